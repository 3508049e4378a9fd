//! The GPU executor: one thread that runs every job's GPU work, one piece at a time, in the
//! order the step policy ([`crate::scheduler::step`]) chooses. The LLM jobs of one model form a
//! lane: one step of it is one forward over all of them, each decoding sequence's next token
//! plus at most one chunk of one waiting prompt (continuous batching: sequences join and leave
//! between steps, and the weights are read once per step for all of them). An image job is a
//! lane of its own whose steps are chunks sized to the policy's time budget. LLM jobs are state
//! machines: tokenize → prefill in chunks → decode → done. Cancellation (or a client that went
//! away) is checked between steps, so a job stops within one step, and its sequence goes back
//! to the model's pool when it ends.
//!
//! Architecture invariant: no request thread submits GPU work; everything goes through this
//! thread. It talks to async code through channels only and never blocks the tokio runtime.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::core::{CoreError, JobEvent, TokenEvent};
use crate::diffusion::job::{ImageRun, ImageWork};
use crate::llm::chat::Message;
use crate::llm::engine::LlmEngine;
use crate::llm::model::{Part, Sequence};
use crate::sampler::{logprobs, Sampler, SamplerConfig};
use crate::scheduler::step::{LlmLane, Pick, Ran, StepConfig, StepPolicy};
use crate::scheduler::JobId;

/// What a generate request asks for.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub prompt: Prompt,
    /// Render the text as one user message with the model's chat template.
    pub chat: bool,
    pub max_tokens: Option<u32>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub logprobs: u32,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    /// A conversation for the chat template.
    Chat(Vec<Message>),
}

/// How a job ended. A job that ran carries its summary event: the core sends it to the client
/// only after it has recorded the end, so a client that has its summary finds the job ended in
/// `halo jobs`.
#[derive(Debug)]
pub enum Ended {
    Done(JobEvent),
    /// None when the summary was sent already: on shutdown the core stops without waiting for
    /// the executor, so the executor tells the client itself.
    Cancelled(Option<JobEvent>),
    Failed(CoreError),
}

/// Why a running job is asked to stop, set by the core and read by the executor between steps.
#[derive(Default)]
pub struct StopFlag(AtomicU8);

/// Why a job stopped early, as its summary's `finish_reason` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `halo cancel`, Ctrl-C, or the client went away.
    Cancelled,
    /// The daemon is shutting down.
    Shutdown,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Cancelled => "cancelled",
            StopReason::Shutdown => "shutdown",
        }
    }
}

impl StopFlag {
    pub fn stop(&self, why: StopReason) {
        let v = match why {
            StopReason::Cancelled => 1,
            StopReason::Shutdown => 2,
        };
        // The first reason wins: a job cancelled by its client stays "cancelled".
        let _ = self
            .0
            .compare_exchange(0, v, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn get(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            2 => Some(StopReason::Shutdown),
            _ => Some(StopReason::Cancelled),
        }
    }
}

/// A job handed to the executor.
pub struct ExecJob {
    pub id: JobId,
    pub engine: Arc<LlmEngine>,
    pub params: GenerateParams,
    pub events: UnboundedSender<JobEvent>,
    pub stop: Arc<StopFlag>,
}

/// An image job handed to the executor.
pub struct ImageExecJob {
    pub id: JobId,
    pub work: ImageWork,
    pub events: UnboundedSender<JobEvent>,
    pub stop: Arc<StopFlag>,
}

/// What the executor thread is asked to do.
enum Msg {
    Job(ExecJob),
    Image(ImageExecJob),
    /// Measure the device's memory bandwidth (bytes/s) between job steps, with two buffers of
    /// the given size.
    Bandwidth(
        halo_kernels::Device,
        u64,
        tokio::sync::oneshot::Sender<Result<f64, String>>,
    ),
    /// The step policy's settings changed (config load or reload).
    Configure(StepConfig),
    /// Measure the image kernels at these shapes between job steps.
    ImageKernels(
        halo_kernels::Device,
        Box<halo_kernels::bench::ImageKernelShapes>,
        tokio::sync::oneshot::Sender<KernelFigures>,
    ),
}

/// The image kernels' figures, or why they could not be measured.
pub type KernelFigures = Result<Vec<halo_kernels::bench::KernelFigure>, String>;

/// Handle to the executor thread.
pub struct Executor {
    tx: std::sync::mpsc::Sender<Msg>,
}

impl Executor {
    /// Starts the thread; `ended` receives (job, outcome) for every job it finishes.
    pub fn spawn(ended: UnboundedSender<(JobId, Ended)>) -> Executor {
        let (tx, rx) = std::sync::mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("halo-gpu".into())
            .spawn(move || run(rx, ended))
            .expect("spawning the executor thread");
        Executor { tx }
    }

    /// Gives the step policy new settings; jobs under way keep running.
    pub fn configure(&self, cfg: StepConfig) {
        let _ = self.tx.send(Msg::Configure(cfg));
    }

    /// Hands a job to the thread; false if the thread has stopped.
    pub fn submit(&self, job: ExecJob) -> bool {
        self.tx.send(Msg::Job(job)).is_ok()
    }

    /// Hands an image job to the thread; false if the thread has stopped.
    pub fn submit_image(&self, job: ImageExecJob) -> bool {
        self.tx.send(Msg::Image(job)).is_ok()
    }

    /// Measures `device`'s bandwidth on the executor thread by copying between two buffers of
    /// `bytes` each; the answer comes on `reply`.
    pub fn measure_bandwidth(
        &self,
        device: halo_kernels::Device,
        bytes: u64,
        reply: tokio::sync::oneshot::Sender<Result<f64, String>>,
    ) {
        if let Err(std::sync::mpsc::SendError(Msg::Bandwidth(_, _, reply))) =
            self.tx.send(Msg::Bandwidth(device, bytes, reply))
        {
            let _ = reply.send(Err("the GPU executor stopped".into()));
        }
    }

    /// Measures the image kernels (conv2d, attention, matmul) at `shapes` on the executor
    /// thread, each for about 300 ms; the answer comes on `reply`.
    pub fn measure_image_kernels(
        &self,
        device: halo_kernels::Device,
        shapes: halo_kernels::bench::ImageKernelShapes,
        reply: tokio::sync::oneshot::Sender<KernelFigures>,
    ) {
        if let Err(std::sync::mpsc::SendError(Msg::ImageKernels(_, _, reply))) = self
            .tx
            .send(Msg::ImageKernels(device, Box::new(shapes), reply))
        {
            let _ = reply.send(Err("the GPU executor stopped".into()));
        }
    }
}

/// What the executor thread holds between pieces of work.
struct State {
    lanes: Vec<LlmWork>,
    images: Vec<ImageExec>,
    policy: StepPolicy,
    /// Pieces over the ceiling since the last warning, and when that was.
    overruns: u64,
    overrun_logged: Option<Instant>,
}

fn run(rx: std::sync::mpsc::Receiver<Msg>, ended: UnboundedSender<(JobId, Ended)>) {
    let mut st = State {
        lanes: Vec::new(),
        images: Vec::new(),
        policy: StepPolicy::new(StepConfig::default()),
        overruns: 0,
        overrun_logged: None,
    };
    let handle = |m: Msg, st: &mut State| match m {
        Msg::Job(job) => {
            let key = lane_key(&job.engine);
            let run = Running::new(job);
            match st.lanes.iter_mut().find(|l| l.key == key) {
                Some(l) => l.jobs.push(run),
                None => st.lanes.push(LlmWork {
                    key,
                    jobs: vec![run],
                    finished: Vec::new(),
                }),
            }
        }
        Msg::Image(job) => st.images.push(ImageExec {
            id: job.id,
            events: job.events,
            stop: job.stop,
            run: ImageRun::new(job.work),
        }),
        Msg::Configure(cfg) => {
            if cfg != st.policy.config() {
                st.policy = StepPolicy::new(cfg);
            }
        }
        Msg::Bandwidth(device, bytes, reply) => {
            let _ = reply.send(bandwidth(&device, bytes).map_err(|e| e.to_string()));
        }
        Msg::ImageKernels(device, shapes, reply) => {
            let figures = halo_kernels::bench::image_kernels(
                &device,
                &shapes,
                halo_kernels::OwnerId::SHARED,
                std::time::Duration::from_millis(300),
            );
            let _ = reply.send(figures.map_err(|e| e.to_string()));
        }
    };
    loop {
        if st.lanes.is_empty() && st.images.is_empty() {
            match rx.recv() {
                Ok(m) => handle(m, &mut st),
                Err(_) => return, // the daemon is gone
            }
        }
        while let Ok(m) = rx.try_recv() {
            handle(m, &mut st);
        }
        let views: Vec<LlmLane> = st.lanes.iter().map(LlmWork::view).collect();
        let image_keys: Vec<u64> = st.images.iter().map(|j| j.id.0).collect();
        let Some(pick) = st.policy.next(&views, &image_keys) else {
            continue;
        };
        let t = Instant::now();
        let mut gone = None;
        // A bug in one job must not take the others (or the daemon) down with it.
        let internal = || {
            Ended::Failed(CoreError::FailedPrecondition(
                "internal error while running the job (see the daemon's log)".into(),
            ))
        };
        let ran = match pick {
            Pick::Llm {
                lane,
                prefill_tokens,
            } => {
                let work = &mut st.lanes[lane];
                let rows = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    work.step(prefill_tokens)
                }))
                .unwrap_or_else(|_| {
                    work.end_all(internal);
                    0
                });
                // The step's engine reference is gone: a model the core drops on hearing of
                // these ends is freed at once.
                for end in work.finished.drain(..) {
                    let _ = ended.send(end);
                }
                Ran {
                    key: work.key,
                    image: false,
                    took: t.elapsed(),
                    rows,
                }
            }
            Pick::Image { lane, budget } => {
                let job = &mut st.images[lane];
                let step =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.step(budget)))
                        .unwrap_or_else(|_| (Some(internal()), None));
                let key = job.id.0;
                let took = step.1.unwrap_or_else(|| t.elapsed());
                if let Some(outcome) = step.0 {
                    // The job (its activations) goes first: when the core hears of the end,
                    // its memory is already released.
                    let job = st.images.swap_remove(lane);
                    let id = job.id;
                    drop(job);
                    gone = Some(key);
                    let _ = ended.send((id, outcome));
                }
                Ran {
                    key,
                    image: true,
                    took,
                    rows: 0,
                }
            }
        };
        tracing::trace!(
            image = ran.image,
            lane = ran.key,
            rows = ran.rows,
            took_us = ran.took.as_micros() as u64,
            wall_us = t.elapsed().as_micros() as u64,
            "ran a piece of GPU work"
        );
        if st.policy.ran(ran) {
            st.overruns += 1;
            // On a slow device every step may overrun: say so once per 10 s, with a count.
            if st
                .overrun_logged
                .is_none_or(|t| t.elapsed().as_secs() >= 10)
            {
                tracing::warn!(
                    image = ran.image,
                    took_ms = ran.took.as_millis() as u64,
                    ceiling_ms = st.policy.config().ceiling.as_millis() as u64,
                    overruns = st.overruns,
                    "a piece of GPU work ran longer than the submission ceiling"
                );
                st.overrun_logged = Some(Instant::now());
                st.overruns = 0;
            }
        }
        if let Some(key) = gone {
            st.policy.forget(key, true);
        }
        st.lanes.retain(|l| {
            let keep = !l.jobs.is_empty();
            if !keep {
                st.policy.forget(l.key, false);
            }
            keep
        });
    }
}

/// The lane of a model: its engine's address, unique while the engine lives.
fn lane_key(engine: &Arc<LlmEngine>) -> u64 {
    Arc::as_ptr(engine) as usize as u64
}

/// The LLM jobs of one loaded model, stepped together.
struct LlmWork {
    key: u64,
    /// In arrival order: the first waiting prompt is the next to get a chunk.
    jobs: Vec<Running>,
    /// Jobs that ended, dropped already, for the run loop to report once nothing of this step
    /// holds their engine any more.
    finished: Vec<(JobId, Ended)>,
}

impl LlmWork {
    fn view(&self) -> LlmLane {
        let decoding = self.jobs.iter().filter(|j| j.feed.is_some()).count();
        LlmLane {
            key: self.key,
            decoding,
            prefilling: self.jobs.len() - decoding,
        }
    }

    /// Ends job `i`: its sequence goes back to the pool and the job (with its engine
    /// reference) is dropped; the core hears of it from the run loop after the step.
    fn end(&mut self, i: usize, outcome: Ended) {
        let mut job = self.jobs.remove(i);
        if let Some(seq) = job.seq.take() {
            job.job.engine.return_sequence(seq);
        }
        let id = job.job.id;
        drop(job);
        self.finished.push((id, outcome));
    }

    fn end_all(&mut self, why: impl Fn() -> Ended) {
        while !self.jobs.is_empty() {
            self.end(0, why());
        }
    }

    /// One step: every job is checked for a stop, new ones are tokenized, then one forward runs
    /// each decoding sequence's next token and a chunk of at most `prefill_tokens` of the first
    /// waiting prompt. Returns the rows the forward ran.
    fn step(&mut self, prefill_tokens: usize) -> usize {
        // Stops, a changing model file, tokenization, and the tokens decoders emit.
        let mut i = 0;
        while i < self.jobs.len() {
            match self.jobs[i].before_step() {
                Some(outcome) => self.end(i, outcome),
                None => i += 1,
            }
        }
        if self.jobs.is_empty() {
            return 0;
        }
        let engine = self.jobs[0].job.engine.clone();
        let mut sc = engine.scratch();
        let room = sc.rows() as usize;
        let decoding = self.jobs.iter().filter(|j| j.feed.is_some()).count();
        let prefiller = self
            .jobs
            .iter()
            .position(|j| j.feed.is_none() && j.fed < j.prompt.len());
        let chunk = prefiller.map(|p| {
            let j = &self.jobs[p];
            (j.prompt.len() - j.fed)
                .min(prefill_tokens.max(1))
                .min(room.saturating_sub(decoding))
        });
        let mut parts = Vec::with_capacity(decoding + 1);
        let mut who = Vec::with_capacity(decoding + 1);
        for (i, j) in self.jobs.iter_mut().enumerate() {
            let Running {
                seq,
                feed,
                prompt,
                fed,
                ..
            } = j;
            let Some(seq) = seq.as_mut() else { continue };
            if let Some(t) = feed.as_ref() {
                parts.push(Part {
                    seq,
                    tokens: std::slice::from_ref(t),
                    logits: true,
                });
                who.push(i);
            } else if Some(i) == prefiller && chunk.unwrap_or(0) > 0 {
                let end = *fed + chunk.unwrap_or(0);
                parts.push(Part {
                    seq,
                    tokens: &prompt[*fed..end],
                    logits: end == prompt.len(),
                });
                who.push(i);
            }
        }
        if parts.is_empty() {
            return 0;
        }
        let counts: Vec<usize> = parts.iter().map(|p| p.tokens.len()).collect();
        let rows = counts.iter().sum();
        let out = engine.model.forward_batch(&mut sc, &mut parts);
        drop(parts);
        drop(sc);
        let logits = match out {
            Ok(l) => l,
            Err(e) => {
                // The step ran for all of them: none of their caches can be trusted.
                for &i in who.iter().rev() {
                    self.end(i, Ended::Failed(Running::gpu(&e)));
                }
                return rows;
            }
        };
        let mut finished = Vec::new();
        for ((&i, l), n) in who.iter().zip(logits).zip(counts) {
            if let Some(end) = self.jobs[i].after_step(n, who.len(), l.as_deref()) {
                finished.push((i, end));
            }
        }
        // Highest index first, so the others keep theirs.
        for (i, end) in finished.into_iter().rev() {
            self.end(i, end);
        }
        rows
    }
}

/// Device memory bandwidth in bytes/s: the best of a few copies of a `bytes` buffer (each copy
/// reads and writes every byte). The two buffers live only while it runs.
fn bandwidth(device: &halo_kernels::Device, bytes: u64) -> Result<f64, halo_kernels::VulkanError> {
    use halo_kernels::{MemoryKind, OwnerId};
    let src = device.alloc(MemoryKind::Device, bytes, OwnerId::SHARED)?;
    let dst = device.alloc(MemoryKind::Device, bytes, OwnerId::SHARED)?;
    let mut best = f64::MAX;
    for _ in 0..4 {
        let mut s = device.stream()?;
        let t = Instant::now();
        s.copy(&src, 0, &dst, 0, bytes)?;
        s.finish()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * bytes as f64 / best)
}

/// The end of a job asked to stop (or whose client has gone), if so. The client still gets a
/// summary of what it was sent: at once on shutdown, else with the end.
fn stopped(
    flag: &StopFlag,
    events: &UnboundedSender<JobEvent>,
    summary: impl FnOnce(&'static str) -> JobEvent,
) -> Option<Ended> {
    let why = match flag.get() {
        None if events.is_closed() => StopReason::Cancelled,
        None => return None,
        Some(why) => why,
    };
    let summary = summary(why.as_str());
    if why == StopReason::Shutdown {
        let _ = events.send(summary);
        return Some(Ended::Cancelled(None));
    }
    Some(Ended::Cancelled(Some(summary)))
}

/// A running image job with its client's channel and stop flag.
struct ImageExec {
    id: JobId,
    events: UnboundedSender<JobEvent>,
    stop: Arc<StopFlag>,
    run: ImageRun,
}

impl ImageExec {
    /// One chunk of the job, aiming at `budget` of device time: how it ended if it did, and
    /// the chunk's measured device time where the device keeps timestamps.
    fn step(
        &mut self,
        budget: std::time::Duration,
    ) -> (Option<Ended>, Option<std::time::Duration>) {
        if let Some(end) = stopped(&self.stop, &self.events, |why| self.run.summary(why, 0, 0)) {
            return (Some(end), None);
        }
        match self.run.step(&self.events, budget) {
            Ok((None, took)) => (None, took),
            Ok((Some(summary), took)) => (Some(Ended::Done(summary)), took),
            Err(e) => (Some(Ended::Failed(e)), None),
        }
    }
}

/// A sampled token: id, its log-probability, and the top alternatives.
type Chosen = (u32, f32, Vec<(u32, f32)>);

/// One job in progress.
struct Running {
    job: ExecJob,
    seq: Option<Sequence>,
    sampler: Sampler,
    prompt: Vec<u32>,
    /// Prompt tokens processed so far, the reused ones included.
    fed: usize,
    /// Leading prompt tokens whose KV cache was reused from the sequence's previous request.
    cached: u32,
    history: Vec<u32>,
    /// The sampled token waiting to be emitted, with its log-probabilities.
    next: Option<Chosen>,
    /// The emitted token the next step feeds back (decoding), None while the prompt runs.
    feed: Option<u32>,
    generated: u32,
    /// Bytes of an incomplete UTF-8 sequence carried to the next token.
    partial: Vec<u8>,
    /// Text held back because it could be the start of a stop string.
    held: String,
    started: Instant,
    /// The most sequences one of its steps ran together.
    peak_batch: u32,
    prompt_ms: u64,
    decode_started: Option<Instant>,
    ready: bool,
}

impl Running {
    fn new(job: ExecJob) -> Running {
        let sampler = Sampler::new(job.params.sampler.clone());
        Running {
            job,
            seq: None,
            sampler,
            prompt: Vec::new(),
            fed: 0,
            cached: 0,
            history: Vec::new(),
            next: None,
            feed: None,
            generated: 0,
            partial: Vec::new(),
            held: String::new(),
            started: Instant::now(),
            peak_batch: 0,
            prompt_ms: 0,
            decode_started: None,
            ready: false,
        }
    }

    /// Before a step of its model: `Some` when the job has ended (stopped, its model file
    /// changing, a prompt it cannot run); otherwise it is tokenized if it was not yet.
    fn before_step(&mut self) -> Option<Ended> {
        let (stop, events) = (self.job.stop.clone(), self.job.events.clone());
        if let Some(end) = stopped(&stop, &events, |why| self.summary(why)) {
            return Some(end);
        }
        // The weights may be the model file's own pages: never touch them once the file is
        // being changed (the writer waits on our lease until the model is dropped).
        if let Some(why) = self.job.engine.file_changed() {
            return Some(Ended::Failed(CoreError::FailedPrecondition(why)));
        }
        if !self.ready {
            if let Err(e) = self.prepare() {
                return Some(Ended::Failed(e));
            }
        }
        None
    }

    /// After a step that ran `rows` of this job's tokens: a prompt chunk advances the prompt;
    /// the logits (after the prompt's last token, or after a fed token) choose the next token,
    /// which goes to the client at once and becomes the next step's feed. `Some` when that
    /// token ended the job.
    fn after_step(&mut self, rows: usize, batch: usize, logits: Option<&[f32]>) -> Option<Ended> {
        self.peak_batch = self.peak_batch.max(batch as u32);
        if self.feed.take().is_none() {
            self.fed += rows;
            if self.fed == self.prompt.len() {
                self.prompt_ms = self.started.elapsed().as_millis() as u64;
                self.decode_started = Some(Instant::now());
            }
        }
        if let Some(l) = logits {
            self.choose(l);
            match self.emit() {
                Ok(t) => self.feed = Some(t),
                Err(end) => return Some(end),
            }
        }
        None
    }

    fn prepare(&mut self) -> Result<(), CoreError> {
        let engine = &self.job.engine;
        let tok = &engine.tokenizer;
        let p = &self.job.params;
        let messages = match (&p.prompt, p.chat) {
            (Prompt::Chat(m), _) => Some(m.clone()),
            (Prompt::Text(text), true) => Some(vec![Message::new("user", text.clone())]),
            _ => None,
        };
        // Whatever the text, it cannot fit the context if even the longest tokens could not
        // cover it: refuse it before spending time tokenizing it.
        let longest = (engine.context as usize).saturating_mul(tok.max_token_bytes());
        let too_long = |len: usize| {
            CoreError::InvalidArgument(format!(
                "the prompt is {len} bytes, more than the model's context of {} tokens could \
                 ever hold; shorten it or raise `context` in the config",
                engine.context
            ))
        };
        let ids = match (&p.prompt, messages) {
            (Prompt::Tokens(ids), _) => ids.clone(),
            (_, Some(messages)) => {
                let tmpl = engine.chat.as_ref().ok_or_else(|| {
                    CoreError::InvalidArgument(
                        "this model has no chat template (its GGUF has no \
                         tokenizer.chat_template), so it cannot take chat messages; send plain \
                         text instead (`halo generate` without --chat)"
                            .into(),
                    )
                })?;
                let text_len: usize = messages.iter().map(|m| m.content.len()).sum();
                if text_len > longest {
                    return Err(too_long(text_len));
                }
                let rendered = tmpl
                    .render(&messages, true)
                    .map_err(|e| CoreError::InvalidArgument(format!("chat template: {e}")))?;
                if rendered.len() > longest {
                    return Err(too_long(rendered.len()));
                }
                // Templates usually write the BOS token themselves; add it only if they do not.
                let has_bos = tok
                    .bos()
                    .and_then(|b| tok.token_text(b))
                    .is_some_and(|b| rendered.starts_with(b));
                tok.encode(&rendered, !has_bos, true).map_err(|e| {
                    CoreError::InvalidArgument(format!("cannot tokenize the prompt: {e}"))
                })?
            }
            (Prompt::Text(text), None) if text.len() > longest => return Err(too_long(text.len())),
            (Prompt::Text(text), None) => tok.encode(text, true, true).map_err(|e| {
                CoreError::InvalidArgument(format!("cannot tokenize the prompt: {e}"))
            })?,
            (Prompt::Chat(_), None) => unreachable!("a chat prompt always has messages"),
        };
        if ids.is_empty() {
            return Err(CoreError::InvalidArgument(
                "the prompt is empty after tokenization".into(),
            ));
        }
        let vocab = engine.model.hp.n_vocab;
        if let Some(bad) = ids.iter().find(|t| **t as u64 >= vocab) {
            return Err(CoreError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        if ids.len() as u64 >= engine.context {
            return Err(CoreError::InvalidArgument(format!(
                "the prompt has {} tokens but the model's context is {}; raise `context` in the config",
                ids.len(),
                engine.context
            )));
        }
        // The free sequence whose cache already holds the longest start of this prompt (a chat's
        // earlier turns, a repeated system prompt): those tokens are not processed again.
        let (seq, cached) = engine.take_sequence_for(&ids).ok_or_else(|| {
            CoreError::ResourceExhausted("no free sequence for this model; try again".into())
        })?;
        tracing::debug!(
            job = ?self.job.id,
            prompt_tokens = ids.len(),
            cached_tokens = cached,
            "prompt ready"
        );
        self.seq = Some(seq);
        self.fed = cached as usize;
        self.cached = cached as u32;
        self.history = ids.clone();
        self.prompt = ids;
        self.ready = true;
        Ok(())
    }

    fn gpu(e: impl std::fmt::Display) -> CoreError {
        CoreError::FailedPrecondition(format!("GPU work failed: {e}"))
    }

    fn choose(&mut self, logits: &[f32]) {
        let t = self.sampler.sample(logits, &self.history);
        let (lp, top) = logprobs(logits, t, self.job.params.logprobs as usize);
        self.next = Some((t, lp, top));
    }

    /// Emits the chosen token: `Ok(token)` to feed it back, or how the job ended with it
    /// (end of generation, a stop string, the length limit).
    fn emit(&mut self) -> Result<u32, Ended> {
        let (t, lp, top) = self.next.take().expect("a token is chosen after prefill");
        let engine = self.job.engine.clone();
        let p = &self.job.params;
        if !p.ignore_eos && engine.tokenizer.is_eog(t) {
            return Err(self.done("eos"));
        }
        self.generated += 1;
        self.history.push(t);
        // Text of this token: complete UTF-8 only, held back while it may start a stop string.
        self.partial
            .extend(engine.tokenizer.token_bytes(t).unwrap_or_default());
        let valid = match std::str::from_utf8(&self.partial) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.partial.len(),
        };
        let piece: Vec<u8> = self.partial.drain(..valid).collect();
        self.held.push_str(&String::from_utf8_lossy(&piece));
        let mut release = self.held.len();
        let mut stopped = false;
        if let Some(at) = p
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            release = at;
            stopped = true;
        } else {
            // Keep back the longest tail that is a prefix of some stop string.
            for s in &p.stop {
                for k in (1..s.len().min(self.held.len() + 1)).rev() {
                    if self.held.is_char_boundary(self.held.len() - k)
                        && s.starts_with(&self.held[self.held.len() - k..])
                    {
                        release = release.min(self.held.len() - k);
                        break;
                    }
                }
            }
        }
        let text: String = self.held.drain(..release).collect();
        let _ = self.job.events.send(JobEvent::Token(TokenEvent {
            token: t,
            text,
            logprob: lp,
            top_logprobs: top,
        }));
        if stopped {
            self.held.clear();
            return Err(self.done("stop"));
        }
        let seq = self.seq.as_ref().expect("prepared");
        let max = p.max_tokens.map(|m| m as u64).unwrap_or(u64::MAX);
        if self.generated as u64 >= max || seq.len() + 1 >= seq.capacity() {
            return Err(self.done("length"));
        }
        Ok(t)
    }

    fn done(&mut self, reason: &str) -> Ended {
        Ended::Done(self.summary(reason))
    }

    /// Sends the held-back text and returns the job's summary line (for the core to send).
    fn summary(&mut self, reason: &str) -> JobEvent {
        if !self.held.is_empty() || !self.partial.is_empty() {
            let mut text = std::mem::take(&mut self.held);
            text.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.partial)));
            if reason != "stop" {
                let _ = self.job.events.send(JobEvent::Text(text));
            }
        }
        JobEvent::Done {
            finish_reason: reason.to_string(),
            prompt_tokens: self.prompt.len() as u32,
            cached_tokens: self.cached,
            completion_tokens: self.generated,
            prompt_ms: self.prompt_ms,
            generation_ms: self
                .decode_started
                .map(|t| t.elapsed().as_millis() as u64)
                .unwrap_or(0),
            peak_batch: self.peak_batch,
        }
    }
}
