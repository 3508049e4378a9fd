//! An LLM on the device: its weights (loaded from the GGUF by copy or import), and the forward
//! pass that turns a batch of tokens of one sequence into the next-token logits, writing the
//! sequence's KV cache as it goes.
//!
//! Prompt batches use the matrix-matrix kernels, single tokens the matrix-vector ones. Every
//! buffer is charged to an owner: the model's weights to the model, a sequence's KV cache and
//! scratch to the sequence's owner, so the allocator's ledger is the memory truth.

use std::collections::HashMap;
use std::fmt;

use halo_kernels::ops::{self, AttentionParams, F32s, KvCache, RopeParams, U32s, Weights};
use halo_kernels::quant::WeightType;
use halo_kernels::{
    Buffer, Device, LoadStrategy, LoadedWeights, MemoryKind, OwnerId, Stream, VulkanError,
};

use super::hparams::{Arch, HParams};
use crate::config::KvCacheType;
use crate::gguf::{GgufError, GgufFile, TensorInfo};

/// Largest number of prompt tokens run through one forward call; longer prompts are chunked.
pub const MAX_BATCH: u64 = 256;

#[derive(Debug)]
pub enum LlmError {
    Format(GgufError),
    Gpu(VulkanError),
    Unsupported(String),
    ContextFull { capacity: u64 },
}

impl fmt::Display for LlmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LlmError::Format(e) => write!(f, "{e}"),
            LlmError::Gpu(e) => write!(f, "GPU: {e}"),
            LlmError::Unsupported(m) => f.write_str(m),
            LlmError::ContextFull { capacity } => write!(
                f,
                "the sequence reached its context of {capacity} tokens; raise `context` for the model"
            ),
        }
    }
}

impl std::error::Error for LlmError {}

impl From<GgufError> for LlmError {
    fn from(e: GgufError) -> Self {
        LlmError::Format(e)
    }
}

impl From<VulkanError> for LlmError {
    fn from(e: VulkanError) -> Self {
        LlmError::Gpu(e)
    }
}

/// A model's weights on the device and what it needs to run.
pub struct LlmModel {
    pub hp: HParams,
    device: Device,
    weights: LoadedWeights,
    tensors: HashMap<String, (usize, TensorInfo)>,
}

/// Names of the tensors every layer of a dense model needs.
fn layer(l: u64, what: &str) -> String {
    format!("blk.{l}.{what}.weight")
}

impl LlmModel {
    /// Loads every tensor of `file` onto `device`, charged to `owner`.
    pub fn load(
        device: &Device,
        file: &GgufFile,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<LlmModel, LlmError> {
        let g = &file.header;
        let hp = HParams::from_gguf(g)?;
        if hp.head_dim > ops::MAX_HEAD_DIM as u64 {
            return Err(LlmError::Unsupported(format!(
                "head dimension {} is above the attention kernel's {}",
                hp.head_dim,
                ops::MAX_HEAD_DIM
            )));
        }
        let moe = hp.arch == Arch::Qwen3Moe;
        if moe
            && (hp.n_expert == 0
                || hp.n_expert_used == 0
                || hp.n_expert_used > hp.n_expert
                || hp.n_ff_expert == 0)
        {
            return Err(LlmError::Unsupported(format!(
                "a mixture-of-experts model needs 1 to {} experts used per token of {} experts \
                 with a positive expert FFN length ({}); found {} used",
                hp.n_expert, hp.n_expert, hp.n_ff_expert, hp.n_expert_used
            )));
        }
        // Check the shapes the forward pass relies on before spending time loading.
        let d = hp.n_embd;
        let q_dim = hp.n_head * hp.head_dim;
        let kv_dim = hp.n_head_kv * hp.head_dim;
        g.tensor_shaped("token_embd.weight", &[d, hp.n_vocab])?;
        g.tensor_shaped("output_norm.weight", &[d])?;
        for l in 0..hp.n_layer {
            g.tensor_shaped(&layer(l, "attn_norm"), &[d])?;
            g.tensor_shaped(&layer(l, "attn_q"), &[d, q_dim])?;
            g.tensor_shaped(&layer(l, "attn_k"), &[d, kv_dim])?;
            g.tensor_shaped(&layer(l, "attn_v"), &[d, kv_dim])?;
            g.tensor_shaped(&layer(l, "attn_output"), &[q_dim, d])?;
            g.tensor_shaped(&layer(l, "ffn_norm"), &[d])?;
            // Projection biases are optional (glm4 has them on q, k and v).
            for (what, len) in [("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)] {
                let name = format!("blk.{l}.{what}.bias");
                if g.tensor(&name).is_ok() {
                    g.tensor_shaped(&name, &[len])?;
                }
            }
            if hp.arch == Arch::Glm4 {
                // One fused matrix: the gate's rows, then the up projection's.
                g.tensor_shaped(&layer(l, "ffn_up"), &[d, 2 * hp.n_ff])?;
                g.tensor_shaped(&layer(l, "ffn_down"), &[hp.n_ff, d])?;
            } else if moe {
                let (e, ff) = (hp.n_expert, hp.n_ff_expert);
                g.tensor_shaped(&layer(l, "ffn_gate_inp"), &[d, e])?;
                g.tensor_shaped(&layer(l, "ffn_gate_exps"), &[d, ff, e])?;
                g.tensor_shaped(&layer(l, "ffn_up_exps"), &[d, ff, e])?;
                g.tensor_shaped(&layer(l, "ffn_down_exps"), &[ff, d, e])?;
            } else {
                g.tensor_shaped(&layer(l, "ffn_gate"), &[d, hp.n_ff])?;
                g.tensor_shaped(&layer(l, "ffn_up"), &[d, hp.n_ff])?;
                g.tensor_shaped(&layer(l, "ffn_down"), &[hp.n_ff, d])?;
            }
            if matches!(hp.arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3) {
                g.tensor_shaped(&layer(l, "attn_q_norm"), &[hp.head_dim])?;
                g.tensor_shaped(&layer(l, "attn_k_norm"), &[hp.head_dim])?;
            }
            if hp.post_norms() {
                g.tensor_shaped(&layer(l, "post_attention_norm"), &[d])?;
                g.tensor_shaped(&layer(l, "post_ffw_norm"), &[d])?;
            }
        }
        // (HParams has already refused an odd rope.dimension_count.)
        if g.tensor("rope_freqs.weight").is_ok() {
            g.tensor_shaped("rope_freqs.weight", &[hp.rope_dims / 2])?;
        }
        if let Ok(t) = g.tensor("output.weight") {
            if t.dims != [d, hp.n_vocab] {
                return Err(GgufError::ShapeMismatch {
                    tensor: t.name.clone(),
                    expected: vec![d, hp.n_vocab],
                    found: t.dims.clone(),
                }
                .into());
            }
        }
        for t in &g.tensors {
            let vector = t.dims.len() == 1;
            if vector && t.ty != WeightType::F32 {
                return Err(LlmError::Unsupported(format!(
                    "tensor {:?} is a {} vector; halo expects f32 norm weights",
                    t.name,
                    t.ty.name()
                )));
            }
        }
        let ranges: Vec<_> = g.tensors.iter().map(|t| g.range(t)).collect();
        let host: std::sync::Arc<dyn halo_kernels::HostMemory> = file.map.clone();
        let weights = device.load_weights(host, &ranges, strategy, owner)?;
        let tensors = g
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), (i, t.clone())))
            .collect();
        Ok(LlmModel {
            hp,
            device: device.clone(),
            weights,
            tensors,
        })
    }

    pub fn weights(&self) -> &LoadedWeights {
        &self.weights
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights one generated token reads: every matrix once, but of the embedding
    /// table only one row (unless it doubles as the output projection), and of each layer's
    /// stacked experts only the ones a token uses.
    pub fn weight_bytes_per_token(&self) -> u64 {
        let tied = !self.tensors.contains_key("output.weight");
        let hp = &self.hp;
        self.tensors
            .values()
            .map(|(_, t)| {
                if t.name == "token_embd.weight" && !tied {
                    t.size / t.dims.get(1).copied().unwrap_or(1).max(1)
                } else if t.name.ends_with("_exps.weight") && hp.n_expert > 0 {
                    t.size / hp.n_expert * hp.n_expert_used
                } else {
                    t.size
                }
            })
            .sum()
    }

    fn info(&self, name: &str) -> Result<&(usize, TensorInfo), LlmError> {
        self.tensors
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()).into())
    }

    /// A weight matrix (GGUF dims [cols, rows]).
    fn w(&self, name: &str) -> Result<Weights<'_>, LlmError> {
        let (i, t) = self.info(name)?;
        let (buffer, offset) = self.weights.tensor(*i).expect("every tensor was loaded");
        Ok(Weights {
            buffer,
            offset,
            ty: t.ty,
            rows: t.dims.get(1).copied().unwrap_or(1),
            cols: t.dims[0],
        })
    }

    /// A layer's experts stacked in one 3-D tensor (GGUF dims [cols, rows_per_expert, experts]),
    /// as one matrix of experts × rows_per_expert rows, and rows_per_expert.
    fn w_experts(&self, name: &str) -> Result<(Weights<'_>, u64), LlmError> {
        let (i, t) = self.info(name)?;
        let (buffer, offset) = self.weights.tensor(*i).expect("every tensor was loaded");
        let per_expert = t.dims.get(1).copied().unwrap_or(1);
        Ok((
            Weights {
                buffer,
                offset,
                ty: t.ty,
                rows: per_expert * t.dims.get(2).copied().unwrap_or(1),
                cols: t.dims[0],
            },
            per_expert,
        ))
    }

    /// The gate and up halves of glm4's fused `ffn_up` (the gate's rows first): two views of
    /// one matrix, since each row is stored whole.
    fn w_gate_up(&self, l: u64) -> Result<(Weights<'_>, Weights<'_>), LlmError> {
        let fused = self.w(&layer(l, "ffn_up"))?;
        let half = fused.rows / 2;
        let row_bytes = usize::try_from(fused.cols)
            .ok()
            .and_then(|c| fused.ty.row_bytes(c))
            .ok_or_else(|| {
                LlmError::Unsupported(format!(
                    "layer {l}'s ffn_up rows of {} are not whole {} blocks",
                    fused.cols, fused.ty
                ))
            })? as u64;
        let gate = Weights {
            rows: half,
            ..fused
        };
        let up = Weights {
            offset: fused.offset + half * row_bytes,
            rows: half,
            ..fused
        };
        Ok((gate, up))
    }

    /// An optional f32 vector (a projection's bias, RoPE frequency factors).
    fn optional_vector(&self, name: &str) -> Result<Option<F32s<'_>>, LlmError> {
        if self.tensors.contains_key(name) {
            self.v(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An f32 vector (norm weights).
    fn v(&self, name: &str) -> Result<F32s<'_>, LlmError> {
        let (i, t) = self.info(name)?;
        let (buffer, offset) = self.weights.tensor(*i).expect("every tensor was loaded");
        Ok(F32s {
            buffer,
            start: offset / 4,
            len: t.elements(),
        })
    }

    /// The output projection: `output.weight`, or the embeddings when they are tied.
    fn output(&self) -> Result<Weights<'_>, LlmError> {
        if self.tensors.contains_key("output.weight") {
            self.w("output.weight")
        } else {
            self.w("token_embd.weight")
        }
    }

    /// A new sequence with room for `capacity` tokens; its KV cache (f16 or f32) and scratch
    /// are charged to `owner`.
    pub fn new_sequence(
        &self,
        capacity: u64,
        kv: KvCacheType,
        owner: OwnerId,
    ) -> Result<Sequence, LlmError> {
        // One allocation for the whole sequence, of exactly its buffers' size.
        let bufs = self
            .device
            .alloc_many(&sequence_buffers(&self.hp, capacity, kv), owner)?;
        let n_layer = self.hp.n_layer as usize;
        let mut it = bufs.into_iter();
        let mut next = || it.next().expect("sequence_buffers lists every buffer");
        let k = (0..n_layer).map(|_| next()).collect();
        let v = (0..n_layer).map(|_| next()).collect();
        Ok(Sequence {
            capacity,
            kv_f16: kv == KvCacheType::F16,
            pos: 0,
            tokens: Vec::new(),
            k,
            v,
            ids: next(),
            positions: next(),
            x: next(),
            h: next(),
            q: next(),
            kk: next(),
            vv: next(),
            attn: next(),
            attn_state: next(),
            gate: next(),
            up: next(),
            logits: next(),
            moe: (self.hp.arch == Arch::Qwen3Moe).then(|| MoeScratch {
                router: next(),
                ids: next(),
                weights: next(),
                gate: next(),
                up: next(),
                out: next(),
                counts: next(),
                pairs: next(),
            }),
        })
    }

    /// Runs `tokens` (at most MAX_BATCH) at the sequence's next positions and returns the logits
    /// after the last one.
    pub fn forward(&self, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>, LlmError> {
        let n = tokens.len() as u64;
        if n == 0 || n > MAX_BATCH {
            return Err(LlmError::Unsupported(format!(
                "a forward batch holds 1 to {MAX_BATCH} tokens, not {n}"
            )));
        }
        if seq.pos + n > seq.capacity {
            return Err(LlmError::ContextFull {
                capacity: seq.capacity,
            });
        }
        if let Some(bad) = tokens.iter().find(|t| **t as u64 >= self.hp.n_vocab) {
            return Err(LlmError::Unsupported(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.hp.n_vocab
            )));
        }
        let dev = &self.device;
        let ids: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        dev.write(&mut seq.ids, 0, &ids)?;
        let pos: Vec<u8> = (seq.pos..seq.pos + n)
            .flat_map(|p| (p as u32).to_le_bytes())
            .collect();
        dev.write(&mut seq.positions, 0, &pos)?;
        let mut s = dev.stream()?;
        self.record(&mut s, seq, n)?;
        s.finish()?;
        seq.pos += n;
        seq.tokens.extend_from_slice(tokens);
        Ok(dev.read_f32(&seq.logits, 0, self.hp.n_vocab)?)
    }

    fn record(&self, s: &mut Stream, seq: &Sequence, n: u64) -> Result<(), LlmError> {
        let hp = &self.hp;
        let d = hp.n_embd;
        let q_dim = hp.n_head * hp.head_dim;
        let kv_dim = hp.n_head_kv * hp.head_dim;
        fn all(buffer: &Buffer, len: u64) -> F32s<'_> {
            F32s {
                buffer,
                start: 0,
                len,
            }
        }
        let x = all(&seq.x, n * d);
        let h = all(&seq.h, n * d);
        let q = all(&seq.q, n * q_dim);
        let kk = all(&seq.kk, n * kv_dim);
        let vv = all(&seq.vv, n * kv_dim);
        let attn = all(&seq.attn, n * q_dim);
        let attn_state = all(&seq.attn_state, 2 * n * hp.n_head);
        let gate = all(&seq.gate, n * hp.n_ff);
        let up = all(&seq.up, n * hp.n_ff);
        let positions = U32s {
            buffer: &seq.positions,
            start: 0,
            len: n,
        };
        // y = W·x for each of the n rows: matvec for one token, matmul for a batch.
        let proj =
            |s: &mut Stream, w: Weights<'_>, x: F32s<'_>, y: F32s<'_>| -> Result<(), VulkanError> {
                if n == 1 {
                    ops::matvec(s, w, x, y)
                } else {
                    ops::matmul(s, w, x, y, n)
                }
            };
        let gemma = hp.arch == Arch::Gemma3;
        let post_norms = hp.post_norms();
        // Llama 3.1's per-pair frequency divisors, when the file has them.
        let freq_factors = self.optional_vector("rope_freqs.weight")?;
        let qk_norm = matches!(hp.arch, Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3);

        ops::get_rows(
            s,
            self.w("token_embd.weight")?,
            U32s {
                buffer: &seq.ids,
                start: 0,
                len: n,
            },
            x,
        )?;
        if hp.embd_scale != 1.0 {
            ops::scale(s, x, hp.embd_scale, x)?;
        }
        for l in 0..hp.n_layer {
            let sliding = hp.is_sliding(l);
            ops::rms_norm(
                s,
                x,
                Some(self.v(&layer(l, "attn_norm"))?),
                h,
                d,
                hp.eps,
                0.0,
            )?;
            proj(s, self.w(&layer(l, "attn_q"))?, h, q)?;
            proj(s, self.w(&layer(l, "attn_k"))?, h, kk)?;
            proj(s, self.w(&layer(l, "attn_v"))?, h, vv)?;
            for (what, out) in [("attn_q", q), ("attn_k", kk), ("attn_v", vv)] {
                if let Some(b) = self.optional_vector(&format!("blk.{l}.{what}.bias"))? {
                    ops::add(s, out, b, out)?;
                }
            }
            if qk_norm {
                let hd = hp.head_dim;
                ops::rms_norm(
                    s,
                    q,
                    Some(self.v(&layer(l, "attn_q_norm"))?),
                    q,
                    hd,
                    hp.eps,
                    0.0,
                )?;
                ops::rms_norm(
                    s,
                    kk,
                    Some(self.v(&layer(l, "attn_k_norm"))?),
                    kk,
                    hd,
                    hp.eps,
                    0.0,
                )?;
            }
            // gemma3's sliding layers keep their own base and no scaling.
            let rope = RopeParams {
                n_heads: hp.n_head,
                head_dim: hp.head_dim,
                rotary_dims: hp.rope_dims,
                freq_base: if sliding {
                    hp.rope_base_local
                } else {
                    hp.rope_base
                },
                freq_scale: if sliding { 1.0 } else { hp.rope_freq_scale },
                freq_factors,
                neox: hp.neox,
                yarn: if sliding { None } else { hp.rope_yarn },
            };
            ops::rope(s, q, positions, q, rope)?;
            ops::rope(
                s,
                kk,
                positions,
                kk,
                RopeParams {
                    n_heads: hp.n_head_kv,
                    ..rope
                },
            )?;
            let kc = KvCache {
                buffer: &seq.k[l as usize],
                offset: 0,
                f16: seq.kv_f16,
            };
            let vc = KvCache {
                buffer: &seq.v[l as usize],
                offset: 0,
                f16: seq.kv_f16,
            };
            ops::kv_store(
                s,
                kk,
                kc,
                hp.n_head_kv,
                hp.head_dim,
                seq.capacity,
                seq.pos,
                n,
            )?;
            ops::kv_store(
                s,
                vv,
                vc,
                hp.n_head_kv,
                hp.head_dim,
                seq.capacity,
                seq.pos,
                n,
            )?;
            ops::attention(
                s,
                q,
                kc,
                vc,
                attn,
                attn_state,
                AttentionParams {
                    n_heads: hp.n_head as u32,
                    n_kv_heads: hp.n_head_kv as u32,
                    head_dim: hp.head_dim as u32,
                    n_q_tokens: n as u32,
                    first_pos: seq.pos as u32,
                    capacity: seq.capacity as u32,
                    scale: hp.attn_scale,
                    sliding_window: if sliding { hp.sliding_window } else { None },
                    softcap: None,
                },
            )?;
            proj(s, self.w(&layer(l, "attn_output"))?, attn, h)?;
            if post_norms {
                ops::rms_norm(
                    s,
                    h,
                    Some(self.v(&layer(l, "post_attention_norm"))?),
                    h,
                    d,
                    hp.eps,
                    0.0,
                )?;
            }
            ops::add(s, x, h, x)?;

            ops::rms_norm(
                s,
                x,
                Some(self.v(&layer(l, "ffn_norm"))?),
                h,
                d,
                hp.eps,
                0.0,
            )?;
            if let Some(moe) = &seq.moe {
                self.record_moe(s, moe, l, h, n)?;
            } else {
                let (w_gate, w_up) = if hp.arch == Arch::Glm4 {
                    self.w_gate_up(l)?
                } else {
                    (self.w(&layer(l, "ffn_gate"))?, self.w(&layer(l, "ffn_up"))?)
                };
                proj(s, w_gate, h, gate)?;
                proj(s, w_up, h, up)?;
                if gemma {
                    ops::geglu(s, gate, up, gate)?;
                } else {
                    ops::swiglu(s, gate, up, gate)?;
                }
                proj(s, self.w(&layer(l, "ffn_down"))?, gate, h)?;
            }
            if post_norms {
                ops::rms_norm(
                    s,
                    h,
                    Some(self.v(&layer(l, "post_ffw_norm"))?),
                    h,
                    d,
                    hp.eps,
                    0.0,
                )?;
            }
            ops::add(s, x, h, x)?;
        }
        // Only the last token's logits are needed.
        let last = x.sub((n - 1) * d, d);
        let hl = h.sub(0, d);
        ops::rms_norm(
            s,
            last,
            Some(self.v("output_norm.weight")?),
            hl,
            d,
            hp.eps,
            0.0,
        )?;
        let logits = F32s {
            buffer: &seq.logits,
            start: 0,
            len: hp.n_vocab,
        };
        ops::matvec(s, self.output()?, hl, logits)?;
        Ok(())
    }

    /// Layer `l`'s mixture-of-experts FFN over the n normed tokens in `h`, replacing each with its
    /// FFN output: the router's logits, softmax and the top k experts per token (their
    /// probabilities renormalized to sum to 1), each chosen expert's gated FFN, and their sum
    /// weighted by those probabilities. The choice stays on the device throughout.
    ///
    /// One token goes through the matrix-vector kernels, expert by chosen expert. A batch is
    /// first sorted by expert (`moe_route`: for each expert, the token-choice pairs that chose
    /// it), so that each expert's matrices are read once per tile for all of its tokens
    /// (`matmul_indexed`), as the dense layers' matmul does.
    fn record_moe(
        &self,
        s: &mut Stream,
        moe: &MoeScratch,
        l: u64,
        h: F32s<'_>,
        n: u64,
    ) -> Result<(), LlmError> {
        let hp = &self.hp;
        let d = hp.n_embd;
        let e = hp.n_expert;
        let k = hp.n_expert_used;
        let ff = hp.n_ff_expert;
        let f32s = |buffer, len| F32s {
            buffer,
            start: 0,
            len,
        };
        let u32s = |buffer, len| U32s {
            buffer,
            start: 0,
            len,
        };
        let router = f32s(&moe.router, n * e);
        let ids = u32s(&moe.ids, n * k);
        let weights = f32s(&moe.weights, n * k);
        let gate = f32s(&moe.gate, n * k * ff);
        let up = f32s(&moe.up, n * k * ff);
        let out = f32s(&moe.out, n * k * d);
        let w_router = self.w(&layer(l, "ffn_gate_inp"))?;
        let (w_gate, ff_gate) = self.w_experts(&layer(l, "ffn_gate_exps"))?;
        let (w_up, ff_up) = self.w_experts(&layer(l, "ffn_up_exps"))?;
        let (w_down, d_down) = self.w_experts(&layer(l, "ffn_down_exps"))?;
        if n == 1 {
            ops::matvec(s, w_router, h, router)?;
            ops::softmax_top_k(s, router, e, k, true, ids, weights)?;
            ops::matvec_indexed(s, w_gate, ff_gate, ids, h, false, gate)?;
            ops::matvec_indexed(s, w_up, ff_up, ids, h, false, up)?;
            ops::swiglu(s, gate, up, gate)?;
            ops::matvec_indexed(s, w_down, d_down, ids, gate, true, out)?;
        } else {
            let counts = u32s(&moe.counts, e);
            let pairs = u32s(&moe.pairs, e * n);
            ops::matmul(s, w_router, h, router, n)?;
            ops::softmax_top_k(s, router, e, k, true, ids, weights)?;
            ops::moe_route(s, ids, e, counts, pairs, n)?;
            ops::matmul_indexed(s, w_gate, ff_gate, counts, pairs, n, k, h, false, gate)?;
            ops::matmul_indexed(s, w_up, ff_up, counts, pairs, n, k, h, false, up)?;
            ops::swiglu(s, gate, up, gate)?;
            ops::matmul_indexed(s, w_down, d_down, counts, pairs, n, k, gate, true, out)?;
        }
        ops::moe_combine(s, out, weights, h, d, k)?;
        Ok(())
    }
}

/// Every buffer a sequence of `capacity` tokens allocates, in the order `new_sequence` takes them:
/// K and V caches per layer, then the scratch. The estimate uses the same list.
pub fn sequence_buffers(
    hp: &HParams,
    capacity: u64,
    kv_type: KvCacheType,
) -> Vec<(MemoryKind, u64)> {
    // Saturating: a context no device could hold comes out as "too large to fit", not a wrap.
    let kv = (hp.n_head_kv * hp.head_dim)
        .saturating_mul(capacity)
        .saturating_mul(kv_type.bytes());
    let b = MAX_BATCH.min(capacity.max(1));
    let q_dim = hp.n_head * hp.head_dim;
    let kv_dim = hp.n_head_kv * hp.head_dim;
    let dev = |elems: u64| (MemoryKind::Device, elems.max(1) * 4);
    let mut out = vec![(MemoryKind::Device, kv); 2 * hp.n_layer as usize];
    out.extend([
        dev(b),
        dev(b),
        dev(b * hp.n_embd),
        dev(b * hp.n_embd),
        dev(b * q_dim),
        dev(b * kv_dim),
        dev(b * kv_dim),
        dev(b * q_dim),
        // The attention's running state between passes (see `ops::attention_state_len`).
        dev(2 * b * hp.n_head),
        dev(b * hp.n_ff),
        dev(b * hp.n_ff),
        (MemoryKind::Readback, hp.n_vocab * 4),
    ]);
    if hp.arch == Arch::Qwen3Moe {
        // The mixture-of-experts scratch for a batch: router logits, the chosen experts' ids and
        // weights, their gate and up activations and their outputs, then each expert's count
        // and list of the token-choice pairs routed to it.
        let k = hp.n_expert_used;
        out.extend([
            dev(b * hp.n_expert),
            dev(b * k),
            dev(b * k),
            dev(b * k * hp.n_ff_expert),
            dev(b * k * hp.n_ff_expert),
            dev(b * k * hp.n_embd),
            dev(hp.n_expert),
            dev(hp.n_expert * b),
        ]);
    }
    out
}

/// A mixture-of-experts model's FFN scratch, for up to a batch of tokens.
struct MoeScratch {
    router: Buffer,
    ids: Buffer,
    weights: Buffer,
    gate: Buffer,
    up: Buffer,
    out: Buffer,
    counts: Buffer,
    pairs: Buffer,
}

/// One sequence's state: its KV cache and scratch. Dropping it frees them.
pub struct Sequence {
    capacity: u64,
    kv_f16: bool,
    pos: u64,
    /// The tokens whose keys and values are in the cache, at positions 0..pos.
    tokens: Vec<u32>,
    k: Vec<Buffer>,
    v: Vec<Buffer>,
    ids: Buffer,
    positions: Buffer,
    x: Buffer,
    h: Buffer,
    q: Buffer,
    kk: Buffer,
    vv: Buffer,
    attn: Buffer,
    attn_state: Buffer,
    gate: Buffer,
    up: Buffer,
    logits: Buffer,
    moe: Option<MoeScratch>,
}

impl Sequence {
    /// Tokens processed so far.
    pub fn len(&self) -> u64 {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How many leading tokens of `prompt` the cache already holds.
    pub fn common_prefix(&self, prompt: &[u32]) -> usize {
        self.tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Keeps the cache for the longest start of `prompt` it holds, but never all of `prompt`
    /// (its last token must run to give the next-token logits), and forgets the rest; returns
    /// how many tokens were kept. Later positions are overwritten as the request runs.
    pub fn keep_prefix(&mut self, prompt: &[u32]) -> u64 {
        let keep = self
            .common_prefix(prompt)
            .min(prompt.len().saturating_sub(1));
        self.tokens.truncate(keep);
        self.pos = keep as u64;
        keep as u64
    }
}
