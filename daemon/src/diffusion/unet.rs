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

use halo_kernels::ops::{self, F32s};
use halo_kernels::{Buffer, Device, LoadStrategy, OwnerId, Stream};

use super::config::UnetShape;
use super::graph::{view, Act, Cx};
use super::plan::{Sim, SimCx};
use super::tensors::{DeviceTensors, Names, TensorError};

pub struct Unet {
    shape: UnetShape,
    tensors: DeviceTensors,
    device: Device,
    /// What each piece of a call has cost on the device, per shape.
    pacer: super::pace::Pacer,
}

/// One call's inputs: `batch` latents (the classifier-free-guidance pair is a batch of two).
pub struct UnetInput<'a> {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    /// batch × in_channels × height × width.
    pub sample: Sample<'a>,
    pub timestep: f32,
    /// batch × context_tokens × context_dim.
    pub context: &'a [f32],
    pub context_tokens: usize,
    /// batch × pooled dim (text_time only).
    pub text_embeds: &'a [f32],
    /// batch × 6 (text_time only).
    pub time_ids: &'a [f32],
}

/// A call's latents: from the host (uploaded for the call), or already on the device (the
/// first values of a job's own buffer, which the call only reads).
#[derive(Clone, Copy)]
pub enum Sample<'a> {
    Host(&'a [f32]),
    Device(&'a halo_kernels::Buffer),
}

/// What runs right after a call's last piece, in the same submission: given the stream and
/// the noise prediction (batch × out_channels × height × width) on the device.
pub type Epilogue<'a> = dyn FnMut(&mut Stream, F32s<'_>) -> Result<(), TensorError> + 'a;

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
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The shape the UNet was built from.
    pub fn shape(&self) -> &UnetShape {
        &self.shape
    }

    pub fn load(
        device: &Device,
        path: &Path,
        names: impl Into<Names>,
        shape: UnetShape,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<Unet, TensorError> {
        let tensors = DeviceTensors::load(device, path, names, strategy, owner)?;
        Ok(Unet {
            shape,
            tensors,
            device: device.clone(),
            pacer: Default::default(),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.tensors.bytes()
    }

    /// The noise prediction for `input`: batch × out_channels × height × width.
    pub fn forward(&self, input: &UnetInput<'_>, owner: OwnerId) -> Result<Vec<f32>, TensorError> {
        let mut call = self.begin(input, owner)?;
        loop {
            if let Some(out) = self.advance(&mut call)? {
                return Ok(out);
            }
        }
    }

    /// Pieces one call is run in: the embeddings and conv_in, each down level, the mid block,
    /// each up level (the last with the output convolution).
    pub fn chunks(&self) -> usize {
        2 * self.shape.levels.len() + 2
    }

    /// The GEGLU feed-forward width of the transformer at `p` (from its weights).
    fn ff_inner(&self, p: &str) -> u64 {
        self.tensors
            .matrix_shape(&format!("{p}.transformer_blocks.0.ff.net.0.proj.weight"))
            .map(|s| s[0] / 2)
            .unwrap_or(0)
    }

    /// Device bytes one call on `batch` latents of `height` × `width` holds at most, charged as
    /// the allocator charges them: the replay of [`Self::begin`] and [`Self::advance`], beside
    /// buffers of `held` f32 values that the job holds throughout (its latents).
    pub fn peak_bytes(
        &self,
        batch: usize,
        height: usize,
        width: usize,
        context_tokens: usize,
        context_dim: usize,
        held: &[u64],
    ) -> u64 {
        let sh = &self.shape;
        let b = batch as u64;
        let mut sim = Sim::holding(held);
        let mut cx = SimCx {
            sim: &mut sim,
            batch: b,
        };
        let c0 = sh.levels[0].channels as u64;
        let temb = sh.time_embed_dim as u64;
        // begin: the embeddings, the context, conv_in and the first skip.
        cx.sim.temp(b * c0);
        cx.sim.temp(b * temb);
        cx.sim.temp(b * temb);
        if let Some((_, proj_in)) = sh.text_time {
            cx.sim.temp(b * proj_in as u64);
            cx.sim.temp(b * temb);
            cx.sim.temp(b * temb);
        }
        cx.sim.keep(b * temb);
        cx.sim.keep(b * (context_tokens * context_dim) as u64);
        // The sample is the job's own buffer (a host sample's upload is not counted).
        let (h, w) = (height as u64, width as u64);
        let mut x = cx.act(c0, h, w);
        let mut skips = vec![cx.act(c0, h, w)];
        cx.sim.flush();
        let kv = context_tokens as u64;
        let n_levels = sh.levels.len();
        for (i, level) in sh.levels.iter().enumerate() {
            let ch = level.channels as u64;
            for j in 0..level.resnets {
                x = cx.resnet(x, ch, true);
                if level.transformer_depth > 0 {
                    let inner = self.ff_inner(&format!("down_blocks.{i}.attentions.{j}"));
                    x = cx.transformer(x, level.transformer_depth, level.heads, inner, kv);
                }
                skips.push(cx.act(x.c, x.h, x.w));
            }
            if i + 1 < n_levels {
                x = cx.op(x, ch, x.h.div_ceil(2), x.w.div_ceil(2), true);
                skips.push(cx.act(x.c, x.h, x.w));
            }
            cx.sim.flush();
        }
        let last = &sh.levels[n_levels - 1];
        x = cx.resnet(x, last.channels as u64, true);
        let inner = self.ff_inner("mid_block.attentions.0");
        x = cx.transformer(x, sh.mid_transformer_depth, last.heads, inner, kv);
        x = cx.resnet(x, last.channels as u64, true);
        cx.sim.flush();
        for (u, level) in sh.levels.iter().rev().enumerate() {
            let ch = level.channels as u64;
            for j in 0..=level.resnets {
                let skip = skips.pop().expect("one skip per up resnet");
                let cat = cx.op(x, x.c + skip.c, x.h, x.w, true);
                cx.sim.drop(skip.slot);
                x = cx.resnet(cat, ch, true);
                if level.transformer_depth > 0 {
                    let inner = self.ff_inner(&format!("up_blocks.{u}.attentions.{j}"));
                    x = cx.transformer(x, level.transformer_depth, level.heads, inner, kv);
                }
            }
            if u + 1 < n_levels {
                let to = skips.last().map(|s| (s.h, s.w)).expect("skips remain");
                x = cx.op(x, ch, to.0, to.1, true);
                x = cx.op(x, ch, x.h, x.w, true);
            } else {
                x = cx.op(x, ch, x.h, x.w, true);
                cx.op(x, sh.out_channels as u64, x.h, x.w, true);
            }
            cx.sim.flush();
        }
        sim.peak()
    }

    fn cx(&self, owner: OwnerId, batch: usize) -> Result<Cx<'_>, TensorError> {
        Ok(Cx {
            t: &self.tensors,
            dev: &self.device,
            owner,
            s: self.device.stream()?,
            batch: batch as u64,
            groups: self.shape.groups as u64,
            eps: self.shape.norm_eps,
        })
    }

    /// Starts a call: the time embedding (with SDXL's added conditions), the uploaded context
    /// and conv_in; [`Self::advance`] runs the rest one chunk at a time. Every buffer is
    /// charged to `owner`.
    pub fn begin(&self, input: &UnetInput<'_>, owner: OwnerId) -> Result<UnetCall, TensorError> {
        let sh = &self.shape;
        let b = input.batch;
        let bad = |m: String| TensorError::File(self.tensors.path().into(), m);
        let latents = b * sh.in_channels as usize * input.height * input.width;
        let fits = match input.sample {
            Sample::Host(v) => v.len() == latents,
            Sample::Device(buf) => buf.len() / 4 >= latents as u64,
        };
        if b == 0 || !fits {
            return Err(bad(format!(
                "{} sample values are not {b} × {} × {} × {}",
                match input.sample {
                    Sample::Host(v) => v.len(),
                    Sample::Device(buf) => (buf.len() / 4) as usize,
                },
                sh.in_channels,
                input.height,
                input.width
            )));
        }
        if input.context_tokens == 0
            || !input.context.len().is_multiple_of(b * input.context_tokens)
        {
            return Err(bad(format!(
                "{} context values are not {b} × {} rows",
                input.context.len(),
                input.context_tokens
            )));
        }
        let mut cx = self.cx(owner, b)?;
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
            if per + pooled != proj_in as usize || ids.len() != b * per {
                return Err(bad(format!(
                    "added conditions are {per} + {pooled} values, the model takes {proj_in}"
                )));
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
        let sample = match input.sample {
            Sample::Host(v) => cx.upload(v)?,
            Sample::Device(b) => b.clone(),
        };
        let x = Act {
            buf: sample,
            c: sh.in_channels as u64,
            h: input.height as u64,
            w: input.width as u64,
        };
        let x = cx.conv("conv_in", &x, sh.levels[0].channels as u64, 3, 1)?;
        let skips = vec![cx.copy(&x)?];
        cx.flush()?;
        Ok(UnetCall {
            owner,
            batch: b,
            emb,
            context,
            context_tokens: input.context_tokens as u64,
            context_dim: (input.context.len() / b / input.context_tokens) as u64,
            x: Some(x),
            skips,
            next: 1,
            piece: 0,
            shape: super::pace::shape_key(b, input.height, input.width),
            out_len: (b * sh.out_channels as usize * input.height * input.width) as u64,
        })
    }

    /// Runs the rest of the call's current chunk (a down level, the mid block, an up level)
    /// and waits for it; the noise prediction (batch × out_channels × height × width) once the
    /// last chunk is done.
    pub fn advance(&self, call: &mut UnetCall) -> Result<Option<Vec<f32>>, TensorError> {
        let n = call.out_len;
        match self.advance_for(call, None, None)?.0 {
            Some(out) => Ok(Some(self.device.read_f32(&out, 0, n)?)),
            None => Ok(None),
        }
    }

    /// The pieces of chunk `chunk` (1-based after [`Self::begin`]), in order.
    fn pieces(&self, chunk: usize) -> Vec<Piece> {
        let sh = &self.shape;
        let n_levels = sh.levels.len();
        let mut out = Vec::new();
        if chunk <= n_levels {
            let level = &sh.levels[chunk - 1];
            for j in 0..level.resnets {
                out.push(Piece::Resnet(j));
                if level.transformer_depth > 0 {
                    out.push(Piece::Attention(j));
                }
            }
            if chunk < n_levels {
                out.push(Piece::Resample);
            }
        } else if chunk == n_levels + 1 {
            out.extend([Piece::Resnet(0), Piece::Attention(0), Piece::Resnet(1)]);
        } else {
            let level = &sh.levels[n_levels - 1 - (chunk - n_levels - 2)];
            for j in 0..=level.resnets {
                out.push(Piece::Resnet(j));
                if level.transformer_depth > 0 {
                    out.push(Piece::Attention(j));
                }
            }
            out.push(Piece::Resample);
        }
        out
    }

    /// Runs pieces of the call's current chunk until the next one's learned device time would
    /// overrun `budget` (None: the rest of the chunk), never past the chunk's end, and waits
    /// for them; `then` is recorded after the call's last piece, before that wait. Returns the
    /// noise prediction (on the device) once the call is done, and the device time spent.
    pub fn advance_for(
        &self,
        call: &mut UnetCall,
        budget: Option<std::time::Duration>,
        then: Option<&mut Epilogue<'_>>,
    ) -> Result<(Option<Buffer>, std::time::Duration), TensorError> {
        let started = std::time::Instant::now();
        let sh = &self.shape;
        let n_levels = sh.levels.len();
        let mut cx = self.cx(call.owner, call.batch)?;
        cx.s.set_profiling(budget.is_some());
        let temb_dim = sh.time_embed_dim as u64;
        let mut x = call.x.take().ok_or_else(|| {
            TensorError::File(self.tensors.path().into(), "the UNet call is over".into())
        })?;
        let chunk = call.next;
        let pieces = self.pieces(chunk);
        let mut paced = super::pace::Chunk::new(&self.pacer, call.shape, budget, started);
        let mut out = None;
        while call.piece < pieces.len() && paced.admit(chunk * 1000 + call.piece) {
            let emb = (&call.emb, temb_dim);
            let ctx = (&call.context, call.context_tokens, call.context_dim);
            let piece = pieces[call.piece];
            call.piece += 1;
            if chunk <= n_levels {
                let i = chunk - 1;
                let level = &sh.levels[i];
                match piece {
                    Piece::Resnet(j) => {
                        let p = format!("down_blocks.{i}.resnets.{j}");
                        x = cx.resnet(&p, &x, level.channels as u64, Some(emb))?;
                        if level.transformer_depth == 0 {
                            call.skips.push(cx.copy(&x)?);
                        }
                    }
                    Piece::Attention(j) => {
                        let p = format!("down_blocks.{i}.attentions.{j}");
                        x = cx.transformer(&p, &x, level.transformer_depth, level.heads, ctx)?;
                        call.skips.push(cx.copy(&x)?);
                    }
                    Piece::Resample => {
                        x = cx.conv_stride(
                            &format!("down_blocks.{i}.downsamplers.0.conv"),
                            &x,
                            level.channels as u64,
                            2,
                        )?;
                        call.skips.push(cx.copy(&x)?);
                    }
                }
            } else if chunk == n_levels + 1 {
                let last = &sh.levels[n_levels - 1];
                let c = last.channels as u64;
                match piece {
                    Piece::Resnet(j) => {
                        x = cx.resnet(&format!("mid_block.resnets.{j}"), &x, c, Some(emb))?
                    }
                    _ => {
                        x = cx.transformer(
                            "mid_block.attentions.0",
                            &x,
                            sh.mid_transformer_depth,
                            last.heads,
                            ctx,
                        )?
                    }
                }
            } else {
                let u = chunk - n_levels - 2;
                let level = &sh.levels[n_levels - 1 - u];
                match piece {
                    Piece::Resnet(j) => {
                        let skip = call.skips.pop().expect("one skip per up resnet");
                        x = cx.concat(&x, &skip)?;
                        x = cx.resnet(
                            &format!("up_blocks.{u}.resnets.{j}"),
                            &x,
                            level.channels as u64,
                            Some(emb),
                        )?;
                    }
                    Piece::Attention(j) => {
                        let p = format!("up_blocks.{u}.attentions.{j}");
                        x = cx.transformer(&p, &x, level.transformer_depth, level.heads, ctx)?;
                    }
                    Piece::Resample if u + 1 < n_levels => {
                        // To the next skip's size, which is 2× unless a side was odd on the way
                        // down.
                        let to = call.skips.last().map(|s| (s.h, s.w)).expect("skips remain");
                        x = cx.upsample(&x, to)?;
                        x = cx.conv(
                            &format!("up_blocks.{u}.upsamplers.0.conv"),
                            &x,
                            level.channels as u64,
                            3,
                            1,
                        )?;
                    }
                    Piece::Resample => {
                        x = cx.norm("conv_norm_out", &x, true)?;
                        let o = cx.conv("conv_out", &x, sh.out_channels as u64, 3, 1)?;
                        if let Some(then) = then {
                            then(&mut cx.s, view(&o.buf, call.out_len))?;
                        }
                        out = Some(o);
                        break;
                    }
                }
            }
        }
        cx.flush()?;
        let took = paced.end(&mut cx.s);
        if call.piece == pieces.len() {
            call.next += 1;
            call.piece = 0;
        }
        if let Some(out) = out {
            return Ok((Some(out.buf), took));
        }
        call.x = Some(x);
        Ok((None, took))
    }
}

/// A piece of a UNet chunk: a resnet, the transformer after it, or the level's resampling
/// (down, up, or the output head after the last up level).
#[derive(Clone, Copy, Debug)]
enum Piece {
    Resnet(u32),
    Attention(u32),
    Resample,
}

/// A UNet call in progress: what its chunks pass on (the time embedding, the context, the
/// current activation and the skips), all on the device.
pub struct UnetCall {
    owner: OwnerId,
    batch: usize,
    emb: halo_kernels::Buffer,
    context: halo_kernels::Buffer,
    context_tokens: u64,
    context_dim: u64,
    /// None once the call is over.
    x: Option<Act>,
    skips: Vec<Act>,
    /// The next chunk (0 was [`Unet::begin`]), and the next piece in it.
    next: usize,
    piece: usize,
    /// The key of the call's shape for learned piece costs.
    shape: u64,
    /// Values in the noise prediction.
    out_len: u64,
}

impl UnetCall {
    /// Chunks done so far, [`Unet::begin`] included.
    pub fn chunks_done(&self) -> usize {
        self.next
    }
}
