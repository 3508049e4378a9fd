//! Flow matching for Flux: the `flow_euler` sampler (diffusers' FlowMatchEulerDiscreteScheduler
//! as FluxPipeline sets it up) and the 2×2 packing of latents into transformer tokens.
//!
//! The schedule: σᵢ = linspace(1, 1/N, N), then shifted. With `use_dynamic_shifting`, μ is
//! linear in the packed image token count between (base_image_seq_len, base_shift) and
//! (max_image_seq_len, max_shift), and σ ↦ e^μ / (e^μ + (1/σ − 1)); otherwise the static shift
//! s: σ ↦ s·σ / (1 + (s − 1)·σ). A final σ = 0 follows. The model's timestep is σ (diffusers
//! passes σ·1000 / 1000; the model multiplies by 1000 itself). A step is x += v · (σ_next − σ).
//!
//! Packing: latents (B, C, H, W) become (B, H/2 · W/2, 4C) tokens, token (i, j) holding the 2×2
//! patch at rows 2i.., columns 2j.. with its values in (c, dy, dx) order, as diffusers'
//! `_pack_latents` has it; each token's position ids are (0, i, j).

use serde::Deserialize;

use super::sampler::SamplerError;

/// `scheduler/scheduler_config.json` of a Flux pipeline.
#[derive(Clone, Debug, Deserialize)]
pub struct FlowSchedulerConfig {
    #[serde(default = "thousand")]
    pub num_train_timesteps: u32,
    #[serde(default = "one")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "base_shift")]
    pub base_shift: f64,
    #[serde(default = "max_shift")]
    pub max_shift: f64,
    #[serde(default = "base_len")]
    pub base_image_seq_len: u64,
    #[serde(default = "max_len")]
    pub max_image_seq_len: u64,
    #[serde(default = "exponential")]
    pub time_shift_type: String,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

fn thousand() -> u32 {
    1000
}
fn one() -> f64 {
    1.0
}
fn base_shift() -> f64 {
    0.5
}
fn max_shift() -> f64 {
    1.15
}
fn base_len() -> u64 {
    256
}
fn max_len() -> u64 {
    4096
}
fn exponential() -> String {
    "exponential".into()
}

impl FlowSchedulerConfig {
    /// Refuses what the sampler does not follow, naming the key.
    pub fn check(&self) -> Result<(), SamplerError> {
        let bad = |k: &str| {
            Err(SamplerError(format!(
                "the scheduler's {k} is not supported by flow_euler"
            )))
        };
        if self.time_shift_type != "exponential" {
            return bad("time_shift_type");
        }
        if self.shift_terminal.is_some() {
            return bad("shift_terminal");
        }
        if self.use_karras_sigmas || self.use_exponential_sigmas || self.use_beta_sigmas {
            return bad("use_karras/exponential/beta_sigmas");
        }
        if self.invert_sigmas {
            return bad("invert_sigmas");
        }
        if self.stochastic_sampling {
            return bad("stochastic_sampling");
        }
        if !self.shift.is_finite() || self.shift <= 0.0 {
            return Err(SamplerError(format!(
                "the scheduler's shift {} is not positive",
                self.shift
            )));
        }
        if self.use_dynamic_shifting && self.max_image_seq_len <= self.base_image_seq_len {
            return Err(SamplerError(
                "the scheduler's max_image_seq_len is not above base_image_seq_len".into(),
            ));
        }
        Ok(())
    }

    /// μ for `image_tokens` packed tokens (diffusers' `calculate_shift`).
    pub fn mu(&self, image_tokens: u64) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_tokens as f64 * m + b
    }
}

/// The σ of every step of a flow_euler run of `steps` steps over `image_tokens` packed tokens,
/// then the final 0: `steps + 1` values, in f32 as diffusers keeps them.
pub fn flow_sigmas(
    cfg: &FlowSchedulerConfig,
    steps: usize,
    image_tokens: u64,
) -> Result<Vec<f32>, SamplerError> {
    cfg.check()?;
    if steps == 0 {
        return Err(SamplerError("a run needs at least one step".into()));
    }
    let mu = cfg.mu(image_tokens);
    let mut out = Vec::with_capacity(steps + 1);
    for i in 0..steps {
        // np.linspace(1, 1/N, N) in f64, then stored as f32.
        let n = steps as f64;
        let s = if steps == 1 {
            1.0
        } else {
            1.0 + (1.0 / n - 1.0) * i as f64 / (n - 1.0)
        };
        let s = s as f32 as f64;
        let shifted = if cfg.use_dynamic_shifting {
            mu.exp() / (mu.exp() + (1.0 / s - 1.0))
        } else {
            cfg.shift * s / (1.0 + (cfg.shift - 1.0) * s)
        };
        out.push(shifted as f32);
    }
    out.push(0.0);
    Ok(out)
}

/// One flow_euler step in place: x += v · (σ_next − σ), in f32.
pub fn flow_step(x: &mut [f32], v: &[f32], sigma: f32, sigma_next: f32) {
    let dt = sigma_next - sigma;
    for (x, v) in x.iter_mut().zip(v) {
        *x += dt * v;
    }
}

/// Packs `batch` latents of `c` × `h` × `w` (h and w even) into (h/2 · w/2) tokens of 4c values.
pub fn pack(latents: &[f32], batch: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let (ph, pw) = (h / 2, w / 2);
    let mut out = vec![0f32; batch * c * h * w];
    for b in 0..batch {
        for i in 0..ph {
            for j in 0..pw {
                let tok = (b * ph + i) * pw + j;
                for ch in 0..c {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            let src = ((b * c + ch) * h + 2 * i + dy) * w + 2 * j + dx;
                            out[tok * 4 * c + ch * 4 + dy * 2 + dx] = latents[src];
                        }
                    }
                }
            }
        }
    }
    out
}

/// The inverse of [`pack`].
pub fn unpack(tokens: &[f32], batch: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let (ph, pw) = (h / 2, w / 2);
    let mut out = vec![0f32; batch * c * h * w];
    for b in 0..batch {
        for i in 0..ph {
            for j in 0..pw {
                let tok = (b * ph + i) * pw + j;
                for ch in 0..c {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            let dst = ((b * c + ch) * h + 2 * i + dy) * w + 2 * j + dx;
                            out[dst] = tokens[tok * 4 * c + ch * 4 + dy * 2 + dx];
                        }
                    }
                }
            }
        }
    }
    out
}

/// Position ids (0, row, column) of the packed tokens of an h × w latent, row by row.
pub fn image_ids(h: usize, w: usize) -> Vec<[f32; 3]> {
    let (ph, pw) = (h / 2, w / 2);
    (0..ph * pw)
        .map(|t| [0.0, (t / pw) as f32, (t % pw) as f32])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> FlowSchedulerConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn schnell_and_dev_schedules() {
        // schnell: shift 1, no dynamic shifting: plain linspace(1, 1/4, 4).
        let schnell = cfg(r#"{"shift": 1.0, "use_dynamic_shifting": false}"#);
        let s = flow_sigmas(&schnell, 4, 4096).unwrap();
        assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        // dev at 1024² (4096 tokens): μ = max_shift.
        let dev = cfg(r#"{"shift": 3.0, "use_dynamic_shifting": true}"#);
        assert!((dev.mu(4096) - 1.15).abs() < 1e-12);
        assert!((dev.mu(256) - 0.5).abs() < 1e-12);
        let s = flow_sigmas(&dev, 2, 4096).unwrap();
        let e = 1.15f64.exp();
        assert_eq!(s[0], 1.0);
        assert_eq!(s[1], (e / (e + 1.0)) as f32);
        assert_eq!(s[2], 0.0);
        // A static shift of 3 at σ = 0.5: 1.5 / 2.
        let shifted = cfg(r#"{"shift": 3.0}"#);
        assert_eq!(flow_sigmas(&shifted, 2, 1).unwrap()[1], 0.75);
    }

    #[test]
    fn schedules_refuse_what_they_do_not_follow() {
        for (json, want) in [
            (r#"{"time_shift_type": "linear"}"#, "time_shift_type"),
            (r#"{"shift_terminal": 0.1}"#, "shift_terminal"),
            (r#"{"use_karras_sigmas": true}"#, "karras"),
            (r#"{"shift": 0.0}"#, "not positive"),
            (r#"{"stochastic_sampling": true}"#, "stochastic_sampling"),
            (
                r#"{"use_dynamic_shifting": true, "max_image_seq_len": 10}"#,
                "max_image_seq_len",
            ),
        ] {
            let e = flow_sigmas(&cfg(json), 4, 16).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
        assert!(flow_sigmas(&cfg("{}"), 0, 16).is_err());
    }

    #[test]
    fn packing_round_trips_in_diffusers_order() {
        let (b, c, h, w) = (2, 3, 4, 6);
        let x: Vec<f32> = (0..b * c * h * w).map(|v| v as f32).collect();
        let p = pack(&x, b, c, h, w);
        // Token (i=1, j=2) of image 0: channel 1's patch at rows 2.., columns 4...
        let tok = 3 + 2;
        let at = |ch: usize, y: usize, xx: usize| ((ch * h + y) * w + xx) as f32;
        assert_eq!(
            &p[tok * 12 + 4..tok * 12 + 8],
            &[at(1, 2, 4), at(1, 2, 5), at(1, 3, 4), at(1, 3, 5)]
        );
        assert_eq!(unpack(&p, b, c, h, w), x);
        let ids = image_ids(h, w);
        assert_eq!(ids.len(), 6);
        assert_eq!(ids[tok], [0.0, 1.0, 2.0]);
    }

    #[test]
    fn a_step_moves_along_the_velocity() {
        let mut x = vec![1.0, 2.0];
        flow_step(&mut x, &[4.0, -2.0], 1.0, 0.75);
        assert_eq!(x, vec![0.0, 2.5]);
    }
}
