//! SDXL as people download it: one safetensors file in the original (Stability) layout, as
//! `sd_xl_base_1.0.safetensors` ships. The components sit under their own prefixes,
//!
//! - `model.diffusion_model.`: the UNet (`input_blocks`, `middle_block`, `output_blocks`, …),
//! - `conditioner.embedders.0.transformer.`: CLIP-L, already in transformers' names,
//! - `conditioner.embedders.1.model.`: OpenCLIP bigG, in open_clip's names (fused q/k/v,
//!   `text_projection` stored `[in, out]`),
//! - `first_stage_model.`: the VAE (`decoder.up.N.block.M`, `mid.attn_1.q` as 1×1 convolutions),
//!
//! and the file carries no configuration and no tokenizer. This module maps each component's
//! original names to the diffusers names the engine looks up ([`Names::Mapped`]: renames, row
//! slices of the fused projection, one transpose) and infers each component's configuration
//! from the tensor shapes. What shapes cannot say (attention heads, group-norm groups, the
//! activation, the VAE's scaling factor, the noise schedule) is SDXL base's public
//! configuration: 64 channels per attention head, 32 groups, SiLU, 0.13025, scaled-linear betas
//! 0.00085 to 0.012 with leading spacing. A model entry may instead name a diffusers folder
//! (`diffusers_config`) whose configs and tokenizers describe the file, as diffusers'
//! `from_single_file(config=...)` does.

use std::collections::{BTreeSet, HashMap};

use serde_json::json;

use super::config::{ClipTextConfig, SchedulerConfig, UnetConfig, VaeConfig};
use super::tensors::{Entry, Names};
use crate::safetensors::Tensor;

pub const UNET: &str = "model.diffusion_model.";
pub const CLIP_L: &str = "conditioner.embedders.0.transformer.";
pub const CLIP_G: &str = "conditioner.embedders.1.model.";
pub const VAE: &str = "first_stage_model.";

/// Channels per attention head in SDXL's UNet and both CLIP encoders.
const HEAD_DIM: u64 = 64;

/// Whether a file's tensors are an original-layout SDXL checkpoint (they have a UNet under
/// [`UNET`]).
pub fn is_checkpoint(ts: &[Tensor]) -> bool {
    ts.iter().any(|t| t.name.starts_with(UNET))
}

pub fn unet_names() -> Names {
    Names::Mapped {
        what: "the UNet of a single-file checkpoint",
        map: unet_entries,
    }
}

pub fn vae_names() -> Names {
    Names::Mapped {
        what: "the VAE of a single-file checkpoint",
        map: vae_entries,
    }
}

pub fn clip_l_names() -> Names {
    Names::Prefix(CLIP_L.into())
}

pub fn clip_g_names() -> Names {
    Names::Mapped {
        what: "the OpenCLIP text encoder of a single-file checkpoint",
        map: clip_g_entries,
    }
}

/// A component's tensors by their names under `prefix`.
fn under<'a>(ts: &'a [Tensor], prefix: &str) -> HashMap<&'a str, &'a Tensor> {
    ts.iter()
        .filter_map(|t| t.name.strip_prefix(prefix).map(|rest| (rest, t)))
        .collect()
}

/// The shape of matrix `name` (at least two dimensions, so `[0]` and `[1]` exist).
fn shape<'a>(m: &HashMap<&str, &'a Tensor>, prefix: &str, name: &str) -> Result<&'a [u64], String> {
    match m.get(name).map(|t| t.shape.as_slice()) {
        Some(s) if s.len() >= 2 => Ok(s),
        Some(s) => Err(format!("{prefix}{name} has shape {s:?}, not a matrix's")),
        None => Err(format!("no tensor {prefix}{name}")),
    }
}

/// `"12.rest"` as (12, "rest").
pub(crate) fn index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The distinct indices `i` of names `{start}{i}.…`.
fn indices(m: &HashMap<&str, &Tensor>, start: &str) -> BTreeSet<usize> {
    m.keys()
        .filter_map(|k| k.strip_prefix(start).and_then(index).map(|(i, _)| i))
        .collect()
}

/// `name` with the first matching `(from, to)` prefix swapped, under `base`: the one renaming
/// step every component's mapping is made of.
fn swap(base: &str, name: &str, table: &[(&str, &str)]) -> Option<String> {
    table.iter().find_map(|(from, to)| {
        name.strip_prefix(from)
            .map(|leaf| format!("{base}{to}{leaf}"))
    })
}

pub(crate) fn entry(name: String, t: &Tensor) -> Entry {
    Entry {
        name,
        tensor: t.clone(),
        transpose: false,
    }
}

// ---- UNet ------------------------------------------------------------------------------------

/// Resnets in each down level: the first downsampler (`input_blocks.N.0.op`) comes after them.
fn unet_layers_per_block(m: &HashMap<&str, &Tensor>) -> Result<usize, String> {
    let blocks = indices(m, "input_blocks.");
    let first_down = blocks
        .iter()
        .find(|&&i| m.contains_key(format!("input_blocks.{i}.0.op.weight").as_str()));
    match (first_down, blocks.last()) {
        (Some(&i), _) if i >= 2 => Ok(i - 1),
        (None, Some(&last)) if last >= 1 => Ok(last),
        _ => Err("no UNet input blocks".into()),
    }
}

/// A resnet's original inner names to diffusers'.
fn unet_resnet(base: &str, rest: &str) -> Option<String> {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    swap(base, rest, &MAP)
}

/// One UNet name (under [`UNET`]) in diffusers' words; `lpb` is resnets per down level. The
/// spatial transformers' inner names are the same in both layouts.
fn unet_key(rest: &str, lpb: usize) -> Option<String> {
    const FIXED: [(&str, &str); 7] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(s) = swap("", rest, &FIXED) {
        return Some(s);
    }
    if let Some(r) = rest.strip_prefix("middle_block.") {
        let (j, r) = index(r)?;
        return match j {
            0 | 2 => unet_resnet(&format!("mid_block.resnets.{}.", j / 2), r),
            1 => Some(format!("mid_block.attentions.0.{r}")),
            _ => None,
        };
    }
    if let Some(r) = rest.strip_prefix("input_blocks.") {
        let (i, r) = index(r)?;
        let i = i.checked_sub(1)?; // input_blocks.0 is conv_in, matched above
        let (level, k) = (i / (lpb + 1), i % (lpb + 1));
        let (j, r) = index(r)?;
        if k == lpb {
            let leaf = r.strip_prefix("op.")?;
            return (j == 0).then(|| format!("down_blocks.{level}.downsamplers.0.conv.{leaf}"));
        }
        return match j {
            0 => unet_resnet(&format!("down_blocks.{level}.resnets.{k}."), r),
            1 => Some(format!("down_blocks.{level}.attentions.{k}.{r}")),
            _ => None,
        };
    }
    if let Some(r) = rest.strip_prefix("output_blocks.") {
        let (i, r) = index(r)?;
        let (level, k) = (i / (lpb + 1), i % (lpb + 1));
        let (j, r) = index(r)?;
        return match (j, r.strip_prefix("conv.")) {
            (0, _) => unet_resnet(&format!("up_blocks.{level}.resnets.{k}."), r),
            (1 | 2, Some(leaf)) => Some(format!("up_blocks.{level}.upsamplers.0.conv.{leaf}")),
            (1, None) => Some(format!("up_blocks.{level}.attentions.{k}.{r}")),
            _ => None,
        };
    }
    None
}

pub fn unet_entries(ts: &[Tensor]) -> Result<Vec<Entry>, String> {
    let lpb = unet_layers_per_block(&under(ts, UNET))?;
    ts.iter()
        .filter_map(|t| t.name.strip_prefix(UNET).map(|rest| (rest, t)))
        .map(|(rest, t)| {
            unet_key(rest, lpb)
                .map(|name| entry(name, t))
                .ok_or_else(|| format!("unexpected tensor {:?}", t.name))
        })
        .collect()
}

/// Transformer layers of the spatial transformer named `{block}.transformer_blocks.N.…`.
fn depth(m: &HashMap<&str, &Tensor>, block: &str) -> usize {
    indices(m, &format!("{block}.transformer_blocks.")).len()
}

/// The UNet's configuration from its shapes; `pooled` is the second text encoder's projection
/// width (the added embedding takes it beside the six time ids).
pub fn unet_config(ts: &[Tensor], pooled: u64) -> Result<UnetConfig, String> {
    let m = under(ts, UNET);
    let sh = |name: &str| shape(&m, UNET, name);
    let lpb = unet_layers_per_block(&m)?;
    let levels = indices(&m, "input_blocks.")
        .iter()
        .filter(|&&i| m.contains_key(format!("input_blocks.{i}.0.op.weight").as_str()))
        .count()
        + 1;
    let (mut channels, mut depths) = (Vec::new(), Vec::new());
    for level in 0..levels {
        let i = 1 + level * (lpb + 1);
        channels.push(sh(&format!("input_blocks.{i}.0.out_layers.3.weight"))?[0]);
        depths.push(depth(&m, &format!("input_blocks.{i}.1")));
    }
    let ups: Vec<usize> = (0..levels)
        .map(|u| depth(&m, &format!("output_blocks.{}.1", u * (lpb + 1))))
        .collect();
    if ups.iter().rev().ne(depths.iter()) {
        return Err(format!(
            "up levels have {ups:?} transformer layers, not the down levels' {depths:?} reversed"
        ));
    }
    let mid = depth(&m, "middle_block.1");
    if mid == 0 || Some(&mid) != depths.last() {
        return Err(format!(
            "the mid block has {mid} transformer layers; halod runs SDXL's, as many as the last level's ({})",
            depths.last().copied().unwrap_or(0)
        ));
    }
    let (attn, k_proj) = m
        .iter()
        .filter(|(k, _)| k.ends_with(".attn2.to_k.weight"))
        .map(|(k, t)| (*k, t.shape.as_slice()))
        .min()
        .ok_or("no cross-attention (attn2.to_k)")?;
    let proj_in = sh(&attn.replace(".transformer_blocks.0.attn2.to_k.weight", ".proj_in.weight"))?;
    let label = sh("label_emb.0.0.weight")?;
    let time = sh("time_embed.0.weight")?;
    let added = label.get(1).copied().unwrap_or(0);
    if added <= pooled || !(added - pooled).is_multiple_of(6) {
        return Err(format!(
            "the added embedding takes {added} values, not the pooled {pooled} and six time ids"
        ));
    }
    let down: Vec<&str> = depths
        .iter()
        .map(|&d| {
            if d == 0 {
                "DownBlock2D"
            } else {
                "CrossAttnDownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = ups
        .iter()
        .map(|&d| {
            if d == 0 {
                "UpBlock2D"
            } else {
                "CrossAttnUpBlock2D"
            }
        })
        .collect();
    let heads: Vec<u64> = channels.iter().map(|c| (c / HEAD_DIM).max(1)).collect();
    let layers: Vec<usize> = depths.iter().map(|&d| d.max(1)).collect();
    let cfg = json!({
        "in_channels": sh("input_blocks.0.0.weight")?[1],
        "out_channels": sh("out.2.weight")?[0],
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": k_proj[1],
        "transformer_layers_per_block": layers,
        "attention_head_dim": heads,
        "use_linear_projection": proj_in.len() == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (added - pooled) / 6,
        "projection_class_embeddings_input_dim": added,
        "time_embedding_dim": time[0],
        "flip_sin_to_cos": true,
        "freq_shift": 0,
    });
    serde_json::from_value(cfg).map_err(|e| e.to_string())
}

// ---- VAE -------------------------------------------------------------------------------------

pub fn vae_entries(ts: &[Tensor]) -> Result<Vec<Entry>, String> {
    let m = under(ts, VAE);
    let levels = indices(&m, "decoder.up.").len();
    let mut out = Vec::new();
    for (rest, t) in &m {
        // The decoder is what halod runs; the encoder and quant_conv stay in the file.
        if rest.starts_with("encoder.") || rest.starts_with("quant_conv.") {
            continue;
        }
        let name = vae_key(rest, levels).ok_or_else(|| format!("unexpected tensor {}", t.name))?;
        let mut e = entry(name, t);
        // The mid block's attention projections are 1×1 convolutions there, linear here.
        if rest.starts_with("decoder.mid.attn_1.") && e.tensor.shape.len() == 4 {
            e.tensor.shape.truncate(2);
        }
        out.push(e);
    }
    Ok(out)
}

fn vae_resnet(base: &str, rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(leaf) => format!("{base}conv_shortcut.{leaf}"),
        None => format!("{base}{rest}"),
    }
}

fn vae_key(rest: &str, levels: usize) -> Option<String> {
    const FIXED: [(&str, &str); 4] = [
        ("decoder.conv_in.", "decoder.conv_in."),
        ("decoder.conv_out.", "decoder.conv_out."),
        ("decoder.norm_out.", "decoder.conv_norm_out."),
        ("post_quant_conv.", "post_quant_conv."),
    ];
    if let Some(s) = swap("", rest, &FIXED) {
        return Some(s);
    }
    if let Some(r) = rest.strip_prefix("decoder.mid.") {
        if let Some(leaf) = r.strip_prefix("block_1.") {
            return Some(vae_resnet("decoder.mid_block.resnets.0.", leaf));
        }
        if let Some(leaf) = r.strip_prefix("block_2.") {
            return Some(vae_resnet("decoder.mid_block.resnets.1.", leaf));
        }
        let a = r.strip_prefix("attn_1.")?;
        const ATTN: [(&str, &str); 5] = [
            ("norm.", "group_norm."),
            ("q.", "to_q."),
            ("k.", "to_k."),
            ("v.", "to_v."),
            ("proj_out.", "to_out.0."),
        ];
        return swap("decoder.mid_block.attentions.0.", a, &ATTN);
    }
    let (i, r) = index(rest.strip_prefix("decoder.up.")?)?;
    let level = levels.checked_sub(1 + i)?;
    if let Some(r) = r.strip_prefix("block.") {
        let (j, leaf) = index(r)?;
        return Some(vae_resnet(
            &format!("decoder.up_blocks.{level}.resnets.{j}."),
            leaf,
        ));
    }
    let leaf = r.strip_prefix("upsample.conv.")?;
    Some(format!(
        "decoder.up_blocks.{level}.upsamplers.0.conv.{leaf}"
    ))
}

/// The VAE's configuration from the decoder's shapes, with SDXL's scaling factor.
pub fn vae_config(ts: &[Tensor]) -> Result<VaeConfig, String> {
    let m = under(ts, VAE);
    let sh = |name: &str| shape(&m, VAE, name);
    let levels = indices(&m, "decoder.up.").len();
    if levels == 0 {
        return Err(format!("no tensors {VAE}decoder.up.N"));
    }
    let channels = (0..levels)
        .map(|i| sh(&format!("decoder.up.{i}.block.0.conv2.weight")).map(|s| s[0]))
        .collect::<Result<Vec<_>, _>>()?;
    let resnets = indices(&m, "decoder.up.0.block.").len();
    let post = m.contains_key("post_quant_conv.weight");
    let cfg = json!({
        "in_channels": 3,
        "out_channels": sh("decoder.conv_out.weight")?[0],
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "block_out_channels": channels,
        "layers_per_block": resnets.saturating_sub(1),
        "latent_channels": sh("decoder.conv_in.weight")?[1],
        "scaling_factor": 0.13025,
        "use_post_quant_conv": post,
        "use_quant_conv": m.contains_key("quant_conv.weight"),
        "mid_block_add_attention": m.contains_key("decoder.mid.attn_1.q.weight"),
    });
    serde_json::from_value(cfg).map_err(|e| e.to_string())
}

// ---- text encoders ---------------------------------------------------------------------------

pub fn clip_g_entries(ts: &[Tensor]) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (rest, t) in under(ts, CLIP_G) {
        let fixed = match rest {
            "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
            "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
            "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
            "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
            "logit_scale" => continue,
            _ => None,
        };
        if let Some(name) = fixed {
            out.push(entry(name.into(), t));
            continue;
        }
        if rest == "text_projection" {
            out.push(Entry {
                name: "text_projection.weight".into(),
                tensor: t.clone(),
                transpose: true,
            });
            continue;
        }
        let bad = || format!("unexpected tensor {}", t.name);
        let (k, leaf) = index(
            rest.strip_prefix("transformer.resblocks.")
                .ok_or_else(bad)?,
        )
        .ok_or_else(bad)?;
        let base = format!("text_model.encoder.layers.{k}.");
        if let Some(kind) = leaf.strip_prefix("attn.in_proj_") {
            // q, k and v stacked as rows: three slices of the file's bytes.
            let rows = t.shape.first().copied().unwrap_or(0);
            if rows == 0 || !rows.is_multiple_of(3) {
                return Err(format!("{} has {rows} rows, not 3 × width", t.name));
            }
            let part = (t.range.end - t.range.start) / 3;
            for (p, which) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                let mut slice = t.clone();
                slice.shape[0] = rows / 3;
                slice.range =
                    t.range.start + p as u64 * part..t.range.start + (p as u64 + 1) * part;
                out.push(entry(format!("{base}self_attn.{which}.{kind}"), &slice));
            }
            continue;
        }
        const MAP: [(&str, &str); 5] = [
            ("ln_1.", "layer_norm1."),
            ("ln_2.", "layer_norm2."),
            ("attn.out_proj.", "self_attn.out_proj."),
            ("mlp.c_fc.", "mlp.fc1."),
            ("mlp.c_proj.", "mlp.fc2."),
        ];
        let name = swap(&base, leaf, &MAP).ok_or_else(bad)?;
        out.push(entry(name, t));
    }
    Ok(out)
}

/// A text encoder's configuration from its shapes: `token`, `position`, `fc1` and the layers'
/// prefix name its tensors in the file's own words.
fn clip_config(
    m: &HashMap<&str, &Tensor>,
    prefix: &str,
    names: [&str; 4],
    act: &str,
    projection: Option<u64>,
) -> Result<ClipTextConfig, String> {
    let [token, position, fc1, layers] = names;
    let tok = shape(m, prefix, token)?;
    let fc = shape(m, prefix, fc1)?;
    let hidden = tok.get(1).copied().ok_or("a 1-D token embedding")?;
    let cfg = json!({
        "vocab_size": tok[0],
        "hidden_size": hidden,
        "intermediate_size": fc[0],
        "num_hidden_layers": indices(m, layers).len(),
        "num_attention_heads": (hidden / HEAD_DIM).max(1),
        "max_position_embeddings": shape(m, prefix, position)?[0],
        "hidden_act": act,
        "projection_dim": projection,
    });
    serde_json::from_value(cfg).map_err(|e| e.to_string())
}

/// CLIP-L's configuration (quick GELU, no projection).
pub fn clip_l_config(ts: &[Tensor]) -> Result<ClipTextConfig, String> {
    clip_config(
        &under(ts, CLIP_L),
        CLIP_L,
        [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight",
            "text_model.encoder.layers.",
        ],
        "quick_gelu",
        None,
    )
}

/// OpenCLIP bigG's configuration (GELU, the pooled projection's width from `text_projection`).
pub fn clip_g_config(ts: &[Tensor]) -> Result<ClipTextConfig, String> {
    let m = under(ts, CLIP_G);
    let projection = shape(&m, CLIP_G, "text_projection")?
        .get(1)
        .copied()
        .ok_or("a 1-D text_projection")?;
    clip_config(
        &m,
        CLIP_G,
        [
            "token_embedding.weight",
            "positional_embedding",
            "transformer.resblocks.0.mlp.c_fc.weight",
            "transformer.resblocks.",
        ],
        "gelu",
        Some(projection),
    )
}

/// SDXL base's noise schedule (its `scheduler_config.json`).
pub fn scheduler_config() -> SchedulerConfig {
    serde_json::from_value(json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    }))
    .expect("a valid scheduler config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_the_level_layout() {
        let cases = [
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.0.skip_connection.bias",
                "down_blocks.0.resnets.1.conv_shortcut.bias",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "middle_block.2.out_layers.3.bias",
                "mid_block.resnets.1.conv2.bias",
            ),
            (
                "middle_block.1.proj_out.weight",
                "mid_block.attentions.0.proj_out.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.4.1.norm.weight",
                "up_blocks.1.attentions.1.norm.weight",
            ),
            (
                "output_blocks.8.0.emb_layers.1.weight",
                "up_blocks.2.resnets.2.time_emb_proj.weight",
            ),
            ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
        ];
        for (from, to) in cases {
            assert_eq!(unet_key(from, 2).as_deref(), Some(to), "{from}");
        }
        assert_eq!(unet_key("input_blocks.1.7.x", 2), None);
        assert_eq!(unet_key("something.else", 2), None);
        assert_eq!(unet_key("input_blocks.0.1.weight", 2), None);
    }

    #[test]
    fn vae_levels_count_down_from_the_top() {
        assert_eq!(
            vae_key("decoder.up.0.block.2.nin_shortcut.weight", 4).as_deref(),
            Some("decoder.up_blocks.3.resnets.2.conv_shortcut.weight")
        );
        assert_eq!(
            vae_key("decoder.up.3.upsample.conv.bias", 4).as_deref(),
            Some("decoder.up_blocks.0.upsamplers.0.conv.bias")
        );
        assert_eq!(
            vae_key("decoder.mid.attn_1.proj_out.weight", 4).as_deref(),
            Some("decoder.mid_block.attentions.0.to_out.0.weight")
        );
        assert_eq!(vae_key("decoder.up.4.block.0.conv1.weight", 4), None);
    }
}
