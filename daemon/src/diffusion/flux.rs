//! Flux's transformer (diffusers' FluxTransformer2DModel) on the GPU, for one image per call:
//! packed latent tokens and T5 states in, the velocity of every latent token out.
//!
//! - Conditioning: σ·1000 and guidance·1000 through 256-wide sinusoidal embeddings (cosines
//!   first) and their MLPs, plus CLIP's pooled vector through its own, summed; every block's
//!   modulation is a linear map of SiLU of that sum.
//! - Tokens: the text (T5 states through `context_embedder`) then the image (latent tokens
//!   through `x_embedder`), in one buffer, text rows first, as the joint attention orders them.
//! - Rotary embedding over the position ids' axes (`axes_dims_rope`): text ids are 0, image ids
//!   (0, row, column); each axis's pairs turn by pos · 10000^(−2i/dim), computed in f64 on the
//!   host as diffusers does and applied from a table ([`ops::rope_table`]).
//! - Double-stream blocks: each stream's layer norm (no affine) modulated by its shift and
//!   scale, its own q/k/v with per-head RMS norms, one attention over both streams, its own
//!   output projection, gated residual; then a modulated, gated GELU (tanh) feed-forward.
//! - Single-stream blocks over the joint tokens: modulated layer norm, q/k/v and a 4× MLP side
//!   by side, attention, [attention | MLP] through `proj_out`, gated residual.
//! - The end: the image rows' layer norm with the final scale and shift, `proj_out`.
//!
//! Weights come in diffusers' names, or in BFL's through [`super::flux_file`].
//!
//! A call runs in pieces (the embeddings, each block, the end) that [`FluxTransformer::advance_for`]
//! packs into chunks of a time budget, as the UNet's are.

use std::path::Path;
use std::time::{Duration, Instant};

use halo_kernels::ops::{self, F32s, Modulation, SeqAttention};
use halo_kernels::{Buffer, Device, LoadStrategy, OwnerId};

use super::config::FluxConfig;
use super::graph::{view, Cx};
use super::pace;
use super::plan::Sim;
use super::tensors::{DeviceTensors, Names, TensorError};
use super::unet::timestep_embedding;

const EPS: f32 = 1e-6;
const ROPE_THETA: f64 = 10000.0;

pub struct FluxTransformer {
    cfg: FluxConfig,
    tensors: DeviceTensors,
    /// The final modulation's name and where its shift and scale halves are: diffusers'
    /// `norm_out.linear` (scale, shift) or a BFL file's (shift, scale).
    final_mod: (&'static str, u64, u64),
    device: Device,
    pacer: pace::Pacer,
}

/// One call's inputs: `x` is tokens × in_channels packed latents, `context` text tokens ×
/// joint_attention_dim T5 states, `pooled` CLIP's pooled vector; `sigma` the step's σ (the
/// model's timestep ÷ 1000); `guidance` the distilled guidance scale (dev models only);
/// `img_ids` each latent token's position ids.
pub struct FluxInput<'a> {
    pub x: &'a [f32],
    pub context: &'a [f32],
    pub pooled: &'a [f32],
    pub sigma: f32,
    pub guidance: Option<f32>,
    pub img_ids: &'a [[f32; 3]],
}

/// A call in progress: what its pieces pass on, on the device.
pub struct FluxCall {
    txt: u64,
    img: u64,
    /// Every token's hidden state: text rows, then image rows.
    h: Buffer,
    /// SiLU of the conditioning vector: the input of every modulation.
    cond: Buffer,
    /// (cos, sin) per token and pair.
    rope: Buffer,
    next: usize,
    shape: u64,
}

impl FluxTransformer {
    pub fn load(
        device: &Device,
        path: &Path,
        names: impl Into<Names>,
        cfg: FluxConfig,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<FluxTransformer, TensorError> {
        let bad = |m: String| TensorError::File(path.into(), m);
        if cfg.patch_size != 1 {
            return Err(bad(format!(
                "patch_size {} is not supported (Flux packs 2×2 latents itself: 1)",
                cfg.patch_size
            )));
        }
        let d = cfg.attention_head_dim;
        if cfg.num_attention_heads == 0 || d == 0 || d % 2 == 1 {
            return Err(bad(format!(
                "{} heads of {d}: heads need an even width",
                cfg.num_attention_heads
            )));
        }
        if cfg.axes_dims_rope.iter().sum::<u32>() != d
            || cfg.axes_dims_rope.iter().any(|a| a % 2 == 1)
        {
            return Err(bad(format!(
                "axes_dims_rope {:?} must be even and add up to the head width {d}",
                cfg.axes_dims_rope
            )));
        }
        if cfg.axes_dims_rope.len() != 3 {
            return Err(bad(format!(
                "axes_dims_rope has {} axes; position ids have 3",
                cfg.axes_dims_rope.len()
            )));
        }
        let tensors = DeviceTensors::load(device, path, names, strategy, owner)?;
        let final_mod = if tensors.has("norm_out.linear.weight") {
            ("norm_out.linear", 1, 0)
        } else {
            (super::flux_file::FINAL_SHIFT_SCALE, 0, 1)
        };
        let t = FluxTransformer {
            cfg,
            tensors,
            final_mod,
            device: device.clone(),
            pacer: Default::default(),
        };
        t.check()?;
        Ok(t)
    }

    fn inner(&self) -> u64 {
        self.cfg.num_attention_heads as u64 * self.cfg.attention_head_dim as u64
    }

    fn out_channels(&self) -> u64 {
        self.cfg.out_channels.unwrap_or(self.cfg.in_channels) as u64
    }

    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    /// Whether the model takes a guidance scale (FLUX.1-dev; schnell does not).
    pub fn has_guidance(&self) -> bool {
        self.cfg.guidance_embeds
    }

    /// Device bytes of the weights.
    pub fn bytes(&self) -> u64 {
        self.tensors.bytes()
    }

    /// Pieces per call: the embeddings, every block, the end.
    pub fn pieces(&self) -> usize {
        (self.cfg.num_layers + self.cfg.num_single_layers) as usize + 2
    }

    /// Device bytes one call over `txt` text and `img` image tokens holds at most, charged as
    /// the allocator charges them (a replay of its allocations), beside buffers of `held`
    /// f32 values that the job keeps throughout.
    pub fn peak_bytes(&self, txt: u64, img: u64, held: &[u64]) -> u64 {
        let c = self.inner();
        let d = self.cfg.attention_head_dim as u64;
        let heads = self.cfg.num_attention_heads as u64;
        let s = txt + img;
        let state = 2 * heads * s;
        let mut sim = Sim::holding(held);
        // The call's own: the hidden states, the conditioning, the rotary table.
        sim.keep(s * c);
        sim.keep(c);
        sim.keep(s * d);
        let piece = |sim: &mut Sim, temps: &[u64]| {
            for &n in temps {
                sim.temp(n);
            }
            sim.flush();
        };
        // The embeddings: the inputs, the sinusoids and each MLP's two outputs.
        let pd = self.cfg.pooled_projection_dim as u64;
        let mut begin = vec![
            img * self.cfg.in_channels as u64,
            txt * self.cfg.joint_attention_dim as u64,
            256,
            c,
            c,
        ];
        if self.cfg.guidance_embeds {
            begin.extend([256, c, c]);
        }
        begin.extend([pd, c, c]);
        piece(&mut sim, &begin);
        if self.cfg.num_layers > 0 {
            // Two modulations, q/k/v, each stream's norm, the attention's output and state,
            // then per stream its projection, norm, and feed-forward's two outputs.
            let mut double = vec![6 * c, 6 * c, s * c, s * c, s * c, txt * c, img * c];
            double.extend([s * c, state]);
            for n in [txt, img] {
                double.extend([n * c, n * c, 4 * n * c, n * c]);
            }
            piece(&mut sim, &double);
        }
        if self.cfg.num_single_layers > 0 {
            let single = [
                3 * c,
                s * c,
                s * c,
                s * c,
                s * c,
                5 * s * c,
                state,
                4 * s * c,
                s * c,
            ];
            piece(&mut sim, &single);
        }
        piece(&mut sim, &[2 * c, img * c, img * self.out_channels()]);
        sim.peak()
    }

    /// Every tensor a call reads, with its shape, so a wrong file fails at load.
    fn check(&self) -> Result<(), TensorError> {
        let c = self.inner();
        let d = self.cfg.attention_head_dim as u64;
        let t = &self.tensors;
        let lin = |name: &str, out: u64, inp: u64| -> Result<(), TensorError> {
            t.matrix(&format!("{name}.weight"), &[out, inp])?;
            t.vector(&format!("{name}.bias"), out)?;
            Ok(())
        };
        lin("x_embedder", c, self.cfg.in_channels as u64)?;
        lin("context_embedder", c, self.cfg.joint_attention_dim as u64)?;
        let mut mlps = vec![
            ("time_text_embed.timestep_embedder", 256),
            (
                "time_text_embed.text_embedder",
                self.cfg.pooled_projection_dim as u64,
            ),
        ];
        if self.cfg.guidance_embeds {
            mlps.push(("time_text_embed.guidance_embedder", 256));
        }
        for (m, din) in mlps {
            lin(&format!("{m}.linear_1"), c, din)?;
            lin(&format!("{m}.linear_2"), c, c)?;
        }
        for i in 0..self.cfg.num_layers {
            let p = format!("transformer_blocks.{i}");
            lin(&format!("{p}.norm1.linear"), 6 * c, c)?;
            lin(&format!("{p}.norm1_context.linear"), 6 * c, c)?;
            for n in [
                "to_q",
                "to_k",
                "to_v",
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
            ] {
                lin(&format!("{p}.attn.{n}"), c, c)?;
            }
            for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                t.vector(&format!("{p}.attn.{n}.weight"), d)?;
            }
            lin(&format!("{p}.attn.to_out.0"), c, c)?;
            lin(&format!("{p}.attn.to_add_out"), c, c)?;
            for ff in ["ff", "ff_context"] {
                lin(&format!("{p}.{ff}.net.0.proj"), 4 * c, c)?;
                lin(&format!("{p}.{ff}.net.2"), c, 4 * c)?;
            }
        }
        for i in 0..self.cfg.num_single_layers {
            let p = format!("single_transformer_blocks.{i}");
            lin(&format!("{p}.norm.linear"), 3 * c, c)?;
            for n in ["to_q", "to_k", "to_v"] {
                lin(&format!("{p}.attn.{n}"), c, c)?;
            }
            for n in ["norm_q", "norm_k"] {
                t.vector(&format!("{p}.attn.{n}.weight"), d)?;
            }
            lin(&format!("{p}.proj_mlp"), 4 * c, c)?;
            lin(&format!("{p}.proj_out"), c, 5 * c)?;
        }
        lin(self.final_mod.0, 2 * c, c)?;
        lin("proj_out", self.out_channels(), c)?;
        Ok(())
    }

    /// The rotary table of `txt` text tokens (ids 0) and the image's: per token, per pair of
    /// the head, (cos, sin) of pos[axis] · θ^(−2i/dim) for the axis the pair belongs to.
    fn rope_table(&self, txt: usize, img_ids: &[[f32; 3]]) -> Vec<f32> {
        let d = self.cfg.attention_head_dim as usize;
        let mut out = Vec::with_capacity((txt + img_ids.len()) * d);
        let zero = [0f32; 3];
        for ids in std::iter::repeat_n(&zero, txt).chain(img_ids) {
            for (axis, &dim) in self.cfg.axes_dims_rope.iter().enumerate() {
                for i in 0..dim as usize / 2 {
                    let freq = 1.0 / ROPE_THETA.powf((2 * i) as f64 / dim as f64);
                    let a = ids[axis] as f64 * freq;
                    out.push(a.cos() as f32);
                    out.push(a.sin() as f32);
                }
            }
        }
        out
    }

    /// One whole call (see [`FluxInput`]): image tokens × out_channels velocities.
    pub fn forward(&self, input: &FluxInput<'_>, owner: OwnerId) -> Result<Vec<f32>, TensorError> {
        let mut call = self.begin(input, owner)?;
        loop {
            if let (Some(v), _) = self.advance_for(&mut call, owner, None)? {
                return Ok(v);
            }
        }
    }

    /// Starts a call: the inputs go to the device and the embeddings are recorded by the first
    /// piece of [`Self::advance_for`].
    pub fn begin(&self, input: &FluxInput<'_>, owner: OwnerId) -> Result<FluxCall, TensorError> {
        let bad = |m: String| TensorError::File(self.tensors.path().into(), m);
        let (cin, joint) = (
            self.cfg.in_channels as usize,
            self.cfg.joint_attention_dim as usize,
        );
        let img = input.img_ids.len();
        if img == 0 || input.x.len() != img * cin {
            return Err(bad(format!(
                "{} latent values are not {img} tokens of {cin}",
                input.x.len()
            )));
        }
        if input.context.is_empty() || !input.context.len().is_multiple_of(joint) {
            return Err(bad(format!(
                "{} context values are not whole tokens of {joint}",
                input.context.len()
            )));
        }
        if input.pooled.len() != self.cfg.pooled_projection_dim as usize {
            return Err(bad(format!(
                "the pooled vector has {} values, expected {}",
                input.pooled.len(),
                self.cfg.pooled_projection_dim
            )));
        }
        match (self.cfg.guidance_embeds, input.guidance) {
            (true, None) => return Err(bad("this model needs a guidance scale".into())),
            (false, Some(_)) => {
                return Err(bad(
                    "this model has no guidance embedding (schnell): no guidance scale".into(),
                ))
            }
            _ => {}
        }
        let txt = input.context.len() / joint;
        let c = self.inner();
        let mut cx = self.cx(owner)?;
        let tokens = (txt + img) as u64;
        let h = cx.alloc(tokens * c)?;
        let cond = cx.alloc(c)?;
        let rope = cx.upload(&self.rope_table(txt, input.img_ids))?;
        // The embeddings now: they read host data that the call does not keep.
        let x = cx.upload(input.x)?;
        let ctx = cx.upload(input.context)?;
        self.linear_into(
            &mut cx,
            "context_embedder",
            view(&ctx, input.context.len() as u64),
            F32s::all(&h).sub(0, txt as u64 * c),
            txt as u64,
            joint as u64,
            c,
        )?;
        self.linear_into(
            &mut cx,
            "x_embedder",
            view(&x, input.x.len() as u64),
            F32s::all(&h).sub(txt as u64 * c, img as u64 * c),
            img as u64,
            cin as u64,
            c,
        )?;
        // σ·1000 as diffusers rounds it: the scheduler's t = σ·1000, the pipeline's t / 1000,
        // the model's · 1000, each in f32.
        let t = input.sigma * 1000.0 / 1000.0 * 1000.0;
        let tproj = cx.upload(&timestep_embedding(&[t], 256, true, 0.0))?;
        let temb = cx.mlp("time_text_embed.timestep_embedder", &tproj, 256, c)?;
        if let Some(g) = input.guidance {
            let gproj = cx.upload(&timestep_embedding(&[g * 1000.0], 256, true, 0.0))?;
            let gemb = cx.mlp("time_text_embed.guidance_embedder", &gproj, 256, c)?;
            ops::add(&mut cx.s, view(&temb, c), view(&gemb, c), view(&temb, c))?;
        }
        let pooled = cx.upload(input.pooled)?;
        let pemb = cx.mlp(
            "time_text_embed.text_embedder",
            &pooled,
            self.cfg.pooled_projection_dim as u64,
            c,
        )?;
        ops::add(&mut cx.s, view(&temb, c), view(&pemb, c), view(&temb, c))?;
        ops::silu(&mut cx.s, view(&temb, c), view(&cond, c))?;
        cx.flush()?;
        Ok(FluxCall {
            txt: txt as u64,
            img: img as u64,
            h,
            cond,
            rope,
            next: 0,
            shape: pace::shape_key(1, txt, img),
        })
    }

    fn cx(&self, owner: OwnerId) -> Result<Cx<'_>, TensorError> {
        Ok(Cx {
            t: &self.tensors,
            dev: &self.device,
            owner,
            s: self.device.stream()?,
            batch: 1,
            groups: 1,
            eps: EPS,
        })
    }

    /// y = x Wᵀ + b into the view `y` (rows × dout).
    #[allow(clippy::too_many_arguments)]
    fn linear_into(
        &self,
        cx: &mut Cx<'_>,
        name: &str,
        x: F32s<'_>,
        y: F32s<'_>,
        rows: u64,
        din: u64,
        dout: u64,
    ) -> Result<(), TensorError> {
        let w = self
            .tensors
            .matrix(&format!("{name}.weight"), &[dout, din])?;
        ops::matmul(&mut cx.s, w, x, y, rows)?;
        let b = self.tensors.vector(&format!("{name}.bias"), dout)?;
        ops::add(&mut cx.s, y, b, y)?;
        Ok(())
    }

    /// Runs the next pieces of a call (piece 0 is the embeddings, done by [`Self::begin`];
    /// then each double block, each single block, the end) until the next one's learned time
    /// would overrun `budget` (None: to the end). Returns the velocities once the end has run,
    /// and the device time spent.
    pub fn advance_for(
        &self,
        call: &mut FluxCall,
        owner: OwnerId,
        budget: Option<Duration>,
    ) -> Result<(Option<Vec<f32>>, Duration), TensorError> {
        let started = Instant::now();
        let mut cx = self.cx(owner)?;
        cx.s.set_profiling(budget.is_some());
        let mut paced = pace::Chunk::new(&self.pacer, call.shape, budget, started);
        let (doubles, singles) = (
            self.cfg.num_layers as usize,
            self.cfg.num_single_layers as usize,
        );
        let end = doubles + singles + 1;
        if call.next == 0 {
            call.next = 1;
        }
        let mut out = None;
        while call.next <= end && paced.admit(call.next) {
            let i = call.next;
            call.next += 1;
            if i <= doubles {
                self.double_block(&mut cx, call, i - 1)?;
            } else if i < end {
                self.single_block(&mut cx, call, i - 1 - doubles)?;
            } else {
                out = Some(self.finish(&mut cx, call)?);
            }
            cx.flush()?;
        }
        cx.s.finish()?;
        let took = paced.end(&mut cx.s);
        match out {
            Some(buf) => {
                let n = call.img * self.out_channels();
                Ok((Some(self.device.read_f32(&buf, 0, n)?), took))
            }
            None => Ok((None, took)),
        }
    }

    /// A block's modulation: `parts` vectors of the inner width from SiLU(conditioning).
    fn modulation(
        &self,
        cx: &mut Cx<'_>,
        name: &str,
        call: &FluxCall,
        parts: u64,
    ) -> Result<Buffer, TensorError> {
        let c = self.inner();
        cx.linear(name, view(&call.cond, c), 1, c, parts * c, true)
    }

    /// Layer norm without affine of `x` (rows of the inner width) into a new buffer, then
    /// · (1 + scale) + shift with part `shift` and `shift + 1` of `m`.
    fn ada_norm(
        &self,
        cx: &mut Cx<'_>,
        x: F32s<'_>,
        m: &Buffer,
        shift: u64,
        scale: u64,
    ) -> Result<Buffer, TensorError> {
        let c = self.inner();
        let out = cx.alloc(x.len)?;
        ops::layer_norm(&mut cx.s, x, None, None, view(&out, x.len), c, EPS)?;
        let part = |k: u64| F32s::all(m).sub(k * c, c);
        ops::modulate(
            &mut cx.s,
            view(&out, x.len),
            Modulation::ScaleShift {
                scale: part(scale),
                shift: part(shift),
            },
            view(&out, x.len),
            c,
            x.len / c,
            0,
        )?;
        Ok(out)
    }

    /// x += part `k` of `m` · y.
    fn gate(
        &self,
        cx: &mut Cx<'_>,
        x: F32s<'_>,
        m: &Buffer,
        k: u64,
        y: F32s<'_>,
    ) -> Result<(), TensorError> {
        let c = self.inner();
        ops::modulate(
            &mut cx.s,
            x,
            Modulation::Gate {
                gate: F32s::all(m).sub(k * c, c),
                y,
            },
            x,
            c,
            x.len / c,
            0,
        )?;
        Ok(())
    }

    /// q, k, v of `n` rows of `x` into rows `at..` of the joint q, k and v buffers, with the
    /// per-head RMS norms of q and k.
    #[allow(clippy::too_many_arguments)]
    fn qkv(
        &self,
        cx: &mut Cx<'_>,
        x: F32s<'_>,
        (q, k, v): (&Buffer, &Buffer, &Buffer),
        at: u64,
        n: u64,
        names: [&str; 3],
        norms: [&str; 2],
    ) -> Result<(), TensorError> {
        let c = self.inner();
        let d = self.cfg.attention_head_dim as u64;
        for (name, buf) in names.iter().zip([q, k, v]) {
            let y = F32s::all(buf).sub(at * c, n * c);
            self.linear_into(cx, name, x, y, n, c, c)?;
        }
        for (norm, buf) in norms.iter().zip([q, k]) {
            let y = F32s::all(buf).sub(at * c, n * c);
            let w = self.tensors.vector(&format!("{norm}.weight"), d)?;
            ops::rms_norm(&mut cx.s, y, Some(w), y, d, EPS, 0.0)?;
        }
        Ok(())
    }

    /// Rotary embedding on the joint q and k, then attention over every token into `o`.
    fn attend(
        &self,
        cx: &mut Cx<'_>,
        call: &FluxCall,
        (q, k, v): (&Buffer, &Buffer, &Buffer),
        o: F32s<'_>,
        o_stride: u64,
    ) -> Result<(), TensorError> {
        let c = self.inner();
        let d = self.cfg.attention_head_dim as u64;
        let heads = self.cfg.num_attention_heads as u64;
        let tokens = call.txt + call.img;
        let table = view(&call.rope, tokens * d);
        for buf in [q, k] {
            ops::rope_table(&mut cx.s, view(buf, tokens * c), table, tokens, heads, d, c)?;
        }
        cx.seq_attention(
            &SeqAttention {
                batch: 1,
                n_heads: heads as u32,
                head_dim: d as u32,
                n_q: tokens as u32,
                n_kv: tokens as u32,
                q_stride: c as u32,
                kv_stride: c as u32,
                o_stride: o_stride as u32,
                scale: 1.0 / (d as f32).sqrt(),
                causal: false,
            },
            view(q, tokens * c),
            view(k, tokens * c),
            view(v, tokens * c),
            o,
        )
    }

    fn double_block(&self, cx: &mut Cx<'_>, call: &FluxCall, i: usize) -> Result<(), TensorError> {
        let c = self.inner();
        fn rows(b: &Buffer, at: u64, n: u64, c: u64) -> F32s<'_> {
            F32s::all(b).sub(at * c, n * c)
        }
        let p = format!("transformer_blocks.{i}");
        let (txt, img) = (call.txt, call.img);
        let tokens = txt + img;
        let m_img = self.modulation(cx, &format!("{p}.norm1.linear"), call, 6)?;
        let m_txt = self.modulation(cx, &format!("{p}.norm1_context.linear"), call, 6)?;
        let (q, k, v) = (
            cx.alloc(tokens * c)?,
            cx.alloc(tokens * c)?,
            cx.alloc(tokens * c)?,
        );
        // (first row, rows, modulation, q/k/v names, norm names, attention output, feed-forward)
        let streams = [
            (
                0,
                txt,
                &m_txt,
                ["add_q_proj", "add_k_proj", "add_v_proj"],
                ["norm_added_q", "norm_added_k"],
                "attn.to_add_out",
                "ff_context",
            ),
            (
                txt,
                img,
                &m_img,
                ["to_q", "to_k", "to_v"],
                ["norm_q", "norm_k"],
                "attn.to_out.0",
                "ff",
            ),
        ];
        for &(at, n, m, names, norms, _, _) in &streams {
            let normed = self.ada_norm(cx, rows(&call.h, at, n, c), m, 0, 1)?;
            let names = names.map(|s| format!("{p}.attn.{s}"));
            let norms = norms.map(|s| format!("{p}.attn.{s}"));
            self.qkv(
                cx,
                view(&normed, n * c),
                (&q, &k, &v),
                at,
                n,
                [&names[0], &names[1], &names[2]],
                [&norms[0], &norms[1]],
            )?;
        }
        let o = cx.alloc(tokens * c)?;
        self.attend(cx, call, (&q, &k, &v), view(&o, tokens * c), c)?;
        for &(at, n, m, _, _, out, ff) in &streams {
            let x = rows(&call.h, at, n, c);
            let a = cx.linear(&format!("{p}.{out}"), rows(&o, at, n, c), n, c, c, true)?;
            self.gate(cx, x, m, 2, view(&a, n * c))?;
            let normed = self.ada_norm(cx, x, m, 3, 4)?;
            let f = cx.linear(
                &format!("{p}.{ff}.net.0.proj"),
                view(&normed, n * c),
                n,
                c,
                4 * c,
                true,
            )?;
            ops::gelu_tanh(&mut cx.s, view(&f, n * 4 * c), view(&f, n * 4 * c))?;
            let g = cx.linear(
                &format!("{p}.{ff}.net.2"),
                view(&f, n * 4 * c),
                n,
                4 * c,
                c,
                true,
            )?;
            self.gate(cx, x, m, 5, view(&g, n * c))?;
        }
        Ok(())
    }

    fn single_block(&self, cx: &mut Cx<'_>, call: &FluxCall, i: usize) -> Result<(), TensorError> {
        let c = self.inner();
        let p = format!("single_transformer_blocks.{i}");
        let tokens = call.txt + call.img;
        let x = view(&call.h, tokens * c);
        let m = self.modulation(cx, &format!("{p}.norm.linear"), call, 3)?;
        let normed = self.ada_norm(cx, x, &m, 0, 1)?;
        let (q, k, v) = (
            cx.alloc(tokens * c)?,
            cx.alloc(tokens * c)?,
            cx.alloc(tokens * c)?,
        );
        let names = ["to_q", "to_k", "to_v"].map(|s| format!("{p}.attn.{s}"));
        let norms = ["norm_q", "norm_k"].map(|s| format!("{p}.attn.{s}"));
        self.qkv(
            cx,
            view(&normed, tokens * c),
            (&q, &k, &v),
            0,
            tokens,
            [&names[0], &names[1], &names[2]],
            [&norms[0], &norms[1]],
        )?;
        // [attention | MLP] side by side, 5 · inner per token.
        let joined = cx.alloc(tokens * 5 * c)?;
        self.attend(cx, call, (&q, &k, &v), view(&joined, tokens * 5 * c), 5 * c)?;
        let mlp = cx.linear(
            &format!("{p}.proj_mlp"),
            view(&normed, tokens * c),
            tokens,
            c,
            4 * c,
            true,
        )?;
        let mlp_v = view(&mlp, tokens * 4 * c);
        ops::gelu_tanh(&mut cx.s, mlp_v, mlp_v)?;
        ops::copy_cols(
            &mut cx.s,
            mlp_v,
            F32s::all(&joined).sub(c, tokens * 5 * c - c),
            tokens,
            4 * c,
            4 * c,
            5 * c,
        )?;
        let y = cx.linear(
            &format!("{p}.proj_out"),
            view(&joined, tokens * 5 * c),
            tokens,
            5 * c,
            c,
            true,
        )?;
        self.gate(cx, x, &m, 2, view(&y, tokens * c))?;
        Ok(())
    }

    /// The image rows' final modulated norm and `proj_out`.
    fn finish(&self, cx: &mut Cx<'_>, call: &FluxCall) -> Result<Buffer, TensorError> {
        let c = self.inner();
        let (name, shift, scale) = self.final_mod;
        let m = self.modulation(cx, name, call, 2)?;
        let x = F32s::all(&call.h).sub(call.txt * c, call.img * c);
        let normed = self.ada_norm(cx, x, &m, shift, scale)?;
        cx.linear(
            "proj_out",
            view(&normed, call.img * c),
            call.img,
            c,
            self.out_channels(),
            true,
        )
    }
}
