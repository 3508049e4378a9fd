//! Flux text-to-image as diffusers' FluxPipeline runs it: the prompt through CLIP-L (its pooled
//! output) and T5 (512 ids, its hidden states), noise (1, 16, H/8, W/8) per image from the
//! seed's torch generator, packed 2×2 into tokens; `flow_euler` steps of the transformer's
//! velocity; the latents unpacked and decoded by the 16-channel VAE. No negative prompt and no
//! true classifier-free guidance: dev models take a distilled guidance scale, schnell none.

use std::path::Path;

use halo_kernels::{Device, LoadStrategy, OwnerId};

use super::clip::ClipTextEncoder;
use super::clip_tokenizer::ClipTokenizer;
use super::config::{self, ClipTextConfig, FluxConfig, T5Config, VaeConfig};
use super::flow::{self, FlowSchedulerConfig};
use super::flux::{FluxInput, FluxTransformer};
use super::rng::TorchRng;
use super::sdxl::{weights_in, SdxlError};
use super::t5::T5Encoder;
use super::t5_tokenizer::T5Tokenizer;
use super::vae::Vae;

/// T5 ids per prompt, as FluxPipeline's default `max_sequence_length`.
pub const T5_TOKENS: usize = 512;

fn err(e: impl std::fmt::Display) -> SdxlError {
    SdxlError(e.to_string())
}

pub struct FluxPipeline {
    clip_tok: ClipTokenizer,
    t5_tok: T5Tokenizer,
    clip: ClipTextEncoder,
    t5: T5Encoder,
    transformer: FluxTransformer,
    vae: Vae,
    scheduler: FlowSchedulerConfig,
}

/// One Flux request.
#[derive(Clone, Debug)]
pub struct FluxRequest {
    pub prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// The distilled guidance scale (dev models); None for schnell.
    pub guidance: Option<f32>,
    pub seed: u64,
    pub batch: usize,
}

impl FluxPipeline {
    /// A diffusers folder: transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/ (T5),
    /// tokenizer/, tokenizer_2/ and scheduler/.
    pub fn load_folder(
        device: &Device,
        dir: &Path,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<FluxPipeline, SdxlError> {
        let part = |p: &str| dir.join(p);
        let cfg_of = |p: &str| part(p).join("config.json");
        let clip_tok = ClipTokenizer::from_folder(&part("tokenizer")).map_err(err)?;
        let t5_tok = T5Tokenizer::load(&part("tokenizer_2")).map_err(err)?;
        let clip_cfg: ClipTextConfig = config::read(&cfg_of("text_encoder")).map_err(err)?;
        let clip = ClipTextEncoder::load(
            device,
            &weights_in(&part("text_encoder"))?,
            "",
            clip_cfg,
            strategy,
            owner,
        )
        .map_err(err)?;
        let t5_cfg: T5Config = config::read(&cfg_of("text_encoder_2")).map_err(err)?;
        let t5 = T5Encoder::load(
            device,
            &weights_in(&part("text_encoder_2"))?,
            "",
            t5_cfg,
            strategy,
            owner,
        )
        .map_err(err)?;
        let flux_cfg: FluxConfig = config::read(&cfg_of("transformer")).map_err(err)?;
        let at = |what: &str, m: String| SdxlError(format!("{}: {what} {m}", dir.display()));
        if flux_cfg.joint_attention_dim != t5.d_model() {
            return Err(at(
                "the transformer's",
                format!(
                    "joint_attention_dim {} is not T5's d_model {}",
                    flux_cfg.joint_attention_dim,
                    t5.d_model()
                ),
            ));
        }
        if flux_cfg.pooled_projection_dim != clip.hidden_size() {
            return Err(at(
                "the transformer's",
                format!(
                    "pooled_projection_dim {} is not CLIP's hidden_size {}",
                    flux_cfg.pooled_projection_dim,
                    clip.hidden_size()
                ),
            ));
        }
        let transformer = FluxTransformer::load(
            device,
            &weights_in(&part("transformer"))?,
            "",
            flux_cfg,
            strategy,
            owner,
        )
        .map_err(err)?;
        let vae_cfg: VaeConfig = config::read(&cfg_of("vae")).map_err(err)?;
        if vae_cfg.latent_channels as u64 * 4 != transformer.config().in_channels as u64 {
            return Err(at(
                "the VAE's",
                format!(
                    "{} latent channels do not pack into the transformer's {} input channels",
                    vae_cfg.latent_channels,
                    transformer.config().in_channels
                ),
            ));
        }
        let vae = Vae::load(
            device,
            &weights_in(&part("vae"))?,
            "",
            vae_cfg,
            strategy,
            owner,
        )
        .map_err(err)?;
        let scheduler: FlowSchedulerConfig =
            config::read(&part("scheduler").join("scheduler_config.json")).map_err(err)?;
        scheduler.check().map_err(err)?;
        Ok(FluxPipeline {
            clip_tok,
            t5_tok,
            clip,
            t5,
            transformer,
            vae,
            scheduler,
        })
    }

    /// Device bytes of all weights.
    pub fn bytes(&self) -> u64 {
        self.clip.bytes() + self.t5.bytes() + self.transformer.bytes() + self.vae.bytes()
    }

    /// Whether the model takes a guidance scale (dev) or not (schnell).
    pub fn has_guidance(&self) -> bool {
        self.transformer.has_guidance()
    }

    fn latent_channels(&self) -> usize {
        self.transformer.config().in_channels as usize / 4
    }

    /// Refuses what the pipeline cannot run, saying why.
    pub fn check(&self, req: &FluxRequest) -> Result<(), SdxlError> {
        let unit = 2 * self.vae.scale();
        if req.width == 0
            || req.height == 0
            || !req.width.is_multiple_of(unit)
            || !req.height.is_multiple_of(unit)
        {
            return Err(SdxlError(format!(
                "{}×{} is not a multiple of {unit} on each side (the VAE's {}× times the 2×2 \
                 packing)",
                req.width,
                req.height,
                self.vae.scale()
            )));
        }
        if req.steps == 0 || req.batch == 0 {
            return Err(SdxlError("steps and batch must be at least 1".into()));
        }
        match (self.has_guidance(), req.guidance) {
            (true, None) => Err(SdxlError(
                "this Flux model (dev) needs a guidance scale".into(),
            )),
            (false, Some(_)) => Err(SdxlError(
                "this Flux model (schnell) takes no guidance scale".into(),
            )),
            _ => Ok(()),
        }
    }

    /// T5's hidden states (512 × d_model) and CLIP's pooled vector for `prompt`.
    pub fn encode(&self, prompt: &str, owner: OwnerId) -> Result<(Vec<f32>, Vec<f32>), SdxlError> {
        let ids = self.t5_tok.encode(prompt, T5_TOKENS).map_err(err)?;
        let states = self.t5.encode(&ids, T5_TOKENS, owner).map_err(err)?;
        let clip_ids = self.clip_tok.encode(prompt).map_err(err)?;
        let out = self
            .clip
            .encode(&clip_ids, self.clip_tok.eos(), true, owner)
            .map_err(err)?;
        let pooled = out
            .pooled
            .ok_or_else(|| SdxlError("CLIP gave no pooled output".into()))?;
        Ok((states, pooled))
    }

    /// A whole request on the host's schedule: every image's pixels (3 × height × width in
    /// about [-1, 1]). `on_step(done, total)` after each transformer call; `on_latents(image,
    /// step, packed latents)` with the latents after each step.
    pub fn generate(
        &self,
        req: &FluxRequest,
        owner: OwnerId,
        mut on_step: impl FnMut(usize, usize),
        mut on_latents: impl FnMut(usize, usize, &[f32]),
    ) -> Result<Vec<Vec<f32>>, SdxlError> {
        self.check(req)?;
        let (context, pooled) = self.encode(&req.prompt, owner)?;
        let scale = self.vae.scale();
        let (lh, lw) = (req.height / scale, req.width / scale);
        let lc = self.latent_channels();
        let tokens = (lh / 2) * (lw / 2);
        let sigmas = flow::flow_sigmas(&self.scheduler, req.steps, tokens as u64).map_err(err)?;
        let ids = flow::image_ids(lh, lw);
        let noise = TorchRng::new(req.seed).randn(req.batch * lc * lh * lw);
        let total = req.batch * req.steps;
        let mut images = Vec::with_capacity(req.batch);
        for b in 0..req.batch {
            let per = lc * lh * lw;
            let mut x = flow::pack(&noise[b * per..(b + 1) * per], 1, lc, lh, lw);
            for i in 0..req.steps {
                let v = self
                    .transformer
                    .forward(
                        &FluxInput {
                            x: &x,
                            context: &context,
                            pooled: &pooled,
                            sigma: sigmas[i],
                            guidance: req.guidance,
                            img_ids: &ids,
                        },
                        owner,
                    )
                    .map_err(err)?;
                flow::flow_step(&mut x, &v, sigmas[i], sigmas[i + 1]);
                on_latents(b, i + 1, &x);
                on_step(b * req.steps + i + 1, total);
            }
            let latents = flow::unpack(&x, 1, lc, lh, lw);
            images.push(self.vae.decode(&latents, 1, lh, lw, owner).map_err(err)?);
        }
        Ok(images)
    }
}
