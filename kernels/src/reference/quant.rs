//! References for the weight-matrix ops beyond those in [`crate::quant`] (which holds the
//! dequantizers and the plain matrix-vector product). Weights are dequantized with
//! [`crate::quant::dequantize`] and products summed in f64.

use crate::quant::{self, WeightType};

/// The mixture-of-experts matrix product of [`crate::ops::matmul_indexed`]: `w` holds
/// `counts.len()` stacked matrices of `rows_per_expert` rows × `cols` columns stored as `ty`;
/// for every expert e and every pair p in its list `pairs[e·n_tokens..][..counts[e]]`, row p of
/// `y` (n_tokens·k × rows_per_expert) becomes W[e] · x_row, where x_row is row p of `x` when
/// `x_per_pair` and row p / k otherwise. As on the GPU, a count above n_tokens is taken as
/// n_tokens, list entries not below n_tokens·k are skipped, and other rows of `y` keep their
/// values.
///
/// # Panics
///
/// If the lengths do not fit together or `cols` is not a whole number of `ty` blocks.
#[allow(clippy::too_many_arguments)]
pub fn matmul_indexed(
    ty: WeightType,
    w: &[u8],
    rows_per_expert: usize,
    cols: usize,
    counts: &[u32],
    pairs: &[u32],
    n_tokens: usize,
    k: usize,
    x: &[f32],
    x_per_pair: bool,
    y: &mut [f32],
) {
    let row_bytes = ty
        .row_bytes(cols)
        .unwrap_or_else(|| panic!("{cols} columns is not a whole number of {ty} blocks"));
    let expert_bytes = row_bytes * rows_per_expert;
    let n_pairs = n_tokens * k;
    assert_eq!(w.len(), counts.len() * expert_bytes, "weights length");
    assert_eq!(pairs.len(), counts.len() * n_tokens, "pairs length");
    let x_rows = if x_per_pair { n_pairs } else { n_tokens };
    assert_eq!(x.len(), x_rows * cols, "x length");
    assert_eq!(y.len(), n_pairs * rows_per_expert, "y length");
    let mut m = vec![0.0f32; rows_per_expert * cols];
    for (e, &count) in counts.iter().enumerate() {
        let count = (count as usize).min(n_tokens);
        if count == 0 {
            continue;
        }
        quant::dequantize(ty, &w[e * expert_bytes..(e + 1) * expert_bytes], &mut m)
            .expect("lengths checked above");
        for &p in &pairs[e * n_tokens..e * n_tokens + count] {
            let p = p as usize;
            if p >= n_pairs {
                continue;
            }
            let xr = if x_per_pair { p } else { p / k };
            let xs = &x[xr * cols..(xr + 1) * cols];
            for (r, out) in y[p * rows_per_expert..(p + 1) * rows_per_expert]
                .iter_mut()
                .enumerate()
            {
                let acc: f64 = m[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(xs)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                *out = acc as f32;
            }
        }
    }
}
