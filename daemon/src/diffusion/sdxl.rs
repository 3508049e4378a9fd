//! An SDXL pipeline from a diffusers folder or a single-file checkpoint, composed as diffusers' StableDiffusionXLPipeline
//! composes it: both tokenizers and text encoders (penultimate states side by side as the
//! context, the second encoder's pooled projection), zeros for an absent negative prompt
//! (`force_zeros_for_empty_prompt`), the added time ids `[h, w, 0, 0, h, w]`, torch-cpu noise
//! for the whole batch at once, classifier-free guidance as one UNet call on the batch
//! `[uncond…, cond…]`, the sampler, and the VAE decode.
//!
//! This is the engine's numerical core; the daemon's image job (memory reservation, steps the
//! executor interleaves with other work, progress, cancellation) builds on it.

use std::path::{Path, PathBuf};

use halo_kernels::bench::ImageKernelShapes;
use halo_kernels::ops::{self, Conv2d, F32s, SeqAttention};
use halo_kernels::{Device, LoadStrategy, OwnerId, WeightLayout};

use crate::models::Mapping;
use crate::safetensors::SafeTensors;

use super::clip::{ClipOutput, ClipRun, ClipTextEncoder};
use super::clip_tokenizer::ClipTokenizer;
use super::config::{self, ClipTextConfig, SchedulerConfig, UnetConfig, VaeConfig};
use super::rng::TorchRng;
use super::sampler::{Sampler, SamplerKind, Schedule};
use super::single_file;
use super::tensors::{DeviceTensors, Names};
use super::unet::{Sample, Unet, UnetCall, UnetInput};
use super::vae::{Decode, Vae};

#[derive(Debug)]
pub struct SdxlError(pub String);

impl std::fmt::Display for SdxlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SdxlError {}

fn err(e: impl std::fmt::Display) -> SdxlError {
    SdxlError(e.to_string())
}

pub struct SdxlPipeline {
    tok1: ClipTokenizer,
    tok2: ClipTokenizer,
    te1: ClipTextEncoder,
    te2: ClipTextEncoder,
    unet: Unet,
    vae: Vae,
    scheduler: SchedulerConfig,
    latent_channels: usize,
}

/// What to make.
#[derive(Clone, Debug)]
pub struct SdxlRequest {
    pub prompt: String,
    /// None or empty: zeros (SDXL's force_zeros_for_empty_prompt).
    pub negative: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: u32,
    pub cfg: f32,
    pub sampler: SamplerKind,
    pub schedule: Schedule,
    pub seed: u64,
    pub batch: usize,
}

/// The one weight file of a diffusers component folder.
pub(crate) fn weights_in(dir: &Path) -> Result<PathBuf, SdxlError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| SdxlError(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(SdxlError(format!(
            "{}: no .safetensors file",
            dir.display()
        ))),
        // fp16 variants sit beside the full files; prefer the plain name diffusers loads.
        _ => found
            .iter()
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    n == "model.safetensors" || n == "diffusion_pytorch_model.safetensors"
                })
            })
            .cloned()
            .ok_or_else(|| {
                SdxlError(format!(
                    "{}: several .safetensors files and none is the default",
                    dir.display()
                ))
            }),
    }
}

/// One component's weights: the file, which of its tensors, and its configuration.
struct Part<C> {
    path: PathBuf,
    names: Names,
    cfg: C,
}

/// Where each part of a pipeline comes from, before anything is loaded.
struct Parts {
    te1: Part<ClipTextConfig>,
    te2: Part<ClipTextConfig>,
    unet: Part<UnetConfig>,
    /// The file that described the UNet's shape, for messages.
    unet_described_by: PathBuf,
    vae: Part<VaeConfig>,
    scheduler: SchedulerConfig,
}

impl Parts {
    /// A diffusers folder: each component's one weight file and its `config.json`.
    fn folder(dir: &Path) -> Result<Parts, SdxlError> {
        let part = |p: &str| dir.join(p);
        let component = |p: &str| -> Result<(PathBuf, PathBuf), SdxlError> {
            Ok((weights_in(&part(p))?, part(p).join("config.json")))
        };
        let te = |p: &str| -> Result<Part<ClipTextConfig>, SdxlError> {
            let (path, cfg) = component(p)?;
            let cfg = config::read(&cfg).map_err(err)?;
            Ok(Part {
                path,
                names: "".into(),
                cfg,
            })
        };
        let (unet_path, unet_cfg) = component("unet")?;
        let (vae_path, vae_cfg) = component("vae")?;
        Ok(Parts {
            te1: te("text_encoder")?,
            te2: te("text_encoder_2")?,
            unet: Part {
                path: unet_path,
                names: "".into(),
                cfg: config::read(&unet_cfg).map_err(err)?,
            },
            unet_described_by: unet_cfg,
            vae: Part {
                path: vae_path,
                names: "".into(),
                cfg: config::read(&vae_cfg).map_err(err)?,
            },
            scheduler: config::read(&part("scheduler").join("scheduler_config.json"))
                .map_err(err)?,
        })
    }

    /// A single-file checkpoint (see [`single_file`]): configs from the diffusers folder
    /// `described_by` when given, otherwise inferred from the tensors' shapes.
    fn file(path: &Path, described_by: Option<&Path>) -> Result<Parts, SdxlError> {
        let at = |e: String| SdxlError(format!("{}: {e}", path.display()));
        let map = Mapping::open(path).map_err(|e| at(e.to_string()))?;
        let st = SafeTensors::parse(map.bytes()).map_err(|e| at(e.to_string()))?;
        let ts = st.tensors();
        if !single_file::is_checkpoint(ts) {
            return Err(at(format!(
                "not an SDXL checkpoint: no {}* tensors (a single-file SDXL keeps its UNet there)",
                single_file::UNET
            )));
        }
        fn part<C>(path: &Path, names: Names, cfg: C) -> Part<C> {
            Part {
                path: path.to_path_buf(),
                names,
                cfg,
            }
        }
        let (te1, te2, unet, vae, scheduler, unet_described_by) = match described_by {
            Some(dir) => {
                let read = |p: &str| dir.join(p).join("config.json");
                (
                    config::read(&read("text_encoder")).map_err(err)?,
                    config::read(&read("text_encoder_2")).map_err(err)?,
                    config::read(&read("unet")).map_err(err)?,
                    config::read(&read("vae")).map_err(err)?,
                    config::read(&dir.join("scheduler").join("scheduler_config.json"))
                        .map_err(err)?,
                    read("unet"),
                )
            }
            None => {
                let te2 = single_file::clip_g_config(ts).map_err(at)?;
                let pooled = te2.projection_dim.unwrap_or(te2.hidden_size) as u64;
                (
                    single_file::clip_l_config(ts).map_err(at)?,
                    te2,
                    single_file::unet_config(ts, pooled).map_err(at)?,
                    single_file::vae_config(ts).map_err(at)?,
                    single_file::scheduler_config(),
                    path.to_path_buf(),
                )
            }
        };
        Ok(Parts {
            te1: part(path, single_file::clip_l_names(), te1),
            te2: part(path, single_file::clip_g_names(), te2),
            unet: part(path, single_file::unet_names(), unet),
            unet_described_by,
            vae: part(path, single_file::vae_names(), vae),
            scheduler,
        })
    }

    fn estimate(&self, layout: WeightLayout) -> Result<u64, SdxlError> {
        let mut total = 0u64;
        // A single file holds every part: its header is read once.
        let mut header: Option<(&PathBuf, SafeTensors)> = None;
        for (path, names) in [
            (&self.te1.path, &self.te1.names),
            (&self.te2.path, &self.te2.names),
            (&self.unet.path, &self.unet.names),
            (&self.vae.path, &self.vae.names),
        ] {
            let at = |e: String| SdxlError(format!("{}: {e}", path.display()));
            if header.as_ref().is_none_or(|(p, _)| *p != path) {
                let map = Mapping::open(path).map_err(|e| at(e.to_string()))?;
                let st = SafeTensors::parse(map.bytes()).map_err(|e| at(e.to_string()))?;
                header = Some((path, st));
            }
            let (_, st) = header.as_ref().expect("read above");
            total += DeviceTensors::estimate(st, names.clone(), layout).map_err(at)?;
        }
        Ok(total)
    }
}

impl SdxlPipeline {
    /// Loads an SDXL model: a diffusers folder, or a single-file checkpoint described by the
    /// diffusers folder `described_by` or, without one, by its own shapes and SDXL base's
    /// configuration (see [`single_file`]).
    pub fn load(
        device: &Device,
        path: &Path,
        described_by: Option<&Path>,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<SdxlPipeline, SdxlError> {
        if path.is_dir() {
            return SdxlPipeline::load_folder(device, path, strategy, owner);
        }
        let parts = Parts::file(path, described_by)?;
        let (tok1, tok2) = match described_by {
            Some(dir) => (
                ClipTokenizer::from_folder(&dir.join("tokenizer")).map_err(err)?,
                ClipTokenizer::from_folder(&dir.join("tokenizer_2")).map_err(err)?,
            ),
            // SDXL's tokenizers: CLIP's vocabulary, padded with end-of-text and with "!".
            None => (
                ClipTokenizer::openai(super::clip_tokenizer::EOS).map_err(err)?,
                ClipTokenizer::openai("!").map_err(err)?,
            ),
        };
        SdxlPipeline::assemble(device, parts, tok1, tok2, strategy, owner)
    }

    /// Device bytes [`Self::load`] will hold for the model at `path` on a device with this
    /// weight layout, from the weight files' headers alone.
    pub fn estimate(
        path: &Path,
        described_by: Option<&Path>,
        layout: WeightLayout,
    ) -> Result<u64, SdxlError> {
        if path.is_dir() {
            return Parts::folder(path)?.estimate(layout);
        }
        Parts::file(path, described_by)?.estimate(layout)
    }

    /// Loads a diffusers SDXL folder.
    pub fn load_folder(
        device: &Device,
        dir: &Path,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<SdxlPipeline, SdxlError> {
        let tok1 = ClipTokenizer::from_folder(&dir.join("tokenizer")).map_err(err)?;
        let tok2 = ClipTokenizer::from_folder(&dir.join("tokenizer_2")).map_err(err)?;
        SdxlPipeline::assemble(device, Parts::folder(dir)?, tok1, tok2, strategy, owner)
    }

    fn assemble(
        device: &Device,
        parts: Parts,
        tok1: ClipTokenizer,
        tok2: ClipTokenizer,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<SdxlPipeline, SdxlError> {
        let te = |p: Part<ClipTextConfig>| {
            ClipTextEncoder::load(device, &p.path, p.names, p.cfg, strategy, owner).map_err(err)
        };
        let te2_path = parts.te2.path.clone();
        let (te1, te2) = (te(parts.te1)?, te(parts.te2)?);
        if te2.projection_dim().is_none() {
            return Err(SdxlError(format!(
                "{}: the second text encoder has no text_projection (SDXL's pooled embedding)",
                te2_path.display()
            )));
        }
        let described = &parts.unet_described_by;
        let shape = parts.unet.cfg.shape(described).map_err(err)?;
        if shape.context_dim != te1.hidden_size() + te2.hidden_size() {
            return Err(SdxlError(format!(
                "{}: cross_attention_dim {} is not the two text encoders' {} + {}",
                described.display(),
                shape.context_dim,
                te1.hidden_size(),
                te2.hidden_size()
            )));
        }
        let unet = Unet::load(
            device,
            &parts.unet.path,
            parts.unet.names,
            shape,
            strategy,
            owner,
        )
        .map_err(err)?;
        let latent_channels = parts.vae.cfg.latent_channels as usize;
        let vae = Vae::load(
            device,
            &parts.vae.path,
            parts.vae.names,
            parts.vae.cfg,
            strategy,
            owner,
        )
        .map_err(err)?;
        Ok(SdxlPipeline {
            tok1,
            tok2,
            te1,
            te2,
            unet,
            vae,
            scheduler: parts.scheduler,
            latent_channels,
        })
    }

    /// Device bytes [`Self::load_folder`] will hold for the folder `dir` on a device with this
    /// weight layout, from the weight files' headers alone.
    pub fn estimate_folder(dir: &Path, layout: WeightLayout) -> Result<u64, SdxlError> {
        Parts::folder(dir)?.estimate(layout)
    }

    /// Device bytes of all weights.
    pub fn bytes(&self) -> u64 {
        self.te1.bytes() + self.te2.bytes() + self.unet.bytes() + self.vae.bytes()
    }

    pub fn vae_scale(&self) -> usize {
        self.vae.scale()
    }

    /// Working memory of a `width` × `height` job of one image with guidance, decoding whole.
    pub fn job_bytes(&self, width: usize, height: usize) -> u64 {
        let req = SdxlRequest {
            prompt: String::new(),
            negative: None,
            width,
            height,
            steps: 1,
            cfg: 5.0,
            sampler: SamplerKind::Euler,
            schedule: Schedule::Normal,
            seed: 0,
            batch: 1,
        };
        self.plan(&req, None).bytes()
    }

    /// The device the pipeline's weights are on.
    pub fn device(&self) -> &Device {
        self.unet.device()
    }

    /// The shapes `halo bench` measures the image kernels at for a `width` × `height` job with
    /// guidance (a batch of two): the first level's 3×3 convolution, self- and cross-attention
    /// at the first level with transformers, and that level's GEGLU input projection.
    pub fn kernel_shapes(&self, width: usize, height: usize) -> ImageKernelShapes {
        let shape = self.unet.shape();
        let scale = self.vae_scale();
        let (lh, lw) = (
            (height / scale).max(1) as u64,
            (width / scale).max(1) as u64,
        );
        let first = &shape.levels[0];
        let (at, level) = shape
            .levels
            .iter()
            .enumerate()
            .find(|(_, l)| l.transformer_depth > 0)
            .unwrap_or((0, first));
        let tokens = ((lh >> at).max(1) * (lw >> at).max(1)) as u32;
        let ch = level.channels;
        let attention = |n_kv: u32| SeqAttention {
            batch: 2,
            n_heads: level.heads,
            head_dim: level.head_dim,
            n_q: tokens,
            n_kv,
            q_stride: ch,
            kv_stride: ch,
            o_stride: ch,
            scale: 1.0 / (level.head_dim as f32).sqrt(),
            causal: false,
        };
        ImageKernelShapes {
            conv: Conv2d {
                n: 2,
                ci: first.channels as u64,
                h: lh,
                w: lw,
                co: first.channels as u64,
                k: 3,
                stride: 1,
                pad: 1,
            },
            self_attention: attention(tokens),
            cross_attention: attention(77),
            matmul: (8 * ch as u64, ch as u64, 2 * tokens as u64),
        }
    }

    /// (context 77 × (c1 + c2), pooled) for one prompt.
    fn encode_one(&self, text: &str, owner: OwnerId) -> Result<Encoded, SdxlError> {
        let a = self
            .te1
            .encode(
                &self.tok1.encode(text).map_err(err)?,
                self.tok1.eos(),
                false,
                owner,
            )
            .map_err(err)?;
        let b = self
            .te2
            .encode(
                &self.tok2.encode(text).map_err(err)?,
                self.tok2.eos(),
                true,
                owner,
            )
            .map_err(err)?;
        Ok(self.combine(a, b))
    }

    /// Both encoders' outputs for one prompt as the UNet takes them: each context row the
    /// first encoder's then the second's, and the second's pooled vector.
    fn combine(&self, a: ClipOutput, b: ClipOutput) -> Encoded {
        let (c1, c2) = (
            self.te1.hidden_size() as usize,
            self.te2.hidden_size() as usize,
        );
        let mut ctx = Vec::with_capacity(77 * (c1 + c2));
        for i in 0..77 {
            ctx.extend(&a.penultimate[i * c1..(i + 1) * c1]);
            ctx.extend(&b.penultimate[i * c2..(i + 1) * c2]);
        }
        (ctx, b.pooled.expect("the second encoder has a projection"))
    }

    /// Starts encoding a job's prompt and its negative (where it has one), checking the
    /// request first so that a bad one fails before any GPU work; nothing runs until
    /// [`Self::encode_for`].
    pub fn begin_encode(&self, req: &SdxlRequest) -> Result<TextEncode, SdxlError> {
        self.check(req)?;
        let mut texts = vec![req.prompt.clone()];
        texts.extend(req.negative.clone().filter(|n| !n.is_empty()));
        Ok(TextEncode {
            texts,
            at: 0,
            run: None,
            first: None,
            done: Vec::new(),
        })
    }

    /// The next chunk of an encode: layers of the current prompt's current encoder within
    /// `budget` of device time (as learned). Returns the prompt's and the negative's
    /// embeddings once both encoders have run on each, and the chunk's device time.
    #[allow(clippy::type_complexity)]
    pub fn encode_for(
        &self,
        te: &mut TextEncode,
        owner: OwnerId,
        budget: Option<std::time::Duration>,
    ) -> Result<(Option<(Encoded, Option<Encoded>)>, std::time::Duration), SdxlError> {
        let (text, second) = (&te.texts[te.at / 2], te.at % 2 == 1);
        let (enc, tok) = match second {
            false => (&self.te1, &self.tok1),
            true => (&self.te2, &self.tok2),
        };
        let mut run = match te.run.take() {
            Some(run) => run,
            None => enc
                .begin(&tok.encode(text).map_err(err)?, tok.eos(), second, owner)
                .map_err(err)?,
        };
        let (out, took) = enc.advance_for(&mut run, budget).map_err(err)?;
        let Some(out) = out else {
            te.run = Some(run);
            return Ok((None, took));
        };
        drop(run);
        te.at += 1;
        match te.first.take() {
            None => te.first = Some(out),
            Some(first) => te.done.push(self.combine(first, out)),
        }
        if te.at < 2 * te.texts.len() {
            return Ok((None, took));
        }
        let mut done = std::mem::take(&mut te.done).into_iter();
        let cond = done.next().expect("the prompt is encoded");
        Ok((Some((cond, done.next())), took))
    }

    /// Runs the whole pipeline; `on_step(i, n)` after each denoising step. Returns each image
    /// as 3 × height × width values in about [-1, 1].
    pub fn generate(
        &self,
        req: &SdxlRequest,
        owner: OwnerId,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Vec<Vec<f32>>, SdxlError> {
        let mut job = self.start(req, owner)?;
        while !job.denoised() {
            self.step(&mut job)?;
            on_step(job.steps_done(), job.total_steps());
        }
        self.decode(&job)
    }

    /// The first part of a job: checks the request, encodes the prompts, draws the noise and
    /// sets up the sampler. The job then advances one UNet call at a time ([`Self::step`]) and
    /// ends with [`Self::decode`], so other work can run between its steps.
    pub fn start(&self, req: &SdxlRequest, owner: OwnerId) -> Result<SdxlJob, SdxlError> {
        self.check(req)?;
        let cond = self.encode_one(&req.prompt, owner)?;
        let uncond = match req.negative.as_deref().filter(|n| !n.is_empty()) {
            Some(n) => Some(self.encode_one(n, owner)?),
            None => None,
        };
        self.start_encoded(req, cond, uncond, owner)
    }

    /// Whether the pipeline can make `req`: sizes a multiple of the VAE's scale, a batch.
    fn check(&self, req: &SdxlRequest) -> Result<(), SdxlError> {
        let scale = self.vae_scale();
        if !req.width.is_multiple_of(scale) || !req.height.is_multiple_of(scale) || req.batch == 0 {
            return Err(SdxlError(format!(
                "{}×{} is not a multiple of {scale}, or the batch is empty",
                req.width, req.height
            )));
        }
        Ok(())
    }

    /// The rest of [`Self::start`] once the prompt and the negative (None: no negative,
    /// zero embeddings as diffusers' SDXL uses) are encoded: the noise and the sampler.
    pub fn start_encoded(
        &self,
        req: &SdxlRequest,
        cond: Encoded,
        uncond: Option<Encoded>,
        owner: OwnerId,
    ) -> Result<SdxlJob, SdxlError> {
        self.check(req)?;
        let scale = self.vae_scale();
        let (lh, lw) = (req.height / scale, req.width / scale);
        let (cond_ctx, cond_pool) = cond;
        let guided = req.cfg > 1.0;
        let (unc_ctx, unc_pool) = match uncond {
            Some(u) => u,
            None => (vec![0.0; cond_ctx.len()], vec![0.0; cond_pool.len()]),
        };
        let n = req.batch;
        let rows = if guided { 2 * n } else { n };
        let mut context = Vec::with_capacity(rows * cond_ctx.len());
        let mut pooled = Vec::with_capacity(rows * cond_pool.len());
        if guided {
            for _ in 0..n {
                context.extend(&unc_ctx);
                pooled.extend(&unc_pool);
            }
        }
        for _ in 0..n {
            context.extend(&cond_ctx);
            pooled.extend(&cond_pool);
        }
        let (h, w) = (req.height as f32, req.width as f32);
        let time_ids: Vec<f32> = (0..rows).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
        let sampler =
            Sampler::new(&self.scheduler, req.sampler, req.schedule, req.steps).map_err(err)?;
        let mut rng = TorchRng::new(req.seed);
        let per = self.latent_channels * lh * lw;
        let latents: Vec<f32> = rng
            .randn(n * per)
            .iter()
            .map(|v| v * sampler.init_noise_sigma())
            .collect();
        // The first UNet input (the latents scaled, twice with guidance; later ones the
        // sampler's kernel writes), then the latents, then the sampler's run, zeroed.
        let s0 = sampler.input_scale(0);
        let (len, copies) = (latents.len() as u64, (rows / n) as u64);
        let mut init: Vec<f32> = (0..copies)
            .flat_map(|_| latents.iter().map(|v| v * s0))
            .collect();
        init.extend(&latents);
        init.resize(Latents::floats(len, copies, req.sampler) as usize, 0.0);
        let state = Latents {
            buf: self.unet.device().upload_f32(&init, owner).map_err(err)?,
            len,
            copies,
        };
        Ok(SdxlJob {
            owner,
            batch: n,
            rows,
            guided,
            cfg: req.cfg,
            latent_hw: (lh, lw),
            context,
            pooled,
            time_ids,
            sampler,
            rng,
            state,
            done: 0,
            call: None,
        })
    }

    /// One denoising step: one UNet call on the guidance batch, the sampler's update.
    pub fn step(&self, job: &mut SdxlJob) -> Result<(), SdxlError> {
        while !self.advance(job)? {}
        Ok(())
    }

    /// Runs the next chunk of the job's current UNet call (starting the call if none is under
    /// way); true when that finished a denoising step (guidance and the sampler's update
    /// applied). Other work can run between two calls.
    pub fn advance(&self, job: &mut SdxlJob) -> Result<bool, SdxlError> {
        Ok(self.advance_for(job, None)?.0)
    }

    /// As [`Self::advance`], but a chunk runs only as many of the UNet's pieces as fit
    /// `budget` of device time (as learned from the earlier chunks); also returns the chunk's
    /// device time.
    pub fn advance_for(
        &self,
        job: &mut SdxlJob,
        budget: Option<std::time::Duration>,
    ) -> Result<(bool, std::time::Duration), SdxlError> {
        let started = std::time::Instant::now();
        let i = job.done;
        if job.denoised() {
            return Err(SdxlError("every step is done".into()));
        }
        let mut call = match job.call.take() {
            Some(call) => call,
            None => {
                let (lh, lw) = job.latent_hw;
                let call = self
                    .unet
                    .begin(
                        &UnetInput {
                            batch: job.rows,
                            height: lh,
                            width: lw,
                            sample: Sample::Device(&job.state.buf),
                            timestep: job.sampler.timesteps()[i],
                            context: &job.context,
                            context_tokens: 77,
                            text_embeds: &job.pooled,
                            time_ids: &job.time_ids,
                        },
                        job.owner,
                    )
                    .map_err(err)?;
                job.call = Some(call);
                return Ok((false, started.elapsed()));
            }
        };
        // After the call's last piece, in its submission: guidance and the sampler's update on
        // the device, which also writes the next call's input.
        let up = job.sampler.update(i, job.guided.then_some(job.cfg));
        let (st, rng, dev) = (&mut job.state, &mut job.rng, self.unet.device());
        let mut then = |s: &mut halo_kernels::Stream, eps: halo_kernels::ops::F32s<'_>| {
            let (n, copies) = (st.len, st.copies);
            if up.noise.is_some() {
                // Euler ancestral: this step's draw, in diffusers' order.
                dev.write_f32(&mut st.buf, (copies + 1) * n, &rng.randn(n as usize))?;
            }
            let all = F32s::all(&st.buf);
            let extra = all.sub((copies + 1) * n, n);
            ops::sampler_step(
                s,
                &up,
                eps,
                all.sub(copies * n, n),
                up.keep_x0.then_some(extra),
                up.noise.map(|_| extra),
                all.sub(0, copies * n),
            )?;
            Ok(())
        };
        let (out, took) = self
            .unet
            .advance_for(&mut call, budget, Some(&mut then))
            .map_err(err)?;
        if out.is_none() {
            job.call = Some(call);
            return Ok((false, took));
        }
        job.done += 1;
        Ok((true, took))
    }

    /// UNet chunks per denoising step (one [`Self::advance`] each).
    pub fn chunks_per_step(&self) -> usize {
        self.unet.chunks()
    }

    /// The images of a job whose steps are done (or its current latents, decoded), whole or
    /// in tiles of `tile` pixels.
    pub fn decode(&self, job: &SdxlJob) -> Result<Vec<Vec<f32>>, SdxlError> {
        self.decode_with(job, None)
    }

    pub fn decode_with(
        &self,
        job: &SdxlJob,
        tile: Option<usize>,
    ) -> Result<Vec<Vec<f32>>, SdxlError> {
        let mut d = self.begin_decode(job, tile)?;
        loop {
            if let (Some(images), _) = self.decode_for(&mut d, job.batch, None)? {
                return Ok(images);
            }
        }
    }

    /// Starts decoding a job's latents, whole or in tiles of `tile` pixels; nothing runs until
    /// [`Self::decode_for`].
    pub fn begin_decode(&self, job: &SdxlJob, tile: Option<usize>) -> Result<Decode, SdxlError> {
        let (lh, lw) = job.latent_hw;
        // The one read of the latents: the decoder takes them from the host.
        let latents = job.latents(self.unet.device())?;
        self.vae
            .start_decode(&latents, job.batch, lh, lw, tile, job.owner)
            .map_err(err)
    }

    /// The next chunk of a decode, within `budget` of device time where given: the images
    /// (one per batch entry) once done, and the chunk's device time.
    pub fn decode_for(
        &self,
        d: &mut Decode,
        batch: usize,
        budget: Option<std::time::Duration>,
    ) -> Result<(Option<Images>, std::time::Duration), SdxlError> {
        let (images, took) = self.vae.step_decode(d, budget).map_err(err)?;
        let images = images.map(|images| {
            let per_image = images.len() / batch.max(1);
            images.chunks(per_image).map(|c| c.to_vec()).collect()
        });
        Ok((images, took))
    }

    /// What a job for `req` will hold on the device, phase by phase, decoding whole
    /// (`tile` None) or in tiles of `tile` pixels.
    pub fn plan(&self, req: &SdxlRequest, tile: Option<usize>) -> JobPlan {
        let scale = self.vae_scale();
        let (lh, lw) = (req.height / scale, req.width / scale);
        let rows = if req.cfg > 1.0 {
            2 * req.batch
        } else {
            req.batch
        };
        // The job's latents and sampler state, held from the end of encoding to the end.
        // The job's latents and sampler state (see [`Latents`]), held from the end of encoding
        // to the end.
        let n = (req.batch * self.latent_channels * lh * lw) as u64;
        let copies = (rows / req.batch.max(1)) as u64;
        let held = [Latents::floats(n, copies, req.sampler)];
        let encode = self
            .te1
            .peak_bytes(1, false)
            .max(self.te2.peak_bytes(1, true))
            .max(super::plan::Sim::holding(&held).peak());
        let context_dim = (self.te1.hidden_size() + self.te2.hidden_size()) as usize;
        let denoise = self.unet.peak_bytes(rows, lh, lw, 77, context_dim, &held);
        let (decode, largest) = match tile {
            None => (
                self.vae.peak_bytes(req.batch, lh, lw, &held),
                self.vae.largest_buffer(lh, lw) * req.batch as u64,
            ),
            Some(t) => {
                let tl = (t / scale).max(1);
                (
                    self.vae.tiled_peak_bytes(lh, lw, t, &held),
                    self.vae.largest_buffer(lh.min(tl), lw.min(tl)),
                )
            }
        };
        JobPlan {
            encode,
            denoise,
            decode,
            tile,
            largest_decode_buffer: largest,
        }
    }

    /// Decode choices for `req` from the whole image down to small tiles (`forced` names one),
    /// each as its plan; the caller takes the first that fits its memory. Choices whose largest
    /// buffer exceeds `max_buffer` (the device's limit) are left out.
    pub fn plans(&self, req: &SdxlRequest, forced: Option<usize>, max_buffer: u64) -> Vec<JobPlan> {
        let scale = self.vae_scale();
        let options: Vec<Option<usize>> = match forced {
            Some(t) => vec![Some(t)],
            None => std::iter::once(None)
                .chain(
                    [1024, 768, 512, 384, 256, 128]
                        .into_iter()
                        .filter(|&t| t < req.width.max(req.height) && t >= 2 * scale)
                        .map(Some),
                )
                .collect(),
        };
        options
            .into_iter()
            .map(|t| self.plan(req, t))
            .filter(|p| forced.is_some() || p.largest_decode_buffer <= max_buffer)
            .collect()
    }
}

/// A job in progress: its conditioning, sampler, generator and latents.
pub struct SdxlJob {
    owner: OwnerId,
    batch: usize,
    /// UNet batch: 2 × batch with guidance.
    rows: usize,
    guided: bool,
    cfg: f32,
    latent_hw: (usize, usize),
    context: Vec<f32>,
    pooled: Vec<f32>,
    time_ids: Vec<f32>,
    sampler: Sampler,
    rng: TorchRng,
    state: Latents,
    done: usize,
    /// The UNet call under way, between chunks.
    call: Option<UnetCall>,
}

/// A job's latents and its sampler's state, on the device from the first step to the end:
/// one buffer of the next UNet input (the scaled latents, `copies` times: twice with
/// guidance), the latents (batch × channels × h × w: `len` values), and where the sampler has
/// one, its extra run (DPM++ 2M's previous x0, Euler ancestral's noise). One buffer of at
/// least 1 MiB, so that it has a chunk of its own and never splits the free space the job's
/// passes share.
struct Latents {
    buf: halo_kernels::Buffer,
    len: u64,
    copies: u64,
}

impl Latents {
    /// The buffer's length in f32 values.
    fn floats(len: u64, copies: u64, sampler: SamplerKind) -> u64 {
        let extra = sampler.carries_state() as u64;
        ((copies + 1 + extra) * len).max(halo_kernels::SMALL_REQUEST / 4)
    }
}

/// A job's prompts being encoded: the prompt and the negative (where it has one), each by
/// both encoders in turn, layers at a time.
pub struct TextEncode {
    texts: Vec<String>,
    /// The next (prompt, encoder) pair: 2 × prompt + encoder.
    at: usize,
    run: Option<ClipRun>,
    /// The first encoder's output for the current prompt.
    first: Option<ClipOutput>,
    done: Vec<Encoded>,
}

/// A prompt's text embeddings: 77 context rows of both encoders' widths, and the pooled vector.
pub type Encoded = (Vec<f32>, Vec<f32>);

/// Decoded images, one per batch entry: out_channels × pixels each.
pub type Images = Vec<Vec<f32>>;

/// Device bytes a job holds in each phase (its activations only; the weights are the model's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobPlan {
    /// Both text encoders (one prompt at a time).
    pub encode: u64,
    /// One UNet call on the guidance batch.
    pub denoise: u64,
    /// The VAE decode, whole or one tile at a time.
    pub decode: u64,
    /// The VAE tile in pixels; None for a whole decode.
    pub tile: Option<usize>,
    /// The largest single buffer of the decode.
    pub largest_decode_buffer: u64,
}

impl JobPlan {
    /// What the job needs reserved: its largest phase.
    pub fn bytes(&self) -> u64 {
        self.encode.max(self.denoise).max(self.decode)
    }
}

impl SdxlJob {
    pub fn steps_done(&self) -> usize {
        self.done
    }

    pub fn total_steps(&self) -> usize {
        self.sampler.timesteps().len()
    }

    pub fn denoised(&self) -> bool {
        self.done == self.total_steps()
    }

    /// Latents per side: (height, width).
    pub fn latent_size(&self) -> (usize, usize) {
        self.latent_hw
    }

    /// Images in the job.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The current latents (batch × channels × h × w), read from the device (previews, the
    /// decode).
    pub fn latents(&self, dev: &Device) -> Result<Vec<f32>, SdxlError> {
        let st = &self.state;
        dev.read_f32(&st.buf, st.copies * st.len, st.len)
            .map_err(err)
    }
}
