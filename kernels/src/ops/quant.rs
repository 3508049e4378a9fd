//! Products with (and lookups into) weight matrices stored in GGUF's formats: F32, F16, BF16 and
//! the block-quantized types of [`WeightType`]. One kernel source per op is compiled once per
//! weight type (`shaders/quant.kernels`); the per-type dequantization lives in
//! `shaders/include/quant.glsl` and matches [`crate::quant::dequantize`].

use super::{bad, grid_1d, to_u32, F32s, Push, U32s};
use crate::error::VulkanError;
use crate::quant::WeightType;
use crate::runtime::{Access, Buffer, Dispatch, Stream};
use crate::KernelId;

/// A row-major matrix of `rows` rows × `cols` columns stored as `ty` (each row is
/// `ty.row_bytes(cols)` bytes), starting `offset` bytes into `buffer`. GGUF's first dimension
/// (ne0) is `cols`.
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    pub buffer: &'a Buffer,
    pub offset: u64,
    pub ty: WeightType,
    pub rows: u64,
    pub cols: u64,
}

/// Threads per workgroup for matvec and get_rows, before clamping to the device's limit.
const ROW_WG: u32 = 128;
/// Rows each matvec workgroup computes (each slice of x is loaded once for all of them).
const MATVEC_ROWS: u32 = 2;
/// Columns per step of the matmul kernel (`BK` in matmul.comp), plus its padding.
const MATMUL_BK_STRIDE: u32 = 33;

enum Op {
    Matvec,
    Matmul,
    MatmulIndexed,
    GetRows,
}

fn kernel(op: Op, ty: WeightType) -> KernelId {
    use KernelId as K;
    use WeightType as T;
    match (op, ty) {
        (Op::Matvec, T::F32) => K::MatvecF32,
        (Op::Matvec, T::F16) => K::MatvecF16,
        (Op::Matvec, T::BF16) => K::MatvecBf16,
        (Op::Matvec, T::Q4_0) => K::MatvecQ40,
        (Op::Matvec, T::Q4_1) => K::MatvecQ41,
        (Op::Matvec, T::Q5_0) => K::MatvecQ50,
        (Op::Matvec, T::Q8_0) => K::MatvecQ80,
        (Op::Matvec, T::Q4_K) => K::MatvecQ4K,
        (Op::Matvec, T::Q5_K) => K::MatvecQ5K,
        (Op::Matvec, T::Q6_K) => K::MatvecQ6K,
        (Op::Matmul, T::F32) => K::MatmulF32,
        (Op::Matmul, T::F16) => K::MatmulF16,
        (Op::Matmul, T::BF16) => K::MatmulBf16,
        (Op::Matmul, T::Q4_0) => K::MatmulQ40,
        (Op::Matmul, T::Q4_1) => K::MatmulQ41,
        (Op::Matmul, T::Q5_0) => K::MatmulQ50,
        (Op::Matmul, T::Q8_0) => K::MatmulQ80,
        (Op::Matmul, T::Q4_K) => K::MatmulQ4K,
        (Op::Matmul, T::Q5_K) => K::MatmulQ5K,
        (Op::Matmul, T::Q6_K) => K::MatmulQ6K,
        (Op::MatmulIndexed, T::F32) => K::MatmulIdF32,
        (Op::MatmulIndexed, T::F16) => K::MatmulIdF16,
        (Op::MatmulIndexed, T::BF16) => K::MatmulIdBf16,
        (Op::MatmulIndexed, T::Q4_0) => K::MatmulIdQ40,
        (Op::MatmulIndexed, T::Q4_1) => K::MatmulIdQ41,
        (Op::MatmulIndexed, T::Q5_0) => K::MatmulIdQ50,
        (Op::MatmulIndexed, T::Q8_0) => K::MatmulIdQ80,
        (Op::MatmulIndexed, T::Q4_K) => K::MatmulIdQ4K,
        (Op::MatmulIndexed, T::Q5_K) => K::MatmulIdQ5K,
        (Op::MatmulIndexed, T::Q6_K) => K::MatmulIdQ6K,
        (Op::GetRows, T::F32) => K::GetRowsF32,
        (Op::GetRows, T::F16) => K::GetRowsF16,
        (Op::GetRows, T::BF16) => K::GetRowsBf16,
        (Op::GetRows, T::Q4_0) => K::GetRowsQ40,
        (Op::GetRows, T::Q4_1) => K::GetRowsQ41,
        (Op::GetRows, T::Q5_0) => K::GetRowsQ50,
        (Op::GetRows, T::Q8_0) => K::GetRowsQ80,
        (Op::GetRows, T::Q4_K) => K::GetRowsQ4K,
        (Op::GetRows, T::Q5_K) => K::GetRowsQ5K,
        (Op::GetRows, T::Q6_K) => K::GetRowsQ6K,
    }
}

/// What the checks learned about a weight matrix.
pub(super) struct Checked<'a> {
    pub(super) row_bytes: u32,
    pub(super) access: Access<'a>,
    pub(super) address: u64,
}

/// Checks that `w` is a whole number of blocks per row, lies inside its buffer, is aligned for
/// the kernels' loads, and that the device can run the kernels at all.
pub(super) fn check_weights<'a>(
    stream: &Stream,
    op: &'static str,
    w: &Weights<'a>,
) -> Result<Checked<'a>, VulkanError> {
    // Every variant reads through 16-bit storage (the float types share the include).
    if !stream.device().features().storage_16bit {
        return Err(VulkanError::Unsupported {
            device: stream.device().info().name.clone(),
            what: format!("{op} needs 16-bit storage buffer access"),
        });
    }
    let cols =
        usize::try_from(w.cols).map_err(|_| bad(op, format!("{} columns is too many", w.cols)))?;
    let row_bytes = w.ty.row_bytes(cols).ok_or_else(|| {
        bad(
            op,
            format!(
                "{} columns is not a whole number of {} blocks ({} elements each)",
                w.cols,
                w.ty,
                w.ty.block_elems()
            ),
        )
    })? as u64;
    let total = row_bytes
        .checked_mul(w.rows)
        .ok_or_else(|| bad(op, format!("{} rows of {row_bytes} bytes overflow", w.rows)))?;
    let end = w.offset.checked_add(total);
    if end.is_none_or(|e| e > w.buffer.len()) {
        return Err(bad(
            op,
            format!(
                "weights {}..{} lie outside a {}-byte buffer",
                w.offset,
                w.offset.saturating_add(total),
                w.buffer.len()
            ),
        ));
    }
    let align = if w.ty == WeightType::F32 { 4 } else { 2 };
    if !w.offset.is_multiple_of(align) {
        return Err(bad(
            op,
            format!(
                "{} weights must start at a multiple of {align} bytes, not {}",
                w.ty, w.offset
            ),
        ));
    }
    to_u32(op, "cols", w.cols)?;
    to_u32(op, "rows", w.rows)?;
    Ok(Checked {
        row_bytes: to_u32(op, "row bytes", row_bytes)?,
        access: Access {
            buffer: w.buffer,
            offset: w.offset,
            len: total,
        },
        address: w.buffer.address(w.offset),
    })
}

fn expect_len(op: &'static str, what: &str, got: u64, want: u64) -> Result<(), VulkanError> {
    if got != want {
        return Err(bad(
            op,
            format!("{what} has {got} elements, expected {want}"),
        ));
    }
    Ok(())
}

/// Workgroup size for the row kernels: ROW_WG within the device's limit.
fn row_wg(stream: &Stream) -> u32 {
    ROW_WG.min(stream.limits().max_compute_workgroup_invocations)
}

/// y[r] = Σ_c W[r,c]·x[c] (token generation). `x.len` must be `w.cols`, `y.len` `w.rows`.
pub fn matvec(
    stream: &mut Stream,
    w: Weights<'_>,
    x: F32s<'_>,
    y: F32s<'_>,
) -> Result<(), VulkanError> {
    let op = kernel(Op::Matvec, w.ty).name();
    let c = check_weights(stream, op, &w)?;
    expect_len(op, "x", x.len, w.cols)?;
    expect_len(op, "y", y.len, w.rows)?;
    record_matvec(stream, op, w, &c, None, x, 0, y, 1, 1)
}

/// How many experts of `rows_per_expert` rows `w` stacks; an error unless it is a whole number.
fn experts(op: &'static str, w: &Weights<'_>, rows_per_expert: u64) -> Result<u64, VulkanError> {
    if rows_per_expert == 0 || !w.rows.is_multiple_of(rows_per_expert) {
        return Err(bad(
            op,
            format!(
                "{} rows is not a whole number of experts of {rows_per_expert} rows",
                w.rows
            ),
        ));
    }
    Ok(w.rows / rows_per_expert)
}

/// Mixture of experts: `w` holds `n_experts` stacked matrices of `rows_per_expert` rows each
/// (`w.rows = n_experts · rows_per_expert`). For each slot k in `0..ids.len`:
/// `y[k·rows..(k+1)·rows] = W[ids[k]] · x[s·cols..(s+1)·cols]`, where s = k when `x_per_slot`
/// and 0 otherwise. The ids live on the GPU, so they cannot be checked here: a slot whose id is
/// not below `n_experts` gets zeros, and no memory outside `w` is read.
pub fn matvec_indexed(
    stream: &mut Stream,
    w: Weights<'_>,
    rows_per_expert: u64,
    ids: U32s<'_>,
    x: F32s<'_>,
    x_per_slot: bool,
    y: F32s<'_>,
) -> Result<(), VulkanError> {
    let op = kernel(Op::Matvec, w.ty).name();
    let c = check_weights(stream, op, &w)?;
    let n_experts = experts(op, &w, rows_per_expert)?;
    let slots = ids.len;
    if slots > 65535 {
        return Err(bad(op, format!("{slots} expert slots (at most 65535)")));
    }
    let x_slots = if x_per_slot { slots } else { 1 };
    expect_len(op, "x", x.len, x_slots * w.cols)?;
    expect_len(op, "y", y.len, slots * rows_per_expert)?;
    to_u32(op, "y length", y.len)?;
    to_u32(op, "x length", x.len)?;
    if slots == 0 {
        return Ok(());
    }
    let x_stride = if x_per_slot { w.cols } else { 0 };
    let sub = Weights {
        rows: rows_per_expert,
        ..w
    };
    record_matvec(
        stream,
        op,
        sub,
        &c,
        Some(ids),
        x,
        x_stride,
        y,
        slots as u32,
        to_u32(op, "experts", n_experts)?,
    )
}

#[allow(clippy::too_many_arguments)]
fn record_matvec(
    stream: &mut Stream,
    op: &'static str,
    w: Weights<'_>,
    c: &Checked<'_>,
    ids: Option<U32s<'_>>,
    x: F32s<'_>,
    x_stride: u64,
    y: F32s<'_>,
    slots: u32,
    n_experts: u32,
) -> Result<(), VulkanError> {
    if w.rows == 0 {
        return Ok(());
    }
    let expert_bytes = w.rows * u64::from(c.row_bytes);
    let push = Push::default()
        .addr(c.address)
        .addr(x.address())
        .addr(y.address())
        .addr(ids.map_or(0, |i| i.address()))
        .addr(expert_bytes)
        .u32(c.row_bytes)
        .u32(to_u32(op, "rows", w.rows)?)
        .u32(to_u32(op, "cols", w.cols)?)
        .u32(to_u32(op, "x stride", x_stride)?)
        .u32(n_experts);
    let wg = row_wg(stream);
    let mut groups = grid_1d(w.rows.div_ceil(u64::from(MATVEC_ROWS)), 1)?;
    groups[2] = slots;
    let mut reads = vec![c.access, x.access()];
    if let Some(i) = ids {
        reads.push(i.access());
    }
    stream.dispatch(&Dispatch {
        kernel: kernel(Op::Matvec, w.ty),
        spec: &[wg, stream.limits().subgroup_size, MATVEC_ROWS],
        push: push.bytes(),
        groups,
        reads: &reads,
        writes: &[y.access()],
    })
}

/// Y = X·Wᵀ for `n` input rows (prompt processing): `x` is n × cols row-major, `y` is n × rows
/// row-major. Tiled through shared memory; the tile sizes are picked from the device's limits.
pub fn matmul(
    stream: &mut Stream,
    w: Weights<'_>,
    x: F32s<'_>,
    y: F32s<'_>,
    n: u64,
) -> Result<(), VulkanError> {
    let op = kernel(Op::Matmul, w.ty).name();
    let c = check_weights(stream, op, &w)?;
    let x_len = n
        .checked_mul(w.cols)
        .ok_or_else(|| bad(op, "n × cols overflows".into()))?;
    let y_len = n
        .checked_mul(w.rows)
        .ok_or_else(|| bad(op, "n × rows overflows".into()))?;
    expect_len(op, "x", x.len, x_len)?;
    expect_len(op, "y", y.len, y_len)?;
    // The kernel indexes x and y with 32-bit element offsets.
    to_u32(op, "x length", x_len)?;
    to_u32(op, "y length", y_len)?;
    if n == 0 || w.rows == 0 {
        return Ok(());
    }
    let (tm, tn) = matmul_tiles(stream, op, n, false)?;
    let wg = (tm / 4) * (tn / 4);
    let tiles_m = w.rows.div_ceil(u64::from(tm));
    let tiles = tiles_m * n.div_ceil(u64::from(tn));
    let push = Push::default()
        .addr(c.address)
        .addr(x.address())
        .addr(y.address())
        .u32(c.row_bytes)
        .u32(to_u32(op, "rows", w.rows)?)
        .u32(to_u32(op, "cols", w.cols)?)
        .u32(to_u32(op, "n", n)?)
        .u32(to_u32(op, "tiles", tiles_m)?);
    stream.dispatch(&Dispatch {
        kernel: kernel(Op::Matmul, w.ty),
        spec: &[wg, stream.limits().subgroup_size, tm, tn],
        push: push.bytes(),
        groups: grid_1d(tiles, 1)?,
        reads: &[c.access, x.access()],
        writes: &[y.access()],
    })
}

/// The largest (TM, TN) output tile that fits the device: each thread computes 4 × 4 outputs,
/// so the workgroup has TM·TN/16 threads, and shared memory holds (TM + TN) padded rows of the
/// column step (plus, for the indexed form, the TN pair indices of the tile). Few input rows get
/// a narrower TN (down to 4) so most of the tile is not wasted.
fn matmul_tiles(
    stream: &Stream,
    op: &'static str,
    n: u64,
    indexed: bool,
) -> Result<(u32, u32), VulkanError> {
    let limits = stream.limits();
    let fits = |tm: u32, tn: u32| {
        let pair_ids = if indexed { tn * 4 } else { 0 };
        (tm / 4) * (tn / 4) <= limits.max_compute_workgroup_invocations
            && (tm + tn) * MATMUL_BK_STRIDE * 4 + pair_ids <= limits.max_compute_shared_memory_size
    };
    // A step of a few decoding sequences is a handful of rows: a tile of 4 or 8 keeps the
    // weights read once without computing 16 columns for 2 of them.
    let tn_want = match n {
        0..=4 => 4,
        5..=8 => 8,
        9..=16 => 16,
        _ => 64,
    };
    [(64, tn_want), (64, 16), (32, 32), (32, 16), (16, 16)]
        .into_iter()
        .find(|&(tm, tn)| fits(tm, tn))
        .ok_or_else(|| VulkanError::Unsupported {
            device: stream.device().info().name.clone(),
            what: format!("{op}: the device's workgroup or shared-memory limits are too small"),
        })
}

/// Mixture of experts over a batch of tokens (prompt processing). `w` holds `n_experts` stacked
/// matrices of `rows_per_expert` rows each (`w.rows = n_experts · rows_per_expert`, as for
/// [`matvec_indexed`]); `counts` (n_experts entries) and `pairs` (n_experts · n_tokens) are the
/// per-expert lists [`moe_route`](super::moe_route) writes for `n_tokens` tokens that chose `k`
/// experts each, pair p = t·k + s. For every expert e and every pair p in its list
/// `pairs[e·n_tokens..][..counts[e]]`:
/// `y[p·rows..(p+1)·rows] = W[e] · x_row`, where x_row is row p of `x` when `x_per_pair` (x is
/// n_tokens·k × cols) and row p / k otherwise (x is n_tokens × cols: each token's own input).
/// `y` is n_tokens·k × rows_per_expert.
///
/// The tiling is [`matmul`]'s, with the expert as a third grid dimension, so each expert's
/// weights are dequantized once per tile for all the tokens routed to it. The lists live on the
/// GPU, so they cannot be checked here: rows of pairs that are in no list (their id was not
/// below n_experts) are left unwritten, a count above n_tokens is taken as n_tokens, and a list
/// entry not below n_tokens·k is skipped, so nothing outside `w`, `x` and `y` is touched.
#[allow(clippy::too_many_arguments)]
pub fn matmul_indexed(
    stream: &mut Stream,
    w: Weights<'_>,
    rows_per_expert: u64,
    counts: U32s<'_>,
    pairs: U32s<'_>,
    n_tokens: u64,
    k: u64,
    x: F32s<'_>,
    x_per_pair: bool,
    y: F32s<'_>,
) -> Result<(), VulkanError> {
    let op = kernel(Op::MatmulIndexed, w.ty).name();
    let c = check_weights(stream, op, &w)?;
    let n_experts = experts(op, &w, rows_per_expert)?;
    // The experts are the grid's z dimension, which every device allows 65535 of.
    if n_experts > 65535 {
        return Err(bad(op, format!("{n_experts} experts (at most 65535)")));
    }
    expect_len(op, "counts", counts.len, n_experts)?;
    let list_len = n_experts
        .checked_mul(n_tokens)
        .ok_or_else(|| bad(op, "experts × tokens overflows".into()))?;
    expect_len(op, "pairs", pairs.len, list_len)?;
    // The kernel indexes the lists, x and y with 32-bit element offsets.
    to_u32(op, "pairs length", list_len)?;
    let n_pairs = n_tokens
        .checked_mul(k)
        .ok_or_else(|| bad(op, "tokens × k overflows".into()))?;
    to_u32(op, "tokens × k", n_pairs)?;
    let x_rows = if x_per_pair { n_pairs } else { n_tokens };
    let x_len = x_rows
        .checked_mul(w.cols)
        .ok_or_else(|| bad(op, "x rows × cols overflows".into()))?;
    let y_len = n_pairs
        .checked_mul(rows_per_expert)
        .ok_or_else(|| bad(op, "pairs × rows overflows".into()))?;
    expect_len(op, "x", x.len, x_len)?;
    expect_len(op, "y", y.len, y_len)?;
    to_u32(op, "x length", x_len)?;
    to_u32(op, "y length", y_len)?;
    if n_pairs == 0 || n_experts == 0 {
        return Ok(());
    }
    // Tiles are sized for the average list; a longer one takes more tiles along the tokens.
    let (tm, tn) = matmul_tiles(stream, op, n_pairs.div_ceil(n_experts), true)?;
    let wg = (tm / 4) * (tn / 4);
    let tiles_m = rows_per_expert.div_ceil(u64::from(tm));
    let tiles = tiles_m * n_tokens.div_ceil(u64::from(tn));
    let mut groups = grid_1d(tiles, 1)?;
    groups[2] = to_u32(op, "experts", n_experts)?;
    let push = Push::default()
        .addr(c.address)
        .addr(x.address())
        .addr(y.address())
        .addr(counts.address())
        .addr(pairs.address())
        .addr(rows_per_expert * u64::from(c.row_bytes))
        .u32(c.row_bytes)
        .u32(to_u32(op, "rows per expert", rows_per_expert)?)
        .u32(to_u32(op, "cols", w.cols)?)
        .u32(to_u32(op, "n_tokens", n_tokens)?)
        .u32(to_u32(op, "tiles", tiles_m)?)
        .u32(to_u32(op, "k", k)?)
        .u32(x_per_pair as u32);
    stream.dispatch(&Dispatch {
        kernel: kernel(Op::MatmulIndexed, w.ty),
        spec: &[wg, stream.limits().subgroup_size, tm, tn],
        push: push.bytes(),
        groups,
        reads: &[c.access, x.access(), counts.access(), pairs.access()],
        writes: &[y.access()],
    })
}

/// `out[i, :]` = row `ids[i]` of `w`, dequantized (embedding lookup); `out.len` must be
/// `ids.len · w.cols`. The ids live on the GPU, so they cannot be checked here: an id that is
/// not below `w.rows` yields a row of zeros, and no memory outside `w` is read.
pub fn get_rows(
    stream: &mut Stream,
    w: Weights<'_>,
    ids: U32s<'_>,
    out: F32s<'_>,
) -> Result<(), VulkanError> {
    let op = kernel(Op::GetRows, w.ty).name();
    let c = check_weights(stream, op, &w)?;
    let want = ids
        .len
        .checked_mul(w.cols)
        .ok_or_else(|| bad(op, "ids × cols overflows".into()))?;
    expect_len(op, "out", out.len, want)?;
    // The kernel indexes the output with 32-bit element offsets.
    to_u32(op, "out length", want)?;
    if ids.len == 0 || w.cols == 0 {
        return Ok(());
    }
    let push = Push::default()
        .addr(c.address)
        .addr(ids.address())
        .addr(out.address())
        .u32(c.row_bytes)
        .u32(to_u32(op, "rows", w.rows)?)
        .u32(to_u32(op, "cols", w.cols)?)
        .u32(to_u32(op, "ids", ids.len)?);
    stream.dispatch(&Dispatch {
        kernel: kernel(Op::GetRows, w.ty),
        spec: &[row_wg(stream), stream.limits().subgroup_size],
        push: push.bytes(),
        groups: grid_1d(ids.len, 1)?,
        reads: &[c.access, ids.access()],
        writes: &[out.access()],
    })
}
