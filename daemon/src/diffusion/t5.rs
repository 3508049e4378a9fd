//! T5's encoder (transformers' T5EncoderModel, v1.1 as Flux uses it) on the GPU: token
//! embeddings, pre-norm layers of self-attention with a relative position bias and a gated-GELU
//! feed-forward, RMS norms without mean subtraction, the final norm.
//!
//! - The position bias is the first layer's `relative_attention_bias` table (buckets × heads),
//!   looked up at the bucket of each key − query offset and shared by every layer: half the
//!   buckets for each direction, exact offsets below half of a half, then logarithmic up to
//!   `relative_attention_max_distance`, computed in f32 as transformers does.
//! - Attention scores are q·k plus that bias, with no 1/√d scaling; every token attends to every
//!   token, padding included (Flux passes no attention mask).
//! - The feed-forward is gelu_tanh(x W0ᵀ) · (x W1ᵀ), then Woᵀ.
//!
//! Activations are f32 throughout (T5 overflows f16 activations).

use std::path::Path;

use halo_kernels::ops::{self, F32s, SeqAttention, U32s};
use halo_kernels::{Buffer, Device, LoadStrategy, MemoryKind, OwnerId, Stream};

use super::config::T5Config;
use super::graph::{upload_u32, view};
use super::plan::Sim;
use super::tensors::{DeviceTensors, Names, TensorError};

pub struct T5Encoder {
    cfg: T5Config,
    tensors: DeviceTensors,
    device: Device,
    /// The token embedding's name: "shared.weight" or "encoder.embed_tokens.weight".
    embedding: &'static str,
    pacer: super::pace::Pacer,
}

const BIAS: &str = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";

/// The bucket of key − query offset `rel` (bidirectional), as transformers' T5 computes it.
pub fn relative_bucket(rel: i64, num_buckets: u32, max_distance: u32) -> u32 {
    let half = num_buckets / 2;
    let mut bucket = if rel > 0 { half } else { 0 };
    let n = rel.unsigned_abs();
    let exact = (half / 2) as u64;
    if n < exact {
        bucket += n as u32;
    } else {
        // In f32 as torch: log(n / exact) / log(max / exact) · (half − exact), truncated.
        let ratio = (n as f32 / exact as f32).ln();
        let span = (max_distance as f64 / exact as f64).ln() as f32;
        let large = exact as u32 + (ratio / span * (half as f32 - exact as f32)) as u32;
        bucket += large.min(half - 1);
    }
    bucket
}

impl T5Encoder {
    pub fn load(
        device: &Device,
        path: &Path,
        names: impl Into<Names>,
        cfg: T5Config,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<T5Encoder, TensorError> {
        let bad = |m: String| TensorError::File(path.into(), m);
        if cfg.feed_forward_proj != "gated-gelu" {
            return Err(bad(format!(
                "feed_forward_proj {:?} is not supported (T5 v1.1's gated-gelu is)",
                cfg.feed_forward_proj
            )));
        }
        if cfg.num_layers == 0 || cfg.num_heads == 0 || cfg.d_kv == 0 {
            return Err(bad("the encoder has no layers or no heads".into()));
        }
        if cfg.relative_attention_num_buckets < 4 || cfg.relative_attention_max_distance < 2 {
            return Err(bad(
                "relative_attention_num_buckets must be at least 4 and the max distance 2".into(),
            ));
        }
        let tensors = DeviceTensors::load(device, path, names, strategy, owner)?;
        let embedding = if tensors.has("shared.weight") {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let enc = T5Encoder {
            cfg,
            tensors,
            device: device.clone(),
            embedding,
            pacer: Default::default(),
        };
        enc.check()?;
        Ok(enc)
    }

    fn inner(&self) -> u64 {
        self.cfg.num_heads as u64 * self.cfg.d_kv as u64
    }

    /// Every tensor the forward pass reads, with its shape, so a wrong file fails at load.
    fn check(&self) -> Result<(), TensorError> {
        let (c, f, i) = (self.cfg.d_model as u64, self.cfg.d_ff as u64, self.inner());
        let t = &self.tensors;
        t.matrix(self.embedding, &[self.cfg.vocab_size as u64, c])?;
        t.matrix(
            BIAS,
            &[
                self.cfg.relative_attention_num_buckets as u64,
                self.cfg.num_heads as u64,
            ],
        )?;
        for l in 0..self.cfg.num_layers {
            let p = format!("encoder.block.{l}.layer.");
            t.vector(&format!("{p}0.layer_norm.weight"), c)?;
            t.vector(&format!("{p}1.layer_norm.weight"), c)?;
            for n in ["q", "k", "v"] {
                t.matrix(&format!("{p}0.SelfAttention.{n}.weight"), &[i, c])?;
            }
            t.matrix(&format!("{p}0.SelfAttention.o.weight"), &[c, i])?;
            t.matrix(&format!("{p}1.DenseReluDense.wi_0.weight"), &[f, c])?;
            t.matrix(&format!("{p}1.DenseReluDense.wi_1.weight"), &[f, c])?;
            t.matrix(&format!("{p}1.DenseReluDense.wo.weight"), &[c, f])?;
        }
        t.vector("encoder.final_layer_norm.weight", c)?;
        Ok(())
    }

    pub fn d_model(&self) -> u32 {
        self.cfg.d_model
    }

    pub fn layers(&self) -> u32 {
        self.cfg.num_layers
    }

    /// Device bytes of the weights.
    pub fn bytes(&self) -> u64 {
        self.tensors.bytes()
    }

    /// Device bytes an encode of `prompts` prompts of `tokens` ids holds at most, charged as
    /// the allocator charges them.
    pub fn peak_bytes(&self, prompts: usize, tokens: usize) -> u64 {
        let rows = (prompts * tokens) as u64;
        let (c, f, i) = (self.cfg.d_model as u64, self.cfg.d_ff as u64, self.inner());
        let heads = self.cfg.num_heads as u64;
        let pairs = (tokens * tokens) as u64;
        let mut sim = Sim::default();
        sim.keep(rows); // ids
        sim.keep(rows * c); // x
        sim.keep(rows * c); // h
        for _ in 0..4 {
            sim.keep(rows * i); // q, k, v, attention output
        }
        sim.keep(rows * f); // gate
        sim.keep(rows * f); // up
        sim.keep(2 * rows * heads); // the attention's state
        sim.keep(heads * pairs); // the bias
                                 // The bias's making, dropped after the first chunk: buckets and the gathered rows.
        sim.keep(pairs);
        sim.keep(heads * pairs);
        sim.peak()
    }

    /// Encodes `ids` (prompts × `tokens` ids) to prompts × tokens × d_model hidden states.
    pub fn encode(
        &self,
        ids: &[u32],
        tokens: usize,
        owner: OwnerId,
    ) -> Result<Vec<f32>, TensorError> {
        let mut run = self.begin(ids, tokens, owner)?;
        loop {
            if let (Some(out), _) = self.advance_for(&mut run, None)? {
                return Ok(out);
            }
        }
    }

    /// Starts an encode: its buffers are allocated, nothing runs until [`Self::advance_for`].
    pub fn begin(&self, ids: &[u32], tokens: usize, owner: OwnerId) -> Result<T5Run, TensorError> {
        let bad = |m: String| TensorError::File(self.tensors.path().into(), m);
        if tokens == 0 || ids.is_empty() || !ids.len().is_multiple_of(tokens) {
            return Err(bad(format!(
                "{} token ids are not whole prompts of {tokens}",
                ids.len()
            )));
        }
        if let Some(&id) = ids.iter().find(|&&i| i >= self.cfg.vocab_size) {
            return Err(bad(format!(
                "token id {id} is past the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let rows = ids.len() as u64;
        let (c, f, i) = (self.cfg.d_model as u64, self.cfg.d_ff as u64, self.inner());
        let heads = self.cfg.num_heads as u64;
        let pairs = (tokens * tokens) as u64;
        let dev = &self.device;
        let alloc = |n: u64| dev.alloc(MemoryKind::Device, n.max(1) * 4, owner);
        let (nb, md) = (
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        );
        let buckets: Vec<u32> = (0..tokens * tokens)
            .map(|e| relative_bucket((e % tokens) as i64 - (e / tokens) as i64, nb, md))
            .collect();
        Ok(T5Run {
            tokens,
            ids_buf: upload_u32(dev, ids, owner)?,
            x: alloc(rows * c)?,
            h: alloc(rows * c)?,
            q: alloc(rows * i)?,
            k: alloc(rows * i)?,
            v: alloc(rows * i)?,
            a: alloc(rows * i)?,
            g: alloc(rows * f)?,
            u: alloc(rows * f)?,
            state: alloc(2 * rows * heads)?,
            bias: alloc(heads * pairs)?,
            making: Some((upload_u32(dev, &buckets, owner)?, alloc(heads * pairs)?)),
            rows,
            next: 0,
        })
    }

    /// Runs the next pieces (the embeddings and the bias, each layer, the final norm) until the
    /// next one's learned time would overrun `budget` (None: to the end), and waits for them.
    /// Returns the hidden states once the last piece is done, and the device time spent.
    pub fn advance_for(
        &self,
        run: &mut T5Run,
        budget: Option<std::time::Duration>,
    ) -> Result<(Option<Vec<f32>>, std::time::Duration), TensorError> {
        let started = std::time::Instant::now();
        let batch = run.rows as usize / run.tokens;
        let shape = super::pace::shape_key(batch, run.tokens, 0);
        let mut paced = super::pace::Chunk::new(&self.pacer, shape, budget, started);
        let mut s = self.device.stream()?;
        s.set_profiling(budget.is_some());
        let last = self.cfg.num_layers + 1;
        let mut done = false;
        while run.next <= last && paced.admit(run.next as usize) {
            match run.next {
                0 => self.embed(&mut s, run)?,
                l if l < last => self.layer(&mut s, run, l - 1)?,
                _ => {
                    let c = self.cfg.d_model as u64;
                    let all = |b| view(b, run.rows * c);
                    self.rms(&mut s, "encoder.final_layer_norm", all(&run.x), all(&run.h))?;
                    done = true;
                }
            }
            run.next += 1;
        }
        s.finish()?;
        // The bias is made: what made it can go.
        run.making = None;
        let took = paced.end(&mut s);
        if !done {
            return Ok((None, took));
        }
        let n = run.rows * self.cfg.d_model as u64;
        Ok((Some(self.device.read_f32(&run.h, 0, n)?), took))
    }

    fn rms(
        &self,
        s: &mut Stream,
        name: &str,
        x: F32s<'_>,
        out: F32s<'_>,
    ) -> Result<(), TensorError> {
        let c = self.cfg.d_model as u64;
        let w = self.tensors.vector(&format!("{name}.weight"), c)?;
        ops::rms_norm(s, x, Some(w), out, c, self.cfg.layer_norm_epsilon, 0.0)?;
        Ok(())
    }

    fn matmul(
        &self,
        s: &mut Stream,
        name: &str,
        shape: [u64; 2],
        x: F32s<'_>,
        y: F32s<'_>,
        rows: u64,
    ) -> Result<(), TensorError> {
        let w = self.tensors.matrix(&format!("{name}.weight"), &shape)?;
        ops::matmul(s, w, x, y, rows)?;
        Ok(())
    }

    /// The token embeddings into `x`, and the position bias (heads × tokens × tokens): the
    /// table's row at each offset's bucket, transposed to one plane per head.
    fn embed(&self, s: &mut Stream, run: &T5Run) -> Result<(), TensorError> {
        let c = self.cfg.d_model as u64;
        let t = &self.tensors;
        ops::get_rows(
            s,
            t.matrix(self.embedding, &[self.cfg.vocab_size as u64, c])?,
            U32s::all(&run.ids_buf),
            view(&run.x, run.rows * c),
        )?;
        let (buckets, rows) = run.making.as_ref().ok_or_else(|| {
            TensorError::File(t.path().into(), "the position bias is already made".into())
        })?;
        let heads = self.cfg.num_heads as u64;
        let pairs = (run.tokens * run.tokens) as u64;
        let table = t.matrix(
            BIAS,
            &[self.cfg.relative_attention_num_buckets as u64, heads],
        )?;
        ops::get_rows(
            s,
            table,
            U32s::all(buckets).sub(0, pairs),
            view(rows, pairs * heads),
        )?;
        ops::transpose(
            s,
            view(rows, pairs * heads),
            view(&run.bias, pairs * heads),
            1,
            pairs,
            heads,
        )?;
        Ok(())
    }

    /// Layer `l` over `x`, in place.
    fn layer(&self, s: &mut Stream, run: &T5Run, l: u32) -> Result<(), TensorError> {
        let rows = run.rows;
        let (c, f, i) = (self.cfg.d_model as u64, self.cfg.d_ff as u64, self.inner());
        let heads = self.cfg.num_heads;
        let n = run.tokens as u32;
        let all = |b| view(b, rows * c);
        let inner = |b| view(b, rows * i);
        let ff = |b| view(b, rows * f);
        let p = format!("encoder.block.{l}.layer.");
        self.rms(s, &format!("{p}0.layer_norm"), all(&run.x), all(&run.h))?;
        for (name, out) in [("q", &run.q), ("k", &run.k), ("v", &run.v)] {
            let name = format!("{p}0.SelfAttention.{name}");
            self.matmul(s, &name, [i, c], all(&run.h), inner(out), rows)?;
        }
        ops::seq_attention_biased(
            s,
            &SeqAttention {
                batch: (rows / n as u64) as u32,
                n_heads: heads,
                head_dim: self.cfg.d_kv,
                n_q: n,
                n_kv: n,
                q_stride: i as u32,
                kv_stride: i as u32,
                o_stride: i as u32,
                scale: 1.0,
                causal: false,
            },
            inner(&run.q),
            inner(&run.k),
            inner(&run.v),
            Some(view(&run.bias, heads as u64 * n as u64 * n as u64)),
            inner(&run.a),
            F32s::all(&run.state).sub(0, 2 * rows * heads as u64),
        )?;
        let o = format!("{p}0.SelfAttention.o");
        self.matmul(s, &o, [c, i], inner(&run.a), all(&run.h), rows)?;
        ops::add(s, all(&run.x), all(&run.h), all(&run.x))?;
        self.rms(s, &format!("{p}1.layer_norm"), all(&run.x), all(&run.h))?;
        let d = format!("{p}1.DenseReluDense");
        self.matmul(
            s,
            &format!("{d}.wi_0"),
            [f, c],
            all(&run.h),
            ff(&run.g),
            rows,
        )?;
        self.matmul(
            s,
            &format!("{d}.wi_1"),
            [f, c],
            all(&run.h),
            ff(&run.u),
            rows,
        )?;
        ops::geglu(s, ff(&run.g), ff(&run.u), ff(&run.g))?;
        self.matmul(s, &format!("{d}.wo"), [c, f], ff(&run.g), all(&run.h), rows)?;
        ops::add(s, all(&run.x), all(&run.h), all(&run.x))?;
        Ok(())
    }
}

/// An encode in progress: every buffer its layers pass on, on the device.
pub struct T5Run {
    tokens: usize,
    rows: u64,
    ids_buf: Buffer,
    x: Buffer,
    h: Buffer,
    q: Buffer,
    k: Buffer,
    v: Buffer,
    a: Buffer,
    g: Buffer,
    u: Buffer,
    state: Buffer,
    bias: Buffer,
    /// The bucket of each (query, key) pair and the table rows gathered at them, until the
    /// first chunk has made the bias.
    making: Option<(Buffer, Buffer)>,
    /// The next piece: 0 the embeddings and the bias, then the layers, then the final norm.
    next: u32,
}
