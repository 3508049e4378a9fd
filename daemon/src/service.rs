//! The gRPC edge: validate each request, hand a command to the core driver, and turn the outcome
//! into protobuf or a `tonic::Status` with a message a person can act on.
//!
//! Architecture invariant: handlers hold no model or job state of their own and never touch the
//! device; prost types go no deeper than this module.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use halo_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::core::{CoreError, CoreHandle, DeviceFacts, JobEvent, JobRow, ModelRow, ResidentRow};
use crate::scheduler::{JobId, JobKind};

/// The `halo.v1.Halo` service.
#[derive(Clone)]
pub struct HaloService {
    core: CoreHandle,
    facts: Arc<DeviceFacts>,
    listen: Arc<Vec<String>>,
    config_path: Option<PathBuf>,
}

impl HaloService {
    /// Loads `model` if it is not resident (as a generate request would).
    async fn ensure_loaded(&self, model: &str) -> Result<(), Status> {
        let model = model.to_string();
        self.core
            .call(|reply| crate::core::Command::Load {
                model,
                pin: false,
                reply,
            })
            .await?;
        Ok(())
    }

    pub fn new(
        core: CoreHandle,
        facts: Arc<DeviceFacts>,
        listen: Vec<String>,
        config_path: Option<PathBuf>,
    ) -> Self {
        HaloService {
            core,
            facts,
            listen: Arc::new(listen),
            config_path,
        }
    }
}

impl From<CoreError> for Status {
    fn from(e: CoreError) -> Status {
        let mut status = match e {
            CoreError::NotFound(m) => Status::not_found(m),
            CoreError::InvalidArgument(m) => Status::invalid_argument(m),
            CoreError::ResourceExhausted(m) => Status::resource_exhausted(m),
            CoreError::FailedPrecondition(m) => Status::failed_precondition(m),
            CoreError::Unimplemented(m) => Status::unimplemented(m),
            CoreError::Unavailable(m) => Status::unavailable(m),
            CoreError::ModelFile(m) => {
                let mut s = Status::failed_precondition(m);
                s.metadata_mut().insert(
                    REASON_KEY,
                    tonic::metadata::MetadataValue::from_static("model-file"),
                );
                s
            }
        };
        // Every status halod itself answers says so; a client seeing one without it knows the
        // connection failed instead (the daemon died or the network cut the stream).
        if status.metadata().get(REASON_KEY).is_none() {
            status.metadata_mut().insert(
                REASON_KEY,
                tonic::metadata::MetadataValue::from_static("halod"),
            );
        }
        status
    }
}

use halo_proto::ERROR_REASON_KEY as REASON_KEY;

fn model_name(name: &str) -> Result<String, Status> {
    let name = name.trim();
    if name.is_empty() {
        return Err(Status::invalid_argument(
            "no model given; `halo models` lists the configured models",
        ));
    }
    Ok(name.to_string())
}

fn device_pb(d: &halo_kernels::DeviceInfo) -> pb::Device {
    pb::Device {
        index: d.index as u32,
        name: d.name.clone(),
        device_type: d.device_type.as_str().to_string(),
        driver: d.driver_name.clone(),
        driver_info: d.driver_info.clone(),
        api_version: d.api_version.clone(),
        vendor_id: d.vendor_id,
        device_id: d.device_id,
        heaps: d
            .heaps
            .iter()
            .map(|h| pb::MemoryHeap {
                size: h.size,
                device_local: h.device_local,
                budget: h.budget.unwrap_or(0),
                usage: h.usage.unwrap_or(0),
            })
            .collect(),
        max_allocation_bytes: d.limits.max_memory_allocation_size,
        max_storage_buffer_range: d.limits.max_storage_buffer_range,
        shared_memory_bytes: d.limits.max_compute_shared_memory_size,
        subgroup_size: d.limits.subgroup_size,
        external_memory_host: d.external_memory_host,
        host_pointer_alignment: d.limits.min_imported_host_pointer_alignment.unwrap_or(0),
        memory_budget_ext: d.memory_budget_ext,
    }
}

fn resident_pb(r: ResidentRow) -> pb::ResidentModel {
    pb::ResidentModel {
        name: r.name,
        kind: r.kind.as_str().to_string(),
        bytes: r.bytes,
        pinned: r.pinned,
        idle_ms: r.idle.as_millis() as u64,
        last_used_unix_ms: r.last_used_unix_ms,
        expires_in_s: r.expires_in.map(|d| d.as_secs()),
        running_jobs: r.running_jobs,
        state: if r.loading { "loading" } else { "resident" }.to_string(),
    }
}

fn model_pb(m: ModelRow) -> pb::Model {
    pb::Model {
        name: m.config.name,
        kind: m.config.kind.as_str().to_string(),
        path: m.config.path.to_string_lossy().into_owned(),
        estimated_bytes: m.estimated_bytes,
        state: m.state.to_string(),
        pinned: m.pinned,
        context: m.config.context.unwrap_or(0),
        error: m.error.unwrap_or_default(),
        keep_alive: crate::config::format_keep_alive(m.config.keep_alive),
        note: m.note.unwrap_or_default(),
    }
}

fn job_pb(j: JobRow) -> pb::Job {
    pb::Job {
        id: j.id.0,
        model: j.model,
        kind: match j.kind {
            JobKind::Generate => "generate",
            JobKind::Image => "image",
        }
        .to_string(),
        state: j.state.as_str().to_string(),
        age_ms: j.age.as_millis() as u64,
        error: j.error.unwrap_or_default(),
        queue_position: j.queue_position.map(|p| p as u32),
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What one job event becomes on the wire: maybe an item, and whether the stream ends.
type Mapped<T> = (Option<Result<T, Status>>, bool);

/// Turns a job's events into a response stream: first `started`, then each event mapped by
/// `map`. When the client goes away the job's receiver is dropped, which the executor notices
/// within one step and cancels the job.
fn job_stream<T: Send + 'static>(
    id: JobId,
    mut events: mpsc::UnboundedReceiver<JobEvent>,
    started: impl Fn(pb::JobStarted) -> T + Send + 'static,
    mut map: impl FnMut(JobEvent) -> Mapped<T> + Send + 'static,
) -> EventStream<T> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        if tx
            .send(Ok(started(pb::JobStarted { job_id: id.0 })))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => return,
            };
            let Some(ev) = ev else { return };
            let (item, end) = map(ev);
            if let Some(item) = item {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The sampling settings of a request: llama.cpp's defaults where the request says nothing, and
/// a fresh seed unless one is given.
fn sampler_config(req: &pb::GenerateRequest) -> crate::sampler::SamplerConfig {
    let d = crate::sampler::SamplerConfig::default();
    let seed = req.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.as_nanos() as u64)
            .unwrap_or(0)
    });
    crate::sampler::SamplerConfig {
        temperature: req.temperature.unwrap_or(d.temperature),
        top_k: req.top_k.map(|k| k as usize).unwrap_or(d.top_k),
        top_p: req.top_p.unwrap_or(d.top_p),
        min_p: req.min_p.unwrap_or(d.min_p),
        repeat_penalty: req.repeat_penalty.unwrap_or(d.repeat_penalty),
        frequency_penalty: req.frequency_penalty.unwrap_or(d.frequency_penalty),
        presence_penalty: req.presence_penalty.unwrap_or(d.presence_penalty),
        penalty_last_n: d.penalty_last_n,
        seed,
    }
}

#[tonic::async_trait]
impl pb::halo_server::Halo for HaloService {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        use crate::config::BudgetSetting;
        let s = self.core.ask(crate::core::Command::Status).await?;
        let b = &s.budget;
        let (devices, device_error) = match &self.facts.discovery {
            Ok(d) => (d.devices.iter().map(device_pb).collect(), String::new()),
            Err(e) => (Vec::new(), e.clone()),
        };
        Ok(Response::new(pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: s.uptime.as_millis() as u64,
            config_path: self
                .config_path
                .as_ref()
                .or(s.config_path.as_ref())
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            listen: self.listen.to_vec(),
            device: self.facts.device().map(device_pb),
            device_error,
            devices,
            budget_bytes: b.budget,
            used_bytes: s.used_bytes,
            budget: Some(pb::Budget {
                mode: match b.setting {
                    BudgetSetting::Auto => "auto",
                    BudgetSetting::Fixed(_) => "fixed",
                }
                .to_string(),
                configured_bytes: match b.setting {
                    BudgetSetting::Auto => 0,
                    BudgetSetting::Fixed(n) => n,
                },
                reserve_bytes: b.reserve,
                vulkan_visible_bytes: b.sources.vulkan_visible.unwrap_or(0),
                sysfs_vram_bytes: b.sources.sysfs_vram.unwrap_or(0),
                sysfs_gtt_bytes: b.sources.sysfs_gtt.unwrap_or(0),
                physical_ram_bytes: b.sources.physical_ram,
                gpu_visible_bytes: b.gpu_visible,
                cap_bytes: crate::config::AUTO_BUDGET_CAP,
                explanation: b.explanation.clone(),
            }),
            gpu_allocated_bytes: self
                .facts
                .runtime
                .as_ref()
                .map(|d| d.ledger().device_memory)
                .unwrap_or(0),
            runtime_error: self
                .facts
                .runtime
                .as_ref()
                .err()
                .cloned()
                .unwrap_or_default(),
            resident_models: s.resident_models as u32,
            active_jobs: s.active_jobs as u32,
        }))
    }

    async fn list_models(
        &self,
        _req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let rows = self.core.ask(crate::core::Command::Models).await?;
        Ok(Response::new(pb::ListModelsResponse {
            models: rows.into_iter().map(model_pb).collect(),
        }))
    }

    async fn list_resident(
        &self,
        _req: Request<pb::ListResidentRequest>,
    ) -> Result<Response<pb::ListResidentResponse>, Status> {
        let rows = self.core.ask(crate::core::Command::Resident).await?;
        Ok(Response::new(pb::ListResidentResponse {
            models: rows.into_iter().map(resident_pb).collect(),
        }))
    }

    async fn load(
        &self,
        req: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        let req = req.into_inner();
        let model = model_name(&req.model)?;
        let done = self
            .core
            .call(|reply| crate::core::Command::Load {
                model,
                pin: req.pin,
                reply,
            })
            .await?;
        Ok(Response::new(pb::LoadResponse {
            model: Some(resident_pb(done.model)),
            evicted: done.evicted,
            load_ms: done.load_time.as_millis() as u64,
        }))
    }

    async fn unload(
        &self,
        req: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        let model = model_name(&req.into_inner().model)?;
        let freed = self
            .core
            .call(|reply| crate::core::Command::Unload { model, reply })
            .await?;
        Ok(Response::new(pb::UnloadResponse { freed_bytes: freed }))
    }

    async fn pin(&self, req: Request<pb::PinRequest>) -> Result<Response<pb::PinResponse>, Status> {
        let model = model_name(&req.into_inner().model)?;
        self.core
            .call(|reply| crate::core::Command::Pin { model, reply })
            .await?;
        Ok(Response::new(pb::PinResponse {}))
    }

    async fn unpin(
        &self,
        req: Request<pb::UnpinRequest>,
    ) -> Result<Response<pb::UnpinResponse>, Status> {
        let model = model_name(&req.into_inner().model)?;
        self.core
            .call(|reply| crate::core::Command::Unpin { model, reply })
            .await?;
        Ok(Response::new(pb::UnpinResponse {}))
    }

    type GenerateStream = EventStream<pb::GenerateEvent>;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = req.into_inner();
        crate::heap::note(request_text_bytes(&req));
        let model = model_name(&req.model)?;
        match &req.prompt {
            Some(_) if !req.messages.is_empty() => {
                return Err(Status::invalid_argument(
                    "the request has both a prompt and chat messages; give one of them \
                     (messages replace the prompt)",
                ))
            }
            None if !req.messages.is_empty() => {}
            None => {
                return Err(Status::invalid_argument(
                    "no prompt: give text, token ids or chat messages",
                ))
            }
            Some(pb::generate_request::Prompt::Tokens(t)) if t.ids.is_empty() => {
                return Err(Status::invalid_argument("the token list is empty"))
            }
            _ => {}
        }
        for m in &req.messages {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(Status::invalid_argument(format!(
                    "unknown chat role {:?}: use system, user or assistant",
                    m.role
                )));
            }
        }
        check_range("temperature", req.temperature, 0.0, 100.0)?;
        check_range("top_p", req.top_p, 0.0, 1.0)?;
        check_range("min_p", req.min_p, 0.0, 1.0)?;
        check_range("repeat_penalty", req.repeat_penalty, 0.0, 10.0)?;
        check_range("frequency_penalty", req.frequency_penalty, -10.0, 10.0)?;
        check_range("presence_penalty", req.presence_penalty, -10.0, 10.0)?;
        if req.max_tokens == Some(0) {
            return Err(Status::invalid_argument("max_tokens must be at least 1"));
        }
        let params = crate::executor::GenerateParams {
            prompt: match req.prompt.clone() {
                Some(pb::generate_request::Prompt::Text(t)) => crate::executor::Prompt::Text(t),
                Some(pb::generate_request::Prompt::Tokens(t)) => {
                    crate::executor::Prompt::Tokens(t.ids)
                }
                None => crate::executor::Prompt::Chat(
                    req.messages
                        .iter()
                        .map(|m| crate::llm::chat::Message::new(m.role.clone(), m.content.clone()))
                        .collect(),
                ),
            },
            chat: req.chat,
            max_tokens: req.max_tokens,
            sampler: sampler_config(&req),
            stop: req.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            logprobs: req.logprobs.min(20),
            ignore_eos: req.ignore_eos,
        };
        let (id, events) = self
            .core
            .call(|reply| crate::core::Command::Submit {
                model,
                kind: JobKind::Generate,
                params: Some(params),
                image: None,
                reply,
            })
            .await?;
        let mut trailing = String::new();
        let token = |e| pb::GenerateEvent { event: Some(e) };
        Ok(Response::new(job_stream(
            id,
            events,
            |s| pb::GenerateEvent {
                event: Some(pb::generate_event::Event::Started(s)),
            },
            move |ev| match ev {
                JobEvent::Token(t) => (
                    Some(Ok(token(pb::generate_event::Event::Token(pb::Token {
                        token: t.token,
                        text: t.text,
                        logprob: t.logprob,
                        top_logprobs: t
                            .top_logprobs
                            .into_iter()
                            .map(|(token, logprob)| pb::TokenLogprob { token, logprob })
                            .collect(),
                    })))),
                    false,
                ),
                JobEvent::Text(t) => {
                    trailing.push_str(&t);
                    (None, false)
                }
                JobEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    prompt_ms,
                    generation_ms,
                    peak_batch,
                } => (
                    Some(Ok(token(pb::generate_event::Event::Done(
                        pb::GenerateDone {
                            finish_reason,
                            prompt_tokens,
                            completion_tokens,
                            prompt_ms,
                            generation_ms,
                            trailing_text: std::mem::take(&mut trailing),
                            cached_tokens,
                            peak_batch,
                        },
                    )))),
                    true,
                ),
                JobEvent::Failed(e) => (Some(Err(Status::from(e))), true),
                JobEvent::Cancelled(why) => (
                    Some(Ok(token(pb::generate_event::Event::Done(
                        pb::GenerateDone {
                            finish_reason: why.as_str().into(),
                            ..Default::default()
                        },
                    )))),
                    true,
                ),
                JobEvent::ImageProgress { .. } | JobEvent::Image(_) | JobEvent::ImageDone(_) => {
                    (None, false)
                }
            },
        )))
    }

    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = req.into_inner();
        crate::heap::note(req.text.len());
        let model = model_name(&req.model)?;
        let rows = self.core.ask(crate::core::Command::Models).await?;
        let row = rows
            .iter()
            .find(|m| m.config.name == model)
            .ok_or_else(|| {
                Status::from(crate::core::CoreError::NotFound(format!(
                    "unknown model {model:?}; `halo models` lists the models in the config"
                )))
            })?;
        if row.config.kind != crate::config::ModelKind::Llm {
            return Err(Status::invalid_argument(format!(
                "model {model:?} is a {} model; only llm models have a tokenizer",
                row.config.kind.as_str()
            )));
        }
        // Like a generate request, tokenizing loads the model if it is not resident.
        self.ensure_loaded(&model).await?;
        let engine = self
            .core
            .call(|reply| crate::core::Command::Engine { model, reply })
            .await?;
        let text = req.text;
        let tokens =
            tokio::task::spawn_blocking(move || engine.tokenizer.encode(&text, true, true))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::invalid_argument(format!("cannot tokenize: {e}")))?;
        Ok(Response::new(pb::TokenizeResponse { tokens }))
    }

    type GenerateImageStream = EventStream<pb::ImageEvent>;

    async fn generate_image(
        &self,
        req: Request<pb::GenerateImageRequest>,
    ) -> Result<Response<Self::GenerateImageStream>, Status> {
        let req = req.into_inner();
        crate::heap::note(req.prompt.len() + req.negative_prompt.len());
        let model = model_name(&req.model)?;
        let rows = self.core.ask(crate::core::Command::Models).await?;
        let defaults = rows
            .iter()
            .find(|m| m.config.name == model)
            .map(|m| m.config.image.clone())
            .unwrap_or_default();
        let params = image_params(&req, &defaults)?;
        let seed = params.request.seed;
        let (id, events) = self
            .core
            .call(|reply| crate::core::Command::Submit {
                model,
                kind: JobKind::Image,
                params: None,
                image: Some(Box::new(params)),
                reply,
            })
            .await?;
        let ev = |e| pb::ImageEvent { event: Some(e) };
        Ok(Response::new(job_stream(
            id,
            events,
            |s| pb::ImageEvent {
                event: Some(pb::image_event::Event::Started(s)),
            },
            move |e| match e {
                JobEvent::ImageProgress {
                    step,
                    total,
                    elapsed_ms,
                    preview,
                } => (
                    Some(Ok(ev(pb::image_event::Event::Progress(
                        pb::ImageProgress {
                            step,
                            total_steps: total,
                            elapsed_ms,
                            preview_png: preview.unwrap_or_default(),
                        },
                    )))),
                    false,
                ),
                JobEvent::Image(img) => (
                    Some(Ok(ev(pb::image_event::Event::Image(pb::Image {
                        png: img.png,
                        width: img.width,
                        height: img.height,
                        seed,
                        index: img.index,
                    })))),
                    false,
                ),
                JobEvent::ImageDone(d) => (Some(Ok(ev(image_done(d)))), true),
                JobEvent::Failed(e) => (Some(Err(Status::from(e))), true),
                // Stopped before it ran: a summary that says so.
                JobEvent::Cancelled(why) => (
                    Some(Ok(ev(pb::image_event::Event::Done(pb::ImageDone {
                        finish_reason: why.as_str().into(),
                        ..Default::default()
                    })))),
                    true,
                ),
                JobEvent::Token(_) | JobEvent::Text(_) | JobEvent::Done { .. } => (None, false),
            },
        )))
    }

    async fn list_jobs(
        &self,
        _req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let rows = self.core.ask(crate::core::Command::Jobs).await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: rows.into_iter().map(job_pb).collect(),
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let id = req.into_inner().job_id;
        if id == 0 {
            return Err(Status::invalid_argument("job ids start at 1"));
        }
        let state = self
            .core
            .call(|reply| crate::core::Command::Cancel {
                job: JobId(id),
                reply,
            })
            .await?;
        Ok(Response::new(pb::CancelJobResponse {
            state: state.as_str().to_string(),
        }))
    }

    async fn roofline(
        &self,
        req: Request<pb::RooflineRequest>,
    ) -> Result<Response<pb::RooflineResponse>, Status> {
        let model = model_name(&req.into_inner().model)?;
        self.ensure_loaded(&model).await?;
        let (bytes, rx, device, vocab) = self
            .core
            .call(|reply| crate::core::Command::Roofline { model, reply })
            .await?;
        let bw = rx
            .await
            .map_err(|_| Status::unavailable("halod is shutting down"))?
            .map_err(|e| Status::failed_precondition(format!("measuring bandwidth: {e}")))?;
        Ok(Response::new(pb::RooflineResponse {
            weight_bytes_per_token: bytes,
            bandwidth_bytes_per_s: bw,
            device,
            vocab_size: u32::try_from(vocab).unwrap_or(u32::MAX),
        }))
    }

    async fn image_kernels(
        &self,
        req: Request<pb::ImageKernelsRequest>,
    ) -> Result<Response<pb::ImageKernelsResponse>, Status> {
        let req = req.into_inner();
        let model = model_name(&req.model)?;
        let (width, height) = (req.width as usize, req.height as usize);
        image_side("width", req.width)?;
        image_side("height", req.height)?;
        self.ensure_loaded(&model).await?;
        let (rx, device, estimates, weight_bytes) = self
            .core
            .call(|reply| crate::core::Command::ImageKernels {
                model,
                width,
                height,
                reply,
            })
            .await?;
        let figures = rx
            .await
            .map_err(|_| Status::unavailable("halod is shutting down"))?
            .map_err(|e| Status::failed_precondition(format!("measuring the kernels: {e}")))?;
        Ok(Response::new(pb::ImageKernelsResponse {
            device,
            kernels: figures
                .into_iter()
                .map(|f| pb::KernelFigure {
                    kernel: f.kernel.into(),
                    shape: f.shape,
                    flops: f.flops,
                    seconds: f.seconds,
                })
                .collect(),
            estimates: estimates
                .into_iter()
                .map(|(w, h, bytes)| pb::JobEstimate {
                    width: w as u32,
                    height: h as u32,
                    bytes,
                })
                .collect(),
            weight_bytes,
        }))
    }

    async fn reload_config(
        &self,
        _req: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigResponse>, Status> {
        let done = reload(&self.core, self.config_path.as_deref()).await?;
        Ok(Response::new(pb::ReloadConfigResponse {
            config_path: self
                .config_path
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            models: done.models as u32,
            budget_bytes: done.budget_bytes,
            unloaded: done.unloaded,
        }))
    }
}

/// Re-reads the config file and hands it to the core; a bad file changes nothing. Shared by the
/// `ReloadConfig` RPC and SIGHUP.
pub async fn reload(
    core: &CoreHandle,
    path: Option<&std::path::Path>,
) -> Result<crate::core::ReloadDone, CoreError> {
    let path = path.ok_or_else(|| {
        CoreError::FailedPrecondition(
            "halod runs on built-in defaults; there is no config file to reload".into(),
        )
    })?;
    let p = path.to_path_buf();
    let config = tokio::task::spawn_blocking(move || Config::load(&p))
        .await
        .map_err(|e| CoreError::Unavailable(format!("reload failed: {e}")))?
        .map_err(|e| {
            CoreError::InvalidArgument(format!("config rejected, the old one stays in force: {e}"))
        })?;
    core.call(|reply| crate::core::Command::Reload {
        config: Box::new(config),
        reply,
    })
    .await
}

/// The text a Generate request carries: its prompt or its chat messages.
fn request_text_bytes(req: &pb::GenerateRequest) -> usize {
    let prompt = match &req.prompt {
        Some(pb::generate_request::Prompt::Text(t)) => t.len(),
        Some(pb::generate_request::Prompt::Tokens(t)) => t.ids.len() * 4,
        None => 0,
    };
    prompt + req.messages.iter().map(|m| m.content.len()).sum::<usize>()
}

fn image_done(d: crate::core::ImageSummary) -> pb::image_event::Event {
    pb::image_event::Event::Done(pb::ImageDone {
        finish_reason: d.finish_reason,
        seed: d.seed,
        width: d.width,
        height: d.height,
        images: d.images,
        steps: d.steps,
        estimated_bytes: d.estimated_bytes,
        peak_bytes: d.peak_bytes,
        encode_ms: d.encode_ms,
        denoise_ms: d.denoise_ms,
        decode_ms: d.decode_ms,
        vae_tile: d.vae_tile,
    })
}

/// halo's defaults for what neither the request nor the model's config sets.
const IMAGE_SIDE: u32 = 1024;
const IMAGE_STEPS: u32 = 30;
const IMAGE_CFG: f32 = 5.0;
const MAX_IMAGE_STEPS: u32 = 1000;
const MAX_IMAGE_BATCH: u32 = 16;

/// An image request checked and completed: the request's values, else the model's configured
/// defaults, else halo's.
/// An image side as jobs and `halo bench` take it: a multiple of 8 from 64 to 4096 pixels.
fn image_side(what: &str, v: u32) -> Result<usize, Status> {
    if !v.is_multiple_of(8) || !(64..=4096).contains(&v) {
        return Err(Status::invalid_argument(format!(
            "{what} {v} must be a multiple of 8 between 64 and 4096"
        )));
    }
    Ok(v as usize)
}

fn image_params(
    req: &pb::GenerateImageRequest,
    defaults: &crate::config::ImageDefaults,
) -> Result<crate::diffusion::job::ImageParams, Status> {
    use crate::diffusion::sampler::{SamplerKind, Schedule};
    if req.prompt.trim().is_empty() {
        return Err(Status::invalid_argument("the prompt is empty"));
    }
    let side = |what: &str, v: u32, default: Option<u32>| -> Result<usize, Status> {
        let v = if v == 0 {
            default.unwrap_or(IMAGE_SIDE)
        } else {
            v
        };
        image_side(what, v)
    };
    let width = side("width", req.width, defaults.width)?;
    let height = side("height", req.height, defaults.height)?;
    let steps = match req.steps {
        0 => defaults.steps.unwrap_or(IMAGE_STEPS),
        s => s,
    };
    if !(1..=MAX_IMAGE_STEPS).contains(&steps) {
        return Err(Status::invalid_argument(format!(
            "steps {steps} must be between 1 and {MAX_IMAGE_STEPS}"
        )));
    }
    let cfg = req.cfg_scale.or(defaults.cfg).unwrap_or(IMAGE_CFG);
    check_range("cfg_scale", Some(cfg), 0.0, 100.0)?;
    let sampler = match req.sampler.as_str() {
        "" => defaults.sampler.unwrap_or(SamplerKind::Euler),
        s => SamplerKind::parse(s).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown sampler {s:?}: use euler, euler_a or dpmpp_2m"
            ))
        })?,
    };
    let schedule = match req.scheduler.as_str() {
        "" => defaults.scheduler.unwrap_or(Schedule::Normal),
        s => Schedule::parse(s).ok_or_else(|| {
            Status::invalid_argument(format!("unknown scheduler {s:?}: use normal or karras"))
        })?,
    };
    if !matches!(req.rng.as_str(), "" | "torch-cpu") {
        return Err(Status::invalid_argument(format!(
            "unknown rng {:?}: halo draws noise as torch-cpu",
            req.rng
        )));
    }
    let batch = req.batch.max(1);
    if batch > MAX_IMAGE_BATCH {
        return Err(Status::invalid_argument(format!(
            "batch {batch} is more than {MAX_IMAGE_BATCH}"
        )));
    }
    let seed = req.seed.unwrap_or_else(random_seed);
    Ok(crate::diffusion::job::ImageParams {
        request: crate::diffusion::sdxl::SdxlRequest {
            prompt: req.prompt.clone(),
            negative: Some(req.negative_prompt.clone()).filter(|n| !n.is_empty()),
            width,
            height,
            steps,
            cfg,
            sampler,
            schedule,
            seed,
            batch: batch as usize,
        },
        vae_tile: (req.vae_tile > 0).then_some(req.vae_tile as usize),
        preview_every: req.preview_every,
    })
}

/// A seed nobody chose: the standard library's per-process random hasher keys, mixed with
/// the time.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Seeds people can type back: below 2^53, as JSON tools read numbers.
    h.finish() >> 11
}

fn check_range(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), Status> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(Status::invalid_argument(format!(
            "{name} {x} is out of range [{lo}, {hi}]"
        ))),
        _ => Ok(()),
    }
}
