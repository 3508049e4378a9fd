//! SDXL's UNet (diffusers' UNet2DConditionModel with text_time conditioning) on the GPU.
//!
//! One call: timestep → sinusoidal embedding → MLP; the added conditions (SDXL's six size/crop
//! numbers through their own sinusoidal embedding, beside the pooled text embedding) → MLP,
//! summed with it. Then conv_in; down levels of resnet blocks (group norm + SiLU, 3×3 conv, the
//! projected time embedding added per channel, group norm + SiLU, 3×3 conv, a 1×1 shortcut when
//! the channels change) each followed on cross-attention levels by a spatial transformer (group
//! norm, linear in, blocks of self-attention, cross-attention to the text context and a GEGLU
//! feed-forward, each pre-normed and residual, linear out, residual), and a stride-2 conv down;
//! the mid block (resnet, transformer, resnet); up levels whose resnets take the matching skip
//! concatenated on channels, with transformers and a nearest ×2 + conv up; group norm, SiLU,
//! conv_out. Every size comes from [`UnetShape`]; every tensor's shape is checked at load.
//!
//! Activations are NCHW f32, the transformer blocks work on token rows (NHWC, by transposing),
//! and each op's output is a new buffer charged to the caller's owner; a call's buffers go when
//! it returns.

use std::path::Path;

use halo_kernels::ops;
use halo_kernels::{Device, LoadStrategy, OwnerId};

use super::config::UnetShape;
use super::graph::{view, Act, Cx};
use super::tensors::{DeviceTensors, TensorError};

pub struct Unet {
    shape: UnetShape,
    tensors: DeviceTensors,
    device: Device,
}

/// One call's inputs: `batch` latents (the classifier-free-guidance pair is a batch of two).
pub struct UnetInput<'a> {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    /// batch × in_channels × height × width.
    pub sample: &'a [f32],
    pub timestep: f32,
    /// batch × context_tokens × context_dim.
    pub context: &'a [f32],
    pub context_tokens: usize,
    /// batch × pooled dim (text_time only).
    pub text_embeds: &'a [f32],
    /// batch × 6 (text_time only).
    pub time_ids: &'a [f32],
}

/// diffusers' `get_timestep_embedding`: half sines and half cosines of t · 10000^(−i/(half −
/// shift)), cosines first when `flip`.
pub fn timestep_embedding(t: &[f32], dim: usize, flip: bool, shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let mut out = Vec::with_capacity(t.len() * dim);
    for &x in t {
        let args: Vec<f32> = (0..half)
            .map(|i| {
                let e = -(10000f32).ln() * i as f32 / (half as f32 - shift);
                x * e.exp()
            })
            .collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
        if flip {
            out.extend(&cos);
            out.extend(&sin);
        } else {
            out.extend(&sin);
            out.extend(&cos);
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

impl Unet {
    pub fn load(
        device: &Device,
        path: &Path,
        prefix: &str,
        shape: UnetShape,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<Unet, TensorError> {
        let tensors = DeviceTensors::load(device, path, prefix, strategy, owner)?;
        Ok(Unet {
            shape,
            tensors,
            device: device.clone(),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.tensors.bytes()
    }

    /// The noise prediction for `input`: batch × out_channels × height × width.
    pub fn forward(&self, input: &UnetInput<'_>, owner: OwnerId) -> Result<Vec<f32>, TensorError> {
        let mut cx = Cx {
            t: &self.tensors,
            dev: &self.device,
            owner,
            s: self.device.stream()?,
            batch: input.batch as u64,
            groups: self.shape.groups as u64,
            eps: self.shape.norm_eps,
        };
        let sh = &self.shape;
        let b = input.batch;
        // Time embedding, with SDXL's added conditions.
        let c0 = sh.levels[0].channels as usize;
        let t_in = timestep_embedding(
            &vec![input.timestep; b],
            c0,
            sh.flip_sin_to_cos,
            sh.freq_shift,
        );
        let t_in = cx.upload(&t_in)?;
        let temb_dim = sh.time_embed_dim as u64;
        let mut emb = cx.mlp("time_embedding", &t_in, c0 as u64, temb_dim)?;
        if let Some((dim, proj_in)) = sh.text_time {
            let ids = timestep_embedding(
                input.time_ids,
                dim as usize,
                sh.flip_sin_to_cos,
                sh.freq_shift,
            );
            let per = 6 * dim as usize;
            let pooled = input.text_embeds.len() / b;
            if per + pooled != proj_in as usize {
                return Err(TensorError::File(
                    self.tensors.path().into(),
                    format!(
                        "added conditions are {per} + {pooled} values, the model takes {proj_in}"
                    ),
                ));
            }
            let mut aug = Vec::with_capacity(b * proj_in as usize);
            for i in 0..b {
                aug.extend(&input.text_embeds[i * pooled..(i + 1) * pooled]);
                aug.extend(&ids[i * per..(i + 1) * per]);
            }
            let aug = cx.upload(&aug)?;
            let add = cx.mlp("add_embedding", &aug, proj_in as u64, temb_dim)?;
            let n = cx.batch * temb_dim;
            ops::add(&mut cx.s, view(&emb, n), view(&add, n), view(&emb, n))?;
        }
        // Resnets take silu(emb).
        let n = cx.batch * temb_dim;
        let emb_act = cx.alloc(n)?;
        ops::silu(&mut cx.s, view(&emb, n), view(&emb_act, n))?;
        emb = emb_act;
        let context = cx.upload(input.context)?;
        let ctx = (
            &context,
            input.context_tokens as u64,
            (input.context.len() / b / input.context_tokens) as u64,
        );

        let sample = cx.upload(input.sample)?;
        let x = Act {
            buf: sample,
            c: sh.in_channels as u64,
            h: input.height as u64,
            w: input.width as u64,
        };
        let mut x = cx.conv("conv_in", &x, sh.levels[0].channels as u64, 3, 1)?;
        let mut skips: Vec<Act> = vec![cx.copy(&x)?];
        let n_levels = sh.levels.len();
        for (i, level) in sh.levels.iter().enumerate() {
            for j in 0..level.resnets {
                let p = format!("down_blocks.{i}.resnets.{j}");
                x = cx.resnet(&p, &x, level.channels as u64, Some((&emb, temb_dim)))?;
                if level.transformer_depth > 0 {
                    let p = format!("down_blocks.{i}.attentions.{j}");
                    x = cx.transformer(&p, &x, level.transformer_depth, level.heads, ctx)?;
                }
                skips.push(cx.copy(&x)?);
            }
            if i + 1 < n_levels {
                x = cx.conv_stride(
                    &format!("down_blocks.{i}.downsamplers.0.conv"),
                    &x,
                    level.channels as u64,
                    2,
                )?;
                skips.push(cx.copy(&x)?);
            }
        }
        let last = &sh.levels[n_levels - 1];
        x = cx.resnet(
            "mid_block.resnets.0",
            &x,
            last.channels as u64,
            Some((&emb, temb_dim)),
        )?;
        x = cx.transformer(
            "mid_block.attentions.0",
            &x,
            sh.mid_transformer_depth,
            last.heads,
            ctx,
        )?;
        x = cx.resnet(
            "mid_block.resnets.1",
            &x,
            last.channels as u64,
            Some((&emb, temb_dim)),
        )?;
        for (u, level) in sh.levels.iter().rev().enumerate() {
            for j in 0..=level.resnets {
                let skip = skips.pop().expect("one skip per up resnet");
                x = cx.concat(&x, &skip)?;
                x = cx.resnet(
                    &format!("up_blocks.{u}.resnets.{j}"),
                    &x,
                    level.channels as u64,
                    Some((&emb, temb_dim)),
                )?;
                if level.transformer_depth > 0 {
                    let p = format!("up_blocks.{u}.attentions.{j}");
                    x = cx.transformer(&p, &x, level.transformer_depth, level.heads, ctx)?;
                }
            }
            if u + 1 < n_levels {
                // To the next skip's size, which is 2× unless a side was odd on the way down.
                let to = skips.last().map(|s| (s.h, s.w)).expect("skips remain");
                x = cx.upsample(&x, to)?;
                x = cx.conv(
                    &format!("up_blocks.{u}.upsamplers.0.conv"),
                    &x,
                    level.channels as u64,
                    3,
                    1,
                )?;
            }
        }
        x = cx.norm("conv_norm_out", &x, true)?;
        let out = cx.conv("conv_out", &x, sh.out_channels as u64, 3, 1)?;
        cx.s.finish()?;
        let n = cx.batch * out.c * out.h * out.w;
        Ok(self.device.read_f32(&out.buf, 0, n)?)
    }
}
