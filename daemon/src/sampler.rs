//! Choosing the next token from the logits: penalties, top-k, top-p, min-p, temperature, then a
//! seeded draw (or the arg-max when the temperature is 0), in the order llama.cpp applies them.
//!
//! Architecture invariant: pure functions of the logits, the token history and the sampler's own
//! seeded generator; the same seed and inputs always give the same token.

/// Sampling settings; `Default` is llama.cpp's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 (or less) means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recent tokens by this; 1 is off.
    pub repeat_penalty: f32,
    /// Subtract this times a token's count in the window; 0 is off.
    pub frequency_penalty: f32,
    /// Subtract this from tokens present in the window; 0 is off.
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

/// A sampler with its own random state.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub config: SamplerConfig,
    state: u64,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let state = config.seed ^ 0x5DEE_CE66_D1CE_4E5B;
        Sampler { config, state }
    }

    /// Uniform in [0, 1) (splitmix64).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks the next token. `history` is every token so far (prompt included).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = &self.config;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, if l.is_nan() { f32::NEG_INFINITY } else { l }))
            .collect();
        apply_penalties(&mut cand, history, c);
        if c.temperature <= 0.0 {
            return argmax(&cand);
        }
        // Most likely first; ties by lower id so the order is deterministic.
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.truncate(c.top_k);
        }
        let probs = softmax(&cand.iter().map(|x| x.1).collect::<Vec<_>>());
        let mut keep = cand.len();
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= c.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if c.min_p > 0.0 {
            let floor = probs[0] * c.min_p as f64;
            keep = keep.min(probs.iter().take_while(|p| **p >= floor).count().max(1));
        }
        cand.truncate(keep.max(1));
        let scaled: Vec<f32> = cand.iter().map(|x| x.1 / c.temperature).collect();
        let probs = softmax(&scaled);
        let r = self.uniform();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[cand.len() - 1].0
    }
}

fn apply_penalties(cand: &mut [(u32, f32)], history: &[u32], c: &SamplerConfig) {
    if c.repeat_penalty == 1.0 && c.frequency_penalty == 0.0 && c.presence_penalty == 0.0 {
        return;
    }
    let window = &history[history.len().saturating_sub(c.penalty_last_n)..];
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for t in window {
        *counts.entry(*t).or_default() += 1;
    }
    for (t, n) in counts {
        let Some(x) = cand.get_mut(t as usize) else {
            continue;
        };
        if x.1 > 0.0 {
            x.1 /= c.repeat_penalty;
        } else {
            x.1 *= c.repeat_penalty;
        }
        x.1 -= n as f32 * c.frequency_penalty + c.presence_penalty;
    }
}

fn argmax(cand: &[(u32, f32)]) -> u32 {
    let mut best = 0;
    for (i, x) in cand.iter().enumerate() {
        if x.1 > cand[best].1 {
            best = i;
        }
    }
    cand[best].0
}

/// Softmax in f64 (max-subtracted).
fn softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return vec![1.0 / x.len() as f64; x.len()];
    }
    let e: Vec<f64> = x.iter().map(|v| (*v as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

/// Natural-log softmax of the raw logits (before any penalty): the token's log-probability and
/// the `k` most likely tokens with theirs (ties by lower id).
pub fn logprobs(logits: &[f32], token: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|v| (*v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let lp = |t: u32| (logits[t as usize] as f64 - lse) as f32;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
    }
    idx.truncate(k);
    idx.sort_by(|a, b| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    });
    (lp(token), idx.into_iter().map(|t| (t, lp(t))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(cfg(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..cfg(1.0) });
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_1_and_tiny_top_p_are_greedy() {
        let logits = [0.0, 1.0, 5.0, 2.0];
        for c in [
            SamplerConfig {
                top_k: 1,
                ..cfg(1.0)
            },
            SamplerConfig {
                top_p: 0.01,
                ..cfg(1.0)
            },
            SamplerConfig {
                min_p: 0.99,
                ..cfg(1.0)
            },
        ] {
            let mut s = Sampler::new(c);
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]), 2);
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let logits = [0.0, 3f32.ln()];
        let mut s = Sampler::new(SamplerConfig {
            seed: 1,
            ..cfg(1.0)
        });
        let ones = (0..20_000).filter(|_| s.sample(&logits, &[]) == 1).count();
        let f = ones as f64 / 20_000.0;
        assert!((f - 0.75).abs() < 0.02, "{f}");
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let logits = [2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 1.5,
            ..cfg(0.0)
        });
        assert_eq!(s.sample(&logits, &[0]), 1, "2.0/1.5 < 1.9");
        let mut s = Sampler::new(SamplerConfig {
            presence_penalty: 0.5,
            ..cfg(0.0)
        });
        assert_eq!(s.sample(&logits, &[0]), 1);
        let mut s = Sampler::new(SamplerConfig {
            frequency_penalty: 0.05,
            ..cfg(0.0)
        });
        assert_eq!(
            s.sample(&logits, &[0]),
            0,
            "one occurrence: 2.0 - 0.05 > 1.9"
        );
        assert_eq!(s.sample(&logits, &[0, 0, 0]), 1, "three: 2.0 - 0.15 < 1.9");
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 0, 2);
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((lp as f64 - (1.0 - lse)).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [2, 1]);
        assert!((top[0].1 as f64 - (3.0 - lse)).abs() < 1e-6);
    }
}
