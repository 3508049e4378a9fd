//! References for the image-model ops (NCHW f32), in f64 where they accumulate.

/// The convolution of `n` images of `ci` × `h` × `w` with `co` filters of `ci` × `k` × `k`
/// (`w` row-major `[co][ci][k][k]`), stride and zero padding; plus `bias[co]`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    ci: usize,
    h: usize,
    wd: usize,
    co: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Vec<f32> {
    let oh = (h + 2 * pad - k) / stride + 1;
    let ow = (wd + 2 * pad - k) / stride + 1;
    let mut out = vec![0f32; n * co * oh * ow];
    for img in 0..n {
        for o in 0..co {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias.map_or(0.0, |b| b[o] as f64);
                    for c in 0..ci {
                        for ky in 0..k {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..k {
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[((img * ci + c) * h + iy as usize) * wd + ix as usize];
                                let wv = w[((o * ci + c) * k + ky) * k + kx];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out[((img * co + o) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    out
}

/// Group norm over images of `channels` × `plane` values, per-channel affine, optional SiLU.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    channels: usize,
    plane: usize,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Vec<f32> {
    let per_group = channels / groups;
    let len = per_group * plane;
    let mut out = Vec::with_capacity(x.len());
    for (g, run) in x.chunks(len).enumerate() {
        let mean = run.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
        let var = run.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for (i, &v) in run.iter().enumerate() {
            let c = (g % groups) * per_group + i / plane;
            let mut y = (v as f64 - mean) * inv * weight[c] as f64 + bias[c] as f64;
            if silu {
                y /= 1.0 + (-y).exp();
            }
            out.push(y as f32);
        }
    }
    out
}

/// Nearest-neighbour ×2 upsampling of `planes` planes of `h` × `w`.
pub fn upsample2x(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() * 4);
    for p in 0..planes {
        for y in 0..2 * h {
            for xx in 0..2 * w {
                out.push(x[(p * h + y / 2) * w + xx / 2]);
            }
        }
    }
    out
}

/// Attention per (batch, head) over rows with the given strides (see `ops::SeqAttention`), in
/// f64 with a max-subtracted softmax.
#[allow(clippy::too_many_arguments)]
pub fn seq_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    heads: usize,
    d: usize,
    n_q: usize,
    n_kv: usize,
    q_stride: usize,
    kv_stride: usize,
    o_stride: usize,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    seq_attention_biased(
        q, k, v, batch, heads, d, n_q, n_kv, q_stride, kv_stride, o_stride, scale, causal, None,
    )
}

/// [`seq_attention`] with `bias` (heads × n_q × n_kv, shared by every batch) added to the
/// scaled scores (see `ops::seq_attention_biased`).
#[allow(clippy::too_many_arguments)]
pub fn seq_attention_biased(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    heads: usize,
    d: usize,
    n_q: usize,
    n_kv: usize,
    q_stride: usize,
    kv_stride: usize,
    o_stride: usize,
    scale: f32,
    causal: bool,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = vec![0f32; ((batch * n_q).max(1) - 1) * o_stride + heads * d];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..n_q {
                let qi = (b * n_q + i) * q_stride + h * d;
                let keys = if causal { i + 1 } else { n_kv };
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        let kj = (b * n_kv + j) * kv_stride + h * d;
                        let dot = (0..d)
                            .map(|c| q[qi + c] as f64 * k[kj + c] as f64)
                            .sum::<f64>()
                            * scale as f64;
                        dot + bias.map_or(0.0, |b| b[(h * n_q + i) * n_kv + j] as f64)
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let total: f64 = w.iter().sum();
                let oi = (b * n_q + i) * o_stride + h * d;
                for c in 0..d {
                    let mut acc = 0.0;
                    for (j, wj) in w.iter().enumerate() {
                        acc += wj * v[(b * n_kv + j) * kv_stride + h * d + c] as f64;
                    }
                    out[oi + c] = (acc / total) as f32;
                }
            }
        }
    }
    out
}

/// `ops::sampler_step` in f32, in the kernel's order: updates `x` (and `prev`, when the step
/// keeps its x0) and returns the next UNet input, `copies` × x's length. `prev` and `noise`
/// may be empty where the step does not use them.
pub fn sampler_step(
    up: &crate::ops::SamplerUpdate,
    eps: &[f32],
    x: &mut [f32],
    prev: &mut [f32],
    noise: &[f32],
    copies: usize,
) -> Vec<f32> {
    let n = x.len();
    for i in 0..n {
        let e = match up.guidance {
            Some(g) => {
                let (u, c) = (eps[i], eps[n + i]);
                u + g * (c - u)
            }
            None => eps[i],
        };
        let x0 = (x[i] - up.sigma * e) * up.inv_alpha;
        let mut y = up.x * x[i] + up.x0 * x0;
        if let Some(c) = up.prev {
            y += c * prev[i];
        }
        if let Some(c) = up.noise {
            y += c * noise[i];
        }
        if up.keep_x0 {
            prev[i] = x0;
        }
        x[i] = y;
    }
    let mut next = Vec::with_capacity(copies * n);
    for _ in 0..copies {
        next.extend(x.iter().map(|v| up.next_scale * v));
    }
    next
}

/// `ops::rope_table` in f32: each adjacent pair of each head of each token turned by its
/// table entry (cos, sin).
pub fn rope_table(
    x: &mut [f32],
    table: &[f32],
    tokens: usize,
    heads: usize,
    d: usize,
    stride: usize,
) {
    for t in 0..tokens {
        for h in 0..heads {
            for j in 0..d / 2 {
                let at = t * stride + h * d + 2 * j;
                let (c, s) = (table[(t * d / 2 + j) * 2], table[(t * d / 2 + j) * 2 + 1]);
                let (a, b) = (x[at], x[at + 1]);
                x[at] = a * c - b * s;
                x[at + 1] = b * c + a * s;
            }
        }
    }
}

/// `ops::modulate` in f32 with `ScaleShift`: x · (1 + scale) + shift per group of rows.
pub fn modulate(
    x: &[f32],
    scale: &[f32],
    shift: &[f32],
    row_len: usize,
    rows_per_batch: usize,
    vec_stride: usize,
) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, v)| {
            let (c, g) = (i % row_len, i / row_len / rows_per_batch);
            v * (1.0 + scale[g * vec_stride + c]) + shift[g * vec_stride + c]
        })
        .collect()
}

/// `ops::modulate` in f32 with `Gate`: x + gate · y per group of rows.
pub fn gate(
    x: &[f32],
    gate: &[f32],
    y: &[f32],
    row_len: usize,
    rows_per_batch: usize,
    vec_stride: usize,
) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, v)| {
            let (c, g) = (i % row_len, i / row_len / rows_per_batch);
            v + gate[g * vec_stride + c] * y[i]
        })
        .collect()
}
