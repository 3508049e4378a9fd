//! Neural-network ops on f32 activations: norms, activations, softmax, rotary embedding,
//! attention over a KV cache, KV-cache stores, top-k and the mixture-of-experts routing and
//! combine. Row-wise ops run one workgroup per row; every op checks its arguments and returns
//! [`VulkanError::BadArgument`] when they do not fit together.

use super::{bad, elementwise, grid_1d, to_u32, F32s, Push, U32s};
use crate::error::VulkanError;
use crate::runtime::{Access, Buffer, Dispatch, Stream};
use crate::KernelId;

/// The most partial results a workgroup reduction keeps (`NN_MAX_PARTIALS` in nn.glsl): a
/// row kernel's workgroup may hold at most this many subgroups.
const MAX_PARTIALS: u32 = 64;
/// The widest workgroup a row kernel uses.
const ROW_WG: u32 = 256;
/// Output values each attention invocation accumulates (`MAX_OUT` in attention.comp).
const ATTN_MAX_OUT: u32 = 8;
/// Attention workgroup size.
const ATTN_WG: u32 = 128;
/// Largest head dimension attention supports.
pub const MAX_HEAD_DIM: u32 = 256;

/// A layer's K or V cache: `n_kv_heads × capacity × head_dim` values, f32 or f16, starting at
/// byte `offset` (a multiple of 4) of `buffer`. Each head's positions are contiguous rows.
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'a> {
    pub buffer: &'a Buffer,
    pub offset: u64,
    pub f16: bool,
}

impl KvCache<'_> {
    fn bytes_per_value(&self) -> u64 {
        if self.f16 {
            2
        } else {
            4
        }
    }

    fn access(&self, values: u64) -> Access<'_> {
        Access {
            buffer: self.buffer,
            offset: self.offset,
            len: values * self.bytes_per_value(),
        }
    }

    fn address(&self) -> u64 {
        self.buffer.address(self.offset)
    }
}

/// Shapes and options of [`attention`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub n_heads: u32,
    /// Divides `n_heads`; query head h reads kv head h / (n_heads / n_kv_heads).
    pub n_kv_heads: u32,
    /// At most [`MAX_HEAD_DIM`]; even when a cache is f16.
    pub head_dim: u32,
    pub n_q_tokens: u32,
    /// Position of query token 0; query token t is at first_pos + t and sees keys at positions
    /// 0..=first_pos + t, which the caches must already hold.
    pub first_pos: u32,
    /// Positions each cache has room for per kv head (the `capacity` of its layout).
    pub capacity: u32,
    /// Multiplies q·k (usually 1 / sqrt(head_dim)).
    pub scale: f32,
    /// A token at position p sees only keys at positions in (p - window, p].
    pub sliding_window: Option<u32>,
    /// Scores become softcap · tanh(score / softcap) (after scaling).
    pub softcap: Option<f32>,
}

fn same_len(op: &'static str, what: &str, got: u64, want: u64) -> Result<(), VulkanError> {
    if got != want {
        return Err(bad(
            op,
            format!("{what} has {got} elements, expected {want}"),
        ));
    }
    Ok(())
}

/// Number of rows of `row_len` in `len`, which must divide exactly.
fn rows(op: &'static str, len: u64, row_len: u64) -> Result<u64, VulkanError> {
    if row_len == 0 || !len.is_multiple_of(row_len) {
        return Err(bad(
            op,
            format!("{len} elements are not a whole number of rows of {row_len}"),
        ));
    }
    to_u32(op, "element count", len)?;
    Ok(len / row_len)
}

/// Workgroup size of a row kernel: a power of two near the row length, at least one subgroup,
/// at most ROW_WG, the device's limit and MAX_PARTIALS subgroups.
pub(super) fn row_wg(stream: &Stream, row_len: u64) -> u32 {
    let l = stream.limits();
    let sg = l.subgroup_size.max(1);
    let device_max = 1u32 << (31 - l.max_compute_workgroup_invocations.max(1).leading_zeros());
    let cap = ROW_WG.min(device_max).min(MAX_PARTIALS.saturating_mul(sg));
    let want = u32::try_from(row_len.next_power_of_two()).unwrap_or(u32::MAX);
    want.max(sg).min(cap).max(1)
}

/// Records a one-workgroup-per-row kernel over `n_rows` rows.
pub(super) fn row_dispatch(
    stream: &mut Stream,
    kernel: KernelId,
    row_len: u64,
    n_rows: u64,
    push: &Push,
    reads: &[Access<'_>],
    writes: &[Access<'_>],
) -> Result<(), VulkanError> {
    if n_rows == 0 {
        return Ok(());
    }
    let wg = row_wg(stream, row_len);
    let spec = [wg, stream.limits().subgroup_size];
    stream.dispatch(&Dispatch {
        kernel,
        spec: &spec,
        push: push.bytes(),
        groups: grid_1d(n_rows, 1)?,
        reads,
        writes,
    })
}

fn optional_row_param(
    op: &'static str,
    what: &str,
    p: Option<F32s<'_>>,
    row_len: u64,
) -> Result<(), VulkanError> {
    match p {
        Some(w) => same_len(op, what, w.len, row_len),
        None => Ok(()),
    }
}

/// RMS norm over rows of `row_len`: out = x / sqrt(mean(x²) + eps) · (weight + weight_offset).
/// `weight` (row_len values) is shared by every row; without it the scale is 1. Per-head q/k
/// norms are this op with row_len = head_dim. `out` may be `x`.
pub fn rms_norm(
    stream: &mut Stream,
    x: F32s<'_>,
    weight: Option<F32s<'_>>,
    out: F32s<'_>,
    row_len: u64,
    eps: f32,
    weight_offset: f32,
) -> Result<(), VulkanError> {
    let op = "rms_norm_f32";
    let n_rows = rows(op, x.len, row_len)?;
    same_len(op, "out", out.len, x.len)?;
    optional_row_param(op, "weight", weight, row_len)?;
    let push = Push::default()
        .addr(x.address())
        .addr(weight.map_or(0, |w| w.address()))
        .addr(out.address())
        .u32(to_u32(op, "row_len", row_len)?)
        .u32(to_u32(op, "rows", n_rows)?)
        .f32(eps)
        .f32(weight_offset)
        .u32(weight.is_some() as u32);
    let mut reads = vec![x.access()];
    reads.extend(weight.map(|w| w.access()));
    row_dispatch(
        stream,
        KernelId::RmsNormF32,
        row_len,
        n_rows,
        &push,
        &reads,
        &[out.access()],
    )
}

/// Layer norm over rows of `row_len`: out = (x - mean) / sqrt(var + eps) · weight + bias, with
/// weight and bias (row_len values each) optional. `out` may be `x`.
pub fn layer_norm(
    stream: &mut Stream,
    x: F32s<'_>,
    weight: Option<F32s<'_>>,
    bias: Option<F32s<'_>>,
    out: F32s<'_>,
    row_len: u64,
    eps: f32,
) -> Result<(), VulkanError> {
    let op = "layer_norm_f32";
    let n_rows = rows(op, x.len, row_len)?;
    same_len(op, "out", out.len, x.len)?;
    optional_row_param(op, "weight", weight, row_len)?;
    optional_row_param(op, "bias", bias, row_len)?;
    let push = Push::default()
        .addr(x.address())
        .addr(weight.map_or(0, |w| w.address()))
        .addr(bias.map_or(0, |b| b.address()))
        .addr(out.address())
        .u32(to_u32(op, "row_len", row_len)?)
        .u32(to_u32(op, "rows", n_rows)?)
        .f32(eps)
        .u32(weight.is_some() as u32)
        .u32(bias.is_some() as u32);
    let mut reads = vec![x.access()];
    reads.extend(weight.map(|w| w.access()));
    reads.extend(bias.map(|b| b.access()));
    row_dispatch(
        stream,
        KernelId::LayerNormF32,
        row_len,
        n_rows,
        &push,
        &reads,
        &[out.access()],
    )
}

fn activation(
    stream: &mut Stream,
    kernel: KernelId,
    x: F32s<'_>,
    up: Option<F32s<'_>>,
    out: F32s<'_>,
) -> Result<(), VulkanError> {
    let op = kernel.name();
    same_len(op, "out", out.len, x.len)?;
    if let Some(u) = up {
        same_len(op, "up", u.len, x.len)?;
    }
    if x.len == 0 {
        return Ok(());
    }
    let push = Push::default()
        .addr(x.address())
        .addr(up.map_or(0, |u| u.address()))
        .addr(out.address())
        .u32(to_u32(op, "n", x.len)?);
    let mut reads = vec![x.access()];
    reads.extend(up.map(|u| u.access()));
    elementwise(stream, kernel, x.len, &push, &reads, &[out.access()])
}

/// out = x / (1 + e^-x). `out` may be `x`.
pub fn silu(stream: &mut Stream, x: F32s<'_>, out: F32s<'_>) -> Result<(), VulkanError> {
    activation(stream, KernelId::SiluF32, x, None, out)
}

/// out = x/2 · (1 + tanh(sqrt(2/pi) · (x + 0.044715 x³))). `out` may be `x`.
pub fn gelu_tanh(stream: &mut Stream, x: F32s<'_>, out: F32s<'_>) -> Result<(), VulkanError> {
    activation(stream, KernelId::GeluTanhF32, x, None, out)
}

/// The exact gelu, out = x/2 · (1 + erf(x / √2)) (PyTorch's default `gelu`). `out` may be `x`.
pub fn gelu(stream: &mut Stream, x: F32s<'_>, out: F32s<'_>) -> Result<(), VulkanError> {
    activation(stream, KernelId::GeluF32, x, None, out)
}

/// CLIP's quick gelu, out = x · sigmoid(1.702 x). `out` may be `x`.
pub fn quick_gelu(stream: &mut Stream, x: F32s<'_>, out: F32s<'_>) -> Result<(), VulkanError> {
    activation(stream, KernelId::QuickGeluF32, x, None, out)
}

/// out = gelu(gate) · up with the exact gelu (diffusers' GEGLU). `out` may be `gate` or `up`.
pub fn geglu_erf(
    stream: &mut Stream,
    gate: F32s<'_>,
    up: F32s<'_>,
    out: F32s<'_>,
) -> Result<(), VulkanError> {
    activation(stream, KernelId::GegluErfF32, gate, Some(up), out)
}

/// out = silu(gate) · up. `out` may be `gate` or `up`.
pub fn swiglu(
    stream: &mut Stream,
    gate: F32s<'_>,
    up: F32s<'_>,
    out: F32s<'_>,
) -> Result<(), VulkanError> {
    activation(stream, KernelId::SwigluF32, gate, Some(up), out)
}

/// out = gelu_tanh(gate) · up. `out` may be `gate` or `up`.
pub fn geglu(
    stream: &mut Stream,
    gate: F32s<'_>,
    up: F32s<'_>,
    out: F32s<'_>,
) -> Result<(), VulkanError> {
    activation(stream, KernelId::GegluF32, gate, Some(up), out)
}

/// Softmax of scale · x over each row of `row_len`, max-subtracted; -inf entries get 0. `out`
/// may be `x`.
pub fn softmax(
    stream: &mut Stream,
    x: F32s<'_>,
    out: F32s<'_>,
    row_len: u64,
    scale: f32,
) -> Result<(), VulkanError> {
    let op = "softmax_f32";
    let n_rows = rows(op, x.len, row_len)?;
    same_len(op, "out", out.len, x.len)?;
    let push = Push::default()
        .addr(x.address())
        .addr(out.address())
        .u32(to_u32(op, "row_len", row_len)?)
        .u32(to_u32(op, "rows", n_rows)?)
        .f32(scale);
    row_dispatch(
        stream,
        KernelId::SoftmaxF32,
        row_len,
        n_rows,
        &push,
        &[x.access()],
        &[out.access()],
    )
}

/// How [`rope`] turns each pair of a head.
#[derive(Clone, Copy, Debug)]
pub struct RopeParams<'a> {
    pub n_heads: u64,
    pub head_dim: u64,
    /// The first `rotary_dims` (even, at most head_dim) values of each head are rotated, the
    /// rest copied.
    pub rotary_dims: u64,
    pub freq_base: f32,
    /// Positions are multiplied by this: 1, or 1 / factor for linear RoPE scaling.
    pub freq_scale: f32,
    /// Optional per-pair frequency divisors, rotary_dims / 2 of them (Llama 3.1's `rope_freqs`).
    pub freq_factors: Option<F32s<'a>>,
    /// Pair i is (i, i + rotary_dims / 2) instead of (2i, 2i + 1).
    pub neox: bool,
    /// YaRN context extension (with `freq_scale` = 1 / factor), or none.
    pub yarn: Option<Yarn>,
}

/// YaRN's blend of unscaled and scaled angles: pairs below `corr_low` keep the unscaled angle,
/// pairs above `corr_high` take the scaled one, linearly in between; cos and sin are multiplied
/// by `mscale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub corr_low: f32,
    pub corr_high: f32,
    pub mscale: f32,
}

impl Yarn {
    /// The ramp and scale for a context extended by `factor` from `original_context` tokens,
    /// with the published defaults' meaning of `beta_fast` (32) and `beta_slow` (1): the pair
    /// index at which a dimension turns `beta` times over the original context, floored and
    /// ceiled and kept inside the pairs; mscale = `attn_factor` · (1 + 0.1 · ln factor).
    pub fn new(
        rotary_dims: u64,
        freq_base: f32,
        factor: f32,
        original_context: u64,
        beta_fast: f32,
        beta_slow: f32,
        attn_factor: f32,
    ) -> Yarn {
        let dims = rotary_dims as f64;
        let base = freq_base as f64;
        let corr = |rotations: f64| {
            dims * (original_context as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let low = corr(beta_fast as f64).floor().max(0.0);
        let high = corr(beta_slow as f64).ceil().min(dims - 1.0);
        let mscale = if factor > 1.0 {
            1.0 + 0.1 * (factor as f64).ln()
        } else {
            1.0
        };
        Yarn {
            corr_low: low as f32,
            corr_high: high as f32,
            mscale: (attn_factor as f64 * mscale) as f32,
        }
    }
}

impl RopeParams<'_> {
    /// Plain RoPE over whole heads: no scaling, no frequency factors.
    pub fn plain(n_heads: u64, head_dim: u64, freq_base: f32, neox: bool) -> Self {
        RopeParams {
            n_heads,
            head_dim,
            rotary_dims: head_dim,
            freq_base,
            freq_scale: 1.0,
            freq_factors: None,
            neox,
            yarn: None,
        }
    }
}

/// Rotary position embedding. `x` is n_tokens × n_heads × head_dim and `positions` holds one
/// position per token. Pair i of a head is (2i, 2i + 1), or (i, i + rotary_dims / 2) when
/// `neox`, and turns by pos · freq_scale · freq_base^(-2i / rotary_dims) / freq_factors[i]
/// (under YaRN, blended with the unscaled angle per [`Yarn`]). `out` may be `x`.
pub fn rope(
    stream: &mut Stream,
    x: F32s<'_>,
    positions: U32s<'_>,
    out: F32s<'_>,
    r: RopeParams<'_>,
) -> Result<(), VulkanError> {
    let op = "rope_f32";
    let RopeParams {
        n_heads,
        head_dim,
        rotary_dims,
        freq_base,
        freq_scale,
        freq_factors,
        neox,
        yarn,
    } = r;
    if rotary_dims == 0 || !rotary_dims.is_multiple_of(2) || rotary_dims > head_dim {
        return Err(bad(
            op,
            format!("rotary_dims = {rotary_dims} must be even, positive and at most head_dim = {head_dim}"),
        ));
    }
    if !(freq_base > 0.0 && freq_base.is_finite()) {
        return Err(bad(op, format!("freq_base = {freq_base} must be positive")));
    }
    if !(freq_scale > 0.0 && freq_scale.is_finite()) {
        return Err(bad(
            op,
            format!("freq_scale = {freq_scale} must be positive"),
        ));
    }
    if let Some(f) = freq_factors {
        same_len(op, "freq_factors", f.len, rotary_dims / 2)?;
    }
    if let Some(y) = yarn {
        if !(y.mscale.is_finite() && y.corr_low.is_finite() && y.corr_high.is_finite()) {
            return Err(bad(op, format!("yarn parameters {y:?} must be finite")));
        }
    }
    let n_rows = rows(op, x.len, head_dim)?;
    if n_heads == 0 || !n_rows.is_multiple_of(n_heads) {
        return Err(bad(
            op,
            format!("{n_rows} head rows are not a whole number of tokens of {n_heads} heads"),
        ));
    }
    same_len(op, "out", out.len, x.len)?;
    same_len(op, "positions", positions.len, n_rows / n_heads)?;
    if x.len == 0 {
        return Ok(());
    }
    let slots = head_dim.div_ceil(2);
    let total = n_rows * slots;
    let push = Push::default()
        .addr(x.address())
        .addr(positions.address())
        .addr(out.address())
        .addr(freq_factors.map_or(0, |f| f.address()))
        .u32(to_u32(op, "threads", total)?)
        .u32(to_u32(op, "slots", slots)?)
        .u32(to_u32(op, "n_heads", n_heads)?)
        .u32(to_u32(op, "head_dim", head_dim)?)
        .u32(to_u32(op, "rotary_dims", rotary_dims)?)
        .f32((freq_base as f64).log2() as f32)
        .f32(freq_scale)
        .u32(neox as u32)
        .f32(if yarn.is_some() { 1.0 } else { 0.0 })
        .f32(yarn.map_or(0.0, |y| y.corr_low))
        .f32(yarn.map_or(0.0, |y| y.corr_high))
        .f32(yarn.map_or(1.0, |y| y.mscale));
    let mut reads = vec![x.access(), positions.access()];
    if let Some(f) = freq_factors {
        reads.push(f.access());
    }
    elementwise(
        stream,
        KernelId::RopeF32,
        total,
        &push,
        &reads,
        &[out.access()],
    )
}

fn check_cache(
    op: &'static str,
    what: &str,
    cache: &KvCache<'_>,
    head_dim: u64,
) -> Result<(), VulkanError> {
    if !cache.offset.is_multiple_of(4) {
        return Err(bad(
            op,
            format!("{what} offset {} is not a multiple of 4", cache.offset),
        ));
    }
    if cache.f16 && !head_dim.is_multiple_of(2) {
        return Err(bad(
            op,
            format!("an f16 {what} needs an even head_dim, not {head_dim}"),
        ));
    }
    Ok(())
}

/// Causal grouped-query attention of `q` (n_q_tokens × n_heads × head_dim) over K and V caches
/// (n_kv_heads × capacity × head_dim each, f32 or f16, already holding positions
/// 0..first_pos + n_q_tokens), written to `out` (same shape as q). Softmax is taken in f32
/// with a running maximum; no score matrix is stored.
///
/// `state` holds at least [`attention_state_len`] floats (its contents on entry do not matter):
/// the running maximum and sum per query row between the dispatches of one call, where the
/// keys are split because the driver caps loop iterations (see [`attention_passes`]).
pub fn attention(
    stream: &mut Stream,
    q: F32s<'_>,
    k_cache: KvCache<'_>,
    v_cache: KvCache<'_>,
    out: F32s<'_>,
    state: F32s<'_>,
    params: AttentionParams,
) -> Result<(), VulkanError> {
    let op = "attention_f32";
    let p = params;
    if p.n_heads == 0 || p.n_kv_heads == 0 || !p.n_heads.is_multiple_of(p.n_kv_heads) {
        return Err(bad(
            op,
            format!(
                "n_heads = {} is not a multiple of n_kv_heads = {}",
                p.n_heads, p.n_kv_heads
            ),
        ));
    }
    if p.head_dim == 0 || p.head_dim > MAX_HEAD_DIM {
        return Err(bad(
            op,
            format!("head_dim = {} is not in 1..={MAX_HEAD_DIM}", p.head_dim),
        ));
    }
    let d = p.head_dim as u64;
    check_cache(op, "K cache", &k_cache, d)?;
    check_cache(op, "V cache", &v_cache, d)?;
    let end = p.first_pos as u64 + p.n_q_tokens as u64;
    if end > p.capacity as u64 {
        return Err(bad(
            op,
            format!(
                "positions up to {end} do not fit a cache of capacity {}",
                p.capacity
            ),
        ));
    }
    if p.sliding_window == Some(0) {
        return Err(bad(op, "a sliding window of 0 sees nothing".into()));
    }
    if let Some(c) = p.softcap {
        if !(c > 0.0 && c.is_finite()) {
            return Err(bad(op, format!("softcap = {c} must be positive")));
        }
    }
    let q_len = p.n_q_tokens as u64 * p.n_heads as u64 * d;
    same_len(op, "q", q.len, q_len)?;
    same_len(op, "out", out.len, q_len)?;
    let state_len = attention_state_len(&p);
    if state.len < state_len {
        return Err(bad(
            op,
            format!("state has {} values, needs {state_len}", state.len),
        ));
    }
    to_u32(op, "state", state.len)?;
    to_u32(op, "q elements", q_len)?;
    let cache_values = p.n_kv_heads as u64 * p.capacity as u64 * d;
    to_u32(op, "cache values", cache_values)?;
    if p.n_q_tokens == 0 {
        return Ok(());
    }

    let (wg, rows_per_wg, tile, per_pass) = attention_plan_for(stream, op, &p)?;
    let subgroup = stream.limits().subgroup_size;
    let n_rows = p.n_q_tokens as u64 * (p.n_heads / p.n_kv_heads) as u64;
    let n_blocks = n_rows.div_ceil(rows_per_wg as u64);
    let mut groups = grid_1d(n_blocks, 1)?;
    groups[2] = p.n_kv_heads;
    let n_blocks = to_u32(op, "blocks", n_blocks)?;
    let window = p.sliding_window.unwrap_or(0);
    let (keys_begin, keys_end) = attention_keys(&p);
    let spec = [wg, subgroup, p.head_dim, rows_per_wg, tile];
    for (begin, end) in key_passes(keys_begin, keys_end, per_pass) {
        let push = Push::default()
            .addr(q.address())
            .addr(k_cache.address())
            .addr(v_cache.address())
            .addr(out.address())
            .addr(state.address())
            .u32(p.n_heads)
            .u32(p.n_kv_heads)
            .u32(p.n_q_tokens)
            .u32(p.first_pos)
            .u32(p.capacity)
            .f32(p.scale)
            .u32(window)
            .f32(p.softcap.unwrap_or(0.0))
            .u32(k_cache.f16 as u32 | (v_cache.f16 as u32) << 1)
            .u32(n_blocks)
            .u32(to_u32(op, "pass start", begin)?)
            .u32(to_u32(op, "pass end", end)?);
        // A pass after the first reads what the ones before left in out and state.
        let reads = [
            q.access(),
            k_cache.access(cache_values),
            v_cache.access(cache_values),
            out.access(),
            state.access(),
        ];
        stream.dispatch(&Dispatch {
            kernel: KernelId::AttentionF32,
            spec: &spec,
            push: push.bytes(),
            groups,
            reads: if begin > keys_begin {
                &reads
            } else {
                &reads[..3]
            },
            writes: &[out.access(), state.access()],
        })?;
    }
    Ok(())
}

/// Floats of running state [`attention`] needs: a maximum and a sum per (query token, head).
/// Callers allocate it on every device, so memory does not depend on where a model runs.
pub fn attention_state_len(p: &AttentionParams) -> u64 {
    2 * p.n_q_tokens as u64 * p.n_heads as u64
}

/// The key positions any query of one [`attention`] call sees: from the oldest the first
/// token's window reaches (0 without a window) to the last token's own position.
fn attention_keys(p: &AttentionParams) -> (u64, u64) {
    let end = p.first_pos as u64 + p.n_q_tokens as u64;
    let begin = match p.sliding_window {
        Some(w) => (p.first_pos as u64 + 1).saturating_sub(w as u64),
        None => 0,
    };
    (begin, end)
}

/// Workgroup width, rows per workgroup, keys per tile and keys per dispatch of one
/// [`attention`] call.
fn attention_plan_for(
    stream: &Stream,
    op: &'static str,
    p: &AttentionParams,
) -> Result<(u32, u32, u32, u64), VulkanError> {
    let l = stream.limits();
    let wg = ATTN_WG.min(l.max_compute_workgroup_invocations).max(1);
    let n_rows = p.n_q_tokens as u64 * (p.n_heads / p.n_kv_heads).max(1) as u64;
    // Vulkan guarantees 128 invocations, which covers head_dim 256.
    let (rows, tile) = attention_plan(stream, op, p.head_dim, n_rows, ATTN_MAX_OUT, wg)?;
    let per_pass =
        attention_pass_keys(l, p.head_dim, rows, tile, wg, ATTN_MAX_OUT).unwrap_or(u64::MAX);
    Ok((wg, rows, tile, per_pass))
}

/// How many dispatches [`attention`] makes on this stream's device: one, unless the driver caps
/// the loop iterations of an invocation and the keys are too many for one.
pub fn attention_passes(stream: &Stream, p: &AttentionParams) -> Result<u64, VulkanError> {
    let (_, _, _, per_pass) = attention_plan_for(stream, "attention_f32", p)?;
    let (begin, end) = attention_keys(p);
    Ok((end - begin).div_ceil(per_pass).max(1))
}

/// Rows per workgroup and keys per tile for the flash-attention kernels (attention.comp and
/// image/attention.comp): rows as many as the accumulators hold (`max_out` per invocation of a
/// `wg`-wide workgroup), no more than `rows_wanted` (to a power of two) and 64; keys per tile as
/// many as shared memory holds beside them (q, K padded by one, V, the scores, three floats per
/// row, and nn.glsl's 64 reduction partials), at most 64 and a multiple of 8 from 8 up.
pub(super) fn attention_plan(
    stream: &Stream,
    op: &'static str,
    head_dim: u32,
    rows_wanted: u64,
    max_out: u32,
    wg: u32,
) -> Result<(u32, u32), VulkanError> {
    let rows_cap = (max_out * wg / head_dim).min(64);
    if rows_cap == 0 {
        return Err(bad(
            op,
            format!("head_dim = {head_dim} needs a larger workgroup than the device allows"),
        ));
    }
    let rows = rows_wanted.next_power_of_two().min(rows_cap as u64);
    let d = head_dim as u64;
    let shared_floats = (stream.limits().max_compute_shared_memory_size / 4) as u64;
    // nn.glsl, which both attention shaders include, declares two reduction arrays of
    // MAX_PARTIALS words (values and indices).
    let fixed = rows * (d + 3) + 2 * MAX_PARTIALS as u64;
    let per_key = 2 * d + 1 + rows;
    let mut tile = (shared_floats.saturating_sub(fixed) / per_key).min(64);
    if tile >= 8 {
        tile -= tile % 8;
    }
    if tile == 0 {
        return Err(bad(
            op,
            format!("head_dim = {head_dim} does not fit in shared memory"),
        ));
    }
    Ok((rows as u32, tile as u32))
}

/// Keys one dispatch of a flash-attention kernel (attention.comp, image/attention.comp) may
/// cover, or `None` where the device does not cap loop iterations (see
/// [`crate::Limits::max_loop_iterations`]). The count follows the kernels' loops: per tile of
/// `tile` keys an invocation runs the K/V load, its share of the scores (each a dot product
/// unrolled by four), the per-row maximum and sum over the tile, its `max_out` accumulators
/// over the tile's keys, and the tile loop itself; outside the tiles, the q load, the
/// accumulators' setup and the output. The plan keeps to half the cap, so a miscount of the
/// compiler's loop shapes (it may unroll, never add) cannot reach it.
pub(super) fn attention_pass_keys(
    limits: &crate::Limits,
    head_dim: u32,
    rows: u32,
    tile: u32,
    wg: u32,
    max_out: u32,
) -> Option<u64> {
    let cap = limits.max_loop_iterations?;
    let (d, r, t, wg, mo) = (
        head_dim as u64,
        rows as u64,
        tile as u64,
        wg.max(1) as u64,
        max_out as u64,
    );
    let per_tile = (t * d).div_ceil(wg)
        + (r * t).div_ceil(wg) * (d / 4 + d % 4 + 3)
        + 2 * t
        + mo * (t + 1)
        + 1;
    let fixed = (r * d).div_ceil(wg) + 4 * mo + 64;
    let tiles = ((cap / 2).saturating_sub(fixed) / per_tile).max(1);
    Some(tiles * t)
}

/// The key ranges of a flash-attention call's dispatches: `begin..end` cut into runs of at most
/// `per_pass` keys (one run where nothing caps the loops).
pub(super) fn key_passes(begin: u64, end: u64, per_pass: u64) -> impl Iterator<Item = (u64, u64)> {
    let per_pass = per_pass.max(1);
    (begin..end)
        .step_by(usize::try_from(per_pass).unwrap_or(usize::MAX))
        .map(move |b| (b, end.min(b.saturating_add(per_pass))))
}

/// Writes `n_tokens` new K or V rows from `src` (n_tokens × n_kv_heads × head_dim, f32) into
/// `cache` (n_kv_heads × capacity × head_dim) at positions first_pos.., rounding to f16 when
/// the cache is f16.
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    stream: &mut Stream,
    src: F32s<'_>,
    cache: KvCache<'_>,
    n_kv_heads: u64,
    head_dim: u64,
    capacity: u64,
    first_pos: u64,
    n_tokens: u64,
) -> Result<(), VulkanError> {
    let op = if cache.f16 {
        "kv_store_f16"
    } else {
        "kv_store_f32"
    };
    if n_kv_heads == 0 || head_dim == 0 {
        return Err(bad(op, "n_kv_heads and head_dim must be positive".into()));
    }
    check_cache(op, "cache", &cache, head_dim)?;
    same_len(op, "src", src.len, n_tokens * n_kv_heads * head_dim)?;
    if first_pos + n_tokens > capacity {
        return Err(bad(
            op,
            format!(
                "positions {first_pos}..{} do not fit a cache of capacity {capacity}",
                first_pos + n_tokens
            ),
        ));
    }
    let cache_values = n_kv_heads * capacity * head_dim;
    to_u32(op, "cache values", cache_values)?;
    if n_tokens == 0 {
        return Ok(());
    }
    let (kernel, n) = if cache.f16 {
        (KernelId::KvStoreF16, src.len / 2)
    } else {
        (KernelId::KvStoreF32, src.len)
    };
    let push = Push::default()
        .addr(src.address())
        .addr(cache.address())
        .u32(to_u32(op, "n", n)?)
        .u32(to_u32(op, "n_kv_heads", n_kv_heads)?)
        .u32(to_u32(op, "head_dim", head_dim)?)
        .u32(to_u32(op, "capacity", capacity)?)
        .u32(to_u32(op, "first_pos", first_pos)?);
    elementwise(
        stream,
        kernel,
        n,
        &push,
        &[src.access()],
        &[cache.access(cache_values)],
    )
}

#[allow(clippy::too_many_arguments)]
fn top_k_inner(
    stream: &mut Stream,
    logits: F32s<'_>,
    row_len: u64,
    k: u64,
    mode: u32,
    out_ids: U32s<'_>,
    out_vals: F32s<'_>,
) -> Result<(), VulkanError> {
    let op = "top_k_f32";
    let n_rows = rows(op, logits.len, row_len)?;
    if k == 0 || k > row_len {
        return Err(bad(op, format!("k = {k} is not in 1..={row_len}")));
    }
    same_len(op, "out_ids", out_ids.len, n_rows * k)?;
    same_len(op, "out_vals", out_vals.len, n_rows * k)?;
    let push = Push::default()
        .addr(logits.address())
        .addr(out_ids.address())
        .addr(out_vals.address())
        .u32(to_u32(op, "row_len", row_len)?)
        .u32(to_u32(op, "rows", n_rows)?)
        .u32(to_u32(op, "k", k)?)
        .u32(mode);
    row_dispatch(
        stream,
        KernelId::TopKF32,
        row_len,
        n_rows,
        &push,
        &[logits.access()],
        &[out_ids.access(), out_vals.access()],
    )
}

/// The `k` largest logits of each row of `row_len`, largest first (ties to the lower index):
/// their indices in `out_ids` and values in `out_vals` (n_rows × k each). NaNs are never chosen.
pub fn top_k(
    stream: &mut Stream,
    logits: F32s<'_>,
    row_len: u64,
    k: u64,
    out_ids: U32s<'_>,
    out_vals: F32s<'_>,
) -> Result<(), VulkanError> {
    top_k_inner(stream, logits, row_len, k, 0, out_ids, out_vals)
}

/// The MoE router: softmax over each row, then its `k` most probable entries as in [`top_k`],
/// with their probabilities (divided by the sum of the k chosen when `renormalize`).
pub fn softmax_top_k(
    stream: &mut Stream,
    logits: F32s<'_>,
    row_len: u64,
    k: u64,
    renormalize: bool,
    out_ids: U32s<'_>,
    out_vals: F32s<'_>,
) -> Result<(), VulkanError> {
    let mode = if renormalize { 2 } else { 1 };
    top_k_inner(stream, logits, row_len, k, mode, out_ids, out_vals)
}

/// Workgroup size of [`moe_route`] before clamping to the device's limit.
const ROUTE_WG: u32 = 256;

/// Mixture-of-experts routing for a batch: `ids` holds the router's choice for `n_tokens`
/// tokens, k = `ids.len / n_tokens` expert ids each (as [`softmax_top_k`] writes them), and
/// pair p = t·k + s is token t's s-th choice. For every expert e < `n_experts` this writes
/// `counts[e]`, the number of pairs that chose e, and `pairs[e·n_tokens..][..counts[e]]`, those
/// pair indices in increasing order (the same on every device and every run). Entries of a list
/// past its count are left as they were.
///
/// A token names an expert at most once, so n_tokens entries per expert are enough; should the
/// ids repeat an expert within a token anyway, that list is cut at n_tokens entries. Ids not
/// below `n_experts` route their pair to no expert: [`matmul_indexed`](super::matmul_indexed)
/// then leaves that pair's output rows unwritten.
pub fn moe_route(
    stream: &mut Stream,
    ids: U32s<'_>,
    n_experts: u64,
    counts: U32s<'_>,
    pairs: U32s<'_>,
    n_tokens: u64,
) -> Result<(), VulkanError> {
    let op = "moe_route_u32";
    if n_tokens == 0 {
        if ids.len != 0 {
            return Err(bad(
                op,
                format!("ids has {} elements but n_tokens is 0", ids.len),
            ));
        }
    } else if !ids.len.is_multiple_of(n_tokens) {
        return Err(bad(
            op,
            format!(
                "ids has {} elements, not a whole number of ids per token for {n_tokens} tokens",
                ids.len
            ),
        ));
    }
    same_len(op, "counts", counts.len, n_experts)?;
    let list_len = n_experts
        .checked_mul(n_tokens)
        .ok_or_else(|| bad(op, "experts × tokens overflows".into()))?;
    same_len(op, "pairs", pairs.len, list_len)?;
    // The kernel indexes ids and pairs with 32-bit element offsets.
    to_u32(op, "ids length", ids.len)?;
    to_u32(op, "pairs length", list_len)?;
    if n_experts == 0 {
        return Ok(());
    }
    // One workgroup per expert; small batches get a smaller workgroup, since each invocation
    // takes a run of ids.
    let l = stream.limits();
    let want = u32::try_from(ids.len.next_power_of_two()).unwrap_or(u32::MAX);
    let wg = want
        .max(l.subgroup_size)
        .min(ROUTE_WG)
        .min(l.max_compute_workgroup_invocations)
        .max(1);
    let push = Push::default()
        .addr(ids.address())
        .addr(counts.address())
        .addr(pairs.address())
        .u32(to_u32(op, "ids length", ids.len)?)
        .u32(to_u32(op, "n_tokens", n_tokens)?)
        .u32(to_u32(op, "n_experts", n_experts)?);
    stream.dispatch(&Dispatch {
        kernel: KernelId::MoeRouteU32,
        spec: &[wg, l.subgroup_size],
        push: push.bytes(),
        groups: grid_1d(n_experts, 1)?,
        reads: &[ids.access()],
        writes: &[counts.access(), pairs.access()],
    })
}

/// The MoE combine for a batch of tokens: `out` is n_tokens × n, `weights` n_tokens × k (on
/// the device, as the router wrote them) and `rows` n_tokens·k × n, one expert output per pair
/// p = t·k + s (the layout [`matmul_indexed`](super::matmul_indexed) writes):
/// `out[t·n + j] = Σ_s weights[t·k + s] · rows[(t·k + s)·n + j]`. n_tokens is `out.len / n`.
/// `out` must not overlap `rows`.
pub fn moe_combine(
    stream: &mut Stream,
    rows: F32s<'_>,
    weights: F32s<'_>,
    out: F32s<'_>,
    n: u64,
    k: u64,
) -> Result<(), VulkanError> {
    let op = "moe_combine_f32";
    if k == 0 {
        return Err(bad(op, "k = 0: there are no experts to combine".into()));
    }
    let n_tokens = if n == 0 {
        if !weights.len.is_multiple_of(k) {
            return Err(bad(
                op,
                format!(
                    "weights has {} elements, not a whole number of tokens of {k}",
                    weights.len
                ),
            ));
        }
        weights.len / k
    } else {
        if !out.len.is_multiple_of(n) {
            return Err(bad(
                op,
                format!(
                    "out has {} elements, not a whole number of rows of {n}",
                    out.len
                ),
            ));
        }
        out.len / n
    };
    let n_pairs = n_tokens
        .checked_mul(k)
        .ok_or_else(|| bad(op, "tokens × k overflows".into()))?;
    same_len(op, "out", out.len, n_tokens * n)?;
    same_len(op, "weights", weights.len, n_pairs)?;
    let rows_len = n_pairs
        .checked_mul(n)
        .ok_or_else(|| bad(op, "pairs × n overflows".into()))?;
    same_len(op, "rows", rows.len, rows_len)?;
    to_u32(op, "rows length", rows_len)?;
    if out.len == 0 {
        return Ok(());
    }
    let push = Push::default()
        .addr(rows.address())
        .addr(weights.address())
        .addr(out.address())
        .u32(to_u32(op, "n", n)?)
        .u32(to_u32(op, "k", k)?)
        .u32(to_u32(op, "out length", out.len)?);
    elementwise(
        stream,
        KernelId::MoeCombineF32,
        out.len,
        &push,
        &[rows.access(), weights.access()],
        &[out.access()],
    )
}
