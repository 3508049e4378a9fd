//! References for the neural-network ops ([`crate::ops::rms_norm`] and friends). Sums are taken
//! in f64 so that the reference is closer to exact than any GPU order of summation.

use crate::ops::AttentionParams;

/// Per row of `row_len`: x / sqrt(mean(x²) + eps) · (w + weight_offset).
pub fn rms_norm(
    x: &[f32],
    weight: Option<&[f32]>,
    row_len: usize,
    eps: f32,
    weight_offset: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(row_len) {
        let ss: f64 = row.iter().map(|v| (*v as f64) * (*v as f64)).sum();
        let inv = 1.0 / (ss / row_len as f64 + eps as f64).sqrt();
        for (i, v) in row.iter().enumerate() {
            let w = weight.map_or(1.0, |w| w[i] as f64 + weight_offset as f64);
            out.push((*v as f64 * inv * w) as f32);
        }
    }
    out
}

/// Per row of `row_len`: (x - mean) / sqrt(var + eps) · w + b.
pub fn layer_norm(
    x: &[f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    row_len: usize,
    eps: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(row_len) {
        let n = row_len as f64;
        let mean = row.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (i, v) in row.iter().enumerate() {
            let mut y = (*v as f64 - mean) * inv;
            if let Some(w) = weight {
                y *= w[i] as f64;
            }
            if let Some(b) = bias {
                y += b[i] as f64;
            }
            out.push(y as f32);
        }
    }
    out
}

fn silu1(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn gelu1(x: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
}

/// x / (1 + e^-x).
pub fn silu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| silu1(*v as f64) as f32).collect()
}

/// x/2 · (1 + tanh(sqrt(2/pi) · (x + 0.044715 x³))).
pub fn gelu_tanh(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| gelu1(*v as f64) as f32).collect()
}

/// The exact gelu, x/2 · (1 + erf(x / √2)), with erf from libm.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| gelu_erf1(*v as f64) as f32).collect()
}

/// x · sigmoid(1.702 x).
pub fn quick_gelu(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|v| {
            let x = *v as f64;
            (x / (1.0 + (-1.702 * x).exp())) as f32
        })
        .collect()
}

/// gelu(gate) · up with the exact gelu.
pub fn geglu_erf(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| (gelu_erf1(*g as f64) * *u as f64) as f32)
        .collect()
}

fn gelu_erf1(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// erf in f64 by its Maclaurin series for small |x| and its continued fraction beyond (both far
/// more accurate than the shader's approximation, which is what they check).
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        // erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        let x2 = a * a;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) = e^(-x²)/√π · 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// silu(gate) · up.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| (silu1(*g as f64) * *u as f64) as f32)
        .collect()
}

/// gelu_tanh(gate) · up.
pub fn geglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| (gelu1(*g as f64) * *u as f64) as f32)
        .collect()
}

/// Per row of `row_len`: softmax(scale · x). -inf entries get 0.
pub fn softmax(x: &[f32], row_len: usize, scale: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(row_len) {
        let v: Vec<f64> = row.iter().map(|x| *x as f64 * scale as f64).collect();
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = v.iter().map(|x| (x - m).exp()).sum();
        out.extend(v.iter().map(|x| ((x - m).exp() / sum) as f32));
    }
    out
}

/// Rotary embedding of x (n_tokens × n_heads × head_dim) at `positions` (one per token); see
/// [`crate::ops::rope`] (`freq_factors`, when given, has rotary_dims / 2 entries).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &[f32],
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
    rotary_dims: usize,
    freq_base: f32,
    freq_scale: f32,
    freq_factors: Option<&[f32]>,
    neox: bool,
    yarn: Option<crate::ops::Yarn>,
) -> Vec<f32> {
    let mut out = x.to_vec();
    let half = rotary_dims / 2;
    for (row, chunk) in out.chunks_mut(head_dim).enumerate() {
        let pos = positions[row / n_heads] as f64;
        let src = &x[row * head_dim..(row + 1) * head_dim];
        for i in 0..half {
            let factor = freq_factors.map_or(1.0, |f| f[i] as f64);
            let unscaled =
                pos * (freq_base as f64).powf(-2.0 * i as f64 / rotary_dims as f64) / factor;
            let mut theta = unscaled * freq_scale as f64;
            let mut mscale = 1.0;
            if let Some(y) = yarn {
                let t = (i as f64 - y.corr_low as f64)
                    / (y.corr_high as f64 - y.corr_low as f64).max(0.001);
                let ramp = 1.0 - t.clamp(0.0, 1.0);
                theta = theta * (1.0 - ramp) + unscaled * ramp;
                mscale = y.mscale as f64;
            }
            let (s, c) = theta.sin_cos();
            let (s, c) = (s * mscale, c * mscale);
            let (a, b) = if neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (src[a] as f64, src[b] as f64);
            chunk[a] = (x0 * c - x1 * s) as f32;
            chunk[b] = (x0 * s + x1 * c) as f32;
        }
    }
    out
}

/// Naive causal GQA attention over f32 caches (n_kv_heads × capacity × head_dim); f16 caches
/// are tested by passing their values widened to f32.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    capacity: usize,
    p: &AttentionParams,
) -> Vec<f32> {
    let (nh, nkv, d) = (
        p.n_heads as usize,
        p.n_kv_heads as usize,
        p.head_dim as usize,
    );
    let group = nh / nkv;
    let mut out = vec![0.0f32; q.len()];
    for t in 0..p.n_q_tokens as usize {
        let pos = p.first_pos as usize + t;
        let first = match p.sliding_window {
            Some(w) => (pos + 1).saturating_sub(w as usize),
            None => 0,
        };
        for h in 0..nh {
            let kvh = h / group;
            let qrow = &q[(t * nh + h) * d..][..d];
            let scores: Vec<f64> = (first..=pos)
                .map(|j| {
                    let krow = &k[(kvh * capacity + j) * d..][..d];
                    let dot: f64 = qrow
                        .iter()
                        .zip(krow)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    let s = dot * p.scale as f64;
                    match p.softcap {
                        Some(c) => c as f64 * (s / c as f64).tanh(),
                        None => s,
                    }
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            let o = &mut out[(t * nh + h) * d..][..d];
            for (dd, o) in o.iter_mut().enumerate() {
                let acc: f64 = (first..=pos)
                    .zip(&w)
                    .map(|(j, w)| w * v[(kvh * capacity + j) * d + dd] as f64)
                    .sum();
                *o = (acc / sum) as f32;
            }
        }
    }
    out
}

/// Writes `src` (n_tokens × n_kv_heads × head_dim) into `cache` (n_kv_heads × capacity ×
/// head_dim) at positions first_pos.., rounding to f16 precision when `f16`.
pub fn kv_store(
    cache: &mut [f32],
    src: &[f32],
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    first_pos: usize,
    f16: bool,
) {
    for (row, chunk) in src.chunks(head_dim).enumerate() {
        let (t, h) = (row / n_kv_heads, row % n_kv_heads);
        let at = (h * capacity + first_pos + t) * head_dim;
        for (d, v) in chunk.iter().enumerate() {
            cache[at + d] = if f16 { round_f16(*v) } else { *v };
        }
    }
}

/// The f16 bit pattern nearest to `x` (ties to even; overflow to infinity).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal (or zero) in f16.
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rest = m & ((1 << shift) - 1);
        let mid = 1 << (shift - 1);
        let round = rest > mid || (rest == mid && half & 1 == 1);
        return sign | (half + round as u32) as u16;
    }
    let half = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    let round = rest > 0x1000 || (rest == 0x1000 && half & 1 == 1);
    sign | (half + round as u32) as u16
}

/// The f32 value of f16 bits.
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: value = man · 2^-24.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        0x1f => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// `x` rounded to the nearest f16 value.
pub fn round_f16(x: f32) -> f32 {
    f16_bits_to_f32(f32_to_f16_bits(x))
}

/// Indices of the `k` largest values of each row (largest first, ties to the lower index) and
/// the values.
pub fn top_k(x: &[f32], row_len: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut ids = Vec::new();
    let mut vals = Vec::new();
    for row in x.chunks(row_len) {
        let mut order: Vec<usize> = (0..row_len).filter(|i| !row[*i].is_nan()).collect();
        // NaNs are filtered out above, so partial_cmp is total here (and -0 ties with 0, as on the GPU).
        order.sort_by(|a, b| row[*b].partial_cmp(&row[*a]).unwrap().then(a.cmp(b)));
        for i in &order[..k] {
            ids.push(*i as u32);
            vals.push(row[*i]);
        }
    }
    (ids, vals)
}

/// As [`top_k`], but the values are the softmax probabilities over the whole row, divided by
/// the sum of the `k` chosen when `renormalize`.
pub fn softmax_top_k(
    x: &[f32],
    row_len: usize,
    k: usize,
    renormalize: bool,
) -> (Vec<u32>, Vec<f32>) {
    let probs = softmax(x, row_len, 1.0);
    let (ids, _) = top_k(x, row_len, k);
    let mut vals: Vec<f32> = ids
        .iter()
        .enumerate()
        .map(|(j, i)| probs[(j / k) * row_len + *i as usize])
        .collect();
    if renormalize {
        for chunk in vals.chunks_mut(k) {
            let s: f64 = chunk.iter().map(|v| *v as f64).sum();
            for v in chunk {
                *v = (*v as f64 / s) as f32;
            }
        }
    }
    (ids, vals)
}

/// Mixture-of-experts routing of `ids` (n_tokens rows of k = ids.len() / n_tokens expert ids;
/// pair p = t·k + s): for every expert e < `n_experts`, the pairs p with ids[p] == e in
/// increasing order, cut at n_tokens entries; see [`crate::ops::moe_route`]. Returned as the op
/// lays them out: (counts, pairs) with list e at pairs[e·n_tokens..]. Entries past a list's
/// count, which the op leaves untouched, are u32::MAX here.
pub fn moe_route(ids: &[u32], n_experts: usize, n_tokens: usize) -> (Vec<u32>, Vec<u32>) {
    let mut counts = vec![0u32; n_experts];
    let mut pairs = vec![u32::MAX; n_experts * n_tokens];
    for (p, &e) in ids.iter().enumerate() {
        let e = e as usize;
        if e < n_experts && (counts[e] as usize) < n_tokens {
            pairs[e * n_tokens + counts[e] as usize] = p as u32;
            counts[e] += 1;
        }
    }
    (counts, pairs)
}

/// The MoE combine over n_tokens = w.len() / k tokens: out[t·n + j] = Σ_s w[t·k + s] ·
/// rows[(t·k + s)·n + j], with n = rows.len() / w.len().
pub fn moe_combine(rows: &[f32], w: &[f32], k: usize) -> Vec<f32> {
    let n_tokens = w.len() / k;
    let n = rows.len() / w.len();
    let mut out = Vec::with_capacity(n_tokens * n);
    for t in 0..n_tokens {
        for j in 0..n {
            let acc: f64 = (0..k)
                .map(|s| {
                    let p = t * k + s;
                    w[p] as f64 * rows[p * n + j] as f64
                })
                .sum();
            out.push(acc as f32);
        }
    }
    out
}

#[cfg(test)]
mod erf_tests {
    #[test]
    fn erf_matches_known_values() {
        // Values from tables of the error function.
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.5, -0.966_105_146_475_310_7),
        ] {
            assert!(
                (super::erf(x) - want).abs() < 1e-14,
                "erf({x}) = {}",
                super::erf(x)
            );
        }
    }
}
