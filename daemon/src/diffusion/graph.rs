//! Recording a diffusion model's forward pass: NCHW activations on the device and the building
//! blocks the UNet and the VAE share (convolutions, group norms, resnet blocks, linear layers,
//! attention, spatial transformers, concatenation, upsampling). Each op's output is a new
//! buffer charged to the call's owner; a call's buffers go when it returns (the stream keeps
//! what its submitted work still reads).

use halo_kernels::ops::{self, Conv2d, F32s, SeqAttention};
use halo_kernels::{Buffer, Device, MemoryKind, OwnerId, Stream};

use super::tensors::{DeviceTensors, TensorError};

/// An activation on the device: NCHW with this many channels and this size.
pub(crate) struct Act {
    pub buf: Buffer,
    pub c: u64,
    pub h: u64,
    pub w: u64,
}

pub(crate) fn view(b: &Buffer, len: u64) -> F32s<'_> {
    F32s::all(b).sub(0, len)
}

/// `v` in a new device buffer charged to `owner` (token ids, gather indices).
pub(crate) fn upload_u32(dev: &Device, v: &[u32], owner: OwnerId) -> Result<Buffer, TensorError> {
    let mut b = dev.alloc(MemoryKind::Device, (v.len().max(1) * 4) as u64, owner)?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    dev.write(&mut b, 0, &bytes)?;
    Ok(b)
}

/// One forward call's recording context.
pub(crate) struct Cx<'a> {
    pub t: &'a DeviceTensors,
    pub dev: &'a Device,
    pub owner: OwnerId,
    pub s: Stream,
    pub batch: u64,
    pub groups: u64,
    /// The epsilon of the resnets' group norms.
    pub eps: f32,
}

impl Cx<'_> {
    pub(crate) fn alloc(&self, n: u64) -> Result<Buffer, TensorError> {
        Ok(self
            .dev
            .alloc(MemoryKind::Device, n.max(1) * 4, self.owner)?)
    }

    pub(crate) fn upload(&self, v: &[f32]) -> Result<Buffer, TensorError> {
        Ok(self.dev.upload_f32(v, self.owner)?)
    }

    pub(crate) fn len(&self, a: &Act) -> u64 {
        self.batch * a.c * a.h * a.w
    }

    pub(crate) fn copy(&mut self, a: &Act) -> Result<Act, TensorError> {
        let n = self.len(a);
        let buf = self.alloc(n)?;
        self.s.copy(&a.buf, 0, &buf, 0, n * 4)?;
        Ok(Act { buf, ..*a })
    }

    /// Runs what is recorded and waits: the buffers only that work used go back to the
    /// allocator. Called after each block, which bounds a call's memory to its live tensors
    /// (the current one and the skips) plus one block's temporaries.
    pub(crate) fn flush(&mut self) -> Result<(), TensorError> {
        Ok(self.s.finish()?)
    }

    /// `ops::seq_attention` with its running state in a buffer of the call's own.
    pub(crate) fn seq_attention(
        &mut self,
        p: &SeqAttention,
        q: F32s<'_>,
        k: F32s<'_>,
        v: F32s<'_>,
        out: F32s<'_>,
    ) -> Result<(), TensorError> {
        let state_len = ops::seq_attention_state_len(p);
        let state = self.alloc(state_len)?;
        ops::seq_attention(&mut self.s, p, q, k, v, out, view(&state, state_len))?;
        Ok(())
    }

    /// rows × in → rows × out: y = x Wᵀ + b.
    pub(crate) fn linear(
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
    pub(crate) fn mlp(
        &mut self,
        name: &str,
        x: &Buffer,
        din: u64,
        dout: u64,
    ) -> Result<Buffer, TensorError> {
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

    pub(crate) fn conv(
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

    /// Rows `rows` (of batch · out.h) of a same-size k × k convolution of `x` into `out`, which
    /// has the output's shape: one band of [`Self::conv`], cut so that a long convolution spans
    /// several submissions.
    pub(crate) fn conv_rows(
        &mut self,
        name: &str,
        x: &Act,
        out: &Act,
        k: u64,
        rows: std::ops::Range<u64>,
    ) -> Result<(), TensorError> {
        let shape = Conv2d {
            n: self.batch,
            ci: x.c,
            h: x.h,
            w: x.w,
            co: out.c,
            k,
            stride: 1,
            pad: k / 2,
        };
        let w = self
            .t
            .matrix(&format!("{name}.weight"), &[out.c, x.c, k, k])?;
        let b = self.t.vector(&format!("{name}.bias"), out.c)?;
        ops::conv2d_rows(
            &mut self.s,
            shape,
            w,
            Some(b),
            view(&x.buf, shape.in_len()),
            view(&out.buf, shape.out_len()),
            rows,
        )?;
        Ok(())
    }

    pub(crate) fn conv_stride(
        &mut self,
        name: &str,
        x: &Act,
        co: u64,
        stride: u64,
    ) -> Result<Act, TensorError> {
        self.conv(name, x, co, 3, stride)
    }

    pub(crate) fn norm(&mut self, name: &str, x: &Act, silu: bool) -> Result<Act, TensorError> {
        self.norm_eps(name, x, silu, self.eps)
    }

    pub(crate) fn norm_eps(
        &mut self,
        name: &str,
        x: &Act,
        silu: bool,
        eps: f32,
    ) -> Result<Act, TensorError> {
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

    /// ResnetBlock2D.
    /// `temb`: the activated time embedding and its width (the UNet's); None in the VAE.
    pub(crate) fn resnet(
        &mut self,
        p: &str,
        x: &Act,
        co: u64,
        temb: Option<(&Buffer, u64)>,
    ) -> Result<Act, TensorError> {
        let h = self.resnet_first(p, x, co, temb)?;
        self.resnet_second(p, x, h, co)
    }

    /// The first half of [`Self::resnet`]: norm1, SiLU, conv1 and the time embedding.
    pub(crate) fn resnet_first(
        &mut self,
        p: &str,
        x: &Act,
        co: u64,
        temb: Option<(&Buffer, u64)>,
    ) -> Result<Act, TensorError> {
        let h = self.norm(&format!("{p}.norm1"), x, true)?;
        let h = self.conv(&format!("{p}.conv1"), &h, co, 3, 1)?;
        let n = self.len(&h);
        if let Some((emb, temb_dim)) = temb {
            let t = self.linear(
                &format!("{p}.time_emb_proj"),
                view(emb, self.batch * temb_dim),
                self.batch,
                temb_dim,
                co,
                true,
            )?;
            ops::add_channel(
                &mut self.s,
                view(&h.buf, n),
                view(&t, self.batch * co),
                view(&h.buf, n),
                h.h * h.w,
            )?;
        }
        Ok(h)
    }

    /// The rest of [`Self::resnet`] from the first half's `h`: norm2, SiLU, conv2, the
    /// shortcut and the sum; flushed.
    pub(crate) fn resnet_second(
        &mut self,
        p: &str,
        x: &Act,
        h: Act,
        co: u64,
    ) -> Result<Act, TensorError> {
        let n = self.len(&h);
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
        self.flush()?;
        Ok(h)
    }

    /// Transformer2DModel with linear projections.
    pub(crate) fn transformer(
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
        self.flush()?;
        Ok(Act { buf: back, ..*x })
    }

    pub(crate) fn layer_norm(
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
    pub(crate) fn attention(
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
        self.seq_attention(
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
    pub(crate) fn block(
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
    pub(crate) fn concat(&mut self, a: &Act, b: &Act) -> Result<Act, TensorError> {
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

    pub(crate) fn upsample(&mut self, x: &Act, to: (u64, u64)) -> Result<Act, TensorError> {
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
