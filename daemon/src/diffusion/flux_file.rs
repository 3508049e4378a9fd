//! The Flux transformer as Black Forest Labs ship it (`flux1-dev.safetensors`,
//! `flux1-schnell.safetensors`): their original key names mapped to the diffusers names
//! [`super::flux`] looks up, and the configuration inferred from the shapes.
//!
//! - `img_in`, `txt_in`: `x_embedder`, `context_embedder`; `time_in`, `guidance_in`,
//!   `vector_in` (`in_layer`, `out_layer`): the timestep, guidance and pooled-text MLPs.
//! - `double_blocks.N`: `img_mod.lin` / `txt_mod.lin` the two streams' modulations;
//!   `img_attn.qkv` / `txt_attn.qkv` q, k and v stacked as rows (three row slices);
//!   `*_attn.norm.{query,key}_norm.scale` the per-head RMS norms; `*_attn.proj` the output
//!   projections; `img_mlp.{0,2}` / `txt_mlp.{0,2}` the feed-forwards.
//! - `single_blocks.N`: `modulation.lin`; `linear1` q, k, v and the MLP's input stacked as rows
//!   (four row slices); `norm.{query,key}_norm.scale`; `linear2` the output over [attention |
//!   MLP].
//! - `final_layer.linear` the output; `final_layer.adaLN_modulation.1` the final modulation,
//!   kept under its own name because its halves are (shift, scale), where diffusers' converter
//!   swaps them to `norm_out.linear`'s (scale, shift).
//!
//! dev and schnell differ by `guidance_in`. The shapes give every size but the rotary axes'
//! split of a head, which is FLUX.1's (16, 56, 56) for heads of 128; a model entry may name a
//! diffusers folder whose transformer config says otherwise.

use std::collections::{BTreeSet, HashMap};

use super::config::FluxConfig;
use super::single_file::{entry, index};
use super::tensors::{Entry, Names};
use crate::safetensors::Tensor;

/// The final modulation's name in a BFL file, halves (shift, scale).
pub const FINAL_SHIFT_SCALE: &str = "final_layer.adaLN_modulation.1";

/// Whether a file's tensors are a BFL-layout Flux transformer.
pub fn is_bfl(ts: &[Tensor]) -> bool {
    ts.iter().any(|t| t.name.starts_with("double_blocks."))
        && ts.iter().any(|t| t.name.starts_with("img_in."))
}

pub fn names() -> Names {
    Names::Mapped {
        what: "the Flux transformer of a BFL-layout file",
        map: entries,
    }
}

/// Rows `first..first + rows` of a tensor stored row-major: its own shape and byte range.
fn rows(t: &Tensor, first: u64, count: u64) -> Result<Tensor, String> {
    let total = *t
        .shape
        .first()
        .ok_or_else(|| format!("{} is a scalar", t.name))?;
    if first + count > total {
        return Err(format!(
            "{} has {total} rows, not the {} its parts need",
            t.name,
            first + count
        ));
    }
    let row_bytes = (t.range.end - t.range.start) / total.max(1);
    let mut s = t.clone();
    s.shape[0] = count;
    s.range = t.range.start + first * row_bytes..t.range.start + (first + count) * row_bytes;
    Ok(s)
}

/// `t` cut into row slices of `parts` (in units of `unit` rows), named `names`.
fn split(
    out: &mut Vec<Entry>,
    t: &Tensor,
    unit: u64,
    parts: &[(u64, String)],
) -> Result<(), String> {
    let total: u64 = parts.iter().map(|(n, _)| n * unit).sum();
    if t.shape.first() != Some(&total) {
        return Err(format!(
            "{} has {:?} rows, expected {total}",
            t.name,
            t.shape.first()
        ));
    }
    let mut at = 0;
    for (n, name) in parts {
        out.push(entry(name.clone(), &rows(t, at, n * unit)?));
        at += n * unit;
    }
    Ok(())
}

pub fn entries(ts: &[Tensor]) -> Result<Vec<Entry>, String> {
    let inner = ts
        .iter()
        .find(|t| t.name == "img_in.weight")
        .and_then(|t| t.shape.first().copied())
        .ok_or("no img_in.weight: not a Flux transformer")?;
    let mut out = Vec::new();
    for t in ts {
        let n = t.name.as_str();
        let bad = || format!("unexpected tensor {n}");
        let (stem, leaf) = n.rsplit_once('.').ok_or_else(bad)?;
        let leaf_name = |dif: &str| format!("{dif}.{leaf}");
        let fixed = match stem {
            "img_in" => Some("x_embedder".to_string()),
            "txt_in" => Some("context_embedder".into()),
            "time_in.in_layer" => Some("time_text_embed.timestep_embedder.linear_1".into()),
            "time_in.out_layer" => Some("time_text_embed.timestep_embedder.linear_2".into()),
            "guidance_in.in_layer" => Some("time_text_embed.guidance_embedder.linear_1".into()),
            "guidance_in.out_layer" => Some("time_text_embed.guidance_embedder.linear_2".into()),
            "vector_in.in_layer" => Some("time_text_embed.text_embedder.linear_1".into()),
            "vector_in.out_layer" => Some("time_text_embed.text_embedder.linear_2".into()),
            "final_layer.linear" => Some("proj_out".into()),
            FINAL_SHIFT_SCALE => Some(FINAL_SHIFT_SCALE.into()),
            _ => None,
        };
        if let Some(dif) = fixed {
            out.push(entry(leaf_name(&dif), t));
            continue;
        }
        if let Some(rest) = n.strip_prefix("double_blocks.") {
            let (i, part) = index(rest).ok_or_else(bad)?;
            let d = format!("transformer_blocks.{i}");
            let (pstem, pleaf) = part.rsplit_once('.').ok_or_else(bad)?;
            let to = |x: &str| format!("{d}.{x}.{pleaf}");
            match pstem {
                "img_attn.qkv" | "txt_attn.qkv" => {
                    let names = if pstem.starts_with("img") {
                        ["to_q", "to_k", "to_v"]
                    } else {
                        ["add_q_proj", "add_k_proj", "add_v_proj"]
                    };
                    let parts: Vec<(u64, String)> = names
                        .iter()
                        .map(|x| (1, to(&format!("attn.{x}"))))
                        .collect();
                    split(&mut out, t, inner, &parts)?;
                    continue;
                }
                _ => {}
            }
            let dif = match (pstem, pleaf) {
                ("img_mod.lin", _) => to("norm1.linear"),
                ("txt_mod.lin", _) => to("norm1_context.linear"),
                ("img_attn.norm.query_norm", "scale") => format!("{d}.attn.norm_q.weight"),
                ("img_attn.norm.key_norm", "scale") => format!("{d}.attn.norm_k.weight"),
                ("txt_attn.norm.query_norm", "scale") => format!("{d}.attn.norm_added_q.weight"),
                ("txt_attn.norm.key_norm", "scale") => format!("{d}.attn.norm_added_k.weight"),
                ("img_attn.proj", _) => to("attn.to_out.0"),
                ("txt_attn.proj", _) => to("attn.to_add_out"),
                ("img_mlp.0", _) => to("ff.net.0.proj"),
                ("img_mlp.2", _) => to("ff.net.2"),
                ("txt_mlp.0", _) => to("ff_context.net.0.proj"),
                ("txt_mlp.2", _) => to("ff_context.net.2"),
                _ => return Err(bad()),
            };
            out.push(entry(dif, t));
            continue;
        }
        if let Some(rest) = n.strip_prefix("single_blocks.") {
            let (i, part) = index(rest).ok_or_else(bad)?;
            let d = format!("single_transformer_blocks.{i}");
            let (pstem, pleaf) = part.rsplit_once('.').ok_or_else(bad)?;
            let to = |x: &str| format!("{d}.{x}.{pleaf}");
            let dif = match (pstem, pleaf) {
                ("linear1", _) => {
                    let parts = vec![
                        (1, to("attn.to_q")),
                        (1, to("attn.to_k")),
                        (1, to("attn.to_v")),
                        (4, to("proj_mlp")),
                    ];
                    split(&mut out, t, inner, &parts)?;
                    continue;
                }
                ("modulation.lin", _) => to("norm.linear"),
                ("norm.query_norm", "scale") => format!("{d}.attn.norm_q.weight"),
                ("norm.key_norm", "scale") => format!("{d}.attn.norm_k.weight"),
                ("linear2", _) => to("proj_out"),
                _ => return Err(bad()),
            };
            out.push(entry(dif, t));
            continue;
        }
        return Err(bad());
    }
    Ok(out)
}

/// The transformer's configuration from a BFL file's shapes (see the module's doc for the
/// rotary axes); `described` (a diffusers folder's config) wins where given.
pub fn config(ts: &[Tensor], described: Option<FluxConfig>) -> Result<FluxConfig, String> {
    if let Some(c) = described {
        return Ok(c);
    }
    let m: HashMap<&str, &Tensor> = ts.iter().map(|t| (t.name.as_str(), t)).collect();
    let shape = |name: &str| -> Result<&[u64], String> {
        m.get(name)
            .map(|t| t.shape.as_slice())
            .ok_or_else(|| format!("no {name}"))
    };
    let [inner, cin] = shape("img_in.weight")?[..] else {
        return Err("img_in.weight is not 2-D".into());
    };
    let joint = shape("txt_in.weight")?
        .get(1)
        .copied()
        .ok_or("txt_in.weight is not 2-D")?;
    let pooled = shape("vector_in.in_layer.weight")?
        .get(1)
        .copied()
        .ok_or("vector_in.in_layer.weight is not 2-D")?;
    let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")?
        .first()
        .copied()
        .ok_or("the query norm has no width")?;
    if head_dim == 0 || !inner.is_multiple_of(head_dim) {
        return Err(format!("width {inner} is not whole heads of {head_dim}"));
    }
    let count = |start: &str| -> usize {
        ts.iter()
            .filter_map(|t| t.name.strip_prefix(start).and_then(index).map(|(i, _)| i))
            .collect::<BTreeSet<_>>()
            .len()
    };
    let axes = match head_dim {
        128 => vec![16, 56, 56],
        d => {
            return Err(format!(
                "heads of {d} (not FLUX.1's 128): the rotary axes are unknown; name a \
                 diffusers folder whose transformer config gives axes_dims_rope"
            ))
        }
    };
    let out = shape("final_layer.linear.weight")?
        .first()
        .copied()
        .ok_or("final_layer.linear.weight has no rows")?;
    Ok(FluxConfig {
        patch_size: 1,
        in_channels: cin as u32,
        out_channels: Some(out as u32),
        num_layers: count("double_blocks.") as u32,
        num_single_layers: count("single_blocks.") as u32,
        attention_head_dim: head_dim as u32,
        num_attention_heads: (inner / head_dim) as u32,
        joint_attention_dim: joint as u32,
        pooled_projection_dim: pooled as u32,
        guidance_embeds: m.contains_key("guidance_in.in_layer.weight"),
        axes_dims_rope: axes,
    })
}
