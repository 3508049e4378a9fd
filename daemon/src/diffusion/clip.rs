//! CLIP's text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection) on the GPU:
//! token and position embeddings, pre-norm transformer layers with causal self-attention and a
//! quick-gelu or gelu MLP, the final layer norm, and the projection of the pooled token.
//!
//! SDXL reads two things from it ([`ClipOutput`]): the penultimate hidden states (the output of
//! the second-to-last layer, no final norm) and, from the second encoder, the pooled embedding:
//! the final-normed hidden state at each prompt's first end-of-text token, projected.

use std::path::Path;

use halo_kernels::ops::{self, F32s, SeqAttention, U32s};
use halo_kernels::{Buffer, Device, LoadStrategy, MemoryKind, OwnerId};

use super::config::ClipTextConfig;
use super::plan::Sim;
use super::tensors::{DeviceTensors, Names, TensorError};

pub struct ClipTextEncoder {
    cfg: ClipTextConfig,
    tensors: DeviceTensors,
    device: Device,
    act: Activation,
    projection: Option<u64>,
    /// "text_model." as transformers 4 saves the model, "" as transformers 5 does.
    base: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    QuickGelu,
    Gelu,
}

/// What one batch of prompts encodes to.
pub struct ClipOutput {
    /// batch × 77 × hidden: the second-to-last layer's output.
    pub penultimate: Vec<f32>,
    /// batch × projection_dim, when asked for and the model has a projection.
    pub pooled: Option<Vec<f32>>,
}

impl ClipTextEncoder {
    /// Loads the encoder's weights from `path` (names under `prefix`: "" for a diffusers
    /// `text_encoder*/model.safetensors`).
    pub fn load(
        device: &Device,
        path: &Path,
        names: impl Into<Names>,
        cfg: ClipTextConfig,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<ClipTextEncoder, TensorError> {
        let bad = |m: String| TensorError::File(path.into(), m);
        let act = match cfg.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(bad(format!("hidden_act {other:?} is not supported"))),
        };
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} does not split into {} heads",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if cfg.num_hidden_layers < 2 {
            return Err(bad(
                "SDXL reads the second-to-last layer: at least 2 layers".into(),
            ));
        }
        let tensors = DeviceTensors::load(device, path, names, strategy, owner)?;
        let projection = tensors
            .has("text_projection.weight")
            .then(|| cfg.projection_dim.unwrap_or(cfg.hidden_size) as u64);
        let base = if tensors.has("embeddings.token_embedding.weight") {
            ""
        } else {
            "text_model."
        };
        let enc = ClipTextEncoder {
            cfg,
            tensors,
            device: device.clone(),
            act,
            projection,
            base,
        };
        enc.check()?;
        Ok(enc)
    }

    /// Every tensor the forward pass reads, with its shape, so a wrong file fails at load.
    fn check(&self) -> Result<(), TensorError> {
        let c = self.cfg.hidden_size as u64;
        let f = self.cfg.intermediate_size as u64;
        let t = &self.tensors;
        t.matrix(
            &format!("{}embeddings.token_embedding.weight", self.base),
            &[self.cfg.vocab_size as u64, c],
        )?;
        t.matrix(
            &format!("{}embeddings.position_embedding.weight", self.base),
            &[self.cfg.max_position_embeddings as u64, c],
        )?;
        for l in 0..self.cfg.num_hidden_layers {
            let p = format!("{}encoder.layers.{l}.", self.base);
            for n in ["layer_norm1", "layer_norm2"] {
                t.vector(&format!("{p}{n}.weight"), c)?;
                t.vector(&format!("{p}{n}.bias"), c)?;
            }
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                t.matrix(&format!("{p}self_attn.{n}.weight"), &[c, c])?;
                t.vector(&format!("{p}self_attn.{n}.bias"), c)?;
            }
            t.matrix(&format!("{p}mlp.fc1.weight"), &[f, c])?;
            t.vector(&format!("{p}mlp.fc1.bias"), f)?;
            t.matrix(&format!("{p}mlp.fc2.weight"), &[c, f])?;
            t.vector(&format!("{p}mlp.fc2.bias"), c)?;
        }
        t.vector(&format!("{}final_layer_norm.weight", self.base), c)?;
        t.vector(&format!("{}final_layer_norm.bias", self.base), c)?;
        if let Some(pd) = self.projection {
            t.matrix("text_projection.weight", &[pd, c])?;
        }
        Ok(())
    }

    pub fn hidden_size(&self) -> u32 {
        self.cfg.hidden_size
    }

    pub fn projection_dim(&self) -> Option<u64> {
        self.projection
    }

    /// Device bytes of the weights.
    pub fn bytes(&self) -> u64 {
        self.tensors.bytes()
    }

    /// Device bytes [`Self::encode`] holds at most for `prompts` prompts (all its buffers live
    /// to the end), charged as the allocator charges them.
    pub fn peak_bytes(&self, prompts: usize, pooled: bool) -> u64 {
        let n_ctx = self.cfg.max_position_embeddings as u64;
        let rows = prompts as u64 * n_ctx;
        let (c, f) = (
            self.cfg.hidden_size as u64,
            self.cfg.intermediate_size as u64,
        );
        let mut sim = Sim::default();
        // Token ids and positions (u32, as wide as f32).
        sim.keep(rows);
        sim.keep(rows);
        for _ in 0..7 {
            sim.keep(rows * c);
        }
        sim.keep(rows * f);
        // The attention's state (see `encode`).
        sim.keep(2 * rows * self.cfg.num_attention_heads as u64);
        if let (true, Some(pd)) = (pooled, self.projection_dim()) {
            sim.keep(prompts as u64);
            sim.keep(prompts as u64 * c);
            sim.keep(prompts as u64 * pd);
        }
        sim.peak()
    }

    /// Encodes `ids` (batch × 77 token ids). With `pooled`, also the projected embedding of
    /// each prompt's first `eos` token. Activations are charged to `owner` while it runs.
    pub fn encode(
        &self,
        ids: &[u32],
        eos: u32,
        pooled: bool,
        owner: OwnerId,
    ) -> Result<ClipOutput, TensorError> {
        let n_ctx = self.cfg.max_position_embeddings as usize;
        if ids.is_empty() || !ids.len().is_multiple_of(n_ctx) {
            return Err(TensorError::File(
                self.tensors.path().into(),
                format!("{} token ids are not whole prompts of {n_ctx}", ids.len()),
            ));
        }
        let batch = ids.len() / n_ctx;
        let rows = ids.len() as u64;
        let c = self.cfg.hidden_size as u64;
        let f = self.cfg.intermediate_size as u64;
        let heads = self.cfg.num_attention_heads;
        let dev = &self.device;
        let t = &self.tensors;
        let alloc = |n: u64| dev.alloc(MemoryKind::Device, n.max(1) * 4, owner);
        let ids_buf = upload_u32(dev, ids, owner)?;
        let positions: Vec<u32> = (0..ids.len()).map(|i| (i % n_ctx) as u32).collect();
        let pos_buf = upload_u32(dev, &positions, owner)?;
        let x = alloc(rows * c)?;
        let h = alloc(rows * c)?;
        let q = alloc(rows * c)?;
        let k = alloc(rows * c)?;
        let v = alloc(rows * c)?;
        let a = alloc(rows * c)?;
        let m = alloc(rows * f)?;
        let penultimate = alloc(rows * c)?;
        // The attention's running state: a maximum and a sum per (prompt, head, token).
        let state_len = 2 * rows * heads as u64;
        let state = alloc(state_len)?;
        fn view(b: &Buffer, len: u64) -> F32s<'_> {
            F32s::all(b).sub(0, len)
        }
        let all = |b| view(b, rows * c);
        let mlp = F32s::all(&m).sub(0, rows * f);

        let mut s = dev.stream()?;
        ops::get_rows(
            &mut s,
            t.matrix(
                &format!("{}embeddings.token_embedding.weight", self.base),
                &[self.cfg.vocab_size as u64, c],
            )?,
            U32s::all(&ids_buf),
            all(&x),
        )?;
        ops::get_rows(
            &mut s,
            t.matrix(
                &format!("{}embeddings.position_embedding.weight", self.base),
                &[n_ctx as u64, c],
            )?,
            U32s::all(&pos_buf),
            all(&h),
        )?;
        ops::add(&mut s, all(&x), all(&h), all(&x))?;
        let eps = self.cfg.layer_norm_eps;
        let linear = |s: &mut halo_kernels::Stream,
                      name: &str,
                      out_dim: u64,
                      in_dim: u64,
                      input: F32s<'_>,
                      output: F32s<'_>|
         -> Result<(), TensorError> {
            ops::matmul(
                s,
                t.matrix(&format!("{name}.weight"), &[out_dim, in_dim])?,
                input,
                output,
                rows,
            )?;
            ops::add(
                s,
                output,
                t.vector(&format!("{name}.bias"), out_dim)?,
                output,
            )?;
            Ok(())
        };
        let layers = self.cfg.num_hidden_layers;
        // The pooled path needs the last layer too; the penultimate output alone does not.
        let run_layers = if pooled && self.projection.is_some() {
            layers
        } else {
            layers - 1
        };
        for l in 0..run_layers {
            let p = format!("{}encoder.layers.{l}.", self.base);
            ops::layer_norm(
                &mut s,
                all(&x),
                Some(t.vector(&format!("{p}layer_norm1.weight"), c)?),
                Some(t.vector(&format!("{p}layer_norm1.bias"), c)?),
                all(&h),
                c,
                eps,
            )?;
            linear(
                &mut s,
                &format!("{p}self_attn.q_proj"),
                c,
                c,
                all(&h),
                all(&q),
            )?;
            linear(
                &mut s,
                &format!("{p}self_attn.k_proj"),
                c,
                c,
                all(&h),
                all(&k),
            )?;
            linear(
                &mut s,
                &format!("{p}self_attn.v_proj"),
                c,
                c,
                all(&h),
                all(&v),
            )?;
            let head_dim = self.cfg.hidden_size / heads;
            ops::seq_attention(
                &mut s,
                &SeqAttention {
                    batch: batch as u32,
                    n_heads: heads,
                    head_dim,
                    n_q: n_ctx as u32,
                    n_kv: n_ctx as u32,
                    q_stride: c as u32,
                    kv_stride: c as u32,
                    o_stride: c as u32,
                    scale: 1.0 / (head_dim as f32).sqrt(),
                    causal: true,
                },
                all(&q),
                all(&k),
                all(&v),
                all(&a),
                F32s::all(&state).sub(0, state_len),
            )?;
            linear(
                &mut s,
                &format!("{p}self_attn.out_proj"),
                c,
                c,
                all(&a),
                all(&h),
            )?;
            ops::add(&mut s, all(&x), all(&h), all(&x))?;
            ops::layer_norm(
                &mut s,
                all(&x),
                Some(t.vector(&format!("{p}layer_norm2.weight"), c)?),
                Some(t.vector(&format!("{p}layer_norm2.bias"), c)?),
                all(&h),
                c,
                eps,
            )?;
            linear(&mut s, &format!("{p}mlp.fc1"), f, c, all(&h), mlp)?;
            match self.act {
                Activation::QuickGelu => ops::quick_gelu(&mut s, mlp, mlp)?,
                Activation::Gelu => ops::gelu(&mut s, mlp, mlp)?,
            }
            linear(&mut s, &format!("{p}mlp.fc2"), c, f, mlp, all(&h))?;
            ops::add(&mut s, all(&x), all(&h), all(&x))?;
            if l + 2 == layers {
                s.copy(&x, 0, &penultimate, 0, rows * c * 4)?;
            }
        }
        let mut pooled_out = None;
        if let (true, Some(pd)) = (pooled, self.projection) {
            ops::layer_norm(
                &mut s,
                all(&x),
                Some(t.vector(&format!("{}final_layer_norm.weight", self.base), c)?),
                Some(t.vector(&format!("{}final_layer_norm.bias", self.base), c)?),
                all(&h),
                c,
                eps,
            )?;
            // Each prompt's first end-of-text token (its last token when there is none).
            let picks: Vec<u32> = ids
                .chunks(n_ctx)
                .enumerate()
                .map(|(b, p)| {
                    let at = p.iter().position(|&i| i == eos).unwrap_or(n_ctx - 1);
                    (b * n_ctx + at) as u32
                })
                .collect();
            let pick_buf = upload_u32(dev, &picks, owner)?;
            let picked = alloc(batch as u64 * c)?;
            let out = alloc(batch as u64 * pd)?;
            // Gather the rows with an f32 "embedding table" view of the normed states.
            ops::get_rows(
                &mut s,
                halo_kernels::ops::Weights {
                    buffer: &h,
                    offset: 0,
                    ty: halo_kernels::quant::WeightType::F32,
                    rows,
                    cols: c,
                },
                U32s::all(&pick_buf),
                F32s::all(&picked).sub(0, batch as u64 * c),
            )?;
            ops::matmul(
                &mut s,
                t.matrix("text_projection.weight", &[pd, c])?,
                F32s::all(&picked).sub(0, batch as u64 * c),
                F32s::all(&out).sub(0, batch as u64 * pd),
                batch as u64,
            )?;
            s.finish()?;
            pooled_out = Some(dev.read_f32(&out, 0, batch as u64 * pd)?);
        } else {
            s.finish()?;
        }
        Ok(ClipOutput {
            penultimate: dev.read_f32(&penultimate, 0, rows * c)?,
            pooled: pooled_out,
        })
    }
}

fn upload_u32(dev: &Device, v: &[u32], owner: OwnerId) -> Result<Buffer, TensorError> {
    let mut b = dev.alloc(MemoryKind::Device, (v.len().max(1) * 4) as u64, owner)?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    dev.write(&mut b, 0, &bytes)?;
    Ok(b)
}
