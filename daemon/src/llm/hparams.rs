//! An LLM's shape and numerics, read from its GGUF metadata, for each architecture halo runs.

use halo_kernels::ops::Yarn;

use crate::gguf::{Gguf, GgufError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen3,
    Qwen3Moe,
    Gemma3,
    Glm4,
}

impl Arch {
    pub fn from_name(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen3" => Arch::Qwen3,
            "qwen3moe" => Arch::Qwen3Moe,
            "gemma3" => Arch::Gemma3,
            "glm4" => Arch::Glm4,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Gemma3 => "gemma3",
            Arch::Glm4 => "glm4",
        }
    }
}

/// Everything the forward pass needs to know besides the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct HParams {
    pub arch: Arch,
    pub n_vocab: u64,
    pub n_embd: u64,
    pub n_layer: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
    pub head_dim: u64,
    pub n_ff: u64,
    pub eps: f32,
    pub rope_base: f32,
    /// RoPE base on sliding-window layers, where it differs (gemma3).
    pub rope_base_local: f32,
    pub rope_dims: u64,
    /// Positions are multiplied by this on layers that are not sliding-window ones: 1, or
    /// 1 / factor under linear RoPE scaling (gemma3 4B and up: 1/8) or YaRN.
    pub rope_freq_scale: f32,
    /// YaRN's blend of scaled and unscaled angles, when the file asks for YaRN.
    pub rope_yarn: Option<Yarn>,
    /// NEOX-style pairs (i, i + d/2) instead of adjacent pairs.
    pub neox: bool,
    pub context_train: u64,
    pub n_expert: u64,
    pub n_expert_used: u64,
    pub n_ff_expert: u64,
    pub sliding_window: Option<u32>,
    /// With a sliding window: layer l is global when (l + 1) % pattern == 0 (gemma3: 6).
    pub sliding_pattern: u64,
    /// Multiply the embeddings by this (gemma: √n_embd).
    pub embd_scale: f32,
    pub attn_scale: f32,
}

/// RoPE scaling as the GGUF declares it (`{arch}.rope.scaling.*`): the position scale (1, or
/// 1 / factor) and, for YaRN, its ramp and attention scale. `linear` (or the older
/// `{arch}.rope.scale_linear`) and `yarn` are implemented; other kinds (LongRoPE, ...) change the
/// frequencies in ways the engine does not, so such a file is refused rather than run subtly
/// wrong.
fn rope_scaling(
    g: &Gguf,
    arch: &str,
    rope_dims: u64,
    rope_base: f32,
) -> Result<(f32, Option<Yarn>), GgufError> {
    let key = |k: &str| format!("{arch}.{k}");
    let float = |k: &str| {
        g.metadata
            .get(&key(k))
            .and_then(|v| v.as_f64())
            .filter(|f| *f > 0.0 && f.is_finite())
    };
    let kind = g
        .metadata
        .get(&key("rope.scaling.type"))
        .and_then(|v| v.as_str())
        .unwrap_or("none");
    let scale = |k: &str| float(k).map_or(1.0, |f| (1.0 / f) as f32);
    match kind {
        "none" => Ok((scale("rope.scale_linear"), None)),
        "linear" => Ok((scale("rope.scaling.factor"), None)),
        "yarn" => {
            let factor = float("rope.scaling.factor").unwrap_or(1.0);
            let original = g
                .metadata
                .get(&key("rope.scaling.original_context_length"))
                .and_then(|v| v.as_u64())
                .ok_or_else(|| {
                    GgufError::MissingKey(key("rope.scaling.original_context_length"))
                })?;
            let yarn = Yarn::new(
                rope_dims,
                rope_base,
                factor as f32,
                original,
                float("rope.scaling.yarn_beta_fast").unwrap_or(32.0) as f32,
                float("rope.scaling.yarn_beta_slow").unwrap_or(1.0) as f32,
                float("rope.scaling.attn_factor").unwrap_or(1.0) as f32,
            );
            Ok(((1.0 / factor) as f32, Some(yarn)))
        }
        _ => Err(GgufError::WrongType {
            key: key("rope.scaling.type"),
            expected: "none, linear or yarn (the RoPE scalings halo implements)",
            found: "an unsupported RoPE scaling",
        }),
    }
}

impl HParams {
    pub fn from_gguf(g: &Gguf) -> Result<HParams, GgufError> {
        let arch_name = g.str("general.architecture")?;
        let arch = Arch::from_name(arch_name).ok_or_else(|| GgufError::WrongType {
            key: "general.architecture".into(),
            expected: "one of llama, qwen3, qwen3moe, gemma3, glm4",
            found: "an unsupported architecture",
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let u = |k: &str| g.u64(&key(k));
        let u_or = |k: &str, d: u64| {
            g.metadata
                .get(&key(k))
                .and_then(|v| v.as_u64())
                .unwrap_or(d)
        };
        let f_or = |k: &str, d: f64| {
            g.metadata
                .get(&key(k))
                .and_then(|v| v.as_f64())
                .unwrap_or(d)
        };
        let n_embd = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        if n_head == 0 || n_embd == 0 {
            return Err(GgufError::BadShape {
                tensor: key("attention.head_count"),
                message: "must be positive".into(),
            });
        }
        let n_head_kv = u_or("attention.head_count_kv", n_head);
        if n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(GgufError::BadShape {
                tensor: key("attention.head_count_kv"),
                message: format!("{n_head_kv} does not divide the {n_head} query heads"),
            });
        }
        let head_dim = u_or("attention.key_length", n_embd / n_head);
        let n_vocab = match g.metadata.get(&key("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v,
            None => g
                .tensor("token_embd.weight")?
                .dims
                .get(1)
                .copied()
                .unwrap_or(0),
        };
        let gemma = arch == Arch::Gemma3;
        let n_layer = u("block_count")?;

        let sliding_window = g
            .metadata
            .get(&key("attention.sliding_window"))
            .and_then(|v| v.as_u64())
            .map(|w| w as u32);
        let rope_dims = u_or("rope.dimension_count", head_dim);
        let rope_base = f_or("rope.freq_base", 10_000.0) as f32;
        let (rope_freq_scale, rope_yarn) = rope_scaling(g, arch_name, rope_dims, rope_base)?;
        let hp = HParams {
            arch,
            n_vocab,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: u_or("feed_forward_length", 0),
            eps: f_or("attention.layer_norm_rms_epsilon", 1e-5) as f32,
            rope_base: f_or("rope.freq_base", 10_000.0) as f32,
            rope_base_local: if gemma {
                10_000.0
            } else {
                f_or("rope.freq_base", 10_000.0) as f32
            },
            rope_dims,
            rope_freq_scale,
            rope_yarn,
            // llama and glm4 rotate adjacent pairs; the others pairs half a head apart.
            neox: !matches!(arch, Arch::Llama | Arch::Glm4),
            context_train: u_or("context_length", 4096),
            n_expert: u_or("expert_count", 0),
            n_expert_used: u_or("expert_used_count", 0),
            n_ff_expert: u_or("expert_feed_forward_length", 0),
            sliding_window: if gemma { sliding_window } else { None },
            sliding_pattern: if gemma { 6 } else { 0 },
            embd_scale: if gemma { (n_embd as f32).sqrt() } else { 1.0 },
            attn_scale: if gemma && n_layer == 62 {
                // Gemma 3 27B (the one with 62 layers) scales queries by 1/√(n_embd / n_head)
                // (its query_pre_attn_scalar, 168) rather than 1/√head_dim (128); the GGUF has no
                // key for it, so the layer count identifies it, as llama.cpp does.
                1.0 / ((n_embd / n_head) as f32).sqrt()
            } else {
                1.0 / (head_dim as f32).sqrt()
            },
        };
        hp.check_plausible(arch_name)?;
        Ok(hp)
    }

    /// Refuses values no model has, before anything is sized from them: a hostile or corrupt
    /// header must give an error, not an allocation of its own choosing or an overflow. The
    /// limits are far above today's largest models (126 layers, 262 144-token vocabularies,
    /// 128 experts).
    fn check_plausible(&self, arch: &str) -> Result<(), GgufError> {
        let checks: [(&str, u64, u64, u64); 9] = [
            ("block_count", self.n_layer, 1, 4096),
            ("embedding_length", self.n_embd, 1, 1 << 20),
            ("attention.head_count", self.n_head, 1, 1 << 16),
            ("attention.key_length", self.head_dim, 1, 1 << 16),
            ("feed_forward_length", self.n_ff, 0, 1 << 24),
            ("vocab_size", self.n_vocab, 1, 1 << 24),
            ("expert_count", self.n_expert, 0, 1 << 16),
            ("expert_used_count", self.n_expert_used, 0, self.n_expert),
            ("expert_feed_forward_length", self.n_ff_expert, 0, 1 << 24),
        ];
        for (key, value, min, max) in checks {
            if value < min || value > max {
                return Err(GgufError::BadValue {
                    key: format!("{arch}.{key}"),
                    message: format!("{value} is outside {min}..={max}"),
                });
            }
        }
        if self.rope_dims > self.head_dim || !self.rope_dims.is_multiple_of(2) {
            return Err(GgufError::BadValue {
                key: format!("{arch}.rope.dimension_count"),
                message: format!(
                    "{} must be even and at most the head dimension {}",
                    self.rope_dims, self.head_dim
                ),
            });
        }
        Ok(())
    }

    /// Whether each layer also normalizes the attention and FFN outputs before adding them to the
    /// residual stream (gemma3, glm4).
    pub fn post_norms(&self) -> bool {
        matches!(self.arch, Arch::Gemma3 | Arch::Glm4)
    }

    /// Whether layer `l` attends only within the sliding window.
    pub fn is_sliding(&self, l: u64) -> bool {
        self.sliding_window.is_some()
            && self.sliding_pattern > 0
            && !(l + 1).is_multiple_of(self.sliding_pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::write::{file, string};

    fn s(v: &str) -> Vec<u8> {
        let mut out = Vec::new();
        string(&mut out, v);
        out
    }

    fn u32v(v: u32) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn f32v(v: f32) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    /// A header with `arch`'s shape keys plus `extra`.
    fn hparams(
        arch: &str,
        n_layer: u32,
        extra: &[(&str, u32, Vec<u8>)],
    ) -> Result<HParams, GgufError> {
        let k = |key: &str| format!("{arch}.{key}");
        let mut kv: Vec<(String, u32, Vec<u8>)> = vec![
            ("general.architecture".into(), 8, s(arch)),
            (k("embedding_length"), 4, u32v(5376)),
            (k("block_count"), 4, u32v(n_layer)),
            (k("attention.head_count"), 4, u32v(32)),
            (k("attention.head_count_kv"), 4, u32v(16)),
            (k("attention.key_length"), 4, u32v(128)),
            (k("vocab_size"), 4, u32v(1000)),
        ];
        kv.extend(extra.iter().map(|(key, ty, v)| (k(key), *ty, v.clone())));
        let kv: Vec<(&str, u32, Vec<u8>)> = kv
            .iter()
            .map(|(a, b, c)| (a.as_str(), *b, c.clone()))
            .collect();
        HParams::from_gguf(&Gguf::parse(&file(&kv, &[])).unwrap())
    }

    #[test]
    fn implausible_shapes_are_errors_not_allocations() {
        // Found by the model_header fuzz target: a block_count of billions once sized a vector
        // of per-layer buffers before anything refused it.
        let err = hparams("llama", 2_000_000_000, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("llama.block_count") && err.contains("4096"),
            "{err}"
        );
        let err = hparams("llama", 2, &[("rope.dimension_count", 4, u32v(129))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope.dimension_count"), "{err}");
        let err = hparams(
            "qwen3moe",
            2,
            &[
                ("expert_count", 4, u32v(8)),
                ("expert_used_count", 4, u32v(9)),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expert_used_count"), "{err}");
        // The largest plausible shape with the largest context estimates without overflowing.
        let g = Gguf::parse(&file(
            &[
                ("general.architecture", 8, s("llama")),
                ("llama.embedding_length", 4, u32v(1 << 20)),
                ("llama.block_count", 4, u32v(4096)),
                ("llama.attention.head_count", 4, u32v(1 << 16)),
                ("llama.attention.key_length", 4, u32v(1 << 16)),
                ("llama.feed_forward_length", 4, u32v(1 << 24)),
                ("llama.vocab_size", 4, u32v(1 << 24)),
            ],
            &[],
        ))
        .unwrap();
        let est = crate::llm::engine::estimate(
            &g,
            Some(u32::MAX),
            64,
            crate::config::KvCacheType::F32,
            crate::llm::engine::WeightLayout {
                max_segment: 1 << 31,
                align: 4096,
            },
        )
        .unwrap();
        assert_eq!(est, u64::MAX);
    }

    #[test]
    fn gemma3_27b_scales_queries_by_hidden_over_heads() {
        let small = hparams("gemma3", 34, &[]).unwrap();
        assert_eq!(small.attn_scale, 1.0 / 128f32.sqrt());
        let big = hparams("gemma3", 62, &[]).unwrap();
        assert_eq!(big.attn_scale, 1.0 / 168f32.sqrt());
        // Only gemma3 has the exception.
        assert_eq!(
            hparams("llama", 62, &[]).unwrap().attn_scale,
            1.0 / 128f32.sqrt()
        );
    }

    #[test]
    fn rope_scaling_linear_and_yarn_and_others_are_refused() {
        assert_eq!(hparams("llama", 2, &[]).unwrap().rope_freq_scale, 1.0);
        let linear = [
            ("rope.scaling.type", 8, s("linear")),
            ("rope.scaling.factor", 6, f32v(8.0)),
        ];
        assert_eq!(
            hparams("gemma3", 34, &linear).unwrap().rope_freq_scale,
            0.125
        );
        let old = [("rope.scale_linear", 6, f32v(4.0))];
        assert_eq!(hparams("llama", 2, &old).unwrap().rope_freq_scale, 0.25);
        let none = [("rope.scaling.type", 8, s("none"))];
        assert_eq!(hparams("qwen3", 2, &none).unwrap().rope_freq_scale, 1.0);
        let yarn = [
            ("rope.scaling.type", 8, s("yarn")),
            ("rope.scaling.factor", 6, f32v(4.0)),
            ("rope.scaling.original_context_length", 4, u32v(32768)),
        ];
        let hp = hparams("qwen3", 2, &yarn).unwrap();
        assert_eq!(hp.rope_freq_scale, 0.25);
        assert_eq!(
            hp.rope_yarn,
            Some(Yarn::new(128, 10_000.0, 4.0, 32768, 32.0, 1.0, 1.0))
        );
        // YaRN needs the original context.
        let err = hparams("qwen3", 2, &yarn[..2]).unwrap_err().to_string();
        assert!(err.contains("original_context_length"), "{err}");
        let longrope = [("rope.scaling.type", 8, s("longrope"))];
        let err = hparams("llama", 2, &longrope).unwrap_err().to_string();
        assert!(err.contains("llama.rope.scaling.type"), "{err}");
    }
}
