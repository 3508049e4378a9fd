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
    /// What each piece of a decode has cost on the device, per shape.
    pacer: super::pace::Pacer,
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
            pacer: Default::default(),
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
    /// charged as the allocator charges them (a replay of its allocations), beside buffers
    /// of `held` f32 values that the job holds throughout.
    pub fn peak_bytes(&self, batch: usize, height: usize, width: usize, held: &[u64]) -> u64 {
        let cfg = &self.cfg;
        let lc = cfg.latent_channels as u64;
        let mut sim = Sim::holding(held);
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
        x = cx.resnet_halves(x, rev[0]);
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
        x = cx.resnet_halves(x, rev[0]);
        for (i, &c) in rev.iter().enumerate() {
            for _ in 0..=cfg.layers_per_block {
                x = cx.resnet_halves(x, c);
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
    pub fn tiled_peak_bytes(&self, height: usize, width: usize, tile: usize, held: &[u64]) -> u64 {
        let tl = (tile / self.scale()).max(1);
        self.peak_bytes(1, height.min(tl), width.min(tl), held)
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
        let mut d = self.start_decode(latents, batch, height, width, None, owner)?;
        loop {
            if let (Some(out), _) = self.step_decode(&mut d, None)? {
                return Ok(out);
            }
        }
    }

    /// The pieces of one decode call, in order.
    fn pieces(&self) -> Vec<VaePiece> {
        let cfg = &self.cfg;
        let mut out = vec![
            VaePiece::In,
            VaePiece::MidResnet(0, false),
            VaePiece::MidResnet(0, true),
        ];
        if cfg.mid_block_add_attention {
            out.push(VaePiece::MidAttention);
        }
        out.extend([VaePiece::MidResnet(1, false), VaePiece::MidResnet(1, true)]);
        let levels = cfg.block_out_channels.len();
        for i in 0..levels {
            for j in 0..=cfg.layers_per_block {
                out.extend([VaePiece::Resnet(i, j, false), VaePiece::Resnet(i, j, true)]);
            }
            if i + 1 < levels {
                out.push(VaePiece::Upsample(i));
            }
        }
        out.push(VaePiece::Out);
        out
    }

    /// A decode as a state machine: the whole batch at once (`tile` None) or image by image in
    /// tiles of `tile` pixels, each run by [`Self::step_decode`] one chunk at a time.
    pub fn start_decode(
        &self,
        latents: &[f32],
        batch: usize,
        height: usize,
        width: usize,
        tile: Option<usize>,
        owner: OwnerId,
    ) -> Result<Decode, TensorError> {
        let scale = self.scale();
        let lc = self.cfg.latent_channels as usize;
        let bad = |m: String| TensorError::File(self.tensors.path().into(), m);
        if latents.len() != batch * lc * height * width {
            return Err(bad(format!(
                "{} latent values are not {batch} × {lc} × {height} × {width}",
                latents.len()
            )));
        }
        let mut grid = Vec::new();
        let mut tiled = None;
        match tile {
            Some(tile) if tile < 2 * scale || !tile.is_multiple_of(scale) => {
                return Err(bad(format!(
                    "a VAE tile of {tile} pixels is not a multiple of {scale} of at least {}",
                    2 * scale
                )));
            }
            // One tile covers it: diffusers decodes such latents whole, and so do we.
            Some(tile) if height > tile / scale || width > tile / scale => {
                let tl = tile / scale;
                let step = (((tl as f64) * 0.75) as usize).max(1);
                for b in 0..batch {
                    for i in (0..height).step_by(step) {
                        for j in (0..width).step_by(step) {
                            let (th, tw) = ((height - i).min(tl), (width - j).min(tl));
                            grid.push(Tile { b, i, j, th, tw });
                        }
                    }
                }
                tiled = Some(tile);
            }
            _ => grid.push(Tile {
                b: 0,
                i: 0,
                j: 0,
                th: height,
                tw: width,
            }),
        }
        Ok(Decode {
            latents: latents.to_vec(),
            batch,
            height,
            width,
            tile: tiled,
            owner,
            grid,
            decoded: Vec::new(),
            call: None,
        })
    }

    /// Runs the next chunk of a decode: pieces of the current tile's decoder until the next
    /// one's learned device time would overrun `budget` (None: the whole tile). Returns the
    /// images (batch × out_channels × pixels) once every tile is done, and the device time.
    pub fn step_decode(
        &self,
        d: &mut Decode,
        budget: Option<std::time::Duration>,
    ) -> Result<(Option<Vec<f32>>, std::time::Duration), TensorError> {
        let started = std::time::Instant::now();
        let lc = self.cfg.latent_channels as usize;
        let t = d.grid[d.decoded.len()];
        let (batch, h, w) = match d.tile {
            None => (d.batch, d.height, d.width),
            Some(_) => (1, t.th, t.tw),
        };
        let mut call = match d.call.take() {
            Some(c) => c,
            None => {
                let lat = if d.tile.is_none() {
                    d.latents.clone()
                } else {
                    let (hh, ww) = (d.height, d.width);
                    let img = &d.latents[t.b * lc * hh * ww..(t.b + 1) * lc * hh * ww];
                    let mut sub = Vec::with_capacity(lc * t.th * t.tw);
                    for c in 0..lc {
                        for y in t.i..t.i + t.th {
                            let at = (c * hh + y) * ww + t.j;
                            sub.extend(&img[at..at + t.tw]);
                        }
                    }
                    sub
                };
                VaeCall {
                    latents: Some(lat),
                    x: None,
                    half: None,
                    part: None,
                    next: 0,
                    shape: super::pace::shape_key(batch, h, w),
                }
            }
        };
        let (out, took) = self.run_pieces(&mut call, batch, h, w, d.owner, budget, started)?;
        let Some(px) = out else {
            d.call = Some(call);
            return Ok((None, took));
        };
        d.decoded.push(px);
        if d.decoded.len() < d.grid.len() {
            return Ok((None, took));
        }
        let images = match d.tile {
            None => d.decoded.pop().expect("one decode"),
            Some(tile) => self.blend(d, tile),
        };
        Ok((Some(images), took))
    }

    /// Runs pieces of one decoder call (see [`Self::step_decode`]).
    #[allow(clippy::too_many_arguments)]
    fn run_pieces(
        &self,
        call: &mut VaeCall,
        batch: usize,
        height: usize,
        width: usize,
        owner: OwnerId,
        budget: Option<std::time::Duration>,
        started: std::time::Instant,
    ) -> Result<(Option<Vec<f32>>, std::time::Duration), TensorError> {
        let cfg = &self.cfg;
        let lc = cfg.latent_channels as usize;
        let mut cx = Cx {
            t: &self.tensors,
            dev: &self.device,
            owner,
            s: self.device.stream()?,
            batch: batch as u64,
            groups: cfg.norm_num_groups as u64,
            eps: EPS,
        };
        cx.s.set_profiling(budget.is_some());
        let rev: Vec<u64> = cfg
            .block_out_channels
            .iter()
            .rev()
            .map(|&c| c as u64)
            .collect();
        let pieces = self.pieces();
        let mut paced = super::pace::Chunk::new(&self.pacer, call.shape, budget, started);
        let mut x = call.x.take();
        let mut out = None;
        let lost = |what: &str| {
            TensorError::File(
                self.tensors.path().into(),
                format!("the decode lost its {what}"),
            )
        };
        while call.next < pieces.len() {
            let piece = pieces[call.next];
            if let VaePiece::In = piece {
                if !paced.admit(call.next) {
                    break;
                }
                call.next += 1;
                let shift = cfg.shift_factor.unwrap_or(0.0);
                let z: Vec<f32> = call
                    .latents
                    .take()
                    .unwrap_or_default()
                    .iter()
                    .map(|v| v / cfg.scaling_factor + shift)
                    .collect();
                let mut a = Act {
                    buf: cx.upload(&z)?,
                    c: lc as u64,
                    h: height as u64,
                    w: width as u64,
                };
                if cfg.use_post_quant_conv {
                    a = cx.conv("post_quant_conv", &a, lc as u64, 1, 1)?;
                }
                x = Some(cx.conv("decoder.conv_in", &a, rev[0], 3, 1)?);
                continue;
            }
            if let VaePiece::MidAttention = piece {
                if !paced.admit(call.next) {
                    break;
                }
                call.next += 1;
                let a = x.take().ok_or_else(|| lost("activation"))?;
                x = Some(self.attention(&mut cx, "decoder.mid_block.attentions.0", &a)?);
                continue;
            }
            // Every other piece ends in a same-size 3×3 convolution, run in bands of output rows
            // when it would overrun the chunk on its own.
            // (An upsample's input is gone once its band started.)
            let (co, oh, done) = match (&call.part, piece, &x) {
                (Some(p), ..) => (p.out.c, p.out.h, p.done),
                (None, VaePiece::MidResnet(..), Some(a)) => (rev[0], a.h, 0),
                (None, VaePiece::Resnet(i, ..), Some(a)) => (rev[i], a.h, 0),
                (None, VaePiece::Upsample(i), Some(a)) => (rev[i], 2 * a.h, 0),
                (None, _, Some(a)) => (cfg.out_channels as u64, a.h, 0),
                (None, _, None) => return Err(lost("activation")),
            };
            let total = cx.batch * oh;
            let rows = paced.admit_rows(call.next, total - done, total);
            if rows == 0 {
                break;
            }
            let resnet = |piece| match piece {
                VaePiece::MidResnet(j, _) => format!("decoder.mid_block.resnets.{j}"),
                VaePiece::Resnet(i, j, _) => format!("decoder.up_blocks.{i}.resnets.{j}"),
                _ => unreachable!("a resnet piece"),
            };
            let mut part = match call.part.take() {
                Some(p) => p,
                None => {
                    let a = x.as_ref().ok_or_else(|| lost("activation"))?;
                    let input = match piece {
                        VaePiece::MidResnet(_, false) | VaePiece::Resnet(_, _, false) => {
                            cx.norm(&format!("{}.norm1", resnet(piece)), a, true)?
                        }
                        VaePiece::MidResnet(_, true) | VaePiece::Resnet(_, _, true) => {
                            let h = call.half.as_ref().ok_or_else(|| lost("resnet half"))?;
                            cx.norm(&format!("{}.norm2", resnet(piece)), h, true)?
                        }
                        VaePiece::Upsample(_) => {
                            let up = cx.upsample(a, (a.h * 2, a.w * 2))?;
                            x = None;
                            up
                        }
                        _ => cx.norm("decoder.conv_norm_out", a, true)?,
                    };
                    let out = Act {
                        buf: cx.alloc(cx.batch * co * input.h * input.w)?,
                        c: co,
                        ..input
                    };
                    Part {
                        input,
                        out,
                        done: 0,
                    }
                }
            };
            let name = match piece {
                VaePiece::MidResnet(_, false) | VaePiece::Resnet(_, _, false) => {
                    format!("{}.conv1", resnet(piece))
                }
                VaePiece::MidResnet(_, true) | VaePiece::Resnet(_, _, true) => {
                    format!("{}.conv2", resnet(piece))
                }
                VaePiece::Upsample(i) => format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                _ => "decoder.conv_out".to_string(),
            };
            cx.conv_rows(
                &name,
                &part.input,
                &part.out,
                3,
                part.done..part.done + rows,
            )?;
            part.done += rows;
            if part.done < total {
                call.part = Some(part);
                break;
            }
            call.next += 1;
            let Part { input, out: h, .. } = part;
            drop(input);
            match piece {
                VaePiece::MidResnet(_, false) | VaePiece::Resnet(_, _, false) => {
                    cx.flush()?;
                    call.half = Some(h);
                }
                VaePiece::MidResnet(_, true) | VaePiece::Resnet(_, _, true) => {
                    let a = x.take().ok_or_else(|| lost("activation"))?;
                    let half = call.half.take().ok_or_else(|| lost("resnet half"))?;
                    let n = cx.len(&h);
                    let skip = if a.c != co {
                        cx.conv(&format!("{}.conv_shortcut", resnet(piece)), &a, co, 1, 1)?
                    } else {
                        cx.copy(&a)?
                    };
                    ops::add(
                        &mut cx.s,
                        view(&h.buf, n),
                        view(&skip.buf, n),
                        view(&h.buf, n),
                    )?;
                    cx.flush()?;
                    drop(half);
                    x = Some(h);
                }
                VaePiece::Upsample(_) => x = Some(h),
                _ => out = Some(h),
            }
        }
        cx.s.finish()?;
        let took = paced.end(&mut cx.s);
        if let Some(out) = out {
            let n = cx.batch * out.c * out.h * out.w;
            return Ok((Some(self.device.read_f32(&out.buf, 0, n)?), took));
        }
        call.x = x;
        Ok((None, took))
    }

    /// Decodes in overlapping tiles of `tile` pixels (a multiple of the VAE's scale), as
    /// diffusers' `tiled_decode` does: tiles start every ¾ tile, each tile's first quarter is
    /// blended linearly with the tile above and the tile to the left, and each tile keeps its
    /// first ¾ (tiles blend with their neighbours as already blended). Memory then follows the
    /// tile size, not the image's. The mid block's attention sees one tile at a time, so the
    /// result is close to, not equal to, an untiled decode.
    pub fn decode_tiled(
        &self,
        latents: &[f32],
        batch: usize,
        height: usize,
        width: usize,
        tile: usize,
        owner: OwnerId,
    ) -> Result<Vec<f32>, TensorError> {
        let mut d = self.start_decode(latents, batch, height, width, Some(tile), owner)?;
        loop {
            if let (Some(out), _) = self.step_decode(&mut d, None)? {
                return Ok(out);
            }
        }
    }

    /// Puts a tiled decode's tiles together (see [`Self::decode_tiled`]).
    fn blend(&self, d: &mut Decode, tile: usize) -> Vec<f32> {
        let scale = self.scale();
        let oc = self.cfg.out_channels as usize;
        let blend = ((tile as f64) * 0.25) as usize;
        let keep = tile - blend;
        let (ph, pw) = (d.height * scale, d.width * scale);
        let mut out = vec![0f32; d.batch * oc * ph * pw];
        let mut decoded = std::mem::take(&mut d.decoded).into_iter();
        for b in 0..d.batch {
            // Decoded tiles by (row, column): their pixels and their size.
            let mut rows: Vec<Vec<(Vec<f32>, usize, usize)>> = Vec::new();
            for t in d.grid.iter().filter(|t| t.b == b) {
                if t.j == 0 {
                    rows.push(Vec::new());
                }
                let px = decoded.next().expect("a decode per tile");
                rows.last_mut()
                    .expect("a row")
                    .push((px, t.th * scale, t.tw * scale));
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
        out
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

/// A piece of one decoder call.
#[derive(Clone, Copy, Debug)]
enum VaePiece {
    /// Latent scaling, the post-quant conv and conv_in.
    In,
    /// A resnet's first half (false: norm1, conv1) or its second (true: norm2, conv2, the
    /// shortcut), so that no piece holds more than one full-resolution convolution.
    MidResnet(u32, bool),
    MidAttention,
    /// Up level i's resnet j, a half.
    Resnet(usize, u32, bool),
    Upsample(usize),
    /// Group norm, SiLU and conv_out.
    Out,
}

/// Where one tile sits: image b, latent rows i.., columns j.., th × tw latents.
#[derive(Clone, Copy, Debug)]
struct Tile {
    b: usize,
    i: usize,
    j: usize,
    th: usize,
    tw: usize,
}

/// One decoder call between chunks: its latents until the first piece uploads them, then its
/// activation on the device.
struct VaeCall {
    latents: Option<Vec<f32>>,
    x: Option<Act>,
    /// A resnet's first half's output, between its two pieces.
    half: Option<Act>,
    /// The piece under way when its convolution runs in bands across chunks.
    part: Option<Part>,
    next: usize,
    shape: u64,
}

/// A piece's convolution between its bands: its input, its output, and the output rows done
/// (of batch · height).
struct Part {
    input: Act,
    out: Act,
    done: u64,
}

/// A decode in progress (see [`Vae::start_decode`]).
pub struct Decode {
    latents: Vec<f32>,
    batch: usize,
    height: usize,
    width: usize,
    /// The tile size when decoding in tiles.
    tile: Option<usize>,
    owner: OwnerId,
    /// The calls to make: one for a whole decode, one per tile otherwise.
    grid: Vec<Tile>,
    /// The pixels of each call done so far.
    decoded: Vec<Vec<f32>>,
    call: Option<VaeCall>,
}
