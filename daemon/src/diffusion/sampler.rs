//! Samplers over the discrete noise schedule of SD-family models, following diffusers'
//! schedulers step for step so a seed gives diffusers' image:
//! - `euler`: EulerDiscreteScheduler (no churn);
//! - `euler_a`: EulerAncestralDiscreteScheduler (fresh noise from the job's generator each step);
//! - `dpmpp_2m`: DPMSolverMultistepScheduler with `dpmsolver++`, order 2, the midpoint solver,
//!   a first-order last step onto σ = 0.
//!
//! with `normal` (the config's `timestep_spacing`) or `karras` sigmas (ρ = 7).
//!
//! The schedule: β from `beta_schedule` (`scaled_linear`: linspace(√β₀, √β₁, T)², in f32 as torch
//! makes it; `linear`), ᾱ = cumprod(1 − β) (accumulated in f64, stored in f32, as torch's CPU
//! cumprod does), σ(t) = √((1 − ᾱ) / ᾱ). Inference timesteps are spaced `leading`, `trailing` or
//! `linspace`, sigmas are interpolated linearly at them; karras sigmas are mapped back to
//! (fractional) timesteps by interpolating log σ. The Euler samplers work on x = x₀ + σ·ε (the
//! starting noise times [`Sampler::init_noise_sigma`], the model's input x ÷ √(σ² + 1));
//! DPM-Solver++ works on the variance-preserving x with α = 1/√(σ² + 1).
//! Each step is a few coefficients over every latent value ([`Sampler::update`]), in f32 like
//! diffusers' tensors: on the device in a job, on the host in [`Sampler::step`].

use std::fmt;

use halo_kernels::ops::SamplerUpdate;
use halo_kernels::reference::image::sampler_step;

use super::config::SchedulerConfig;
use super::rng::TorchRng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    Euler,
    EulerAncestral,
    DpmPp2m,
}

impl SamplerKind {
    pub fn parse(s: &str) -> Option<SamplerKind> {
        Some(match s {
            "euler" => SamplerKind::Euler,
            "euler_a" => SamplerKind::EulerAncestral,
            "dpmpp_2m" => SamplerKind::DpmPp2m,
            _ => return None,
        })
    }

    /// Whether its steps use a run of values beside the latents (DPM++ 2M's previous x0, Euler
    /// ancestral's noise), as [`Sampler::update`] says.
    pub fn carries_state(self) -> bool {
        self != SamplerKind::Euler
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_a",
            SamplerKind::DpmPp2m => "dpmpp_2m",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Normal,
    Karras,
}

impl Schedule {
    pub fn as_str(self) -> &'static str {
        match self {
            Schedule::Normal => "normal",
            Schedule::Karras => "karras",
        }
    }

    pub fn parse(s: &str) -> Option<Schedule> {
        Some(match s {
            "normal" => Schedule::Normal,
            "karras" => Schedule::Karras,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplerError(pub String);

impl fmt::Display for SamplerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SamplerError {}

/// A sampler set up for one job: its sigmas and timesteps, and the state it carries between
/// steps (DPM-Solver++'s previous prediction).
#[derive(Clone, Debug)]
pub struct Sampler {
    kind: SamplerKind,
    /// σ for each step, then the final σ (0): `steps + 1` values.
    sigmas: Vec<f32>,
    /// The UNet's timestep at each step.
    timesteps: Vec<f32>,
    init_noise_sigma: f32,
    /// DPM-Solver++: the previous step's x₀ prediction, for steps on the host.
    previous: Option<Vec<f32>>,
}

/// ᾱ for every training timestep, as diffusers computes it.
fn alphas_cumprod(cfg: &SchedulerConfig) -> Result<Vec<f32>, SamplerError> {
    let n = cfg.num_train_timesteps as usize;
    if n < 2 {
        return Err(SamplerError(format!(
            "num_train_timesteps = {n} is too small"
        )));
    }
    let linspace = |a: f32, b: f32| -> Vec<f32> {
        // torch.linspace in f32: from the start for the first half, from the end for the rest.
        let step = (b - a) / (n - 1) as f32;
        (0..n)
            .map(|i| {
                if i < n / 2 {
                    a + step * i as f32
                } else {
                    b - step * (n - 1 - i) as f32
                }
            })
            .collect()
    };
    let betas: Vec<f32> = match cfg.beta_schedule.as_str() {
        "scaled_linear" => linspace((cfg.beta_start as f32).sqrt(), (cfg.beta_end as f32).sqrt())
            .into_iter()
            .map(|b| b * b)
            .collect(),
        "linear" => linspace(cfg.beta_start as f32, cfg.beta_end as f32),
        other => {
            return Err(SamplerError(format!(
                "beta_schedule {other:?} is not supported (scaled_linear or linear)"
            )))
        }
    };
    let mut acc = 1.0f64;
    Ok(betas
        .iter()
        .map(|b| {
            acc *= (1.0 - b) as f64;
            acc as f32
        })
        .collect())
}

/// np.interp(x, 0..len, ys) for x inside the table.
fn interp(x: f64, ys: &[f32]) -> f64 {
    let last = (ys.len() - 1) as f64;
    let x = x.clamp(0.0, last);
    let i = (x.floor() as usize).min(ys.len() - 2);
    let f = x - i as f64;
    ys[i] as f64 + (ys[i + 1] as f64 - ys[i] as f64) * f
}

/// Karras et al.'s sigmas: ρ = 7 spacing between the range's ends.
fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..n)
        .map(|i| {
            let ramp = if n == 1 {
                0.0
            } else {
                i as f64 / (n - 1) as f64
            };
            (hi + ramp * (lo - hi)).powf(rho)
        })
        .collect()
}

/// The (fractional) training timestep of `sigma`, by linear interpolation of log σ.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let mut low = 0;
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n - 2);
    let (l, h) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((l - log_sigma) / (l - h)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

impl Sampler {
    pub fn new(
        cfg: &SchedulerConfig,
        kind: SamplerKind,
        schedule: Schedule,
        steps: u32,
    ) -> Result<Sampler, SamplerError> {
        if cfg.prediction_type != "epsilon" {
            return Err(SamplerError(format!(
                "prediction_type {:?} is not supported (epsilon)",
                cfg.prediction_type
            )));
        }
        let n_train = cfg.num_train_timesteps as usize;
        if steps == 0 || steps as usize > n_train {
            return Err(SamplerError(format!(
                "steps must be between 1 and {n_train}, not {steps}"
            )));
        }
        let ac = alphas_cumprod(cfg)?;
        let train_sigmas: Vec<f32> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
        let n = steps as usize;
        let offset = cfg.steps_offset as f64;
        let spaced = |count: usize, last: usize| -> Result<Vec<f64>, SamplerError> {
            Ok(match cfg.timestep_spacing.as_str() {
                "leading" => {
                    let ratio = (last / count) as f64;
                    (0..count)
                        .rev()
                        .map(|i| (i as f64 * ratio).round() + offset)
                        .collect()
                }
                "trailing" => {
                    let ratio = last as f64 / count as f64;
                    (1..=count)
                        .rev()
                        .map(|i| (i as f64 * ratio).round() - 1.0)
                        .collect()
                }
                "linspace" => (0..count)
                    .rev()
                    .map(|i| {
                        if count == 1 {
                            0.0
                        } else {
                            (n_train - 1) as f64 * i as f64 / (count - 1) as f64
                        }
                    })
                    .collect(),
                other => {
                    return Err(SamplerError(format!(
                        "timestep_spacing {other:?} is not supported"
                    )))
                }
            })
        };
        let (sigmas, timesteps): (Vec<f64>, Vec<f64>) = match kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let ts = spaced(n, n_train)?;
                let mut s: Vec<f64> = ts.iter().map(|&t| interp(t, &train_sigmas)).collect();
                let mut ts = ts;
                if schedule == Schedule::Karras {
                    if kind == SamplerKind::EulerAncestral {
                        return Err(SamplerError(
                            "euler_a runs with the normal schedule only".into(),
                        ));
                    }
                    // From the interpolated sigmas' ends, as diffusers' Euler does.
                    s = karras(*s.last().unwrap(), s[0], n);
                    ts = s.iter().map(|&x| sigma_to_t(x, &log_sigmas)).collect();
                }
                (s, ts)
            }
            SamplerKind::DpmPp2m => {
                // DPM-Solver spaces over one more step and drops the last.
                let ts: Vec<f64> = match cfg.timestep_spacing.as_str() {
                    "leading" => {
                        let ratio = (n_train / (n + 1)) as f64;
                        (1..=n)
                            .rev()
                            .map(|i| (i as f64 * ratio).round() + offset)
                            .collect()
                    }
                    "linspace" => (1..=n)
                        .rev()
                        .map(|i| ((n_train - 1) as f64 * i as f64 / n as f64).round())
                        .collect(),
                    _ => spaced(n, n_train)?,
                };
                match schedule {
                    Schedule::Normal => {
                        (ts.iter().map(|&t| interp(t, &train_sigmas)).collect(), ts)
                    }
                    Schedule::Karras => {
                        let s = karras(
                            train_sigmas[0] as f64,
                            *train_sigmas.last().unwrap() as f64,
                            n,
                        );
                        let ts = s
                            .iter()
                            .map(|&x| sigma_to_t(x, &log_sigmas).round())
                            .collect();
                        (s, ts)
                    }
                }
            }
        };
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().cloned().fold(0.0f32, f32::max);
        let init_noise_sigma = match kind {
            SamplerKind::DpmPp2m => 1.0,
            _ if matches!(cfg.timestep_spacing.as_str(), "linspace" | "trailing") => max,
            _ => (max * max + 1.0).sqrt(),
        };
        Ok(Sampler {
            kind,
            sigmas,
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            init_noise_sigma,
            previous: None,
        })
    }

    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// The UNet's timestep at each step.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// σ at each step and the final σ.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// What the starting noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// What the latents are multiplied by to make step `i`'s UNet input.
    pub fn input_scale(&self, i: usize) -> f32 {
        match self.kind {
            SamplerKind::DpmPp2m => 1.0,
            _ => 1.0 / (self.sigmas[i] * self.sigmas[i] + 1.0).sqrt(),
        }
    }

    /// Step `i` as coefficients over each latent value (see [`SamplerUpdate`]), with the
    /// prediction's guidance `guidance` and the next step's input scale folded in; the GPU runs
    /// it as one kernel (`ops::sampler_step`) and [`Self::step`] on the host.
    pub fn update(&self, i: usize, guidance: Option<f32>) -> SamplerUpdate {
        let s = self.sigmas[i];
        let s_next = self.sigmas[i + 1];
        let steps = self.timesteps.len();
        let next_scale = if i + 1 < steps {
            self.input_scale(i + 1)
        } else {
            1.0
        };
        // Euler: x0 = x − σ·ε and x' = x + (x − x0)/σ · dt, which is (1 + dt/σ)·x − dt/σ·x0.
        let euler = |dt: f32, noise: Option<f32>| SamplerUpdate {
            guidance,
            sigma: s,
            inv_alpha: 1.0,
            x: 1.0 + dt / s,
            x0: -dt / s,
            prev: None,
            noise,
            keep_x0: false,
            next_scale,
        };
        match self.kind {
            SamplerKind::Euler => euler(s_next - s, None),
            SamplerKind::EulerAncestral => {
                let up = (s_next * s_next * (s * s - s_next * s_next) / (s * s)).sqrt();
                let down = (s_next * s_next - up * up).sqrt();
                euler(down - s, Some(up))
            }
            SamplerKind::DpmPp2m => {
                let alpha_sigma = |sigma: f32| {
                    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
                    (a, sigma * a)
                };
                let lambda = |a: f32, s: f32| a.ln() - s.ln();
                let (a_s0, s_s0) = alpha_sigma(s);
                let (a_t, s_t) = alpha_sigma(s_next);
                let h = lambda(a_t, s_t) - lambda(a_s0, s_s0);
                let phi = a_t * ((-h).exp() - 1.0);
                let mut up = SamplerUpdate {
                    guidance,
                    sigma: s_s0,
                    inv_alpha: 1.0 / a_s0,
                    x: s_t / s_s0,
                    x0: -phi,
                    prev: None,
                    noise: None,
                    keep_x0: true,
                    next_scale,
                };
                // The second-order update from the second step on, but for the last (a
                // first-order step onto σ = 0): x' = r·x − φ·m0 − ½φ·(m0 − m1)/r0.
                if i > 0 && i + 1 < steps {
                    let (a_s1, s_s1) = alpha_sigma(self.sigmas[i - 1]);
                    let h0 = lambda(a_s0, s_s0) - lambda(a_s1, s_s1);
                    let r0 = h0 / h;
                    up.x0 = -phi - 0.5 * phi / r0;
                    up.prev = Some(0.5 * phi / r0);
                }
                up
            }
        }
    }

    /// Advances `x` by step `i` given the guided noise prediction `eps`, on the host. Euler
    /// ancestral draws its noise from `rng` (one draw of `x.len()` values per step, as
    /// diffusers does).
    pub fn step(&mut self, i: usize, eps: &[f32], x: &mut [f32], rng: &mut TorchRng) {
        assert_eq!(eps.len(), x.len());
        let up = self.update(i, None);
        let noise = match up.noise {
            Some(_) => rng.randn(x.len()),
            None => Vec::new(),
        };
        let prev = self.previous.get_or_insert_with(|| vec![0.0; x.len()]);
        sampler_step(&up, eps, x, prev, &noise, 0);
    }
}
