//! An image job on the GPU executor: a state machine over chunks. It encodes the prompt and the
//! negative through both text encoders (layers at a time) and draws the noise, then runs the
//! UNet and the VAE decode (whole or in tiles, as its memory plan says) in chunks of the time
//! budget the step policy gives (so LLM steps and cancellation come in between), reports progress after each denoising step (with a latent preview when asked),
//! writes the PNGs, and ends with a summary of its times and its memory.

use std::sync::Arc;
use std::time::Instant;

use halo_kernels::{Device, OwnerId};

use crate::core::{CoreError, ImageOut, ImageSummary, JobEvent};

use super::png;
use super::preview;
use super::sdxl::{JobPlan, SdxlJob, SdxlPipeline, SdxlRequest, TextEncode};
use super::vae::Decode;

/// What an image request asks for, defaults filled in.
#[derive(Clone, Debug)]
pub struct ImageParams {
    pub request: SdxlRequest,
    /// `--vae-tile PX`: decode in tiles of this size whatever the memory allows.
    pub vae_tile: Option<usize>,
    /// Send a latent preview with the progress every this many steps (0: never).
    pub preview_every: u32,
}

/// The job's work, as the executor holds it.
pub struct ImageWork {
    pub pipeline: Arc<SdxlPipeline>,
    pub params: ImageParams,
    /// The memory plan the core reserved (it fixes the VAE tiling).
    pub plan: JobPlan,
    /// The allocator owner its activations are charged to (watched for their peak).
    pub owner: OwnerId,
    pub device: Device,
    /// The model's name, written into the PNG's parameters.
    pub model: String,
}

enum Phase {
    Start,
    /// The prompt and the negative being encoded; the noise and the sampler come with the
    /// chunk that ends it.
    Encode(Box<TextEncode>),
    Denoise(Box<SdxlJob>),
    /// The decode, its state made on its first chunk.
    Decode(Box<SdxlJob>, Option<Box<Decode>>),
}

/// A running image job.
pub struct ImageRun {
    pub work: ImageWork,
    phase: Phase,
    started: Instant,
    encode_ms: u64,
    denoise_started: Option<Instant>,
    denoise_ms: u64,
    decode_started: Option<Instant>,
    steps_done: u32,
}

fn gpu(e: impl std::fmt::Display) -> CoreError {
    CoreError::FailedPrecondition(format!("GPU work failed: {e}"))
}

impl ImageRun {
    pub fn new(work: ImageWork) -> ImageRun {
        work.device.watch_peak(work.owner);
        ImageRun {
            work,
            phase: Phase::Start,
            started: Instant::now(),
            encode_ms: 0,
            denoise_started: None,
            denoise_ms: 0,
            decode_started: None,
            steps_done: 0,
        }
    }

    fn total_steps(&self) -> u32 {
        self.work.params.request.steps
    }

    /// One chunk of work aiming at `budget` of device time: events go to `events`; the
    /// summary when the job is done, and the chunk's measured device time where known.
    pub fn step(
        &mut self,
        events: &tokio::sync::mpsc::UnboundedSender<JobEvent>,
        budget: std::time::Duration,
    ) -> Result<(Option<JobEvent>, Option<std::time::Duration>), CoreError> {
        let pipe = self.work.pipeline.clone();
        let chunk_started = Instant::now();
        match std::mem::replace(&mut self.phase, Phase::Start) {
            Phase::Start => {
                let te = pipe
                    .begin_encode(&self.work.params.request)
                    .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
                self.phase = Phase::Encode(Box::new(te));
                self.step(events, budget)
            }
            Phase::Encode(mut te) => {
                let (done, took) = pipe
                    .encode_for(&mut te, self.work.owner, Some(budget))
                    .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
                let Some((cond, uncond)) = done else {
                    self.phase = Phase::Encode(te);
                    return Ok((None, Some(took)));
                };
                let job = pipe
                    .start_encoded(&self.work.params.request, cond, uncond, self.work.owner)
                    .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
                self.encode_ms = self.started.elapsed().as_millis() as u64;
                self.denoise_started = Some(Instant::now());
                self.phase = if job.denoised() {
                    Phase::Decode(Box::new(job), None)
                } else {
                    Phase::Denoise(Box::new(job))
                };
                Ok((None, Some(chunk_started.elapsed())))
            }
            Phase::Denoise(mut job) => {
                let (stepped, took) = pipe.advance_for(&mut job, Some(budget)).map_err(gpu)?;
                if stepped {
                    self.steps_done += 1;
                    let every = self.work.params.preview_every;
                    let last = job.denoised();
                    let preview = (every > 0 && (self.steps_done.is_multiple_of(every) || last))
                        .then(|| self.preview(&job))
                        .flatten();
                    let elapsed = self
                        .denoise_started
                        .map(|t| t.elapsed().as_millis() as u64)
                        .unwrap_or(0);
                    let _ = events.send(JobEvent::ImageProgress {
                        step: self.steps_done,
                        total: self.total_steps(),
                        elapsed_ms: elapsed,
                        preview,
                    });
                    if last {
                        self.denoise_ms = elapsed;
                        self.phase = Phase::Decode(job, None);
                        return Ok((None, Some(took)));
                    }
                }
                self.phase = Phase::Denoise(job);
                Ok((None, Some(took)))
            }
            Phase::Decode(job, decode) => {
                let mut decode = match decode {
                    Some(d) => d,
                    None => {
                        self.decode_started = Some(Instant::now());
                        Box::new(pipe.begin_decode(&job, self.work.plan.tile).map_err(gpu)?)
                    }
                };
                let (images, took) = pipe
                    .decode_for(&mut decode, job.batch(), Some(budget))
                    .map_err(gpu)?;
                let Some(images) = images else {
                    self.phase = Phase::Decode(job, Some(decode));
                    return Ok((None, Some(took)));
                };
                let req = &self.work.params.request;
                let params = self.parameters();
                for (i, image) in images.iter().enumerate() {
                    let rgb = png::to_rgb8(image, req.width, req.height);
                    let seed = req.seed.to_string();
                    let index = i.to_string();
                    let bytes = png::encode(
                        &rgb,
                        req.width as u32,
                        req.height as u32,
                        &[
                            ("parameters", params.as_str()),
                            ("Software", "halo"),
                            ("seed", seed.as_str()),
                            ("batch_index", index.as_str()),
                        ],
                    )
                    .map_err(|e| CoreError::FailedPrecondition(format!("writing the PNG: {e}")))?;
                    let _ = events.send(JobEvent::Image(ImageOut {
                        index: i as u32,
                        png: bytes,
                        width: req.width as u32,
                        height: req.height as u32,
                    }));
                }
                let decode_ms = self
                    .decode_started
                    .map(|t| t.elapsed().as_millis() as u64)
                    .unwrap_or(0);
                let summary = self.summary("done", images.len() as u32, decode_ms);
                Ok((Some(summary), Some(took)))
            }
        }
    }

    /// The job's parameters as the PNG's `parameters` text (the form image tools read:
    /// prompt, then `Negative prompt:`, then the settings).
    fn parameters(&self) -> String {
        let r = &self.work.params.request;
        let mut s = r.prompt.clone();
        if let Some(n) = r.negative.as_deref().filter(|n| !n.is_empty()) {
            s.push_str(&format!("\nNegative prompt: {n}"));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, Schedule type: {}, CFG scale: {}, Seed: {}, Size: {}x{}, \
             Model: {}, RNG: torch-cpu, Batch size: {}",
            r.steps,
            r.sampler.as_str(),
            r.schedule.as_str(),
            r.cfg,
            r.seed,
            r.width,
            r.height,
            self.work.model,
            r.batch
        ));
        if let Some(t) = self.work.plan.tile {
            s.push_str(&format!(", VAE tile: {t}"));
        }
        s
    }

    /// A PNG of the first image's latents through the fixed latent→RGB map.
    fn preview(&self, job: &SdxlJob) -> Option<Vec<u8>> {
        let (h, w) = job.latent_size();
        let latents = job.latents(&self.work.device).ok()?;
        let c = latents.len() / job.batch() / (h * w);
        let rgb = preview::latent_rgb(&latents[..c * h * w], c, h, w);
        png::encode(&rgb, w as u32, h as u32, &[]).ok()
    }

    /// The summary: what was made, how long each phase took, and the memory it held.
    pub fn summary(&mut self, reason: &str, images: u32, decode_ms: u64) -> JobEvent {
        if self.denoise_ms == 0 {
            self.denoise_ms = self
                .denoise_started
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0);
        }
        let req = &self.work.params.request;
        JobEvent::ImageDone(ImageSummary {
            finish_reason: reason.to_string(),
            seed: req.seed,
            width: req.width as u32,
            height: req.height as u32,
            images,
            steps: self.steps_done,
            estimated_bytes: self.work.plan.bytes(),
            peak_bytes: self.work.device.peak(self.work.owner).unwrap_or(0),
            encode_ms: self.encode_ms,
            denoise_ms: self.denoise_ms,
            decode_ms,
            vae_tile: self.work.plan.tile.unwrap_or(0) as u32,
        })
    }
}

impl Drop for ImageRun {
    fn drop(&mut self) {
        // Stop watching the owner; its buffers went with the phase.
        self.work.device.take_peak(self.work.owner);
    }
}
