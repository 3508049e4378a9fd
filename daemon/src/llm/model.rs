//! An LLM on the device: its weights (loaded from the GGUF by copy or import), and the forward
//! pass that turns one step's tokens (a prompt chunk, one decode token of each of several
//! sequences, or both) into next-token logits, writing each sequence's KV cache as it goes.
//!
//! A step's rows go through the matrix-matrix kernels together (a single token through the
//! matrix-vector ones), so the weights are read once per step however many sequences take part.
//! Every buffer is charged to an owner: the model's weights to the model, a sequence's KV cache
//! and the step scratch to their owner, so the allocator's ledger is the memory truth.

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

/// Largest number of tokens run through one forward step (all its sequences together); longer
/// prompts are chunked.
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

    /// A new sequence with room for `capacity` tokens: its KV cache (f16 or f32), charged to
    /// `owner`. The activations of a step live in a [`Scratch`] shared by every sequence.
    pub fn new_sequence(
        &self,
        capacity: u64,
        kv: KvCacheType,
        owner: OwnerId,
    ) -> Result<Sequence, LlmError> {
        // One allocation for the whole cache, of exactly its buffers' size.
        let bufs = self
            .device
            .alloc_many(&sequence_buffers(&self.hp, capacity, kv), owner)?;
        let n_layer = self.hp.n_layer as usize;
        let mut it = bufs.into_iter();
        let k = it.by_ref().take(n_layer).collect();
        let v = it.collect();
        Ok(Sequence {
            capacity,
            kv_f16: kv == KvCacheType::F16,
            pos: 0,
            tokens: Vec::new(),
            k,
            v,
        })
    }

    /// The buffers of one step for up to `rows` tokens of any sequences together, with logits
    /// for up to `logit_rows` of them, charged to `owner`.
    pub fn new_scratch(
        &self,
        rows: u64,
        logit_rows: u64,
        owner: OwnerId,
    ) -> Result<Scratch, LlmError> {
        let rows = rows.clamp(1, MAX_BATCH);
        let logit_rows = logit_rows.clamp(1, rows);
        let bufs = self
            .device
            .alloc_many(&scratch_buffers(&self.hp, rows, logit_rows), owner)?;
        let mut it = bufs.into_iter();
        let mut next = || it.next().expect("scratch_buffers lists every buffer");
        Ok(Scratch {
            rows,
            logit_rows,
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

    /// Runs `tokens` (at most `sc.rows()`) at the sequence's next positions and returns the
    /// logits after the last one.
    pub fn forward(
        &self,
        sc: &mut Scratch,
        seq: &mut Sequence,
        tokens: &[u32],
    ) -> Result<Vec<f32>, LlmError> {
        let mut parts = [Part {
            seq,
            tokens,
            logits: true,
        }];
        let mut out = self.forward_batch(sc, &mut parts)?;
        Ok(out.pop().flatten().expect("the one part asked for logits"))
    }

    /// One step over several sequences at once: each part's tokens run at its sequence's next
    /// positions, every weight matrix read once for all of them (their rows stacked); returns,
    /// per part, the logits after its last token if it asked for them. Attention and the KV
    /// cache stay per sequence, so a sequence's result does not depend on what it is batched
    /// with (up to the rounding of the matrix kernel chosen for the batch's row count).
    pub fn forward_batch(
        &self,
        sc: &mut Scratch,
        parts: &mut [Part<'_>],
    ) -> Result<Vec<Option<Vec<f32>>>, LlmError> {
        let n: u64 = parts.iter().map(|p| p.tokens.len() as u64).sum();
        let wanted = parts.iter().filter(|p| p.logits).count() as u64;
        if parts.is_empty() || parts.iter().any(|p| p.tokens.is_empty()) || n > sc.rows {
            return Err(LlmError::Unsupported(format!(
                "a forward step holds 1 to {} tokens, each part at least one, not {n} in {} parts",
                sc.rows,
                parts.len()
            )));
        }
        if wanted > sc.logit_rows {
            return Err(LlmError::Unsupported(format!(
                "a step reads logits for at most {} sequences, not {wanted}",
                sc.logit_rows
            )));
        }
        for p in parts.iter() {
            if p.seq.pos + p.tokens.len() as u64 > p.seq.capacity {
                return Err(LlmError::ContextFull {
                    capacity: p.seq.capacity,
                });
            }
            if let Some(bad) = p.tokens.iter().find(|t| **t as u64 >= self.hp.n_vocab) {
                return Err(LlmError::Unsupported(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.hp.n_vocab
                )));
            }
        }
        let dev = &self.device;
        let ids: Vec<u8> = parts
            .iter()
            .flat_map(|p| p.tokens.iter().flat_map(|t| t.to_le_bytes()))
            .collect();
        dev.write(&mut sc.ids, 0, &ids)?;
        let pos: Vec<u8> = parts
            .iter()
            .flat_map(|p| {
                let n = p.tokens.len() as u64;
                (p.seq.pos..p.seq.pos + n).flat_map(|q| (q as u32).to_le_bytes())
            })
            .collect();
        dev.write(&mut sc.positions, 0, &pos)?;
        let mut row = 0;
        let mut logit_rows = Vec::new();
        let mut spans = Vec::with_capacity(parts.len());
        for p in parts.iter() {
            let len = p.tokens.len() as u64;
            spans.push(Span {
                seq: &*p.seq,
                row,
                len,
            });
            row += len;
            if p.logits {
                logit_rows.push(row - 1);
            }
        }
        let mut s = dev.stream()?;
        self.record(&mut s, sc, &spans, &logit_rows)?;
        s.finish()?;
        let n_vocab = self.hp.n_vocab;
        let all = dev.read_f32(&sc.logits, 0, wanted * n_vocab)?;
        let mut rows = all.chunks_exact(n_vocab as usize);
        let mut out = Vec::with_capacity(parts.len());
        for p in parts.iter_mut() {
            p.seq.pos += p.tokens.len() as u64;
            p.seq.tokens.extend_from_slice(p.tokens);
            out.push(
                p.logits
                    .then(|| rows.next().expect("a row per part").to_vec()),
            );
        }
        Ok(out)
    }

    /// Records one step: `spans` are the sequences' rows in the scratch (in order, together
    /// `n` rows), `logit_rows` the rows whose logits go to the scratch's logit rows, in order.
    fn record(
        &self,
        s: &mut Stream,
        sc: &Scratch,
        spans: &[Span<'_>],
        logit_rows: &[u64],
    ) -> Result<(), LlmError> {
        let hp = &self.hp;
        let n: u64 = spans.iter().map(|p| p.len).sum();
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
        let x = all(&sc.x, n * d);
        let h = all(&sc.h, n * d);
        let q = all(&sc.q, n * q_dim);
        let kk = all(&sc.kk, n * kv_dim);
        let vv = all(&sc.vv, n * kv_dim);
        let attn = all(&sc.attn, n * q_dim);
        let attn_state = all(&sc.attn_state, 2 * n * hp.n_head);
        let gate = all(&sc.gate, n * hp.n_ff);
        let up = all(&sc.up, n * hp.n_ff);
        let positions = U32s {
            buffer: &sc.positions,
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
                buffer: &sc.ids,
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
            // The cache and attention are each sequence's own, over its rows.
            for sp in spans {
                let seq = sp.seq;
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
                let (k_rows, v_rows) = (
                    kk.sub(sp.row * kv_dim, sp.len * kv_dim),
                    vv.sub(sp.row * kv_dim, sp.len * kv_dim),
                );
                for (rows, cache) in [(k_rows, kc), (v_rows, vc)] {
                    ops::kv_store(
                        s,
                        rows,
                        cache,
                        hp.n_head_kv,
                        hp.head_dim,
                        seq.capacity,
                        seq.pos,
                        sp.len,
                    )?;
                }
                ops::attention(
                    s,
                    q.sub(sp.row * q_dim, sp.len * q_dim),
                    kc,
                    vc,
                    attn.sub(sp.row * q_dim, sp.len * q_dim),
                    attn_state.sub(2 * sp.row * hp.n_head, 2 * sp.len * hp.n_head),
                    AttentionParams {
                        n_heads: hp.n_head as u32,
                        n_kv_heads: hp.n_head_kv as u32,
                        head_dim: hp.head_dim as u32,
                        n_q_tokens: sp.len as u32,
                        first_pos: seq.pos as u32,
                        capacity: seq.capacity as u32,
                        scale: hp.attn_scale,
                        sliding_window: if sliding { hp.sliding_window } else { None },
                        softcap: None,
                    },
                )?;
            }
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
            if let Some(moe) = &sc.moe {
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
        // Only the logits of each part's last token are needed: those rows of x, gathered at
        // the start of h, normed and projected together.
        let m = logit_rows.len() as u64;
        for (i, r) in logit_rows.iter().enumerate() {
            s.copy(&sc.x, r * d * 4, &sc.h, i as u64 * d * 4, d * 4)?;
        }
        let hl = h.sub(0, m * d);
        ops::rms_norm(
            s,
            hl,
            Some(self.v("output_norm.weight")?),
            hl,
            d,
            hp.eps,
            0.0,
        )?;
        let logits = F32s {
            buffer: &sc.logits,
            start: 0,
            len: m * hp.n_vocab,
        };
        if m == 1 {
            ops::matvec(s, self.output()?, hl, logits)?;
        } else {
            ops::matmul(s, self.output()?, hl, logits, m)?;
        }
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

/// Every buffer a sequence of `capacity` tokens allocates, in the order `new_sequence` takes
/// them: the K caches of every layer, then the V caches. The estimate uses the same list.
pub fn sequence_buffers(
    hp: &HParams,
    capacity: u64,
    kv_type: KvCacheType,
) -> Vec<(MemoryKind, u64)> {
    // Saturating: a context no device could hold comes out as "too large to fit", not a wrap.
    let kv = (hp.n_head_kv * hp.head_dim)
        .saturating_mul(capacity)
        .saturating_mul(kv_type.bytes());
    vec![(MemoryKind::Device, kv); 2 * hp.n_layer as usize]
}

/// Rows a model's step scratch holds for `parallel` sequences of `capacity` tokens: a full
/// prompt chunk, but never more than all the sequences could hold.
pub fn scratch_rows(capacity: u64, parallel: u64) -> u64 {
    MAX_BATCH.min(capacity.max(1).saturating_mul(parallel.max(1)))
}

/// Every buffer a step's scratch for `rows` tokens (logits for `logit_rows`) allocates, in the
/// order `new_scratch` takes them. The estimate uses the same list.
pub fn scratch_buffers(hp: &HParams, rows: u64, logit_rows: u64) -> Vec<(MemoryKind, u64)> {
    let b = rows.clamp(1, MAX_BATCH);
    let q_dim = hp.n_head * hp.head_dim;
    let kv_dim = hp.n_head_kv * hp.head_dim;
    let dev = |elems: u64| (MemoryKind::Device, elems.max(1) * 4);
    let mut out = vec![
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
        (
            MemoryKind::Readback,
            logit_rows.clamp(1, b) * hp.n_vocab * 4,
        ),
    ];
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

/// The activations of one step, for up to `rows` tokens of any sequences of the model, and
/// the logits of up to `logit_rows` of them. A model needs one: the executor runs its steps
/// one at a time.
pub struct Scratch {
    rows: u64,
    logit_rows: u64,
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

impl Scratch {
    /// Tokens one step holds at most.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Sequences one step reads logits for at most.
    pub fn logit_rows(&self) -> u64 {
        self.logit_rows
    }
}

/// One sequence's part of a step: the tokens to run at its next positions, and whether the
/// logits after the last of them are wanted.
pub struct Part<'a> {
    pub seq: &'a mut Sequence,
    pub tokens: &'a [u32],
    pub logits: bool,
}

/// Where a part's tokens sit among a step's rows.
struct Span<'a> {
    seq: &'a Sequence,
    row: u64,
    len: u64,
}

/// One sequence's state: its KV cache and the tokens in it. Dropping it frees the cache.
pub struct Sequence {
    capacity: u64,
    kv_f16: bool,
    pos: u64,
    /// The tokens whose keys and values are in the cache, at positions 0..pos.
    tokens: Vec<u32>,
    k: Vec<Buffer>,
    v: Vec<Buffer>,
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
