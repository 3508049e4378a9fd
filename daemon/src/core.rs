//! The core driver: one task that owns the residency and scheduler cores, feeds them events and
//! the clock, and applies their decisions (map or drop model files, start or fail jobs).
//!
//! Everything else talks to it through [`CoreHandle`], which sends a [`Command`] and awaits the
//! reply. Slow work (mapping files) runs on the blocking pool and comes back as an internal event,
//! so the driver never stalls on I/O.
//!
//! Architecture invariant: only this task mutates the residency and scheduler state; gRPC
//! handlers never touch it directly. No engine exists yet: a job that reaches the front of its
//! queue gets its model loaded and then ends with UNIMPLEMENTED, naming what is missing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::{Config, ModelConfig, ModelKind};
use crate::diffusion::job::{ImageParams, ImageWork};
use crate::executor::{
    Ended, ExecJob, Executor, GenerateParams, ImageExecJob, StopFlag, StopReason,
};
use crate::llm::engine::{self, LlmEngine};
use crate::memory::{self, BudgetReport, MemorySources};
use crate::models::{self, MappedModel, ModelFileError};
use crate::residency::{
    format_bytes, KeepAlive, LoadError, LoadPlan, ModelSpec, ModelState, PinError, Residency,
    UnloadError,
};
use crate::scheduler::{
    Action, CancelError, CancelOutcome, JobId, JobKind, JobState, Outcome, Scheduler, SubmitError,
};

/// How many finished jobs `halo jobs` remembers.
const JOB_HISTORY: usize = 256;
/// Image jobs' allocator owners are their job ids with this bit set (models count from 1).
const JOB_OWNERS: u64 = 1 << 48;
/// How often keep-alive expiry is checked.
const TICK: Duration = Duration::from_secs(1);
/// Each of the bandwidth probe's two buffers: at most this, and no more than half of what the
/// budget has left (the probe's bytes count against the budget like any others).
const BANDWIDTH_PROBE_BYTES: u64 = 128 << 20;
/// Below this per buffer the copy is too short to time well.
const MIN_BANDWIDTH_PROBE_BYTES: u64 = 8 << 20;

/// A request the daemon cannot satisfy, with the gRPC code it maps to and a message a person can
/// act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    NotFound(String),
    InvalidArgument(String),
    ResourceExhausted(String),
    FailedPrecondition(String),
    Unimplemented(String),
    Unavailable(String),
    /// A model's files cannot be used (missing, corrupt, unsupported): retrying will not help
    /// until the file is fixed.
    ModelFile(String),
}

impl std::fmt::Display for CoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = match self {
            CoreError::NotFound(m)
            | CoreError::InvalidArgument(m)
            | CoreError::ResourceExhausted(m)
            | CoreError::FailedPrecondition(m)
            | CoreError::Unimplemented(m)
            | CoreError::Unavailable(m)
            | CoreError::ModelFile(m) => m,
        };
        f.write_str(m)
    }
}

impl std::error::Error for CoreError {}

/// One generated token as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub token: u32,
    /// The text this token completes (may be empty while UTF-8 or a stop string is pending).
    pub text: String,
    /// Natural-log probability of the token under the raw logits.
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What a running job reports to its client.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Token(TokenEvent),
    /// Text left over at the end (an incomplete stop-string prefix that never completed).
    Text(String),
    Done {
        finish_reason: String,
        prompt_tokens: u32,
        /// Of the prompt tokens, those whose KV cache was reused.
        cached_tokens: u32,
        completion_tokens: u32,
        prompt_ms: u64,
        generation_ms: u64,
        /// The most sequences one of the job's steps ran together.
        peak_batch: u32,
    },
    Failed(CoreError),
    /// Stopped before it ran (or before the executor could say more).
    Cancelled(StopReason),
    /// An image job finished a denoising step.
    ImageProgress {
        step: u32,
        total: u32,
        /// Since denoising began.
        elapsed_ms: u64,
        /// A PNG of the latents through a fixed linear map, when the request asked for one.
        preview: Option<Vec<u8>>,
    },
    /// One finished image of an image job.
    Image(ImageOut),
    /// An image job's summary (its last event).
    ImageDone(ImageSummary),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageOut {
    /// Position in the batch.
    pub index: u32,
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageSummary {
    /// done, cancelled or shutdown.
    pub finish_reason: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub images: u32,
    pub steps: u32,
    /// The job's working memory as reserved before it ran, and the most it held.
    pub estimated_bytes: u64,
    pub peak_bytes: u64,
    pub encode_ms: u64,
    pub denoise_ms: u64,
    pub decode_ms: u64,
    /// The VAE tile in pixels; 0 for a whole decode.
    pub vae_tile: u32,
}

/// Facts fixed at start-up: the devices, the opened runtime, and the memory sources.
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    pub discovery: Result<halo_kernels::Discovery, String>,
    /// The Vulkan runtime on the chosen device, or why it could not be opened.
    pub runtime: Result<halo_kernels::Device, String>,
    pub memory: MemorySources,
}

impl DeviceFacts {
    pub fn device(&self) -> Option<&halo_kernels::DeviceInfo> {
        self.discovery.as_ref().ok().map(|d| d.device())
    }
}

/// One configured model as `halo models` shows it.
#[derive(Debug, Clone)]
pub struct ModelRow {
    pub config: ModelConfig,
    pub estimated_bytes: u64,
    /// `unloaded`, `loading`, `resident`, `missing` (no file) or `invalid` (a file halo cannot use).
    pub state: &'static str,
    pub pinned: bool,
    pub error: Option<String>,
    pub note: Option<String>,
}

/// One model in memory as `halo ps` shows it.
#[derive(Debug, Clone)]
pub struct ResidentRow {
    pub name: String,
    pub kind: ModelKind,
    pub bytes: u64,
    pub loading: bool,
    pub pinned: bool,
    pub running_jobs: u32,
    pub idle: Duration,
    pub last_used_unix_ms: i64,
    pub expires_in: Option<Duration>,
}

/// One job as `halo jobs` shows it.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: JobId,
    pub model: String,
    pub kind: JobKind,
    pub state: JobState,
    pub age: Duration,
    pub error: Option<String>,
    pub queue_position: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct StatusSnapshot {
    pub uptime: Duration,
    pub config_path: Option<std::path::PathBuf>,
    pub budget: BudgetReport,
    pub used_bytes: u64,
    pub resident_models: usize,
    pub active_jobs: usize,
}

#[derive(Debug, Clone)]
pub struct LoadDone {
    pub model: ResidentRow,
    pub evicted: Vec<String>,
    pub load_time: Duration,
}

#[derive(Debug, Clone)]
pub struct ReloadDone {
    pub models: usize,
    pub budget_bytes: u64,
    pub unloaded: Vec<String>,
}

type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

/// Weight bytes per token, the pending bandwidth measurement, the device's name, the vocabulary.
pub type RooflineParts = (u64, oneshot::Receiver<Result<f64, String>>, String, u64);
/// The figures to come, the device's name, (width, height, job bytes) estimates, weight bytes.
pub type ImageKernelParts = (
    oneshot::Receiver<crate::executor::KernelFigures>,
    String,
    Vec<(usize, usize, u64)>,
    u64,
);

/// A request to the core driver.
pub enum Command {
    Status(oneshot::Sender<StatusSnapshot>),
    Models(oneshot::Sender<Vec<ModelRow>>),
    Resident(oneshot::Sender<Vec<ResidentRow>>),
    Load {
        model: String,
        pin: bool,
        reply: Reply<LoadDone>,
    },
    Unload {
        model: String,
        reply: Reply<u64>,
    },
    Pin {
        model: String,
        reply: Reply<()>,
    },
    Unpin {
        model: String,
        reply: Reply<()>,
    },
    Submit {
        model: String,
        kind: JobKind,
        params: Option<GenerateParams>,
        /// An image job's request, defaults filled in.
        image: Option<Box<ImageParams>>,
        reply: Reply<(JobId, mpsc::UnboundedReceiver<JobEvent>)>,
    },
    Jobs(oneshot::Sender<Vec<JobRow>>),
    /// Bandwidth roofline of a resident LLM (measured on the executor thread).
    Roofline {
        model: String,
        reply: Reply<RooflineParts>,
    },
    /// An image model's kernel figures at a width × height job's shapes (measured on the
    /// executor thread), with the working memory of jobs at that size and at 1024².
    ImageKernels {
        model: String,
        width: usize,
        height: usize,
        reply: Reply<ImageKernelParts>,
    },
    /// The engine of a resident LLM (for tokenizing outside a job).
    Engine {
        model: String,
        reply: Reply<Arc<LlmEngine>>,
    },
    Cancel {
        job: JobId,
        reply: Reply<JobState>,
    },
    Reload {
        config: Box<Config>,
        reply: Reply<ReloadDone>,
    },
    /// Cancel every job and stop; replies when done.
    Shutdown(oneshot::Sender<()>),
    /// A lease on some model file is being broken (SIGIO): see which, and act.
    CheckFiles,
}

/// Work that finished off the driver task.
enum Internal {
    Loaded {
        model: String,
        result: Result<Loaded, ModelFileError>,
        started: Instant,
    },
    JobEnded(JobId, Ended),
    /// Short-lived working memory reserved in the residency table is free again.
    ScratchDone(u64),
    /// The client of a job closed its stream.
    ClientGone(JobId),
}

/// A model in memory: an LLM on the GPU, an SDXL pipeline on the GPU (its jobs are not run
/// yet), or files mapped for an engine still to come.
pub enum Loaded {
    Llm(Arc<LlmEngine>),
    Sdxl(Arc<crate::diffusion::sdxl::SdxlPipeline>),
    Mapped(MappedModel),
}

impl Loaded {
    fn describe(&self) -> String {
        match self {
            Loaded::Llm(e) => format!(
                "{} on the GPU ({}), {} sequences of {} tokens",
                e.model.hp.arch.name(),
                e.model.weights().strategy.as_str(),
                e.parallel,
                e.context
            ),
            Loaded::Sdxl(_) => "SDXL pipeline on the GPU (weights copied)".to_string(),
            Loaded::Mapped(m) => format!("{} files mapped", m.files()),
        }
    }
}

/// A cheap, cloneable way to talk to the core driver.
#[derive(Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<Command>,
}

impl CoreHandle {
    /// Sends a command built around a fresh reply channel and waits for the answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, CoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| CoreError::Unavailable("halod is shutting down".into()))?;
        rx.await
            .map_err(|_| CoreError::Unavailable("halod is shutting down".into()))
    }

    /// Sends a command that needs no answer.
    pub async fn send(&self, cmd: Command) -> Result<(), CoreError> {
        self.tx
            .send(cmd)
            .await
            .map_err(|_| CoreError::Unavailable("halod is shutting down".into()))
    }

    /// Like [`ask`](Self::ask) for commands whose reply is itself a `Result`.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, CoreError> {
        self.ask(make).await?
    }
}

struct CatalogEntry {
    config: ModelConfig,
    estimate: Result<u64, ModelFileError>,
    /// The model path's metadata when `estimate` was made; `None` forces a new estimate.
    stamp: Option<FileStamp>,
}

/// What says a file changed: size, modification time, inode (a file replaced by a rename).
type FileStamp = (u64, Option<SystemTime>, u64, u64);

fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok(), m.ino(), m.dev()))
}

struct LoadWaiter {
    reply: Reply<LoadDone>,
    evicted: Vec<String>,
    started: Instant,
}

/// The state the driver task owns.
pub struct Core {
    started: Instant,
    started_unix_ms: i64,
    config: Config,
    facts: Arc<DeviceFacts>,
    budget: BudgetReport,
    catalog: BTreeMap<String, CatalogEntry>,
    residency: Residency,
    scheduler: Scheduler,
    loaded: HashMap<String, Loaded>,
    /// Owner ids for the allocator's ledger, one per model name.
    owners: HashMap<String, halo_kernels::OwnerId>,
    executor: Executor,
    job_params: HashMap<JobId, GenerateParams>,
    image_params: HashMap<JobId, ImageParams>,
    stop_flags: HashMap<JobId, Arc<StopFlag>>,
    /// Running jobs whose model was withdrawn under them (its file changed): they end on the
    /// old copy, whose memory residency charges until the last of them is reported.
    withdrawn_jobs: HashSet<JobId>,
    /// Set once shutdown began: stopped jobs end with finish_reason "shutdown".
    stopping: bool,
    load_waiters: HashMap<String, Vec<LoadWaiter>>,
    job_streams: HashMap<JobId, mpsc::UnboundedSender<JobEvent>>,
    job_errors: HashMap<JobId, CoreError>,
    /// The summary events of jobs the executor finished, sent once their end is recorded.
    summaries: HashMap<JobId, JobEvent>,
    internal_tx: mpsc::UnboundedSender<Internal>,
}

/// Starts the driver task and returns its handle.
pub fn spawn(config: Config, facts: Arc<DeviceFacts>) -> (CoreHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let (internal_tx, internal_rx) = mpsc::unbounded_channel();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(JobId, Ended)>();
    let forward = internal_tx.clone();
    tokio::spawn(async move {
        while let Some((id, how)) = ended_rx.recv().await {
            if forward.send(Internal::JobEnded(id, how)).is_err() {
                return;
            }
        }
    });
    let budget = memory::resolve(config.budget, config.reserve, &facts.memory);
    info!(budget = %format_bytes(budget.budget), explanation = %budget.explanation, "memory budget");
    let mut core = Core {
        started: Instant::now(),
        started_unix_ms: unix_ms(SystemTime::now()),
        facts,
        residency: Residency::new(budget.budget),
        scheduler: Scheduler::new(config.max_queue, JOB_HISTORY),
        budget,
        config: Config::default(),
        catalog: BTreeMap::new(),
        loaded: HashMap::new(),
        owners: HashMap::new(),
        executor: Executor::spawn(ended_tx),
        job_params: HashMap::new(),
        image_params: HashMap::new(),
        stop_flags: HashMap::new(),
        withdrawn_jobs: HashSet::new(),
        stopping: false,
        load_waiters: HashMap::new(),
        job_streams: HashMap::new(),
        job_errors: HashMap::new(),
        summaries: HashMap::new(),
        internal_tx,
    };
    core.install_catalog(config);
    let task = tokio::spawn(core.run(rx, internal_rx));
    (CoreHandle { tx }, task)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Core {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut internal_rx: mpsc::UnboundedReceiver<Internal>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        self.shutdown();
                        let _ = done.send(());
                        return;
                    }
                    Some(cmd) => self.handle(cmd),
                    None => {
                        self.shutdown();
                        return;
                    }
                },
                Some(ev) = internal_rx.recv() => self.internal(ev),
                _ = tick.tick() => self.tick(),
            }
            self.pump();
        }
    }

    fn handle(&mut self, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(StatusSnapshot {
                    uptime: now,
                    config_path: self.config.source.clone(),
                    budget: self.budget.clone(),
                    used_bytes: self.residency.used(),
                    resident_models: self
                        .residency
                        .models()
                        .iter()
                        .filter(|m| !matches!(m.state, ModelState::Unloaded))
                        .count(),
                    active_jobs: self
                        .scheduler
                        .jobs()
                        .iter()
                        .filter(|j| !j.state.is_terminal())
                        .count(),
                });
            }
            Command::Models(reply) => {
                self.refresh_catalog();
                let _ = reply.send(self.model_rows());
            }
            Command::Resident(reply) => {
                let _ = reply.send(self.resident_rows());
            }
            Command::Load { model, pin, reply } => match self.start_load(&model, pin) {
                Ok((LoadPlan::AlreadyResident, _)) => {
                    let row = self.resident_row(&model);
                    let _ = reply.send(row.map(|model| LoadDone {
                        model,
                        evicted: Vec::new(),
                        load_time: Duration::ZERO,
                    }));
                }
                Ok((_, evicted)) => {
                    self.load_waiters
                        .entry(model)
                        .or_default()
                        .push(LoadWaiter {
                            reply,
                            evicted,
                            started: Instant::now(),
                        });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Unload { model, reply } => {
                let _ = reply.send(self.unload(&model));
            }
            Command::Pin { model, reply } => {
                let r = self.residency.pin(&model).map_err(pin_error);
                let _ = reply.send(r);
            }
            Command::Unpin { model, reply } => {
                let r = self.residency.unpin(&model, now).map_err(pin_error);
                let _ = reply.send(r);
            }
            Command::Submit {
                model,
                kind,
                params,
                image,
                reply,
            } => {
                let r = self.submit(&model, kind);
                if let (Ok((id, _)), Some(p)) = (&r, params) {
                    self.job_params.insert(*id, p);
                }
                if let (Ok((id, _)), Some(p)) = (&r, image) {
                    self.image_params.insert(*id, *p);
                }
                let _ = reply.send(r);
            }
            Command::Jobs(reply) => {
                let _ = reply.send(self.job_rows());
            }
            Command::Roofline { model, reply } => {
                // The probe's two buffers must fit in what the budget has left.
                let free = self.residency.free();
                let probe = (free / 2).min(BANDWIDTH_PROBE_BYTES) & !((1 << 20) - 1);
                let r = match self.loaded.get(&model) {
                    Some(Loaded::Llm(_))
                        if probe < MIN_BANDWIDTH_PROBE_BYTES
                            || !self.residency.reserve_scratch(2 * probe) =>
                    {
                        Err(CoreError::ResourceExhausted(format!(
                            "measuring the memory bandwidth needs {} free under the budget and \
                             {} is left; unload a model or raise [memory] budget",
                            format_bytes(2 * MIN_BANDWIDTH_PROBE_BYTES),
                            format_bytes(free)
                        )))
                    }
                    Some(Loaded::Llm(e)) => {
                        let (exec_tx, exec_rx) = oneshot::channel();
                        let device = e.model.device().clone();
                        let name = device.info().name.clone();
                        self.executor.measure_bandwidth(device, probe, exec_tx);
                        let rx = self.relay_releasing_scratch(exec_rx, 2 * probe);
                        Ok((
                            e.model.weight_bytes_per_token(),
                            rx,
                            name,
                            e.model.hp.n_vocab,
                        ))
                    }
                    _ => Err(CoreError::FailedPrecondition(format!(
                        "model {model:?} is not loaded on the GPU"
                    ))),
                };
                let _ = reply.send(r);
            }
            Command::ImageKernels {
                model,
                width,
                height,
                reply,
            } => {
                let r = match self.loaded.get(&model) {
                    Some(Loaded::Sdxl(pipe)) => {
                        let shapes = pipe.kernel_shapes(width, height);
                        let need = shapes.bytes();
                        if self.residency.reserve_scratch(need) {
                            let (exec_tx, exec_rx) = oneshot::channel();
                            let device = pipe.device().clone();
                            let name = device.info().name.clone();
                            self.executor.measure_image_kernels(device, shapes, exec_tx);
                            let rx = self.relay_releasing_scratch(exec_rx, need);
                            let mut sizes = vec![(width, height)];
                            if (width, height) != (1024, 1024) {
                                sizes.push((1024, 1024));
                            }
                            let estimates = sizes
                                .into_iter()
                                .map(|(w, h)| (w, h, pipe.job_bytes(w, h)))
                                .collect();
                            Ok((rx, name, estimates, pipe.bytes()))
                        } else {
                            Err(CoreError::ResourceExhausted(format!(
                                "measuring the image kernels needs {} free under the budget and \
                                 {} is left; unload a model or raise [memory] budget",
                                format_bytes(need),
                                format_bytes(self.residency.free())
                            )))
                        }
                    }
                    _ => Err(CoreError::FailedPrecondition(format!(
                        "model {model:?} is not an image model loaded on the GPU"
                    ))),
                };
                let _ = reply.send(r);
            }
            Command::Engine { model, reply } => {
                let r = match self.loaded.get(&model) {
                    Some(Loaded::Llm(e)) => {
                        self.residency.touch(&model, now);
                        Ok(e.clone())
                    }
                    Some(_) => Err(CoreError::FailedPrecondition(format!(
                        "model {model:?} is not loaded on the GPU; tokenizing needs the LLM engine"
                    ))),
                    None => Err(CoreError::FailedPrecondition(format!(
                        "model {model:?} is not loaded"
                    ))),
                };
                let _ = reply.send(r);
            }
            Command::Cancel { job, reply } => {
                let r = match self.scheduler.cancel(job, now) {
                    Ok(CancelOutcome::Cancelled) => Ok(JobState::Cancelled),
                    Ok(CancelOutcome::Aborting) => {
                        self.apply(vec![Action::Abort { job }]);
                        Ok(self
                            .scheduler
                            .job(job)
                            .map(|j| j.state)
                            .unwrap_or(JobState::Cancelled))
                    }
                    Err(CancelError::NotFound(id)) => Err(CoreError::NotFound(format!(
                        "no job {id}; `halo jobs` lists the jobs halod knows"
                    ))),
                    Err(CancelError::AlreadyFinished { job, state }) => {
                        Err(CoreError::FailedPrecondition(format!(
                            "job {job} already finished ({}); there is nothing to cancel",
                            state.as_str()
                        )))
                    }
                };
                let _ = reply.send(r);
            }
            Command::Reload { config, reply } => {
                let _ = reply.send(self.reload(*config));
            }
            Command::CheckFiles => self.check_files(),
            Command::Shutdown(_) => unreachable!("handled by run"),
        }
    }

    // ---- catalog and config ------------------------------------------------------------------

    /// Makes `config` the one in force: estimates every model, hands the catalog to the
    /// residency core, drops models it says to, and loads pinned models.
    fn install_catalog(&mut self, config: Config) -> Vec<String> {
        self.catalog = config
            .models
            .iter()
            .map(|m| {
                let stamp = file_stamp(&m.path);
                let estimate = estimate_model(m, self.layout());
                if let Err(e) = &estimate {
                    warn!(model = %m.name, error = %e, "model file problem");
                }
                (
                    m.name.clone(),
                    CatalogEntry {
                        config: m.clone(),
                        estimate,
                        stamp,
                    },
                )
            })
            .collect();
        let dropped = self.residency.set_catalog(self.specs());
        for name in &dropped {
            self.drop_model(name, "removed from the config");
        }
        self.scheduler.set_max_queue(config.max_queue);
        let pinned: Vec<String> = config
            .models
            .iter()
            .filter(|m| m.pinned)
            .map(|m| m.name.clone())
            .collect();
        self.executor.configure(config.step_config());
        self.config = config;
        for name in pinned {
            match self.start_load(&name, true) {
                Ok(_) => info!(model = %name, "loading pinned model"),
                Err(e) => warn!(model = %name, error = %e, "cannot load pinned model"),
            }
        }
        dropped
    }

    /// Estimates again every model whose file changed (appeared, went, was rewritten) since
    /// its last estimate, so `halo models` never shows a stale "missing" or "invalid".
    fn refresh_catalog(&mut self) {
        let gpu = self.layout();
        let mut changed = false;
        for e in self.catalog.values_mut() {
            let stamp = file_stamp(&e.config.path);
            if stamp.is_some() && stamp == e.stamp {
                continue;
            }
            let fresh = estimate_model(&e.config, gpu);
            changed |= fresh.as_ref().ok() != e.estimate.as_ref().ok();
            e.estimate = fresh;
            e.stamp = stamp;
        }
        if changed {
            self.residency.set_catalog(self.specs());
        }
    }

    fn specs(&self) -> Vec<ModelSpec> {
        self.catalog
            .values()
            .map(|e| ModelSpec {
                name: e.config.name.clone(),
                estimated_bytes: *e.estimate.as_ref().unwrap_or(&0),
                keep_alive: e.config.keep_alive,
            })
            .collect()
    }

    fn reload(&mut self, config: Config) -> Result<ReloadDone, CoreError> {
        let budget = memory::resolve(config.budget, config.reserve, &self.facts.memory);
        let now = self.now();
        let mut unloaded = self
            .residency
            .set_budget(budget.budget, now)
            .map_err(|e| CoreError::FailedPrecondition(format!("new config rejected: {e}")))?;
        for name in &unloaded {
            self.drop_model(name, "the new budget is smaller");
        }
        if config.listen != self.config.listen {
            warn!("a changed [daemon] listen takes effect after a restart");
        }
        info!(budget = %format_bytes(budget.budget), explanation = %budget.explanation, "config reloaded");
        self.budget = budget;
        unloaded.extend(self.install_catalog(config));
        Ok(ReloadDone {
            models: self.catalog.len(),
            budget_bytes: self.budget.budget,
            unloaded,
        })
    }

    // ---- loading and unloading ---------------------------------------------------------------

    /// Checks the model, asks the residency core for room, drops what it evicts and starts
    /// mapping the files. Returns the plan and the evicted models.
    fn start_load(&mut self, name: &str, pin: bool) -> Result<(LoadPlan, Vec<String>), CoreError> {
        let layout = self.layout();
        let entry = self
            .catalog
            .get_mut(name)
            .ok_or_else(|| unknown_model(name))?;
        // The file may have appeared, changed or gone since the config was read.
        entry.stamp = file_stamp(&entry.config.path);
        let fresh = estimate_model(&entry.config, layout);
        let changed = fresh.as_ref().ok() != entry.estimate.as_ref().ok();
        entry.estimate = fresh;
        let config = entry.config.clone();
        if let Err(e) = &entry.estimate {
            warn!(model = %name, error = %e, "cannot load model");
            let e = CoreError::ModelFile(format!("cannot load model {name:?}: {e}"));
            if changed {
                self.residency.set_catalog(self.specs());
            }
            return Err(e);
        }
        if changed {
            self.residency.set_catalog(self.specs());
        }
        let now = self.now();
        let plan = self
            .residency
            .begin_load(name, pin, now)
            .map_err(load_error)?;
        let evicted = match &plan {
            LoadPlan::Load { evict } => {
                for victim in evict {
                    self.drop_model(victim, "evicted to make room");
                }
                let tx = self.internal_tx.clone();
                let model = name.to_string();
                let started = Instant::now();
                let device = self.facts.runtime.as_ref().ok().cloned();
                let owner = self.owner(name);
                let strategy = self.config.weights;
                tokio::task::spawn_blocking(move || {
                    let result = load_model(&config, device.as_ref(), owner, strategy);
                    let _ = tx.send(Internal::Loaded {
                        model,
                        result,
                        started,
                    });
                });
                evict.clone()
            }
            _ => Vec::new(),
        };
        Ok((plan, evicted))
    }

    fn internal(&mut self, ev: Internal) {
        match ev {
            Internal::Loaded {
                model,
                result,
                started,
            } => self.mapped(model, result, started),
            Internal::JobEnded(id, how) => self.job_ended(id, how),
            Internal::ScratchDone(bytes) => self.residency.release_scratch(bytes),
            Internal::ClientGone(job) => self.client_gone(job),
        }
    }

    fn mapped(&mut self, model: String, result: Result<Loaded, ModelFileError>, started: Instant) {
        let now = self.now();
        let outcome = match result {
            Ok(loaded) => {
                // What the model really holds: the allocator's ledger for GPU models, the mapped
                // bytes otherwise.
                let owner = self.owner(&model);
                let bytes = match &loaded {
                    Loaded::Llm(_) | Loaded::Sdxl(_) => self
                        .facts
                        .runtime
                        .as_ref()
                        .map(|d| d.ledger().owner(owner))
                        .unwrap_or(0),
                    Loaded::Mapped(m) => m.bytes(),
                };
                match self.residency.finish_load(&model, bytes, now) {
                    Ok(extra) => {
                        for victim in &extra {
                            self.drop_model(victim, "evicted: the model was larger than estimated");
                        }
                        info!(model = %model, bytes, what = %loaded.describe(),
                              ms = started.elapsed().as_millis() as u64, "model loaded");
                        self.loaded.insert(model.clone(), loaded);
                        Ok(extra)
                    }
                    Err(e) => Err(load_error(e)),
                }
            }
            Err(e) => {
                warn!(model = %model, error = %e, ms = started.elapsed().as_millis() as u64,
                      "loading the model failed");
                self.residency.fail_load(&model);
                if let Some(entry) = self.catalog.get_mut(&model) {
                    // `halo models` shows the failure until the file changes.
                    entry.estimate = Err(e.clone());
                }
                Err(CoreError::ModelFile(format!(
                    "cannot load model {model:?}: {e}"
                )))
            }
        };
        for w in self.load_waiters.remove(&model).unwrap_or_default() {
            let reply = match &outcome {
                Ok(extra) => self.resident_row(&model).map(|row| LoadDone {
                    model: row,
                    evicted: w.evicted.iter().chain(extra).cloned().collect(),
                    load_time: w.started.elapsed(),
                }),
                Err(e) => Err(e.clone()),
            };
            let _ = w.reply.send(reply);
        }
        let actions = match outcome {
            Ok(_) => self.scheduler.load_finished(&model, Ok(()), now),
            Err(e) => {
                self.fail_model_jobs(&model, &e);
                self.scheduler
                    .load_finished(&model, Err(e.to_string()), now)
            }
        };
        self.apply(actions);
    }

    /// Remembers the error code for every waiting job of `model`, before the scheduler fails them.
    fn fail_model_jobs(&mut self, model: &str, e: &CoreError) {
        for j in self.scheduler.jobs() {
            if j.model == model && matches!(j.state, JobState::Queued | JobState::Loading) {
                self.job_errors.insert(j.id, e.clone());
            }
        }
    }

    fn drop_model(&mut self, name: &str, why: &str) {
        if let Some(m) = self.loaded.remove(name) {
            info!(model = %name, what = %m.describe(), reason = why, "model unloaded");
        }
    }

    fn unload(&mut self, name: &str) -> Result<u64, CoreError> {
        let bytes = self
            .residency
            .view(name)
            .map(|v| v.state.bytes())
            .ok_or_else(|| unknown_model(name))?;
        self.residency.unload(name).map_err(|e| match e {
            UnloadError::UnknownModel { .. } => unknown_model(name),
            other => CoreError::FailedPrecondition(other.to_string()),
        })?;
        self.drop_model(name, "unloaded on request");
        Ok(bytes)
    }

    /// Cancels the job of a client that went away; a job that already ended is left alone.
    fn client_gone(&mut self, job: JobId) {
        let now = self.now();
        match self.scheduler.cancel(job, now) {
            Ok(CancelOutcome::Cancelled) => debug!(job = %job, "client left; queued job cancelled"),
            Ok(CancelOutcome::Aborting) => {
                debug!(job = %job, "client left; running job cancelled");
                self.apply(vec![Action::Abort { job }]);
            }
            Err(_) => {}
        }
    }

    /// Takes out of service every resident model whose file another process has started to
    /// change (its lease is breaking): its jobs fail at their next step, and once the last
    /// reference goes the mapping and its lease are released, letting the writer proceed.
    fn check_files(&mut self) {
        let changed: Vec<(String, String)> = self
            .loaded
            .iter()
            .filter_map(|(name, m)| match m {
                Loaded::Llm(e) => e.file_changed().map(|why| (name.clone(), why)),
                Loaded::Sdxl(_) | Loaded::Mapped(_) => None,
            })
            .collect();
        for (name, why) in changed {
            warn!(model = %name, reason = %why, "model file changed; taking the model out of service");
            self.withdrawn_jobs.extend(
                self.scheduler
                    .jobs()
                    .into_iter()
                    .filter(|j| j.model == name && j.state == JobState::Running)
                    .map(|j| j.id),
            );
            self.residency.withdraw(&name);
            self.drop_model(&name, "its file changed on disk");
            if let Some(e) = self.catalog.get_mut(&name) {
                // Estimated again (from the new file) at the next load or listing.
                e.stamp = None;
            }
        }
    }

    fn tick(&mut self) {
        // Lease breaks arrive as SIGIO; checking each tick too covers a signal lost in a burst.
        self.check_files();
        let now = self.now();
        for name in self.residency.tick(now) {
            self.drop_model(&name, "keep-alive expired");
        }
    }

    // ---- jobs --------------------------------------------------------------------------------

    fn submit(
        &mut self,
        model: &str,
        kind: JobKind,
    ) -> Result<(JobId, mpsc::UnboundedReceiver<JobEvent>), CoreError> {
        let entry = self
            .catalog
            .get(model)
            .ok_or_else(|| unknown_model(model))?;
        let wanted = match kind {
            JobKind::Generate => entry.config.kind == ModelKind::Llm,
            JobKind::Image => entry.config.kind != ModelKind::Llm,
        };
        if !wanted {
            let verb = if entry.config.kind == ModelKind::Llm {
                "halo generate"
            } else {
                "halo image"
            };
            return Err(CoreError::InvalidArgument(format!(
                "model {model:?} is a {} model; use `{verb}` with it",
                entry.config.kind.as_str()
            )));
        }
        if let Err(why) = &self.facts.runtime {
            return Err(CoreError::FailedPrecondition(format!(
                "no GPU device: {why}; jobs need a Vulkan device (see `halo status`)"
            )));
        }
        let id = self
            .scheduler
            .submit(model, kind, self.now())
            .map_err(|SubmitError::QueueFull { model, max_queue }| {
                CoreError::ResourceExhausted(format!(
                    "model {model:?} already has {max_queue} jobs waiting ([defaults] max_queue); try again later"
                ))
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        // A client that goes away cancels its job at once, queued or running: a waiting job
        // must not keep its queue slot until its turn comes.
        let watch = tx.clone();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            watch.closed().await;
            let _ = internal.send(Internal::ClientGone(id));
        });
        self.job_streams.insert(id, tx);
        debug!(job = %id, model, "job queued");
        Ok((id, rx))
    }

    /// Lets the scheduler pick what runs next and applies it; then tells finished jobs' clients.
    fn pump(&mut self) {
        let resident: Vec<String> = self
            .residency
            .models()
            .into_iter()
            .filter(|m| matches!(m.state, ModelState::Resident { .. }))
            .map(|m| m.name)
            .collect();
        let now = self.now();
        let actions = self.scheduler.poll(
            &|m: &str| resident.iter().any(|r| r == m),
            &|m: &str| match self.loaded.get(m) {
                Some(Loaded::Llm(e)) => e.parallel as usize,
                _ => 1,
            },
            now,
        );
        self.apply(actions);
        self.reap();
    }

    fn apply(&mut self, actions: Vec<Action>) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            let now = self.now();
            match action {
                Action::Load { model } => match self.start_load(&model, false) {
                    Ok((LoadPlan::AlreadyResident, _)) => {
                        queue.extend(self.scheduler.load_finished(&model, Ok(()), now));
                    }
                    Ok(_) => {} // the mapping reports back through `mapped`
                    Err(e) => {
                        self.fail_model_jobs(&model, &e);
                        queue.extend(
                            self.scheduler
                                .load_finished(&model, Err(e.to_string()), now),
                        );
                    }
                },
                Action::Run { job, model } => {
                    self.residency.job_started(&model, now);
                    if let Some(Loaded::Sdxl(pipe)) = self.loaded.get(&model) {
                        let pipe = pipe.clone();
                        self.run_image(job, &model, pipe);
                        continue;
                    }
                    let engine = match self.loaded.get(&model) {
                        Some(Loaded::Llm(e)) => Some(e.clone()),
                        _ => None,
                    };
                    let params = self.job_params.remove(&job);
                    let events = self.job_streams.get(&job).cloned();
                    match (engine, params, events) {
                        (Some(engine), Some(params), Some(events)) => {
                            let stop = Arc::new(StopFlag::default());
                            self.stop_flags.insert(job, stop.clone());
                            let exec = ExecJob {
                                id: job,
                                engine,
                                params,
                                events,
                                stop,
                            };
                            if !self.executor.submit(exec) {
                                self.end_job(
                                    job,
                                    &model,
                                    Outcome::Failed("the GPU executor stopped".into()),
                                    None,
                                );
                            }
                        }
                        (engine, _, _) => {
                            let kind = self.catalog.get(&model).map(|e| e.config.kind);
                            // No engine can run it: say so instead of pretending.
                            let e = match kind {
                                Some(ModelKind::Llm) if engine.is_none() => CoreError::FailedPrecondition(format!(
                                    "model {model:?} is loaded without the GPU runtime; jobs need a Vulkan device"
                                )),
                                Some(ModelKind::Llm) => CoreError::FailedPrecondition(
                                    "the job lost its request or its client".into(),
                                ),
                                Some(ModelKind::Sdxl) => CoreError::FailedPrecondition(format!(
                                    "model {model:?} is loaded without the GPU runtime; image jobs need a Vulkan device"
                                )),
                                _ => CoreError::Unimplemented(format!(
                                    "the {} engine is not built yet: halod mapped {model:?} but cannot run it",
                                    kind.map(|k| k.as_str()).unwrap_or("diffusion")
                                )),
                            };
                            self.end_job(job, &model, Outcome::Failed(e.to_string()), Some(e));
                        }
                    }
                }
                Action::Abort { job } => {
                    match self.stop_flags.get(&job) {
                        // The executor stops it at its next step and reports back.
                        Some(flag) => flag.stop(if self.stopping {
                            StopReason::Shutdown
                        } else {
                            StopReason::Cancelled
                        }),
                        None => {
                            if let Some(view) = self.scheduler.job(job) {
                                if view.state == JobState::Running {
                                    self.end_job(job, &view.model, Outcome::Cancelled, None);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Starts an image job on a resident SDXL pipeline: picks the decode (whole, or the widest
    /// tile that fits), reserves the job's working memory under the budget (evicting idle
    /// models, or refusing with what holds the memory), and hands it to the executor.
    fn run_image(
        &mut self,
        job: JobId,
        model: &str,
        pipe: Arc<crate::diffusion::sdxl::SdxlPipeline>,
    ) {
        let fail = |core: &mut Core, e: CoreError| {
            core.end_job(job, model, Outcome::Failed(e.to_string()), Some(e));
        };
        let (Some(params), Some(events), Ok(device)) = (
            self.image_params.remove(&job),
            self.job_streams.get(&job).cloned(),
            self.facts.runtime.clone(),
        ) else {
            return fail(
                self,
                CoreError::FailedPrecondition("the job lost its request or its client".into()),
            );
        };
        let limits = &device.info().limits;
        let max_buffer = limits
            .max_storage_buffer_range
            .min(limits.max_memory_allocation_size);
        let req = &params.request;
        let what = format!(
            "{}×{}, batch {}{}",
            req.width,
            req.height,
            req.batch,
            params
                .vae_tile
                .map(|t| format!(", VAE tiles of {t} px"))
                .unwrap_or_default()
        );
        if let Some(t) = params.vae_tile {
            let scale = pipe.vae_scale();
            if t < 2 * scale || !t.is_multiple_of(scale) {
                return fail(
                    self,
                    CoreError::InvalidArgument(format!(
                        "a VAE tile of {t} px must be a multiple of {scale} and at least {}",
                        2 * scale
                    )),
                );
            }
        }
        let plans = pipe.plans(req, params.vae_tile, max_buffer);
        let Some(plan) = plans
            .iter()
            .find(|p| self.residency.job_fits(model, p.bytes()))
            .or(plans.last())
            .copied()
        else {
            return fail(
                self,
                CoreError::ResourceExhausted(format!(
                    "{what}: even the smallest VAE tile needs a buffer larger than the device's \
                     limit of {}; lower the resolution",
                    format_bytes(max_buffer)
                )),
            );
        };
        match self.residency.reserve_job(job.0, model, plan.bytes()) {
            Ok(evicted) => {
                for victim in evicted {
                    self.drop_model(&victim, "evicted for an image job's working memory");
                }
            }
            Err(e) => {
                return fail(self, CoreError::ResourceExhausted(format!("{what}: {e}")));
            }
        }
        info!(
            job = %job,
            model,
            bytes = %format_bytes(plan.bytes()),
            tile = ?plan.tile,
            "image job reserved its working memory"
        );
        let stop = Arc::new(StopFlag::default());
        self.stop_flags.insert(job, stop.clone());
        let exec = ImageExecJob {
            id: job,
            work: ImageWork {
                pipeline: pipe,
                params,
                plan,
                owner: halo_kernels::OwnerId(JOB_OWNERS | job.0),
                device,
                model: model.to_string(),
            },
            events,
            stop,
        };
        if !self.executor.submit_image(exec) {
            fail(
                self,
                CoreError::Unavailable("the GPU executor stopped".into()),
            );
        }
    }

    /// Records the end of a running job in both cores.
    fn end_job(&mut self, job: JobId, model: &str, outcome: Outcome, error: Option<CoreError>) {
        let now = self.now();
        self.residency.release_job(job.0);
        if let Some(e) = error {
            self.job_errors.insert(job, e);
        }
        self.stop_flags.remove(&job);
        self.scheduler.job_finished(job, outcome, now);
        if self.withdrawn_jobs.remove(&job) {
            // It ran on a copy taken out of service; its end releases that copy's charge.
            self.residency.withdrawn_job_finished(model);
            return;
        }
        for name in self.residency.job_finished(model, now) {
            self.drop_model(&name, "removed from the config");
        }
    }

    /// The executor finished a job.
    fn job_ended(&mut self, job: JobId, how: Ended) {
        let Some(view) = self.scheduler.job(job) else {
            return;
        };
        let outcome = match how {
            Ended::Done(summary) => {
                self.summaries.insert(job, summary);
                (Outcome::Done, None)
            }
            Ended::Cancelled(summary) => {
                if let Some(summary) = summary {
                    self.summaries.insert(job, summary);
                }
                (Outcome::Cancelled, None)
            }
            Ended::Failed(e) => (Outcome::Failed(e.to_string()), Some(e)),
        };
        self.end_job(job, &view.model, outcome.0, outcome.1);
    }

    /// Sends the final event to every client whose job has ended.
    fn reap(&mut self) {
        let ended: Vec<JobId> = self
            .job_streams
            .keys()
            .copied()
            .filter(|id| {
                self.scheduler
                    .job(*id)
                    .is_none_or(|j| j.state.is_terminal())
            })
            .collect();
        for id in ended {
            let tx = self.job_streams.remove(&id).expect("listed above");
            if let Some(summary) = self.summaries.remove(&id) {
                let _ = tx.send(summary);
                continue;
            }
            let view = self.scheduler.job(id);
            let ev = match view.as_ref().map(|j| j.state) {
                Some(JobState::Cancelled) => JobEvent::Cancelled(if self.stopping {
                    StopReason::Shutdown
                } else {
                    StopReason::Cancelled
                }),
                Some(JobState::Failed) => {
                    JobEvent::Failed(self.job_errors.remove(&id).unwrap_or_else(|| {
                        CoreError::FailedPrecondition(
                            view.and_then(|j| j.error)
                                .unwrap_or_else(|| "the job failed".into()),
                        )
                    }))
                }
                _ => continue,
            };
            let _ = tx.send(ev);
        }
        self.job_errors
            .retain(|id, _| self.job_streams.contains_key(id));
        self.summaries
            .retain(|id, _| self.job_streams.contains_key(id));
        self.image_params
            .retain(|id, _| self.job_streams.contains_key(id));
    }

    fn shutdown(&mut self) {
        self.stopping = true;
        let now = self.now();
        let actions = self.scheduler.cancel_all(now);
        self.apply(actions);
        self.reap();
        for w in self.load_waiters.drain().flat_map(|(_, ws)| ws) {
            let _ = w
                .reply
                .send(Err(CoreError::Unavailable("halod is shutting down".into())));
        }
        let n = self.loaded.len();
        self.loaded.clear();
        info!(models = n, "core stopped");
    }

    // ---- views -------------------------------------------------------------------------------

    fn model_rows(&self) -> Vec<ModelRow> {
        self.catalog
            .values()
            .map(|e| {
                let view = self.residency.view(&e.config.name);
                let (state, pinned) = match (&e.estimate, &view) {
                    (_, Some(v)) if !matches!(v.state, ModelState::Unloaded) => (
                        match v.state {
                            ModelState::Loading { .. } => "loading",
                            _ => "resident",
                        },
                        v.pinned,
                    ),
                    (Err(ModelFileError::Missing { .. }), _) => ("missing", false),
                    (Err(_), _) => ("invalid", false),
                    _ => ("unloaded", false),
                };
                ModelRow {
                    config: e.config.clone(),
                    estimated_bytes: *e.estimate.as_ref().unwrap_or(&0),
                    state,
                    pinned,
                    error: e.estimate.as_ref().err().map(|e| e.to_string()),
                    note: match self.loaded.get(&e.config.name) {
                        Some(Loaded::Llm(engine)) => engine.weights_note().map(str::to_string),
                        _ => None,
                    },
                }
            })
            .collect()
    }

    fn resident_rows(&self) -> Vec<ResidentRow> {
        self.residency
            .models()
            .into_iter()
            .filter(|m| !matches!(m.state, ModelState::Unloaded))
            .filter_map(|m| self.resident_row(&m.name).ok())
            .collect()
    }

    fn resident_row(&self, name: &str) -> Result<ResidentRow, CoreError> {
        let v = self
            .residency
            .view(name)
            .ok_or_else(|| unknown_model(name))?;
        let now = self.now();
        let last_used = v.last_used.unwrap_or(now);
        Ok(ResidentRow {
            name: v.name.clone(),
            kind: self
                .catalog
                .get(name)
                .map(|e| e.config.kind)
                .unwrap_or(ModelKind::Llm),
            bytes: v.state.bytes(),
            loading: matches!(v.state, ModelState::Loading { .. }),
            pinned: v.pinned,
            running_jobs: v.busy,
            idle: now.saturating_sub(last_used),
            last_used_unix_ms: self.started_unix_ms + last_used.as_millis() as i64,
            expires_in: v.expires_at.map(|t| t.saturating_sub(now)),
        })
    }

    /// Passes an executor measurement's answer on to the client, then returns its `scratch`
    /// bytes to the budget: they stay reserved until it reports, whether or not the client still
    /// waits for the answer.
    fn relay_releasing_scratch<T: Send + 'static>(
        &self,
        exec_rx: oneshot::Receiver<Result<T, String>>,
        scratch: u64,
    ) -> oneshot::Receiver<Result<T, String>> {
        let (tx, rx) = oneshot::channel();
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let r = exec_rx
                .await
                .unwrap_or_else(|_| Err("the GPU executor stopped".into()));
            let _ = tx.send(r);
            let _ = internal.send(Internal::ScratchDone(scratch));
        });
        rx
    }

    fn job_rows(&self) -> Vec<JobRow> {
        let now = self.now();
        self.scheduler
            .jobs()
            .into_iter()
            .map(|j| JobRow {
                id: j.id,
                model: j.model,
                kind: j.kind,
                state: j.state,
                age: now.saturating_sub(j.submitted_at),
                error: j.error,
                queue_position: j.queue_position,
            })
            .collect()
    }
}

impl Core {
    /// How the GPU runtime lays weights out, if there is one (LLM estimates depend on it).
    fn layout(&self) -> Option<halo_kernels::WeightLayout> {
        self.facts.runtime.as_ref().ok().map(|d| d.weight_layout())
    }

    /// The allocator owner id of a model (stable for the daemon's lifetime).
    fn owner(&mut self, name: &str) -> halo_kernels::OwnerId {
        let next = halo_kernels::OwnerId(self.owners.len() as u64 + 1);
        *self.owners.entry(name.to_string()).or_insert(next)
    }
}

/// Bytes a model will take: for LLMs on a GPU, weights plus the sequence pool, computed from the
/// GGUF header and the config (the same sizes the loader allocates); for SDXL on a GPU (a
/// diffusers folder or a single file), its weights as the loader places them, from the
/// safetensors headers; otherwise the files' size.
fn estimate_model(
    m: &ModelConfig,
    gpu: Option<halo_kernels::WeightLayout>,
) -> Result<u64, ModelFileError> {
    if let (ModelKind::Sdxl, Some(layout)) = (m.kind, gpu) {
        models::estimate(m)?; // the folder's layout first, with its own wording
        let described_by = m.diffusers_config.as_deref();
        return crate::diffusion::sdxl::SdxlPipeline::estimate(&m.path, described_by, layout)
            .map_err(|e| ModelFileError::Invalid {
                path: m.path.clone(),
                message: e.to_string(),
            });
    }
    let Some(layout) = gpu.filter(|_| m.kind == ModelKind::Llm) else {
        return models::estimate(m);
    };
    models::estimate(m)?; // missing-file errors first, with their own wording
    let file = crate::gguf::GgufFile::open(&m.path).map_err(|e| ModelFileError::Invalid {
        path: m.path.clone(),
        message: match e.error {
            crate::gguf::GgufFileErrorKind::Format(f) => f.to_string(),
            crate::gguf::GgufFileErrorKind::Io(io) => io.to_string(),
        },
    })?;
    engine::estimate(
        &file.header,
        m.context,
        m.parallel as u64,
        m.kv_cache,
        layout,
    )
    .map_err(|e| ModelFileError::Invalid {
        path: m.path.clone(),
        message: e.to_string(),
    })
}

/// Loads a model: an LLM or an SDXL model onto the GPU when there is one, otherwise its files
/// mapped.
fn load_model(
    m: &ModelConfig,
    device: Option<&halo_kernels::Device>,
    owner: halo_kernels::OwnerId,
    strategy: halo_kernels::LoadStrategy,
) -> Result<Loaded, ModelFileError> {
    match (m.kind, device) {
        (ModelKind::Llm, Some(dev)) => {
            models::estimate(m)?;
            LlmEngine::load(
                dev,
                &m.path,
                m.context,
                m.parallel as u64,
                m.kv_cache,
                strategy,
                owner,
            )
            .map(|e| Loaded::Llm(Arc::new(e)))
            .map_err(|e| ModelFileError::Invalid {
                path: m.path.clone(),
                message: e.to_string(),
            })
        }
        // A diffusers folder or a single file; its weights are copied (the files hold no lease
        // yet, so they must not be the weights).
        (ModelKind::Sdxl, Some(dev)) => {
            models::estimate(m)?;
            crate::diffusion::sdxl::SdxlPipeline::load(
                dev,
                &m.path,
                m.diffusers_config.as_deref(),
                halo_kernels::LoadStrategy::Copy,
                owner,
            )
            .map(|p| Loaded::Sdxl(Arc::new(p)))
            .map_err(|e| ModelFileError::Invalid {
                path: m.path.clone(),
                message: e.to_string(),
            })
        }
        _ => models::map(m).map(Loaded::Mapped),
    }
}

fn unknown_model(name: &str) -> CoreError {
    CoreError::NotFound(format!(
        "unknown model {name:?}; `halo models` lists the models in the config"
    ))
}

fn load_error(e: LoadError) -> CoreError {
    match e {
        LoadError::UnknownModel { name } => unknown_model(&name),
        other => CoreError::ResourceExhausted(other.to_string()),
    }
}

fn pin_error(e: PinError) -> CoreError {
    match e {
        PinError::UnknownModel { name } => unknown_model(&name),
        other => CoreError::FailedPrecondition(format!(
            "{other}; use `halo load MODEL --pin` to load and pin it"
        )),
    }
}

/// Keep-alive as `halo models` prints it.
pub fn keep_alive_str(k: KeepAlive) -> String {
    crate::config::format_keep_alive(k)
}
