//! Starting noise that matches PyTorch's CPU generator bit for bit (`--rng torch-cpu`), so a seed
//! gives the latents diffusers and ComfyUI start from on CPU.
//!
//! What PyTorch does (ATen, CPU), reproduced here step by step:
//! - `torch.Generator("cpu").manual_seed(s)` seeds a standard 32-bit MT19937 with the low 32 bits
//!   of `s` and forgets any cached normal sample.
//! - `torch.randn(shape, generator=g)` on a contiguous float32 tensor of 16 or more values first
//!   draws one uniform per value (`(u32 & 0xFFFFFF) / 2^24`), then turns each block of 16 into
//!   normals with Box–Muller: the first 8 of the block are `u1`, the next 8 `u2`, and value `j` is
//!   `sqrt(-2 ln(1 - u1[j])) · cos(2π u2[j])`, value `j + 8` the same with `sin`. The logarithm,
//!   sine and cosine are the Cephes-style single-precision approximations of PyTorch's AVX2
//!   kernel (`avx_mathfun.h`; x86 builds use it, AVX-512 machines included), evaluated here in the
//!   same order of f32 operations. The released binaries are compiled with FMA contraction: a
//!   product whose only use is an addition becomes one fused multiply-add (the earlier product
//!   when both operands of an addition are products). The `mul_add` calls below are exactly
//!   those; without them about 1 value in 700 differs in its last bit. When the size is not a multiple of 16, the last 16 values are
//!   drawn again (16 fresh uniforms) and transformed as one more block, overwriting the tail.
//! - Fewer than 16 values go one at a time through a double-precision Box–Muller whose second
//!   value is cached for the next call (53-bit uniforms from two 32-bit draws).
//!
//! Checked against torch's own output in `daemon/tests/diffusion_rng.rs` on vectors recorded by
//! `scripts/gen_rng_refs.py`.

/// PyTorch's CPU random generator: MT19937 plus the cached second normal of the double path.
#[derive(Clone)]
pub struct TorchRng {
    mt: Mt19937,
    next_double_normal: Option<f64>,
}

impl TorchRng {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> TorchRng {
        TorchRng {
            mt: Mt19937::new(seed as u32),
            next_double_normal: None,
        }
    }

    /// One 32-bit draw (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// `generator->random64()`: two draws, the first in the high half.
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// A float32 uniform in [0, 1) with 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00FF_FFFF) as f32 * (1.0 / 16_777_216.0)
    }

    /// A float64 uniform in [0, 1) with 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `torch.randn(n, generator=self)` for a contiguous float32 tensor of `n` values.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block.try_into().expect("16 values"));
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail.try_into().expect("16 values"));
        }
        data
    }

    /// One standard normal from the double-precision path (`at::normal_distribution<double>`).
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }
}

/// Box–Muller over one block of 16 uniforms, as PyTorch's AVX2 kernel computes it (mean 0,
/// standard deviation 1: its final `fma(n, 1, 0)` is `n` itself, save for the sign of a zero).
fn box_muller_16(block: &mut [f32; 16]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * cephes_log(u1)).sqrt();
        let (s, c) = cephes_sincos(two_pi * u2);
        block[j] = (radius * c).mul_add(1.0, 0.0);
        block[j + 8] = (radius * s).mul_add(1.0, 0.0);
    }
}

/// A decimal constant as C rounds it: to double first, then to float. The constants below are
/// written as the Cephes tables give them, digits beyond f64's precision included.
const fn c(v: f64) -> f32 {
    v as f32
}

/// Natural logarithm for x > 0 (the Cephes `logf` polynomial): x = m · 2^e with m in
/// [√½, √2), ln x = e·ln 2 + ln m, ln 2 split in two parts for precision.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
fn cephes_log(x: f32) -> f32 {
    const SQRTHF: f32 = c(0.707106781186547524);
    const P: [f32; 9] = [
        c(7.0376836292E-2),
        c(-1.1514610310E-1),
        c(1.1676998740E-1),
        c(-1.2420140846E-1),
        c(1.4249322787E-1),
        c(-1.6668057665E-1),
        c(2.0000714765E-1),
        c(-2.4999993993E-1),
        c(3.3333331174E-1),
    ];
    const Q1: f32 = c(-2.12194440e-4);
    const Q2: f32 = c(0.693359375);
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = m < SQRTHF;
    let add = if below { m } else { 0.0 };
    m -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    m += add;
    let z = m * m;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(m, p);
    }
    y *= m;
    y = y.mul_add(z, e * Q1);
    y = (-z).mul_add(0.5, y);
    e.mul_add(Q2, m + y)
}

/// Sine and cosine (the Cephes `sinf`/`cosf` polynomials, with the argument reduced by π/4 in
/// three parts).
#[allow(clippy::excessive_precision, clippy::approx_constant)]
fn cephes_sincos(x: f32) -> (f32, f32) {
    const FOPI: f32 = c(1.27323954473516);
    const DP: [f32; 3] = [
        c(-0.78515625),
        c(-2.4187564849853515625e-4),
        c(-3.77489497744594108e-8),
    ];
    const SIN: [f32; 3] = [c(-1.9515295891E-4), c(8.3321608736E-3), c(-1.6666654611E-1)];
    const COS: [f32; 3] = [
        c(2.443315711809948E-005),
        c(-1.388731625493765E-003),
        c(4.166664568298827E-002),
    ];
    let sign_sin = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    let mut j = (x * FOPI) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sin = ((j & 4) as u32) << 29;
    let cos_poly_for_sin = j & 2 == 0;
    x = y.mul_add(DP[0], x);
    x = y.mul_add(DP[1], x);
    x = y.mul_add(DP[2], x);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_sin ^ swap_sin;

    let z = x * x;
    let mut yc = COS[0].mul_add(z, COS[1]);
    yc = yc.mul_add(z, COS[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    let mut ys = SIN[0].mul_add(z, SIN[1]);
    ys = ys.mul_add(z, SIN[2]);
    ys *= z;
    ys = ys.mul_add(x, x);

    // Where the sine takes the sine polynomial the cosine takes the cosine one, and the other
    // way round; the kernel selects with masks and subtractions, which this mirrors exactly.
    let (sin_s, sin_c) = if cos_poly_for_sin {
        (ys, 0.0)
    } else {
        (0.0, yc)
    };
    let s = sin_c + sin_s;
    let cv = (yc - sin_c) + (ys - sin_s);
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(cv.to_bits() ^ sign_cos),
    )
}

/// The standard 32-bit Mersenne Twister (MT19937).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_gives_the_reference_sequence() {
        // The 10000th output for the default seed 5489 is 4123659995 (C++ std::mt19937).
        let mut mt = Mt19937::new(5489);
        let v = (0..10_000).map(|_| mt.next_u32()).last().unwrap();
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn the_approximations_are_close_to_libm() {
        for i in 1..=10_000 {
            let u = i as f32 / 10_000.0;
            assert!(
                (cephes_log(u) - u.ln()).abs() <= 2e-7 * u.ln().abs().max(1.0),
                "{u}"
            );
            let t = u * std::f32::consts::TAU;
            let (s, c) = cephes_sincos(t);
            assert!(
                (s - t.sin()).abs() < 1e-6 && (c - t.cos()).abs() < 1e-6,
                "{t}"
            );
        }
    }

    #[test]
    fn randn_is_standard_normal_and_the_tail_is_redrawn() {
        let v = TorchRng::new(0).randn(100_000);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
        // 20 values: the first 4 come from the first block of 16, the last 16 from new draws.
        let a = TorchRng::new(7).randn(16);
        let b = TorchRng::new(7).randn(20);
        assert_eq!(&a[..4], &b[..4]);
        assert_ne!(&a[4..], &b[4..16]);
    }
}
