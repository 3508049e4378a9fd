//! The VAE's decoder (diffusers' AutoencoderKL) on the GPU: latents ÷ scaling_factor (+
//! shift_factor), the 1×1 post-quant conv, conv_in, the mid block (resnet, single-head
//! self-attention over every pixel, resnet), up levels of resnets with nearest ×2 + conv between
//! them, group norm, SiLU, conv_out to RGB in about [-1, 1]. Sizes come from the VAE's config;
//! group norms use ε = 1e-6 as diffusers' VAE does.

use std::path::Path;

use halo_kernels::ops::{self, SeqAttention};
use halo_kernels::{charged_bytes, Device, LoadStrategy, OwnerId};

use super::config::VaeConfig;
use super::graph::{view, Act, Cx};
use super::plan::{Sim, SimCx};
use super::tensors::{DeviceTensors, Names, TensorError};

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
        names: impl Into<Names>,
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
        let tensors = DeviceTensors::load(device, path, names, strategy, owner)?;
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

    /// Device bytes [`Self::decode`] holds at most for `batch` latents of `height` × `width`,
    /// charged as the allocator charges them (a replay of its allocations).
    pub fn peak_bytes(&self, batch: usize, height: usize, width: usize) -> u64 {
        let cfg = &self.cfg;
        let lc = cfg.latent_channels as u64;
        let mut sim = Sim::default();
        let mut cx = SimCx {
            sim: &mut sim,
            batch: batch as u64,
        };
        let (h, w) = (height as u64, width as u64);
        let mut x = cx.act(lc, h, w);
        if cfg.use_post_quant_conv {
            x = cx.op(x, lc, h, w, true);
        }
        let rev: Vec<u64> = cfg
            .block_out_channels
            .iter()
            .rev()
            .map(|&c| c as u64)
            .collect();
        x = cx.op(x, rev[0], h, w, true);
        x = cx.resnet(x, rev[0], false);
        if cfg.mid_block_add_attention {
            for _ in 0..7 {
                // norm, rows, q, k, v, o, out
                cx.sim.temp(cx.batch * x.c * x.h * x.w);
            }
            // The attention's state: a maximum and a sum per (image, pixel).
            cx.sim.temp(2 * cx.batch * x.h * x.w);
            let back = cx.act(x.c, x.h, x.w);
            cx.sim.flush();
            cx.sim.free(x.slot);
            x = back;
        }
        x = cx.resnet(x, rev[0], false);
        for (i, &c) in rev.iter().enumerate() {
            for _ in 0..=cfg.layers_per_block {
                x = cx.resnet(x, c, false);
            }
            if i + 1 < rev.len() {
                x = cx.op(x, c, x.h * 2, x.w * 2, true);
                x = cx.op(x, c, x.h, x.w, true);
            }
        }
        x = cx.op(x, x.c, x.h, x.w, true);
        cx.op(x, cfg.out_channels as u64, x.h, x.w, true);
        cx.sim.flush();
        sim.peak()
    }

    /// The most [`Self::decode_tiled`] holds on the device: one tile's decode (the blending is
    /// on the host).
    pub fn tiled_peak_bytes(&self, height: usize, width: usize, tile: usize) -> u64 {
        let tl = (tile / self.scale()).max(1);
        if height <= tl && width <= tl {
            return self.peak_bytes(1, height, width);
        }
        self.peak_bytes(1, height.min(tl), width.min(tl))
    }

    /// The largest single buffer [`Self::decode`] makes for one image of `height` × `width`
    /// latents, in bytes: at each level the wider of its input's and its own channels at that
    /// level's size, and each upsample's output at the next size.
    pub fn largest_buffer(&self, height: usize, width: usize) -> u64 {
        let rev: Vec<u64> = self
            .cfg
            .block_out_channels
            .iter()
            .rev()
            .map(|&c| c as u64)
            .collect();
        let hw = (height * width) as u64;
        let mut most = 0;
        for i in 0..rev.len() {
            let area = hw << (2 * i);
            let input = if i == 0 { rev[0] } else { rev[i - 1] };
            most = most.max(input.max(rev[i]) * area);
            if i + 1 < rev.len() {
                most = most.max(rev[i] * (area << 2));
            }
        }
        charged_bytes(4 * most)
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

    /// Decodes in overlapping tiles of `tile` pixels (a multiple of the VAE's scale), as
    /// diffusers' `tiled_decode` does: tiles start every ¾ tile, each tile's first quarter is
    /// blended linearly with the tile above and the tile to the left, and each tile keeps its
    /// first ¾ (tiles blend with their neighbours as already blended). Memory then follows the tile size, not the image's. The mid block's attention
    /// sees one tile at a time, so the result is close to, not equal to, an untiled decode.
    pub fn decode_tiled(
        &self,
        latents: &[f32],
        batch: usize,
        height: usize,
        width: usize,
        tile: usize,
        owner: OwnerId,
    ) -> Result<Vec<f32>, TensorError> {
        let scale = self.scale();
        let lc = self.cfg.latent_channels as usize;
        let oc = self.cfg.out_channels as usize;
        let bad = |m: String| TensorError::File(self.tensors.path().into(), m);
        if tile < 2 * scale || !tile.is_multiple_of(scale) {
            return Err(bad(format!(
                "a VAE tile of {tile} pixels is not a multiple of {scale} of at least {}",
                2 * scale
            )));
        }
        if latents.len() != batch * lc * height * width {
            return Err(bad(format!(
                "{} latent values are not {batch} × {lc} × {height} × {width}",
                latents.len()
            )));
        }
        let tl = tile / scale;
        if height <= tl && width <= tl {
            // One tile covers it: diffusers decodes such latents whole, and so do we.
            return self.decode(latents, batch, height, width, owner);
        }
        let step = ((tl as f64) * 0.75) as usize;
        let blend = ((tile as f64) * 0.25) as usize;
        let keep = tile - blend;
        let step = step.max(1);
        let (ph, pw) = (height * scale, width * scale);
        let mut out = vec![0f32; batch * oc * ph * pw];
        for b in 0..batch {
            let lat = &latents[b * lc * height * width..(b + 1) * lc * height * width];
            // Decoded tiles by (row, column): their pixels and their size.
            let mut rows: Vec<Vec<(Vec<f32>, usize, usize)>> = Vec::new();
            for i in (0..height).step_by(step) {
                let mut row = Vec::new();
                for j in (0..width).step_by(step) {
                    let (th, tw) = ((height - i).min(tl), (width - j).min(tl));
                    let mut sub = Vec::with_capacity(lc * th * tw);
                    for c in 0..lc {
                        for y in i..i + th {
                            let at = (c * height + y) * width + j;
                            sub.extend(&lat[at..at + tw]);
                        }
                    }
                    let px = self.decode(&sub, 1, th, tw, owner)?;
                    row.push((px, th * scale, tw * scale));
                }
                rows.push(row);
            }
            let mut y0 = 0;
            for i in 0..rows.len() {
                let mut x0 = 0;
                let mut row_h = 0;
                for j in 0..rows[i].len() {
                    let (mut px, h, w) = rows[i][j].clone();
                    if i > 0 {
                        let (above, ah, aw) = &rows[i - 1][j];
                        let e = blend.min(*ah).min(h);
                        for c in 0..oc {
                            for y in 0..e {
                                let t = y as f32 / e as f32;
                                for x in 0..w.min(*aw) {
                                    let a = above[(c * ah + ah - e + y) * aw + x];
                                    let v = &mut px[(c * h + y) * w + x];
                                    *v = a * (1.0 - t) + *v * t;
                                }
                            }
                        }
                    }
                    if j > 0 {
                        let (left, lh, lw) = &rows[i][j - 1];
                        let e = blend.min(*lw).min(w);
                        for c in 0..oc {
                            for y in 0..h.min(*lh) {
                                for x in 0..e {
                                    let t = x as f32 / e as f32;
                                    let a = left[(c * lh + y) * lw + lw - e + x];
                                    let v = &mut px[(c * h + y) * w + x];
                                    *v = a * (1.0 - t) + *v * t;
                                }
                            }
                        }
                    }
                    // Keep the tile's first ¾ (all of it at the image's edge).
                    let (kh, kw) = (h.min(keep).min(ph - y0), w.min(keep).min(pw - x0));
                    for c in 0..oc {
                        for y in 0..kh {
                            let dst = ((b * oc + c) * ph + y0 + y) * pw + x0;
                            out[dst..dst + kw]
                                .copy_from_slice(&px[(c * h + y) * w..(c * h + y) * w + kw]);
                        }
                    }
                    x0 += kw;
                    row_h = kh;
                    // Later tiles blend with this one as blended here, as diffusers' in-place
                    // blending has it.
                    rows[i][j].0 = px;
                }
                y0 += row_h;
            }
        }
        Ok(out)
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
        cx.seq_attention(
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
        // Its temporaries are as large as the activation: free them before the next block.
        cx.flush()?;
        Ok(Act { buf: back, ..*x })
    }
}
