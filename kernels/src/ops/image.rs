//! Image-model ops (UNet, VAE) over NCHW f32 activations: convolution, group norm, ×2 nearest
//! upsampling.

use super::nn::row_dispatch;
use super::quant::check_weights;
use super::{bad, elementwise, grid_1d, to_u32, F32s, Push, Weights};
use crate::error::VulkanError;
use crate::quant::WeightType;
use crate::runtime::{Dispatch, Stream};
use crate::KernelId;

/// The shape of one 2-D convolution: `n` images of `ci` channels at `h` × `w`, `co` output
/// channels, a square `k` × `k` kernel, `stride` and zero padding `pad` on every side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub n: u64,
    pub ci: u64,
    pub h: u64,
    pub w: u64,
    pub co: u64,
    pub k: u64,
    pub stride: u64,
    pub pad: u64,
}

impl Conv2d {
    /// Output height and width.
    pub fn out_hw(&self) -> (u64, u64) {
        let o = |d: u64| (d + 2 * self.pad).saturating_sub(self.k) / self.stride.max(1) + 1;
        (o(self.h), o(self.w))
    }

    pub fn in_len(&self) -> u64 {
        self.n * self.ci * self.h * self.w
    }

    pub fn out_len(&self) -> u64 {
        let (oh, ow) = self.out_hw();
        self.n * self.co * oh * ow
    }

    /// Multiply-adds of the whole convolution (for benchmarks).
    pub fn macs(&self) -> u64 {
        self.out_len() * self.ci * self.k * self.k
    }
}

/// Output tile of conv2d.comp (64 channels × 64 pixels) and its K step (padded rows).
const CONV_TILE: u32 = 64;
const CONV_BK_STRIDE: u32 = 33;

/// `y = conv2d(x, w) + bias`. `w` holds `co` rows of `ci · k · k` values (PyTorch's
/// `[co][ci][kh][kw]`) in f32, f16 or bf16; `bias` has `co` values.
pub fn conv2d(
    stream: &mut Stream,
    shape: Conv2d,
    w: Weights<'_>,
    bias: Option<F32s<'_>>,
    x: F32s<'_>,
    y: F32s<'_>,
) -> Result<(), VulkanError> {
    let rows = shape.n * shape.out_hw().0;
    conv2d_rows(stream, shape, w, bias, x, y, 0..rows)
}

/// [`conv2d`] for output `rows` only: rows of every image in turn, `n · oh` in all (image `i`'s
/// row `r` is row `i · oh + r`). The rest of `y` is left as it is, so a long convolution can be
/// cut into bands run one submission each; every output is the same as from the whole
/// convolution, bit for bit.
pub fn conv2d_rows(
    stream: &mut Stream,
    shape: Conv2d,
    w: Weights<'_>,
    bias: Option<F32s<'_>>,
    x: F32s<'_>,
    y: F32s<'_>,
    rows: std::ops::Range<u64>,
) -> Result<(), VulkanError> {
    let kernel = match w.ty {
        WeightType::F32 => KernelId::Conv2dF32,
        WeightType::F16 => KernelId::Conv2dF16,
        WeightType::BF16 => KernelId::Conv2dBf16,
        other => {
            return Err(bad(
                "conv2d",
                format!("convolution weights must be f32, f16 or bf16, not {other}"),
            ))
        }
    };
    let op = kernel.name();
    let Conv2d {
        n,
        ci,
        h,
        w: width,
        co,
        k,
        stride,
        pad,
    } = shape;
    if k == 0 || stride == 0 || pad >= k || h + 2 * pad < k || width + 2 * pad < k {
        return Err(bad(
            op,
            format!(
                "a {k}×{k} kernel with stride {stride} and padding {pad} does not fit {h}×{width}"
            ),
        ));
    }
    if w.rows != co || w.cols != ci * k * k {
        return Err(bad(
            op,
            format!(
                "weights are {}×{}, expected {co}×{} ({co} channels of {ci}·{k}·{k})",
                w.rows,
                w.cols,
                ci * k * k
            ),
        ));
    }
    let c = check_weights(stream, op, &w)?;
    if x.len != shape.in_len() {
        return Err(bad(
            op,
            format!("x has {} values, expected {}", x.len, shape.in_len()),
        ));
    }
    if y.len != shape.out_len() {
        return Err(bad(
            op,
            format!("y has {} values, expected {}", y.len, shape.out_len()),
        ));
    }
    if let Some(b) = bias {
        if b.len != co {
            return Err(bad(op, format!("bias has {} values, expected {co}", b.len)));
        }
    }
    to_u32(op, "input length", x.len)?;
    to_u32(op, "output length", y.len)?;
    let (oh, ow) = shape.out_hw();
    if rows.start > rows.end || rows.end > n * oh {
        return Err(bad(
            op,
            format!(
                "rows {}..{} are not within the {} output rows",
                rows.start,
                rows.end,
                n * oh
            ),
        ));
    }
    let (first, pixels) = (rows.start * ow, rows.end * ow);
    if pixels == first || co == 0 {
        return Ok(());
    }
    let limits = stream.limits();
    let wg = (CONV_TILE / 4) * (CONV_TILE / 4);
    let shared = 2 * CONV_TILE * CONV_BK_STRIDE * 4 + CONV_TILE * 12;
    if wg > limits.max_compute_workgroup_invocations
        || shared > limits.max_compute_shared_memory_size
    {
        return Err(VulkanError::Unsupported {
            device: stream.device().info().name.clone(),
            what: format!("{op} needs {wg} invocations and {shared} bytes of shared memory"),
        });
    }
    let tiles_m = co.div_ceil(CONV_TILE as u64);
    let tiles = tiles_m * (pixels - first).div_ceil(CONV_TILE as u64);
    let push = Push::default()
        .addr(c.address)
        .addr(x.address())
        .addr(bias.map_or(0, |b| b.address()))
        .addr(y.address())
        .u32(to_u32(op, "ci", ci)?)
        .u32(to_u32(op, "h", h)?)
        .u32(to_u32(op, "w", width)?)
        .u32(to_u32(op, "co", co)?)
        .u32(to_u32(op, "oh", oh)?)
        .u32(to_u32(op, "ow", ow)?)
        .u32(to_u32(op, "k", k)?)
        .u32(to_u32(op, "stride", stride)?)
        .u32(to_u32(op, "pad", pad)?)
        .u32(to_u32(op, "pixels", pixels)?)
        .u32(to_u32(op, "tiles", tiles_m)?)
        .u32(bias.is_some() as u32)
        .u32(to_u32(op, "first pixel", first)?);
    let mut reads = vec![c.access, x.access()];
    reads.extend(bias.map(|b| b.access()));
    stream.dispatch(&Dispatch {
        kernel,
        spec: &[wg, limits.subgroup_size],
        push: push.bytes(),
        groups: grid_1d(tiles, 1)?,
        reads: &reads,
        writes: &[y.access()],
    })
}

/// Group norm of `n` images of `channels` channels of `plane` (h · w) values each, in `groups`
/// groups, with per-channel `weight` and `bias`, then SiLU when `silu` is set. In place is
/// allowed (`out` may be `x`).
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    stream: &mut Stream,
    x: F32s<'_>,
    weight: F32s<'_>,
    bias: F32s<'_>,
    out: F32s<'_>,
    channels: u64,
    plane: u64,
    groups: u64,
    eps: f32,
    silu: bool,
) -> Result<(), VulkanError> {
    let op = "group_norm_f32";
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(bad(
            op,
            format!("{channels} channels do not split into {groups} groups"),
        ));
    }
    let image = channels * plane;
    if image == 0 || !x.len.is_multiple_of(image) {
        return Err(bad(
            op,
            format!(
                "x has {} values, not a whole number of {channels}×{plane} images",
                x.len
            ),
        ));
    }
    if out.len != x.len {
        return Err(bad(
            op,
            format!("out has {} values, x has {}", out.len, x.len),
        ));
    }
    for (what, p) in [("weight", weight), ("bias", bias)] {
        if p.len != channels {
            return Err(bad(
                op,
                format!("{what} has {} values, expected {channels}", p.len),
            ));
        }
    }
    to_u32(op, "length", x.len)?;
    let per_group = channels / groups;
    let n_groups = x.len / image * groups;
    let len = per_group * plane;
    if let Some(cap) = stream.limits().max_loop_iterations {
        // Three loops of four values per iteration, and the two reductions' short loops.
        let wg = super::nn::row_wg(stream, len) as u64;
        let loops = 3 * len.div_ceil(4 * wg) + 256;
        if loops > cap {
            return Err(bad(
                op,
                format!(
                    "a group of {len} values is more than this device can normalize in one \
                     workgroup (its driver caps loops at {cap} iterations); use more groups \
                     or a smaller image"
                ),
            ));
        }
    }
    let push = Push::default()
        .addr(x.address())
        .addr(weight.address())
        .addr(bias.address())
        .addr(out.address())
        .u32(to_u32(op, "plane", plane)?)
        .u32(to_u32(op, "per_group", per_group)?)
        .u32(to_u32(op, "groups", groups)?)
        .u32(to_u32(op, "n_groups", n_groups)?)
        .f32(eps)
        .u32(silu as u32);
    row_dispatch(
        stream,
        KernelId::GroupNormF32,
        len,
        n_groups,
        &push,
        &[x.access(), weight.access(), bias.access()],
        &[out.access()],
    )
}

/// Nearest-neighbour ×2 upsampling of `planes` (images × channels) planes of `h` × `w`.
pub fn upsample2x(
    stream: &mut Stream,
    x: F32s<'_>,
    out: F32s<'_>,
    planes: u64,
    h: u64,
    w: u64,
) -> Result<(), VulkanError> {
    upsample_nearest(stream, x, out, planes, (h, w), (2 * h, 2 * w))
}

/// Nearest-neighbour upsampling of `planes` planes from `from` = (h, w) to `to` = (oh, ow), no
/// smaller: output (y, x) reads input (y·h / oh, x·w / ow). The UNet upsamples to its skip's
/// size when a latent side is not a multiple of the total downscale.
pub fn upsample_nearest(
    stream: &mut Stream,
    x: F32s<'_>,
    out: F32s<'_>,
    planes: u64,
    from: (u64, u64),
    to: (u64, u64),
) -> Result<(), VulkanError> {
    let op = "upsample2x_f32";
    let ((h, w), (oh, ow)) = (from, to);
    if oh < h || ow < w {
        return Err(bad(op, format!("cannot upsample {h}×{w} to {oh}×{ow}")));
    }
    if x.len != planes * h * w {
        return Err(bad(
            op,
            format!("x has {} values, expected {planes}·{h}·{w}", x.len),
        ));
    }
    if out.len != planes * oh * ow {
        return Err(bad(
            op,
            format!("out has {} values, expected {planes}·{oh}·{ow}", out.len),
        ));
    }
    let push = Push::default()
        .addr(x.address())
        .addr(out.address())
        .u32(to_u32(op, "h", h)?)
        .u32(to_u32(op, "w", w)?)
        .u32(to_u32(op, "oh", oh)?)
        .u32(to_u32(op, "ow", ow)?)
        .u32(to_u32(op, "planes", planes)?);
    to_u32(op, "output length", out.len)?;
    if out.len == 0 {
        return Ok(());
    }
    elementwise(
        stream,
        KernelId::Upsample2xF32,
        out.len,
        &push,
        &[x.access()],
        &[out.access()],
    )
}

/// One multi-head attention over whole sequences (see attention.comp): `batch` × `n_heads`
/// heads of `head_dim`, `n_q` query rows against `n_kv` key/value rows per batch. Row r of a
/// tensor starts `stride` floats after row r − 1 (so q, k and v may be column ranges of one
/// fused projection, each view starting at its first column); head h is the `head_dim` columns
/// from h · head_dim. `causal`: query row i sees keys 0..=i only (CLIP's text encoder).
#[derive(Clone, Copy, Debug)]
pub struct SeqAttention {
    pub batch: u32,
    pub n_heads: u32,
    pub head_dim: u32,
    pub n_q: u32,
    pub n_kv: u32,
    pub q_stride: u32,
    pub kv_stride: u32,
    pub o_stride: u32,
    pub scale: f32,
    pub causal: bool,
}

/// Output values each invocation accumulates (`MAX_OUT` in image/attention.comp).
const SEQ_ATTN_MAX_OUT: u32 = 16;
const SEQ_ATTN_WG: u32 = 128;
/// The largest head this kernel takes (the VAE's single 512-wide head fits with room).
pub const SEQ_ATTN_MAX_HEAD_DIM: u32 = 1024;

/// Floats of running state [`seq_attention`] needs beside its output: a maximum and a sum per
/// (batch, head, query row). The state is used between the dispatches of one call where the
/// keys are split (see [`seq_attention_passes`]); callers allocate it on every device, so a
/// job's memory is the same wherever it runs.
pub fn seq_attention_state_len(p: &SeqAttention) -> u64 {
    2 * p.batch as u64 * p.n_heads as u64 * p.n_q as u64
}

/// The work plan of one [`seq_attention`]: workgroup width, rows per workgroup, keys per tile
/// and keys per dispatch.
fn seq_attention_plan(
    stream: &Stream,
    op: &'static str,
    p: &SeqAttention,
) -> Result<(u32, u32, u32, u64), VulkanError> {
    let l = stream.limits();
    let wg = SEQ_ATTN_WG.min(l.max_compute_workgroup_invocations).max(1);
    let (rows, tile) =
        super::nn::attention_plan(stream, op, p.head_dim, p.n_q as u64, SEQ_ATTN_MAX_OUT, wg)?;
    let per_pass = super::nn::attention_pass_keys(l, p.head_dim, rows, tile, wg, SEQ_ATTN_MAX_OUT)
        .unwrap_or(u64::MAX);
    Ok((wg, rows, tile, per_pass))
}

/// How many dispatches [`seq_attention`] makes on this stream's device: one, unless the
/// driver caps the loop iterations of an invocation and the keys are too many for one.
pub fn seq_attention_passes(stream: &Stream, p: &SeqAttention) -> Result<u64, VulkanError> {
    let (_, _, _, per_pass) = seq_attention_plan(stream, "attention_seq_f32", p)?;
    Ok((p.n_kv as u64).div_ceil(per_pass).max(1))
}

/// out = softmax(scale · q kᵀ) v per (batch, head), without storing the score matrix. `state`
/// holds at least [`seq_attention_state_len`] floats; its contents on entry do not matter.
pub fn seq_attention(
    stream: &mut Stream,
    p: &SeqAttention,
    q: F32s<'_>,
    k: F32s<'_>,
    v: F32s<'_>,
    out: F32s<'_>,
    state: F32s<'_>,
) -> Result<(), VulkanError> {
    seq_attention_biased(stream, p, q, k, v, None, out, state)
}

/// [`seq_attention`] with `bias` added to the scaled scores: out = softmax(scale · q kᵀ + bias)
/// v, `bias` holding n_heads × n_q × n_kv values that every batch shares (T5's relative
/// position bias).
#[allow(clippy::too_many_arguments)]
pub fn seq_attention_biased(
    stream: &mut Stream,
    p: &SeqAttention,
    q: F32s<'_>,
    k: F32s<'_>,
    v: F32s<'_>,
    bias: Option<F32s<'_>>,
    out: F32s<'_>,
    state: F32s<'_>,
) -> Result<(), VulkanError> {
    let op = "attention_seq_f32";
    if let Some(b) = bias {
        let want = p.n_heads as u64 * p.n_q as u64 * p.n_kv as u64;
        if b.len != want {
            return Err(bad(
                op,
                format!(
                    "bias has {} values, expected {want} ({} heads × {} × {})",
                    b.len, p.n_heads, p.n_q, p.n_kv
                ),
            ));
        }
        to_u32(op, "bias", b.len)?;
    }
    let d = p.head_dim as u64;
    if p.head_dim == 0 || p.head_dim > SEQ_ATTN_MAX_HEAD_DIM || p.n_heads == 0 {
        return Err(bad(
            op,
            format!(
                "{} heads of {} (head_dim must be 1..={SEQ_ATTN_MAX_HEAD_DIM})",
                p.n_heads, p.head_dim
            ),
        ));
    }
    if p.causal && p.n_q != p.n_kv {
        return Err(bad(
            op,
            "causal attention needs as many keys as queries".into(),
        ));
    }
    let width = p.n_heads as u64 * d;
    let need = |what: &str, view: F32s<'_>, rows: u64, stride: u32| {
        if (stride as u64) < width {
            return Err(bad(
                op,
                format!("{what} rows are {stride} apart, less than {width} columns of heads"),
            ));
        }
        let len = if rows == 0 {
            0
        } else {
            (rows - 1) * stride as u64 + width
        };
        if view.len < len {
            return Err(bad(
                op,
                format!("{what} has {} values, needs {len}", view.len),
            ));
        }
        to_u32(op, what, view.len)
    };
    let (bq, bkv) = (
        p.batch as u64 * p.n_q as u64,
        p.batch as u64 * p.n_kv as u64,
    );
    need("q", q, bq, p.q_stride)?;
    need("k", k, bkv, p.kv_stride)?;
    need("v", v, bkv, p.kv_stride)?;
    need("out", out, bq, p.o_stride)?;
    if bq == 0 {
        return Ok(());
    }
    if p.n_kv == 0 {
        return Err(bad(op, "no keys to attend to".into()));
    }
    let state_len = seq_attention_state_len(p);
    if state.len < state_len {
        return Err(bad(
            op,
            format!("state has {} values, needs {state_len}", state.len),
        ));
    }
    to_u32(op, "state", state.len)?;
    let (wg, rows, tile, per_pass) = seq_attention_plan(stream, op, p)?;
    let subgroup = stream.limits().subgroup_size;
    let rows = rows as u64;
    let n_blocks = (p.n_q as u64).div_ceil(rows);
    let mut groups = grid_1d(n_blocks, 1)?;
    let bh = p.batch as u64 * p.n_heads as u64;
    // Vulkan guarantees 65535 workgroups along z.
    if bh > 65535 {
        return Err(bad(
            op,
            format!("{bh} (batch, head) pairs is too many for one dispatch"),
        ));
    }
    groups[2] = bh as u32;
    let n_blocks = to_u32(op, "blocks", n_blocks)?;
    for (begin, end) in super::nn::key_passes(0, p.n_kv as u64, per_pass) {
        let push = Push::default()
            .addr(q.address())
            .addr(k.address())
            .addr(v.address())
            .addr(out.address())
            .addr(state.address())
            .addr(bias.map_or(0, |b| b.address()))
            .u32(p.n_heads)
            .u32(p.n_q)
            .u32(p.n_kv)
            .u32(p.q_stride)
            .u32(p.kv_stride)
            .u32(p.o_stride)
            .f32(p.scale)
            .u32(p.causal as u32)
            .u32(n_blocks)
            .u32(begin as u32)
            .u32(end as u32)
            .u32(bias.is_some() as u32);
        // A pass after the first reads what the one before left in out and state.
        let resumed = begin > 0;
        let mut reads = vec![q.access(), k.access(), v.access()];
        reads.extend(bias.map(|b| b.access()));
        if resumed {
            reads.extend([out.access(), state.access()]);
        }
        stream.dispatch(&Dispatch {
            kernel: KernelId::AttentionSeqF32,
            spec: &[wg, subgroup, p.head_dim, rows as u32, tile],
            push: push.bytes(),
            groups,
            reads: &reads,
            writes: &[out.access(), state.access()],
        })?;
    }
    Ok(())
}

/// out[b] = x[b]ᵀ for `batch` row-major matrices of `rows` × `cols`.
pub fn transpose(
    stream: &mut Stream,
    x: F32s<'_>,
    out: F32s<'_>,
    batch: u64,
    rows: u64,
    cols: u64,
) -> Result<(), VulkanError> {
    let op = "transpose_f32";
    let n = batch * rows * cols;
    if x.len != n || out.len != n {
        return Err(bad(
            op,
            format!(
                "x has {} and out {} values, expected {batch}·{rows}·{cols}",
                x.len, out.len
            ),
        ));
    }
    to_u32(op, "length", n)?;
    if n == 0 {
        return Ok(());
    }
    let push = Push::default()
        .addr(x.address())
        .addr(out.address())
        .u32(to_u32(op, "rows", rows)?)
        .u32(to_u32(op, "cols", cols)?)
        .u32(to_u32(op, "batch", batch)?);
    elementwise(
        stream,
        KernelId::TransposeF32,
        n,
        &push,
        &[x.access()],
        &[out.access()],
    )
}

/// out[i] = x[i] + b[i / plane]: one value of `b` per (image, channel) plane of NCHW `x`. `out`
/// may be `x`.
pub fn add_channel(
    stream: &mut Stream,
    x: F32s<'_>,
    b: F32s<'_>,
    out: F32s<'_>,
    plane: u64,
) -> Result<(), VulkanError> {
    let op = "add_channel_f32";
    if plane == 0 || x.len != b.len * plane || out.len != x.len {
        return Err(bad(
            op,
            format!(
                "x has {} values, out {}, b {}: expected b × {plane}",
                x.len, out.len, b.len
            ),
        ));
    }
    to_u32(op, "length", x.len)?;
    if x.len == 0 {
        return Ok(());
    }
    let push = Push::default()
        .addr(x.address())
        .addr(b.address())
        .addr(out.address())
        .u32(to_u32(op, "plane", plane)?)
        .u32(to_u32(op, "n", x.len)?);
    elementwise(
        stream,
        KernelId::AddChannelF32,
        x.len,
        &push,
        &[x.access(), b.access()],
        &[out.access()],
    )
}

/// The coefficients of one diffusion sampler step, as [`sampler_step`] applies them to every
/// latent value x with the noise prediction e (guided from its unguided and guided halves when
/// `guidance` is set):
/// x0 = (x − sigma·e)·inv_alpha; x' = x·x + x0·x0 + prev·(the previous x0) + noise·z, and the
/// next UNet input is next_scale·x'. Every sampler halod has (Euler, Euler ancestral,
/// DPM++ 2M) is one of these per step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerUpdate {
    /// The guidance scale, where the prediction comes as an unguided and a guided half.
    pub guidance: Option<f32>,
    pub sigma: f32,
    pub inv_alpha: f32,
    pub x: f32,
    pub x0: f32,
    /// The coefficient of the previous step's x0, where the step reads it.
    pub prev: Option<f32>,
    /// The coefficient of fresh noise, where the step adds some.
    pub noise: Option<f32>,
    /// Whether this step's x0 is kept for the next.
    pub keep_x0: bool,
    pub next_scale: f32,
}

/// One sampler step over `x` (updated in place) from the prediction `eps` (x's length, or
/// twice it with guidance: the unguided half first), writing the new x, scaled, to `next` as
/// many times as it holds x's length. `prev` (x's length) is read and written as `up` says; `noise` (x's length) is read
/// when `up.noise` is set.
pub fn sampler_step(
    stream: &mut Stream,
    up: &SamplerUpdate,
    eps: F32s<'_>,
    x: F32s<'_>,
    prev: Option<F32s<'_>>,
    noise: Option<F32s<'_>>,
    next: F32s<'_>,
) -> Result<(), VulkanError> {
    let op = "sampler_step_f32";
    let n = x.len;
    let halves = if up.guidance.is_some() { 2 } else { 1 };
    let copies = next.len / n.max(1);
    if eps.len != halves * n || next.len != copies * n || (n > 0 && copies == 0) {
        return Err(bad(
            op,
            format!(
                "x has {n} values, the prediction {} ({halves} × expected), next {} (a \
                 multiple expected)",
                eps.len, next.len
            ),
        ));
    }
    let wants_prev = up.prev.is_some() || up.keep_x0;
    match (wants_prev, prev) {
        (true, None) => {
            return Err(bad(
                op,
                "the step uses the previous x0 but has no buffer".into(),
            ))
        }
        (_, Some(p)) if p.len != n => {
            return Err(bad(op, format!("prev has {} values, x {n}", p.len)))
        }
        _ => {}
    }
    match (up.noise.is_some(), noise) {
        (true, None) => return Err(bad(op, "the step adds noise but has no buffer".into())),
        (_, Some(z)) if z.len != n => {
            return Err(bad(op, format!("noise has {} values, x {n}", z.len)))
        }
        _ => {}
    }
    to_u32(op, "length", eps.len.max(next.len))?;
    if n == 0 {
        return Ok(());
    }
    let flags = up.guidance.is_some() as u32
        | (up.prev.is_some() as u32) << 1
        | (up.keep_x0 as u32) << 2
        | (up.noise.is_some() as u32) << 3;
    // Buffers the step does not touch take x's address.
    let prev = prev.filter(|_| wants_prev);
    let noise = noise.filter(|_| up.noise.is_some());
    let push = Push::default()
        .addr(eps.address())
        .addr(x.address())
        .addr(prev.map_or(x.address(), |p| p.address()))
        .addr(noise.map_or(x.address(), |z| z.address()))
        .addr(next.address())
        .u32(to_u32(op, "n", n)?)
        .u32(flags)
        .u32(to_u32(op, "copies", copies)?)
        .f32(up.guidance.unwrap_or(1.0))
        .f32(up.sigma)
        .f32(up.inv_alpha)
        .f32(up.x)
        .f32(up.x0)
        .f32(up.prev.unwrap_or(0.0))
        .f32(up.noise.unwrap_or(0.0))
        .f32(up.next_scale);
    let mut reads = vec![eps.access(), x.access()];
    let mut writes = vec![x.access(), next.access()];
    if let Some(p) = prev {
        reads.push(p.access());
        if up.keep_x0 {
            writes.push(p.access());
        }
    }
    if let Some(z) = noise {
        reads.push(z.access());
    }
    elementwise(stream, KernelId::SamplerStepF32, n, &push, &reads, &writes)
}

/// Rotary embedding from a table, in place: for each of `tokens` tokens (rows `row_stride`
/// floats apart) and each of `heads` heads of `head_dim` values, every adjacent pair (2j, 2j+1)
/// turns by the angle whose (cos, sin) is `table[token][j]` (tokens × head_dim/2 × 2 values).
/// The angles of any number of position axes (Flux's frame, row and column) go in the table.
pub fn rope_table(
    stream: &mut Stream,
    x: F32s<'_>,
    table: F32s<'_>,
    tokens: u64,
    heads: u64,
    head_dim: u64,
    row_stride: u64,
) -> Result<(), VulkanError> {
    let op = "rope_table_f32";
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(bad(op, format!("head_dim {head_dim} is not even")));
    }
    if row_stride < heads * head_dim {
        return Err(bad(
            op,
            format!("rows {row_stride} apart hold less than {heads} heads of {head_dim}"),
        ));
    }
    let need = if tokens == 0 {
        0
    } else {
        (tokens - 1) * row_stride + heads * head_dim
    };
    if x.len < need {
        return Err(bad(op, format!("x has {} values, needs {need}", x.len)));
    }
    if table.len != tokens * head_dim {
        return Err(bad(
            op,
            format!(
                "the table has {} values, expected {tokens} tokens × {head_dim}",
                table.len
            ),
        ));
    }
    let n = tokens * heads * (head_dim / 2);
    to_u32(op, "x", x.len)?;
    if n == 0 {
        return Ok(());
    }
    let push = Push::default()
        .addr(x.address())
        .addr(table.address())
        .u32(to_u32(op, "heads", heads)?)
        .u32(to_u32(op, "head_dim", head_dim / 2)?)
        .u32(to_u32(op, "row_stride", row_stride)?)
        .u32(to_u32(op, "pairs", n)?);
    elementwise(
        stream,
        KernelId::RopeTableF32,
        n,
        &push,
        &[x.access(), table.access()],
        &[x.access()],
    )
}

/// How [`modulate`] combines its inputs.
#[derive(Clone, Copy)]
pub enum Modulation<'a> {
    /// out = x · (1 + scale) + shift.
    ScaleShift { scale: F32s<'a>, shift: F32s<'a> },
    /// out = x + gate · y.
    Gate { gate: F32s<'a>, y: F32s<'a> },
}

/// Adaptive layer norm's modulation or gating over rows of `row_len`, in groups of
/// `rows_per_batch` rows (one per image), each group reading its vectors at
/// `group · vec_stride` (see [`Modulation`]). `out` may be `x`.
pub fn modulate(
    stream: &mut Stream,
    x: F32s<'_>,
    m: Modulation<'_>,
    out: F32s<'_>,
    row_len: u64,
    rows_per_batch: u64,
    vec_stride: u64,
) -> Result<(), VulkanError> {
    let op = "modulate_f32";
    if row_len == 0 || rows_per_batch == 0 || !x.len.is_multiple_of(row_len * rows_per_batch) {
        return Err(bad(
            op,
            format!(
                "x has {} values, not whole groups of {rows_per_batch} rows of {row_len}",
                x.len
            ),
        ));
    }
    if out.len != x.len {
        return Err(bad(op, format!("out has {} values, x {}", out.len, x.len)));
    }
    let groups = x.len / (row_len * rows_per_batch);
    let vec_need = (groups - 1) * vec_stride + row_len;
    let (a, b, y, mode) = match m {
        Modulation::ScaleShift { scale, shift } => (scale, shift, x, 0u32),
        Modulation::Gate { gate, y } => {
            if y.len != x.len {
                return Err(bad(op, format!("y has {} values, x {}", y.len, x.len)));
            }
            (gate, gate, y, 1)
        }
    };
    for (what, v) in [("the first vector", a), ("the second vector", b)] {
        if v.len < vec_need {
            return Err(bad(
                op,
                format!("{what} has {} values, needs {vec_need}", v.len),
            ));
        }
    }
    to_u32(op, "x", x.len)?;
    if x.len == 0 {
        return Ok(());
    }
    let push = Push::default()
        .addr(x.address())
        .addr(y.address())
        .addr(a.address())
        .addr(b.address())
        .addr(out.address())
        .u32(to_u32(op, "row_len", row_len)?)
        .u32(to_u32(op, "rows_per_batch", rows_per_batch)?)
        .u32(to_u32(op, "vec_stride", vec_stride)?)
        .u32(mode)
        .u32(to_u32(op, "n", x.len)?);
    let mut reads = vec![x.access(), a.access(), b.access()];
    if mode == 1 {
        reads.push(y.access());
    }
    elementwise(
        stream,
        KernelId::ModulateF32,
        x.len,
        &push,
        &reads,
        &[out.access()],
    )
}

/// Copies `width` columns of `rows` rows: `out[r · out_stride + c] = x[r · x_stride + c]`
/// (each view starting at its first column): a column concatenation, one part at a time.
pub fn copy_cols(
    stream: &mut Stream,
    x: F32s<'_>,
    out: F32s<'_>,
    rows: u64,
    width: u64,
    x_stride: u64,
    out_stride: u64,
) -> Result<(), VulkanError> {
    let op = "copy_cols_f32";
    if x_stride < width || out_stride < width {
        return Err(bad(
            op,
            format!("rows {x_stride} and {out_stride} apart cannot hold {width} columns"),
        ));
    }
    let need = |stride: u64| {
        if rows == 0 {
            0
        } else {
            (rows - 1) * stride + width
        }
    };
    if x.len < need(x_stride) || out.len < need(out_stride) {
        return Err(bad(
            op,
            format!(
                "x has {} values and out {}: {rows} rows need {} and {}",
                x.len,
                out.len,
                need(x_stride),
                need(out_stride)
            ),
        ));
    }
    to_u32(op, "x", x.len)?;
    to_u32(op, "out", out.len)?;
    let n = rows * width;
    if n == 0 {
        return Ok(());
    }
    let push = Push::default()
        .addr(x.address())
        .addr(out.address())
        .u32(to_u32(op, "width", width)?)
        .u32(to_u32(op, "x_stride", x_stride)?)
        .u32(to_u32(op, "out_stride", out_stride)?)
        .u32(to_u32(op, "n", n)?);
    elementwise(
        stream,
        KernelId::CopyColsF32,
        n,
        &push,
        &[x.access()],
        &[out.access()],
    )
}
