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

use halo_kernels::ops::{self, Conv2d, F32s, SeqAttention};
use halo_kernels::{Buffer, Device, LoadStrategy, MemoryKind, OwnerId, Stream};

use super::config::UnetShape;
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

/// An activation on the device: NCHW with this many channels and this size.
struct Act {
    buf: Buffer,
    c: u64,
    h: u64,
    w: u64,
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
                x = cx.resnet(&p, &x, level.channels as u64, &emb, temb_dim)?;
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
            &emb,
            temb_dim,
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
            &emb,
            temb_dim,
        )?;
        for (u, level) in sh.levels.iter().rev().enumerate() {
            for j in 0..=level.resnets {
                let skip = skips.pop().expect("one skip per up resnet");
                x = cx.concat(&x, &skip)?;
                x = cx.resnet(
                    &format!("up_blocks.{u}.resnets.{j}"),
                    &x,
                    level.channels as u64,
                    &emb,
                    temb_dim,
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

fn view(b: &Buffer, len: u64) -> F32s<'_> {
    F32s::all(b).sub(0, len)
}

/// One forward call's recording context.
struct Cx<'a> {
    t: &'a DeviceTensors,
    dev: &'a Device,
    owner: OwnerId,
    s: Stream,
    batch: u64,
    groups: u64,
    eps: f32,
}

impl Cx<'_> {
    fn alloc(&self, n: u64) -> Result<Buffer, TensorError> {
        Ok(self
            .dev
            .alloc(MemoryKind::Device, n.max(1) * 4, self.owner)?)
    }

    fn upload(&self, v: &[f32]) -> Result<Buffer, TensorError> {
        Ok(self.dev.upload_f32(v, self.owner)?)
    }

    fn len(&self, a: &Act) -> u64 {
        self.batch * a.c * a.h * a.w
    }

    fn copy(&mut self, a: &Act) -> Result<Act, TensorError> {
        let n = self.len(a);
        let buf = self.alloc(n)?;
        self.s.copy(&a.buf, 0, &buf, 0, n * 4)?;
        Ok(Act { buf, ..*a })
    }

    /// rows × in → rows × out: y = x Wᵀ + b.
    fn linear(
        &mut self,
        name: &str,
        x: F32s<'_>,
        rows: u64,
        din: u64,
        dout: u64,
        bias: bool,
    ) -> Result<Buffer, TensorError> {
        let y = self.alloc(rows * dout)?;
        let w = self.t.matrix(&format!("{name}.weight"), &[dout, din])?;
        ops::matmul(&mut self.s, w, x, view(&y, rows * dout), rows)?;
        if bias {
            let b = self.t.vector(&format!("{name}.bias"), dout)?;
            ops::add(&mut self.s, view(&y, rows * dout), b, view(&y, rows * dout))?;
        }
        Ok(y)
    }

    /// TimestepEmbedding: linear, SiLU, linear.
    fn mlp(&mut self, name: &str, x: &Buffer, din: u64, dout: u64) -> Result<Buffer, TensorError> {
        let rows = self.batch;
        let h = self.linear(
            &format!("{name}.linear_1"),
            view(x, rows * din),
            rows,
            din,
            dout,
            true,
        )?;
        ops::silu(&mut self.s, view(&h, rows * dout), view(&h, rows * dout))?;
        self.linear(
            &format!("{name}.linear_2"),
            view(&h, rows * dout),
            rows,
            dout,
            dout,
            true,
        )
    }

    fn conv(
        &mut self,
        name: &str,
        x: &Act,
        co: u64,
        k: u64,
        stride: u64,
    ) -> Result<Act, TensorError> {
        let shape = Conv2d {
            n: self.batch,
            ci: x.c,
            h: x.h,
            w: x.w,
            co,
            k,
            stride,
            pad: k / 2,
        };
        let (oh, ow) = shape.out_hw();
        let y = self.alloc(shape.out_len())?;
        let w = self.t.matrix(&format!("{name}.weight"), &[co, x.c, k, k])?;
        let b = self.t.vector(&format!("{name}.bias"), co)?;
        ops::conv2d(
            &mut self.s,
            shape,
            w,
            Some(b),
            view(&x.buf, shape.in_len()),
            view(&y, shape.out_len()),
        )?;
        Ok(Act {
            buf: y,
            c: co,
            h: oh,
            w: ow,
        })
    }

    fn conv_stride(
        &mut self,
        name: &str,
        x: &Act,
        co: u64,
        stride: u64,
    ) -> Result<Act, TensorError> {
        self.conv(name, x, co, 3, stride)
    }

    fn norm(&mut self, name: &str, x: &Act, silu: bool) -> Result<Act, TensorError> {
        self.norm_eps(name, x, silu, self.eps)
    }

    fn norm_eps(&mut self, name: &str, x: &Act, silu: bool, eps: f32) -> Result<Act, TensorError> {
        let n = self.len(x);
        let y = self.alloc(n)?;
        ops::group_norm(
            &mut self.s,
            view(&x.buf, n),
            self.t.vector(&format!("{name}.weight"), x.c)?,
            self.t.vector(&format!("{name}.bias"), x.c)?,
            view(&y, n),
            x.c,
            x.h * x.w,
            self.groups,
            eps,
            silu,
        )?;
        Ok(Act { buf: y, ..*x })
    }

    /// ResnetBlock2D with the time embedding.
    fn resnet(
        &mut self,
        p: &str,
        x: &Act,
        co: u64,
        emb: &Buffer,
        temb_dim: u64,
    ) -> Result<Act, TensorError> {
        let h = self.norm(&format!("{p}.norm1"), x, true)?;
        let h = self.conv(&format!("{p}.conv1"), &h, co, 3, 1)?;
        let t = self.linear(
            &format!("{p}.time_emb_proj"),
            view(emb, self.batch * temb_dim),
            self.batch,
            temb_dim,
            co,
            true,
        )?;
        let n = self.len(&h);
        ops::add_channel(
            &mut self.s,
            view(&h.buf, n),
            view(&t, self.batch * co),
            view(&h.buf, n),
            h.h * h.w,
        )?;
        let h = self.norm(&format!("{p}.norm2"), &h, true)?;
        let h = self.conv(&format!("{p}.conv2"), &h, co, 3, 1)?;
        let skip = if x.c != co {
            self.conv(&format!("{p}.conv_shortcut"), x, co, 1, 1)?
        } else {
            self.copy(x)?
        };
        ops::add(
            &mut self.s,
            view(&h.buf, n),
            view(&skip.buf, n),
            view(&h.buf, n),
        )?;
        Ok(h)
    }

    /// Transformer2DModel with linear projections.
    fn transformer(
        &mut self,
        p: &str,
        x: &Act,
        depth: u32,
        heads: u32,
        ctx: (&Buffer, u64, u64),
    ) -> Result<Act, TensorError> {
        let (c, hw) = (x.c, x.h * x.w);
        let tokens = self.batch * hw;
        let n = tokens * c;
        let h = self.norm_eps(&format!("{p}.norm"), x, false, 1e-6)?;
        let rows = self.alloc(n)?;
        ops::transpose(
            &mut self.s,
            view(&h.buf, n),
            view(&rows, n),
            self.batch,
            c,
            hw,
        )?;
        let mut cur = self.linear(&format!("{p}.proj_in"), view(&rows, n), tokens, c, c, true)?;
        for k in 0..depth {
            let bp = format!("{p}.transformer_blocks.{k}");
            cur = self.block(&bp, cur, tokens, hw, c, heads, ctx)?;
        }
        let out = self.linear(&format!("{p}.proj_out"), view(&cur, n), tokens, c, c, true)?;
        let back = self.alloc(n)?;
        ops::transpose(
            &mut self.s,
            view(&out, n),
            view(&back, n),
            self.batch,
            hw,
            c,
        )?;
        ops::add(&mut self.s, view(&back, n), view(&x.buf, n), view(&back, n))?;
        Ok(Act { buf: back, ..*x })
    }

    fn layer_norm(
        &mut self,
        name: &str,
        x: &Buffer,
        n: u64,
        c: u64,
    ) -> Result<Buffer, TensorError> {
        let y = self.alloc(n)?;
        ops::layer_norm(
            &mut self.s,
            view(x, n),
            Some(self.t.vector(&format!("{name}.weight"), c)?),
            Some(self.t.vector(&format!("{name}.bias"), c)?),
            view(&y, n),
            c,
            1e-5,
        )?;
        Ok(y)
    }

    /// Attention from `x` (tokens × c) to `kv` (kv_tokens × kv_dim per image): to_q/k/v without
    /// bias, to_out.0 with.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        p: &str,
        x: &Buffer,
        tokens: u64,
        per_image: u64,
        c: u64,
        heads: u32,
        kv: (&Buffer, u64, u64),
    ) -> Result<Buffer, TensorError> {
        let (kvb, kv_tokens, kv_dim) = kv;
        let kv_rows = self.batch * kv_tokens;
        let q = self.linear(
            &format!("{p}.to_q"),
            view(x, tokens * c),
            tokens,
            c,
            c,
            false,
        )?;
        let k = self.linear(
            &format!("{p}.to_k"),
            view(kvb, kv_rows * kv_dim),
            kv_rows,
            kv_dim,
            c,
            false,
        )?;
        let v = self.linear(
            &format!("{p}.to_v"),
            view(kvb, kv_rows * kv_dim),
            kv_rows,
            kv_dim,
            c,
            false,
        )?;
        let o = self.alloc(tokens * c)?;
        let head_dim = (c / heads as u64) as u32;
        ops::seq_attention(
            &mut self.s,
            &SeqAttention {
                batch: self.batch as u32,
                n_heads: heads,
                head_dim,
                n_q: per_image as u32,
                n_kv: kv_tokens as u32,
                q_stride: c as u32,
                kv_stride: c as u32,
                o_stride: c as u32,
                scale: 1.0 / (head_dim as f32).sqrt(),
                causal: false,
            },
            view(&q, tokens * c),
            view(&k, kv_rows * c),
            view(&v, kv_rows * c),
            view(&o, tokens * c),
        )?;
        self.linear(
            &format!("{p}.to_out.0"),
            view(&o, tokens * c),
            tokens,
            c,
            c,
            true,
        )
    }

    /// BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        p: &str,
        x: Buffer,
        tokens: u64,
        hw: u64,
        c: u64,
        heads: u32,
        ctx: (&Buffer, u64, u64),
    ) -> Result<Buffer, TensorError> {
        let n = tokens * c;
        let h = self.layer_norm(&format!("{p}.norm1"), &x, n, c)?;
        let a = self.attention(&format!("{p}.attn1"), &h, tokens, hw, c, heads, (&h, hw, c))?;
        ops::add(&mut self.s, view(&x, n), view(&a, n), view(&x, n))?;
        let h = self.layer_norm(&format!("{p}.norm2"), &x, n, c)?;
        let a = self.attention(&format!("{p}.attn2"), &h, tokens, hw, c, heads, ctx)?;
        ops::add(&mut self.s, view(&x, n), view(&a, n), view(&x, n))?;
        let h = self.layer_norm(&format!("{p}.norm3"), &x, n, c)?;
        // GEGLU: the projection's first half of rows is the value, the second half the gate.
        let proj = format!("{p}.ff.net.0.proj");
        let inner = match self.t.matrix_shape(&format!("{proj}.weight")) {
            Some(&[rows, cols]) if rows % 2 == 0 && cols == c => rows / 2,
            _ => {
                return Err(TensorError::File(
                    self.t.path().into(),
                    format!("{proj}.weight is missing or not a [2·inner, {c}] matrix"),
                ))
            }
        };
        let full = self.t.matrix(&format!("{proj}.weight"), &[2 * inner, c])?;
        let half_bytes = full.ty.row_bytes(c as usize).expect("float rows") as u64 * inner;
        let value_w = halo_kernels::ops::Weights {
            rows: inner,
            ..full
        };
        let gate_w = halo_kernels::ops::Weights {
            rows: inner,
            offset: full.offset + half_bytes,
            ..full
        };
        let bias = self.t.vector(&format!("{proj}.bias"), 2 * inner)?;
        let value = self.alloc(tokens * inner)?;
        let gate = self.alloc(tokens * inner)?;
        let m = tokens * inner;
        ops::matmul(&mut self.s, value_w, view(&h, n), view(&value, m), tokens)?;
        ops::add(
            &mut self.s,
            view(&value, m),
            bias.sub(0, inner),
            view(&value, m),
        )?;
        ops::matmul(&mut self.s, gate_w, view(&h, n), view(&gate, m), tokens)?;
        ops::add(
            &mut self.s,
            view(&gate, m),
            bias.sub(inner, inner),
            view(&gate, m),
        )?;
        ops::geglu_erf(
            &mut self.s,
            view(&gate, m),
            view(&value, m),
            view(&value, m),
        )?;
        let f = self.linear(
            &format!("{p}.ff.net.2"),
            view(&value, m),
            tokens,
            inner,
            c,
            true,
        )?;
        ops::add(&mut self.s, view(&x, n), view(&f, n), view(&x, n))?;
        Ok(x)
    }

    /// Channel concatenation of two NCHW activations of one size, image by image.
    fn concat(&mut self, a: &Act, b: &Act) -> Result<Act, TensorError> {
        let plane = a.h * a.w;
        let c = a.c + b.c;
        let out = self.alloc(self.batch * c * plane)?;
        for i in 0..self.batch {
            self.s.copy(
                &a.buf,
                i * a.c * plane * 4,
                &out,
                i * c * plane * 4,
                a.c * plane * 4,
            )?;
            self.s.copy(
                &b.buf,
                i * b.c * plane * 4,
                &out,
                (i * c + a.c) * plane * 4,
                b.c * plane * 4,
            )?;
        }
        Ok(Act {
            buf: out,
            c,
            h: a.h,
            w: a.w,
        })
    }

    fn upsample(&mut self, x: &Act, to: (u64, u64)) -> Result<Act, TensorError> {
        let n = self.len(x);
        let m = self.batch * x.c * to.0 * to.1;
        let y = self.alloc(m)?;
        ops::upsample_nearest(
            &mut self.s,
            view(&x.buf, n),
            view(&y, m),
            self.batch * x.c,
            (x.h, x.w),
            to,
        )?;
        Ok(Act {
            buf: y,
            c: x.c,
            h: to.0,
            w: to.1,
        })
    }
}
