//! CLIP's text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection) on the GPU:
//! token and position embeddings, pre-norm transformer layers with causal self-attention and a
//! quick-gelu or gelu MLP, the final layer norm, and the projection of the pooled token.
//!
//! SDXL reads two things from it ([`ClipOutput`]): the penultimate hidden states (the output of
//! the second-to-last layer, no final norm) and, from the second encoder, the pooled embedding:
//! the final-normed hidden state at each prompt's first end-of-text token, projected.

use std::path::Path;

use halo_kernels::ops::{self, F32s, SeqAttention, U32s};
use halo_kernels::{Buffer, Device, LoadStrategy, MemoryKind, OwnerId, Stream};

use super::config::ClipTextConfig;
use super::graph::{upload_u32, view};
use super::plan::Sim;
use super::tensors::{DeviceTensors, Names, TensorError};

pub struct ClipTextEncoder {
    cfg: ClipTextConfig,
    tensors: DeviceTensors,
    device: Device,
    act: Activation,
    projection: Option<u64>,
    /// "text_model." as transformers 4 saves the model, "" as transformers 5 does.
    base: &'static str,
    /// What each piece of an encode has cost on the device.
    pacer: super::pace::Pacer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    QuickGelu,
    Gelu,
}

/// What one batch of prompts encodes to.
pub struct ClipOutput {
    /// batch × 77 × hidden: the second-to-last layer's output.
    pub penultimate: Vec<f32>,
    /// When asked for: batch × projection_dim where the model has a projection, else batch ×
    /// hidden_size (the final-normed end-of-text state, CLIPTextModel's pooler output).
    pub pooled: Option<Vec<f32>>,
}

impl ClipTextEncoder {
    /// Loads the encoder's weights from `path` (names under `prefix`: "" for a diffusers
    /// `text_encoder*/model.safetensors`).
    pub fn load(
        device: &Device,
        path: &Path,
        names: impl Into<Names>,
        cfg: ClipTextConfig,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<ClipTextEncoder, TensorError> {
        let bad = |m: String| TensorError::File(path.into(), m);
        let act = match cfg.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(bad(format!("hidden_act {other:?} is not supported"))),
        };
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} does not split into {} heads",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if cfg.num_hidden_layers < 2 {
            return Err(bad(
                "SDXL reads the second-to-last layer: at least 2 layers".into(),
            ));
        }
        let tensors = DeviceTensors::load(device, path, names, strategy, owner)?;
        let projection = tensors
            .has("text_projection.weight")
            .then(|| cfg.projection_dim.unwrap_or(cfg.hidden_size) as u64);
        let base = if tensors.has("embeddings.token_embedding.weight") {
            ""
        } else {
            "text_model."
        };
        let enc = ClipTextEncoder {
            cfg,
            tensors,
            device: device.clone(),
            act,
            projection,
            base,
            pacer: Default::default(),
        };
        enc.check()?;
        Ok(enc)
    }

    /// Every tensor the forward pass reads, with its shape, so a wrong file fails at load.
    fn check(&self) -> Result<(), TensorError> {
        let c = self.cfg.hidden_size as u64;
        let f = self.cfg.intermediate_size as u64;
        let t = &self.tensors;
        t.matrix(
            &format!("{}embeddings.token_embedding.weight", self.base),
            &[self.cfg.vocab_size as u64, c],
        )?;
        t.matrix(
            &format!("{}embeddings.position_embedding.weight", self.base),
            &[self.cfg.max_position_embeddings as u64, c],
        )?;
        for l in 0..self.cfg.num_hidden_layers {
            let p = format!("{}encoder.layers.{l}.", self.base);
            for n in ["layer_norm1", "layer_norm2"] {
                t.vector(&format!("{p}{n}.weight"), c)?;
                t.vector(&format!("{p}{n}.bias"), c)?;
            }
            for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                t.matrix(&format!("{p}self_attn.{n}.weight"), &[c, c])?;
                t.vector(&format!("{p}self_attn.{n}.bias"), c)?;
            }
            t.matrix(&format!("{p}mlp.fc1.weight"), &[f, c])?;
            t.vector(&format!("{p}mlp.fc1.bias"), f)?;
            t.matrix(&format!("{p}mlp.fc2.weight"), &[c, f])?;
            t.vector(&format!("{p}mlp.fc2.bias"), c)?;
        }
        t.vector(&format!("{}final_layer_norm.weight", self.base), c)?;
        t.vector(&format!("{}final_layer_norm.bias", self.base), c)?;
        if let Some(pd) = self.projection {
            t.matrix("text_projection.weight", &[pd, c])?;
        }
        Ok(())
    }

    pub fn hidden_size(&self) -> u32 {
        self.cfg.hidden_size
    }

    pub fn projection_dim(&self) -> Option<u64> {
        self.projection
    }

    /// Device bytes of the weights.
    pub fn bytes(&self) -> u64 {
        self.tensors.bytes()
    }

    /// Device bytes [`Self::encode`] holds at most for `prompts` prompts (all its buffers live
    /// to the end), charged as the allocator charges them.
    pub fn peak_bytes(&self, prompts: usize, pooled: bool) -> u64 {
        let n_ctx = self.cfg.max_position_embeddings as u64;
        let rows = prompts as u64 * n_ctx;
        let (c, f) = (
            self.cfg.hidden_size as u64,
            self.cfg.intermediate_size as u64,
        );
        let mut sim = Sim::default();
        // Token ids and positions (u32, as wide as f32).
        sim.keep(rows);
        sim.keep(rows);
        for _ in 0..7 {
            sim.keep(rows * c);
        }
        sim.keep(rows * f);
        // The attention's state (see `encode`).
        sim.keep(2 * rows * self.cfg.num_attention_heads as u64);
        if pooled {
            sim.keep(prompts as u64);
            sim.keep(prompts as u64 * c);
            if let Some(pd) = self.projection_dim() {
                sim.keep(prompts as u64 * pd);
            }
        }
        sim.peak()
    }

    /// Encodes `ids` (batch × 77 token ids). With `pooled`, also the pooled embedding of each
    /// prompt's first `eos` token (projected where the model has a projection). Activations are
    /// charged to `owner` while it runs.
    pub fn encode(
        &self,
        ids: &[u32],
        eos: u32,
        pooled: bool,
        owner: OwnerId,
    ) -> Result<ClipOutput, TensorError> {
        let mut run = self.begin(ids, eos, pooled, owner)?;
        loop {
            if let (Some(out), _) = self.advance_for(&mut run, None)? {
                return Ok(out);
            }
        }
    }

    /// Starts an encode (see [`Self::encode`]): its buffers are allocated, nothing runs until
    /// [`Self::advance_for`].
    pub fn begin(
        &self,
        ids: &[u32],
        eos: u32,
        pooled: bool,
        owner: OwnerId,
    ) -> Result<ClipRun, TensorError> {
        let n_ctx = self.cfg.max_position_embeddings as usize;
        if ids.is_empty() || !ids.len().is_multiple_of(n_ctx) {
            return Err(TensorError::File(
                self.tensors.path().into(),
                format!("{} token ids are not whole prompts of {n_ctx}", ids.len()),
            ));
        }
        let rows = ids.len() as u64;
        let c = self.cfg.hidden_size as u64;
        let f = self.cfg.intermediate_size as u64;
        let dev = &self.device;
        let alloc = |n: u64| dev.alloc(MemoryKind::Device, n.max(1) * 4, owner);
        let positions: Vec<u32> = (0..ids.len()).map(|i| (i % n_ctx) as u32).collect();
        let layers = self.cfg.num_hidden_layers;
        Ok(ClipRun {
            ids: ids.to_vec(),
            eos,
            owner,
            ids_buf: upload_u32(dev, ids, owner)?,
            pos_buf: upload_u32(dev, &positions, owner)?,
            x: alloc(rows * c)?,
            h: alloc(rows * c)?,
            q: alloc(rows * c)?,
            k: alloc(rows * c)?,
            v: alloc(rows * c)?,
            a: alloc(rows * c)?,
            m: alloc(rows * f)?,
            penultimate: alloc(rows * c)?,
            // The attention's running state: a maximum and a sum per (prompt, head, token).
            state: alloc(2 * rows * self.cfg.num_attention_heads as u64)?,
            // The pooled path needs the last layer too; the penultimate output alone does not.
            run_layers: if pooled { layers } else { layers - 1 },
            pooled,
            next: 0,
        })
    }

    /// Runs the next pieces of an encode (the embeddings, each layer, the pooled output) until
    /// the next one's learned device time would overrun `budget` (None: to the end), and waits
    /// for them. Returns the output once the last piece is done, and the device time spent.
    pub fn advance_for(
        &self,
        run: &mut ClipRun,
        budget: Option<std::time::Duration>,
    ) -> Result<(Option<ClipOutput>, std::time::Duration), TensorError> {
        let started = std::time::Instant::now();
        let rows = run.ids.len() as u64;
        let batch = run.ids.len() / self.cfg.max_position_embeddings as usize;
        let shape = super::pace::shape_key(batch, 0, run.run_layers as usize);
        let mut paced = super::pace::Chunk::new(&self.pacer, shape, budget, started);
        let mut s = self.device.stream()?;
        s.set_profiling(budget.is_some());
        let last = run.run_layers + 1;
        let mut done = false;
        while run.next <= last && paced.admit(run.next as usize) {
            match run.next {
                0 => self.embed(&mut s, run)?,
                l if l < last => self.layer(&mut s, run, l - 1)?,
                _ => done = true,
            }
            run.next += 1;
        }
        if !done {
            s.finish()?;
            return Ok((None, paced.end(&mut s)));
        }
        let c = self.cfg.hidden_size as u64;
        let pooled = if run.pooled {
            let (out, width) = self.pool(&mut s, run, batch)?;
            s.finish()?;
            Some(self.device.read_f32(&out, 0, batch as u64 * width)?)
        } else {
            s.finish()?;
            None
        };
        let took = paced.end(&mut s);
        Ok((
            Some(ClipOutput {
                penultimate: self.device.read_f32(&run.penultimate, 0, rows * c)?,
                pooled,
            }),
            took,
        ))
    }

    /// rows × in → rows × out: y = x Wᵀ + b.
    fn linear(
        &self,
        s: &mut Stream,
        name: &str,
        (out_dim, in_dim): (u64, u64),
        input: F32s<'_>,
        output: F32s<'_>,
        rows: u64,
    ) -> Result<(), TensorError> {
        let t = &self.tensors;
        ops::matmul(
            s,
            t.matrix(&format!("{name}.weight"), &[out_dim, in_dim])?,
            input,
            output,
            rows,
        )?;
        ops::add(
            s,
            output,
            t.vector(&format!("{name}.bias"), out_dim)?,
            output,
        )?;
        Ok(())
    }

    /// The layer norm `name` (weight and bias) of `x`'s rows into `out`.
    fn layer_norm(
        &self,
        s: &mut Stream,
        name: &str,
        x: F32s<'_>,
        out: F32s<'_>,
    ) -> Result<(), TensorError> {
        let (t, c) = (&self.tensors, self.cfg.hidden_size as u64);
        ops::layer_norm(
            s,
            x,
            Some(t.vector(&format!("{name}.weight"), c)?),
            Some(t.vector(&format!("{name}.bias"), c)?),
            out,
            c,
            self.cfg.layer_norm_eps,
        )?;
        Ok(())
    }

    /// The token and position embeddings, summed into `x`.
    fn embed(&self, s: &mut Stream, run: &ClipRun) -> Result<(), TensorError> {
        let (t, c) = (&self.tensors, self.cfg.hidden_size as u64);
        let n_ctx = self.cfg.max_position_embeddings as u64;
        let all = |b| view(b, run.ids.len() as u64 * c);
        ops::get_rows(
            s,
            t.matrix(
                &format!("{}embeddings.token_embedding.weight", self.base),
                &[self.cfg.vocab_size as u64, c],
            )?,
            U32s::all(&run.ids_buf),
            all(&run.x),
        )?;
        ops::get_rows(
            s,
            t.matrix(
                &format!("{}embeddings.position_embedding.weight", self.base),
                &[n_ctx, c],
            )?,
            U32s::all(&run.pos_buf),
            all(&run.h),
        )?;
        ops::add(s, all(&run.x), all(&run.h), all(&run.x))?;
        Ok(())
    }

    /// Encoder layer `l` over `x`, in place; the penultimate output is kept.
    fn layer(&self, s: &mut Stream, run: &ClipRun, l: u32) -> Result<(), TensorError> {
        let rows = run.ids.len() as u64;
        let n_ctx = self.cfg.max_position_embeddings;
        let batch = run.ids.len() / n_ctx as usize;
        let c = self.cfg.hidden_size as u64;
        let f = self.cfg.intermediate_size as u64;
        let heads = self.cfg.num_attention_heads;
        let all = |b| view(b, rows * c);
        let mlp = view(&run.m, rows * f);
        let p = format!("{}encoder.layers.{l}.", self.base);
        self.layer_norm(s, &format!("{p}layer_norm1"), all(&run.x), all(&run.h))?;
        for (name, out) in [("q_proj", &run.q), ("k_proj", &run.k), ("v_proj", &run.v)] {
            let name = format!("{p}self_attn.{name}");
            self.linear(s, &name, (c, c), all(&run.h), all(out), rows)?;
        }
        let head_dim = self.cfg.hidden_size / heads;
        ops::seq_attention(
            s,
            &SeqAttention {
                batch: batch as u32,
                n_heads: heads,
                head_dim,
                n_q: n_ctx,
                n_kv: n_ctx,
                q_stride: c as u32,
                kv_stride: c as u32,
                o_stride: c as u32,
                scale: 1.0 / (head_dim as f32).sqrt(),
                causal: true,
            },
            all(&run.q),
            all(&run.k),
            all(&run.v),
            all(&run.a),
            F32s::all(&run.state).sub(0, 2 * rows * heads as u64),
        )?;
        let out_proj = format!("{p}self_attn.out_proj");
        self.linear(s, &out_proj, (c, c), all(&run.a), all(&run.h), rows)?;
        ops::add(s, all(&run.x), all(&run.h), all(&run.x))?;
        self.layer_norm(s, &format!("{p}layer_norm2"), all(&run.x), all(&run.h))?;
        self.linear(s, &format!("{p}mlp.fc1"), (f, c), all(&run.h), mlp, rows)?;
        match self.act {
            Activation::QuickGelu => ops::quick_gelu(s, mlp, mlp)?,
            Activation::Gelu => ops::gelu(s, mlp, mlp)?,
        }
        self.linear(s, &format!("{p}mlp.fc2"), (c, f), mlp, all(&run.h), rows)?;
        ops::add(s, all(&run.x), all(&run.h), all(&run.x))?;
        if l + 2 == self.cfg.num_hidden_layers {
            s.copy(&run.x, 0, &run.penultimate, 0, rows * c * 4)?;
        }
        Ok(())
    }

    /// The final layer norm at each prompt's first end-of-text token (its last token when
    /// there is none), projected where the model has a projection: a buffer of batch × the
    /// width it returns (the projection's, or hidden_size: CLIPTextModel's pooler output).
    fn pool(
        &self,
        s: &mut Stream,
        run: &ClipRun,
        batch: usize,
    ) -> Result<(Buffer, u64), TensorError> {
        let (t, dev, owner) = (&self.tensors, &self.device, run.owner);
        let rows = run.ids.len() as u64;
        let c = self.cfg.hidden_size as u64;
        let n_ctx = self.cfg.max_position_embeddings as usize;
        let all = |b| view(b, rows * c);
        let name = format!("{}final_layer_norm", self.base);
        self.layer_norm(s, &name, all(&run.x), all(&run.h))?;
        let picks: Vec<u32> = run
            .ids
            .chunks(n_ctx)
            .enumerate()
            .map(|(b, p)| {
                let at = p.iter().position(|&i| i == run.eos).unwrap_or(n_ctx - 1);
                (b * n_ctx + at) as u32
            })
            .collect();
        let pick_buf = upload_u32(dev, &picks, owner)?;
        let alloc = |n: u64| dev.alloc(MemoryKind::Device, n.max(1) * 4, owner);
        let picked = alloc(batch as u64 * c)?;
        // Gather the rows with an f32 "embedding table" view of the normed states.
        ops::get_rows(
            s,
            halo_kernels::ops::Weights {
                buffer: &run.h,
                offset: 0,
                ty: halo_kernels::quant::WeightType::F32,
                rows,
                cols: c,
            },
            U32s::all(&pick_buf),
            F32s::all(&picked).sub(0, batch as u64 * c),
        )?;
        let Some(pd) = self.projection else {
            return Ok((picked, c));
        };
        let out = alloc(batch as u64 * pd)?;
        ops::matmul(
            s,
            t.matrix("text_projection.weight", &[pd, c])?,
            F32s::all(&picked).sub(0, batch as u64 * c),
            F32s::all(&out).sub(0, batch as u64 * pd),
            batch as u64,
        )?;
        Ok((out, pd))
    }
}

/// An encode in progress: its token ids and every buffer its layers pass on, on the device.
pub struct ClipRun {
    ids: Vec<u32>,
    eos: u32,
    owner: OwnerId,
    ids_buf: Buffer,
    pos_buf: Buffer,
    x: Buffer,
    h: Buffer,
    q: Buffer,
    k: Buffer,
    v: Buffer,
    a: Buffer,
    m: Buffer,
    penultimate: Buffer,
    state: Buffer,
    run_layers: u32,
    pooled: bool,
    /// The next piece: 0 the embeddings, then the layers, then the output.
    next: u32,
}
