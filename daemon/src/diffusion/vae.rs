//! The VAE's decoder (diffusers' AutoencoderKL) on the GPU: latents ÷ scaling_factor (+
//! shift_factor), the 1×1 post-quant conv, conv_in, the mid block (resnet, single-head
//! self-attention over every pixel, resnet), up levels of resnets with nearest ×2 + conv between
//! them, group norm, SiLU, conv_out to RGB in about [-1, 1]. Sizes come from the VAE's config;
//! group norms use ε = 1e-6 as diffusers' VAE does.

use std::path::Path;

use halo_kernels::ops::{self, SeqAttention};
use halo_kernels::{Device, LoadStrategy, OwnerId};

use super::config::VaeConfig;
use super::graph::{view, Act, Cx};
use super::tensors::{DeviceTensors, TensorError};

pub struct Vae {
    cfg: VaeConfig,
    tensors: DeviceTensors,
    device: Device,
}

const EPS: f32 = 1e-6;

impl Vae {
    pub fn load(
        device: &Device,
        path: &Path,
        prefix: &str,
        cfg: VaeConfig,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<Vae, TensorError> {
        let bad = |m: String| TensorError::File(path.into(), m);
        if cfg.act_fn != "silu" {
            return Err(bad(format!("act_fn {:?} is not supported", cfg.act_fn)));
        }
        if cfg.block_out_channels.is_empty()
            || cfg.up_block_types.len() != cfg.block_out_channels.len()
            || cfg.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
        {
            return Err(bad(
                "the decoder must have one UpDecoderBlock2D per entry of block_out_channels".into(),
            ));
        }
        if let Some(c) = cfg
            .block_out_channels
            .iter()
            .find(|&&c| cfg.norm_num_groups == 0 || !c.is_multiple_of(cfg.norm_num_groups))
        {
            return Err(bad(format!(
                "{c} channels are not a multiple of norm_num_groups = {}",
                cfg.norm_num_groups
            )));
        }
        let tensors = DeviceTensors::load(device, path, prefix, strategy, owner)?;
        Ok(Vae {
            cfg,
            tensors,
            device: device.clone(),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.tensors.bytes()
    }

    /// Pixels per latent along each side: 2^(levels − 1).
    pub fn scale(&self) -> usize {
        1 << (self.cfg.block_out_channels.len() - 1)
    }

    /// Decodes `batch` latents of latent_channels × height × width (as the sampler leaves them,
    /// before the scaling factor is undone) to batch × out_channels × (scale·height) ×
    /// (scale·width).
    pub fn decode(
        &self,
        latents: &[f32],
        batch: usize,
        height: usize,
        width: usize,
        owner: OwnerId,
    ) -> Result<Vec<f32>, TensorError> {
        let cfg = &self.cfg;
        let lc = cfg.latent_channels as usize;
        if latents.len() != batch * lc * height * width {
            return Err(TensorError::File(
                self.tensors.path().into(),
                format!(
                    "{} latent values are not {batch} × {lc} × {height} × {width}",
                    latents.len()
                ),
            ));
        }
        let shift = cfg.shift_factor.unwrap_or(0.0);
        let z: Vec<f32> = latents
            .iter()
            .map(|v| v / cfg.scaling_factor + shift)
            .collect();
        let mut cx = Cx {
            t: &self.tensors,
            dev: &self.device,
            owner,
            s: self.device.stream()?,
            batch: batch as u64,
            groups: cfg.norm_num_groups as u64,
            eps: EPS,
        };
        let mut x = Act {
            buf: cx.upload(&z)?,
            c: lc as u64,
            h: height as u64,
            w: width as u64,
        };
        if cfg.use_post_quant_conv {
            x = cx.conv("post_quant_conv", &x, lc as u64, 1, 1)?;
        }
        let rev: Vec<u64> = cfg
            .block_out_channels
            .iter()
            .rev()
            .map(|&c| c as u64)
            .collect();
        x = cx.conv("decoder.conv_in", &x, rev[0], 3, 1)?;
        x = cx.resnet("decoder.mid_block.resnets.0", &x, rev[0], None)?;
        if cfg.mid_block_add_attention {
            x = self.attention(&mut cx, "decoder.mid_block.attentions.0", &x)?;
        }
        x = cx.resnet("decoder.mid_block.resnets.1", &x, rev[0], None)?;
        for (i, &c) in rev.iter().enumerate() {
            for j in 0..=cfg.layers_per_block {
                x = cx.resnet(&format!("decoder.up_blocks.{i}.resnets.{j}"), &x, c, None)?;
            }
            if i + 1 < rev.len() {
                x = cx.upsample(&x, (x.h * 2, x.w * 2))?;
                x = cx.conv(
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    &x,
                    c,
                    3,
                    1,
                )?;
            }
        }
        x = cx.norm("decoder.conv_norm_out", &x, true)?;
        let out = cx.conv("decoder.conv_out", &x, cfg.out_channels as u64, 3, 1)?;
        cx.s.finish()?;
        let n = cx.batch * out.c * out.h * out.w;
        Ok(self.device.read_f32(&out.buf, 0, n)?)
    }

    /// The mid block's attention: group norm, one head over all pixels (q, k, v and out with
    /// biases), residual.
    fn attention(&self, cx: &mut Cx<'_>, p: &str, x: &Act) -> Result<Act, TensorError> {
        let (c, hw) = (x.c, x.h * x.w);
        let tokens = cx.batch * hw;
        let n = tokens * c;
        let h = cx.norm(&format!("{p}.group_norm"), x, false)?;
        let rows = cx.alloc(n)?;
        ops::transpose(&mut cx.s, view(&h.buf, n), view(&rows, n), cx.batch, c, hw)?;
        let q = cx.linear(&format!("{p}.to_q"), view(&rows, n), tokens, c, c, true)?;
        let k = cx.linear(&format!("{p}.to_k"), view(&rows, n), tokens, c, c, true)?;
        let v = cx.linear(&format!("{p}.to_v"), view(&rows, n), tokens, c, c, true)?;
        let o = cx.alloc(n)?;
        ops::seq_attention(
            &mut cx.s,
            &SeqAttention {
                batch: cx.batch as u32,
                n_heads: 1,
                head_dim: c as u32,
                n_q: hw as u32,
                n_kv: hw as u32,
                q_stride: c as u32,
                kv_stride: c as u32,
                o_stride: c as u32,
                scale: 1.0 / (c as f32).sqrt(),
                causal: false,
            },
            view(&q, n),
            view(&k, n),
            view(&v, n),
            view(&o, n),
        )?;
        let out = cx.linear(&format!("{p}.to_out.0"), view(&o, n), tokens, c, c, true)?;
        let back = cx.alloc(n)?;
        ops::transpose(&mut cx.s, view(&out, n), view(&back, n), cx.batch, hw, c)?;
        ops::add(&mut cx.s, view(&back, n), view(&x.buf, n), view(&back, n))?;
        Ok(Act { buf: back, ..*x })
    }
}
