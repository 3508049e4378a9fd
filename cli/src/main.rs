//! `halo`: the command-line client for `halod`. It only speaks gRPC to the daemon.
//!
//! Output rules: results go to stdout (tables for people, `--json` for scripts), everything else to
//! stderr; a closed stdout (`halo ps | head -1`) is not an error. Exit codes: 0 success, 1 the
//! daemon cannot be reached, 2 bad command line, 3 the daemon refused the request, 4 the daemon
//! does not implement it yet, 5 a stream was cut before its summary (the daemon stopped or died:
//! the output is incomplete), 130 Ctrl-C cancelled the job (after printing its summary).
#![forbid(unsafe_code)]

mod output;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use halo_proto::v1 as pb;
use halo_proto::{Addr, HaloClient};
use output::{fmt_bytes, fmt_secs, Out, Table};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Talk to halod, halo's local inference daemon.
#[derive(Parser)]
#[command(name = "halo", version)]
struct Cli {
    /// Daemon address: unix:PATH or http://HOST:PORT [default: the local socket]
    #[arg(long, global = true, env = halo_proto::ADDR_ENV)]
    addr: Option<Addr>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Args, Clone, Copy)]
struct JsonFlag {
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Verb {
    /// Daemon, GPU device and memory budget
    Status(JsonFlag),
    /// Models in the config, loaded or not
    Models(JsonFlag),
    /// Models in memory now
    Ps(JsonFlag),
    /// Load a model into memory
    Load {
        model: String,
        /// Never evict it (until `halo unpin`)
        #[arg(long)]
        pin: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Unload a model from memory
    Unload { model: String },
    /// Keep a loaded model in memory: never evicted, never expires
    Pin { model: String },
    /// Let a pinned model be evicted and expire again
    Unpin { model: String },
    /// Queued, running and recently finished jobs
    Jobs(JsonFlag),
    /// Cancel a queued or running job
    Cancel { job: u64 },
    /// Make halod re-read its config file
    Reload(JsonFlag),
    /// Generate text from a prompt, streaming it as it comes
    Generate(GenerateArgs),
    /// Chat with a model in the terminal (the history stays in this process)
    Chat(ChatArgs),
    /// Prompt-processing and generation speed of a model, against the memory-bandwidth roofline
    Bench(BenchArgs),
    /// Show how a model tokenizes text
    Tokenize {
        /// The model, by its name in the config (`halo models` lists them)
        model: String,
        /// The text; `-` reads it from standard input
        text: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Generate an image
    Image(ImageArgs),
}

/// Sampling options shared by `generate` and `chat` (unset: llama.cpp's defaults). Numbers may
/// be negative (`--temperature -1`): the daemon checks the ranges and says what is allowed.
#[derive(Args, Clone)]
struct SamplingArgs {
    /// Stop after this many generated tokens [default: at end of generation or a full context]
    #[arg(long, value_name = "N")]
    max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 100; 0 is greedy (always the most likely token) [default: 0.8]
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Sample among the K most likely tokens only; 0 keeps them all [default: 40]
    #[arg(long, value_name = "K")]
    top_k: Option<u32>,
    /// Sample among the fewest tokens whose probabilities add up to P, 0 to 1 [default: 0.95]
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one, 0 to 1 [default: 0.05]
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    min_p: Option<f32>,
    /// Same seed, same output [default: a new one each time]
    #[arg(long)]
    seed: Option<u64>,
    /// Divide positive (multiply negative) logits of the last 64 tokens by this; 1 is off [default: 1]
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    repeat_penalty: Option<f32>,
    /// Subtract this times a token's count in the last 64 tokens [default: 0]
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    frequency_penalty: Option<f32>,
    /// Subtract this from tokens present in the last 64 tokens [default: 0]
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    presence_penalty: Option<f32>,
}

impl SamplingArgs {
    /// A request with these options filled in.
    fn request(&self, model: &str) -> pb::GenerateRequest {
        pb::GenerateRequest {
            model: model.to_string(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
            repeat_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// The model, by its name in the config (`halo models` lists them)
    model: String,
    /// The prompt; `-` (or no prompt, with standard input not a terminal) reads it from
    /// standard input, for prompts too long for the command line
    prompt: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop when this text is generated (repeatable)
    #[arg(long)]
    stop: Vec<String>,
    /// Render the prompt as one user message with the model's chat template
    #[arg(long)]
    chat: bool,
    /// Give the prompt as token ids: 1,2,3
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    tokens: Option<Vec<u32>>,
    /// Report this many top alternatives per token
    #[arg(long, default_value_t = 0)]
    logprobs: u32,
    /// One JSON object per token, then a final summary line
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    /// The model, by its name in the config (`halo models` lists them)
    model: String,
    /// A system message to start the conversation with
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// The model, by its name in the config (`halo models` lists them)
    model: String,
    /// Prompt tokens for the prompt-processing test (pp), at least 1
    #[arg(short = 'p', long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    prompt: u32,
    /// Generated tokens for the generation test (tg), at least 2
    #[arg(short = 'n', long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(2..))]
    gen: u32,
    /// Runs of each test; the best is reported
    #[arg(short = 'r', long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    repetitions: u32,
    /// Image models: the job's width in pixels, a multiple of 8
    #[arg(long, default_value_t = 512)]
    width: u32,
    /// Image models: the job's height in pixels, a multiple of 8
    #[arg(long, default_value_t = 512)]
    height: u32,
    /// Image models: denoising steps of the timed job
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    steps: u32,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ImageArgs {
    /// The model, by its name in the config (`halo models` lists them)
    model: String,
    /// What to draw
    prompt: String,
    /// What to keep out of the image [default: nothing]
    #[arg(long)]
    negative: Option<String>,
    /// Width in pixels, a multiple of 8 [default: the model's, else 1024]
    #[arg(long)]
    width: Option<u32>,
    /// Height in pixels, a multiple of 8 [default: the model's, else 1024]
    #[arg(long)]
    height: Option<u32>,
    /// Denoising steps [default: the model's, else 30]
    #[arg(long)]
    steps: Option<u32>,
    /// Classifier-free guidance scale; 1 or less turns guidance off [default: the model's, else 5]
    #[arg(long, allow_negative_numbers = true)]
    cfg: Option<f32>,
    /// euler, euler_a or dpmpp_2m [default: the model's, else euler]
    #[arg(long)]
    sampler: Option<String>,
    /// normal or karras [default: the model's, else normal]
    #[arg(long)]
    scheduler: Option<String>,
    /// Same seed, same image [default: a new one each time, printed]
    #[arg(long)]
    seed: Option<u64>,
    /// The starting noise's generator: torch-cpu matches torch.randn on a CPU generator
    #[arg(long, default_value = "torch-cpu")]
    rng: String,
    /// Images made together; the files are out.png, out-1.png, …
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Decode in tiles of PX pixels [default: whole, or tiled when that would not fit]
    #[arg(long, value_name = "PX")]
    vae_tile: Option<u32>,
    /// Rewrite a cheap latent preview PNG here every few steps
    #[arg(long, value_name = "FILE")]
    preview: Option<std::path::PathBuf>,
    /// Steps between previews
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    preview_every: u32,
    /// Where to write the PNG [default: halo-JOB.png]
    #[arg(long, short = 'o')]
    output: Option<std::path::PathBuf>,
    /// Progress and the summary as JSON lines on stdout
    #[arg(long)]
    json: bool,
}

const EXIT_UNREACHABLE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_REFUSED: u8 = 3;
const EXIT_UNIMPLEMENTED: u8 = 4;
const EXIT_CUT: u8 = 5;
/// As shells report a command ended by SIGINT.
const EXIT_INTERRUPTED: u8 = 130;

/// Why the command failed, and so which exit code.
enum Failure {
    Unreachable(String),
    Refused(tonic::Status),
    Local(String),
    /// A bad command line that clap cannot see (exit 2).
    Usage(String),
    /// A stream ended before its summary: the output is incomplete (exit 5).
    Cut(String),
    /// Ctrl-C: the job was cancelled and its summary shown (exit 130).
    Interrupted,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Refused(s)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Local(e.to_string())
    }
}

type Result<T, E = Failure> = std::result::Result<T, E>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("halo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = Out::stdout();
    match runtime.block_on(run(cli, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Unreachable(m)) => {
            eprintln!("halo: {m}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
        Err(Failure::Refused(s)) => {
            let code = if s.code() == tonic::Code::Unimplemented {
                EXIT_UNIMPLEMENTED
            } else {
                EXIT_REFUSED
            };
            let model_file = s
                .metadata()
                .get(halo_proto::ERROR_REASON_KEY)
                .is_some_and(|v| v == "model-file");
            let label = if model_file {
                "unusable model file"
            } else {
                code_name(s.code())
            };
            eprintln!("halo: {label}: {}", s.message());
            ExitCode::from(code)
        }
        Err(Failure::Usage(m)) => {
            eprintln!("halo: {m}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Cut(m)) => {
            eprintln!("halo: {m}");
            ExitCode::from(EXIT_CUT)
        }
        Err(Failure::Interrupted) => ExitCode::from(EXIT_INTERRUPTED),
        Err(Failure::Local(m)) if m.contains("Broken pipe") => ExitCode::SUCCESS,
        Err(Failure::Local(m)) => {
            eprintln!("halo: {m}");
            ExitCode::FAILURE
        }
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        NotFound => "not found",
        InvalidArgument => "invalid argument",
        ResourceExhausted => "out of room",
        FailedPrecondition => "cannot do that now",
        Unimplemented => "not implemented",
        Unavailable => "unavailable",
        Cancelled => "cancelled",
        DeadlineExceeded => "timed out",
        PermissionDenied => "permission denied",
        _ => "error",
    }
}

/// Connects to the daemon at `addr`, or at the first default socket that exists.
async fn connect(addr: Option<Addr>) -> Result<HaloClient<Channel>> {
    let addr = addr.unwrap_or_else(|| {
        let candidates = halo_proto::socket_candidates();
        let found = candidates.iter().find(|p| p.exists()).cloned();
        Addr::Unix(found.unwrap_or_else(|| candidates[0].clone()))
    });
    halo_proto::connect(&addr).await.map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.to_string());
        Failure::Unreachable(format!(
            "cannot reach halod at {addr}: {cause}; is it running? (start it with `halod` or `systemctl start halod`, or point --addr / $HALO_ADDR at it)"
        ))
    })
}

async fn run(cli: Cli, out: &mut Out) -> Result<()> {
    let mut c = connect(cli.addr).await?;
    match cli.verb {
        Verb::Status(j) => status(&mut c, j.json, out).await,
        Verb::Models(j) => models(&mut c, j.json, out).await,
        Verb::Ps(j) => ps(&mut c, j.json, out).await,
        Verb::Load { model, pin, json } => {
            let r = c
                .load(pb::LoadRequest {
                    model: model.clone(),
                    pin,
                })
                .await?
                .into_inner();
            let m = r.model.unwrap_or_default();
            if json.json {
                out.json(&json!({
                    "model": resident_json(&m),
                    "evicted": r.evicted,
                    "load_ms": r.load_ms,
                }))
            } else {
                for e in &r.evicted {
                    eprintln!("evicted {e}");
                }
                out.line(&format!(
                    "loaded {} ({}{}) in {:.1} s",
                    m.name,
                    fmt_bytes(m.bytes),
                    if m.pinned { ", pinned" } else { "" },
                    r.load_ms as f64 / 1000.0
                ))
            }
        }
        Verb::Unload { model } => {
            let r = c
                .unload(pb::UnloadRequest {
                    model: model.clone(),
                })
                .await?
                .into_inner();
            out.line(&format!(
                "unloaded {model} (freed {})",
                fmt_bytes(r.freed_bytes)
            ))
        }
        Verb::Pin { model } => {
            c.pin(pb::PinRequest {
                model: model.clone(),
            })
            .await?;
            out.line(&format!("pinned {model}"))
        }
        Verb::Unpin { model } => {
            c.unpin(pb::UnpinRequest {
                model: model.clone(),
            })
            .await?;
            out.line(&format!("unpinned {model}"))
        }
        Verb::Jobs(j) => jobs(&mut c, j.json, out).await,
        Verb::Cancel { job } => {
            let r = c
                .cancel_job(pb::CancelJobRequest { job_id: job })
                .await?
                .into_inner();
            out.line(&format!("job {job}: {}", r.state))
        }
        Verb::Reload(j) => {
            let r = c
                .reload_config(pb::ReloadConfigRequest {})
                .await?
                .into_inner();
            if j.json {
                out.json(&json!({
                    "config_path": r.config_path,
                    "models": r.models,
                    "budget_bytes": r.budget_bytes,
                    "unloaded": r.unloaded,
                }))
            } else {
                out.line(&format!(
                    "reloaded {}: {} models, budget {}{}",
                    r.config_path,
                    r.models,
                    fmt_bytes(r.budget_bytes),
                    if r.unloaded.is_empty() {
                        String::new()
                    } else {
                        format!(", unloaded {}", r.unloaded.join(", "))
                    }
                ))
            }
        }
        Verb::Generate(a) => generate(&mut c, a, out).await,
        Verb::Tokenize { model, text, json } => {
            let text = if text == "-" {
                read_stdin().await?
            } else {
                text
            };
            let r = c
                .tokenize(pb::TokenizeRequest { model, text })
                .await?
                .into_inner();
            if json.json {
                out.json(&json!({ "tokens": r.tokens }))
            } else {
                let ids: Vec<String> = r.tokens.iter().map(u32::to_string).collect();
                out.line(&ids.join(" "))
            }
        }
        Verb::Image(a) => image(&mut c, a, out).await,
        Verb::Chat(a) => chat(&mut c, a, out).await,
        Verb::Bench(a) => bench(&mut c, a, out).await,
    }
}

/// Runs one generate request to its end and returns its final summary.
async fn run_to_end(
    c: &mut HaloClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<pb::GenerateDone> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut done = None;
    while let Some(ev) = stream.next().await {
        if let Some(pb::generate_event::Event::Done(d)) =
            ev.map_err(|s| stream_failure(s, true))?.event
        {
            done = Some(d);
        }
    }
    match done {
        Some(d) if d.finish_reason == "shutdown" => {
            Err(Failure::Cut("halod shut down during the benchmark".into()))
        }
        Some(d) => Ok(d),
        None => Err(Failure::Cut("the stream ended without a summary".into())),
    }
}

/// Like llama-bench's pp/tg: a prompt of `-p` tokens processed at once, then `-n` tokens generated
/// one by one (end-of-generation ignored), best of `-r` runs; generation also as a share of the
/// roofline (device bandwidth / weight bytes read per token).
async fn bench(c: &mut HaloClient<Channel>, a: BenchArgs, out: &mut Out) -> Result<()> {
    let models = c.list_models(pb::ListModelsRequest {}).await?.into_inner();
    let kind = models
        .models
        .iter()
        .find(|m| m.name == a.model)
        .map(|m| m.kind.clone());
    if matches!(kind.as_deref(), Some("sdxl" | "flux")) {
        return bench_image(c, a, out).await;
    }
    let roof = c
        .roofline(pb::RooflineRequest {
            model: a.model.clone(),
        })
        .await?
        .into_inner();
    // Token ids spread over the vocabulary; the content does not matter.
    let vocab = u64::from(roof.vocab_size.max(1));
    let ids: Vec<u32> = (0..u64::from(a.prompt))
        .map(|i| ((i * 7919) % vocab) as u32)
        .collect();
    let base = pb::GenerateRequest {
        model: a.model.clone(),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    };
    let mut pp = 0f64;
    let mut tg = 0f64;
    for _ in 0..a.repetitions.max(1) {
        let d = run_to_end(
            c,
            pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::Tokens(pb::TokenList {
                    ids: ids.clone(),
                })),
                max_tokens: Some(1),
                ..base.clone()
            },
        )
        .await?;
        pp = pp.max(a.prompt as f64 / (d.prompt_ms.max(1) as f64 / 1000.0));
        let d = run_to_end(
            c,
            pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::Tokens(pb::TokenList {
                    ids: vec![ids[0]],
                })),
                max_tokens: Some(a.gen),
                ..base.clone()
            },
        )
        .await?;
        // The first token comes from the prompt pass; the rest each cost one decode step.
        let steps = d.completion_tokens.saturating_sub(1).max(1) as f64;
        tg = tg.max(steps / (d.generation_ms.max(1) as f64 / 1000.0));
    }
    let roofline = roof.bandwidth_bytes_per_s / roof.weight_bytes_per_token.max(1) as f64;
    if a.json {
        return out.json(&json!({
            "model": a.model, "device": roof.device,
            "pp": a.prompt, "pp_tokens_per_s": pp,
            "tg": a.gen, "tg_tokens_per_s": tg,
            "weight_bytes_per_token": roof.weight_bytes_per_token,
            "bandwidth_bytes_per_s": roof.bandwidth_bytes_per_s,
            "tg_roofline_tokens_per_s": roofline,
            "tg_percent_of_roofline": 100.0 * tg / roofline,
        }));
    }
    let mut t = Table::new(&["MODEL", "TEST", "TOKENS/S", "ROOFLINE", "% ROOFLINE"]);
    t.row(vec![
        a.model.clone(),
        format!("pp{}", a.prompt),
        format!("{pp:.1}"),
        String::new(),
        String::new(),
    ]);
    t.row(vec![
        a.model.clone(),
        format!("tg{}", a.gen),
        format!("{tg:.2}"),
        format!("{roofline:.1}"),
        format!("{:.1}%", 100.0 * tg / roofline),
    ]);
    out.table(&t)?;
    eprintln!(
        "device {}: {:.1} GB/s measured; {} of weights read per generated token",
        roof.device,
        roof.bandwidth_bytes_per_s / 1e9,
        fmt_bytes(roof.weight_bytes_per_token)
    );
    Ok(())
}

/// An image model: one job of `--steps` steps at `--width` × `--height` timed phase by phase
/// (text encoding, seconds per step, VAE decode; best of `-r` runs), then the conv2d and
/// attention kernels' GFLOP/s at the model's shapes beside the f16 matmul's, measured in the
/// same run, and the working memory jobs at this size and at 1024² reserve.
async fn bench_image(c: &mut HaloClient<Channel>, a: BenchArgs, out: &mut Out) -> Result<()> {
    for (what, v) in [("--width", a.width), ("--height", a.height)] {
        if v % 8 != 0 {
            return Err(Failure::Usage(format!("{what} {v} is not a multiple of 8")));
        }
    }
    let (mut encode, mut step, mut decode) = (u64::MAX, f64::MAX, u64::MAX);
    let mut job_bytes = (0, 0);
    for _ in 0..a.repetitions.max(1) {
        let req = pb::GenerateImageRequest {
            model: a.model.clone(),
            prompt: "a lighthouse on a rocky coast at dusk, oil painting".into(),
            width: a.width,
            height: a.height,
            steps: a.steps,
            seed: Some(0),
            batch: 1,
            ..Default::default()
        };
        let mut stream = c.generate_image(req).await?.into_inner();
        let done = loop {
            match stream.next().await {
                Some(ev) => {
                    if let Some(pb::image_event::Event::Done(d)) = ev?.event {
                        break d;
                    }
                }
                None => return Err(Failure::Cut("the stream ended without a summary".into())),
            }
        };
        if done.finish_reason != "done" {
            return Err(Failure::Cut(format!(
                "the benchmark job ended ({})",
                done.finish_reason
            )));
        }
        encode = encode.min(done.encode_ms);
        step = step.min(done.denoise_ms as f64 / 1000.0 / done.steps.max(1) as f64);
        decode = decode.min(done.decode_ms);
        job_bytes = (done.estimated_bytes, done.peak_bytes);
    }
    let k = c
        .image_kernels(pb::ImageKernelsRequest {
            model: a.model.clone(),
            width: a.width,
            height: a.height,
        })
        .await?
        .into_inner();
    let gflops = |f: &pb::KernelFigure| f.flops / f.seconds.max(1e-12) / 1e9;
    let matmul = k
        .kernels
        .iter()
        .find(|f| f.kernel.starts_with("matmul"))
        .map(gflops)
        .unwrap_or(0.0);
    if a.json {
        return out.json(&json!({
            "model": a.model, "device": k.device,
            "width": a.width, "height": a.height, "steps": a.steps,
            "text_encode_ms": encode, "s_per_step": step, "vae_decode_ms": decode,
            "job_estimated_bytes": job_bytes.0, "job_peak_bytes": job_bytes.1,
            "weight_bytes": k.weight_bytes,
            "estimates": k.estimates.iter().map(|e| json!({
                "width": e.width, "height": e.height, "bytes": e.bytes,
            })).collect::<Vec<_>>(),
            "kernels": k.kernels.iter().map(|f| json!({
                "kernel": f.kernel, "shape": f.shape, "ms": f.seconds * 1000.0,
                "gflop_per_s": gflops(f), "vs_matmul": gflops(f) / matmul.max(1e-12),
            })).collect::<Vec<_>>(),
        }));
    }
    let mut t = Table::new(&["MODEL", "TEST", "TIME"]);
    let size = format!("{}x{}", a.width, a.height);
    t.row(vec![
        a.model.clone(),
        "text encode".into(),
        format!("{encode} ms"),
    ]);
    t.row(vec![
        a.model.clone(),
        format!("step {size}"),
        format!("{step:.2} s/step"),
    ]);
    t.row(vec![
        a.model.clone(),
        format!("vae decode {size}"),
        format!("{decode} ms"),
    ]);
    out.table(&t)?;
    println!();
    let mut t = Table::new(&["KERNEL", "SHAPE", "MS", "GFLOP/S", "VS MATMUL"]);
    for f in &k.kernels {
        t.row(vec![
            f.kernel.clone(),
            f.shape.clone(),
            format!("{:.2}", f.seconds * 1000.0),
            format!("{:.1}", gflops(f)),
            format!("{:.2}x", gflops(f) / matmul.max(1e-12)),
        ]);
    }
    out.table(&t)?;
    eprintln!(
        "device {}; weights {}; the timed job reserved {} and peaked at {}",
        k.device,
        fmt_bytes(k.weight_bytes),
        fmt_bytes(job_bytes.0),
        fmt_bytes(job_bytes.1)
    );
    for e in &k.estimates {
        eprintln!(
            "a {}x{} job (one image, guidance) reserves {}",
            e.width,
            e.height,
            fmt_bytes(e.bytes)
        );
    }
    Ok(())
}

/// Reads a line from stdin on the blocking pool; `None` at end of input.
async fn read_line() -> Result<Option<String>> {
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line)),
            Err(e) => Err(Failure::Local(format!("cannot read stdin: {e}"))),
        }
    })
    .await
    .map_err(|e| Failure::Local(e.to_string()))?
}

/// An interactive conversation: each line you type is a user message; the reply streams back.
/// `/clear` forgets the conversation, `/bye` or end of input leaves.
async fn chat(c: &mut HaloClient<Channel>, a: ChatArgs, out: &mut Out) -> Result<()> {
    use std::io::IsTerminal;
    let interactive = std::io::stdin().is_terminal();
    let mut history: Vec<pb::ChatMessage> = Vec::new();
    let system = a.system.clone().map(|content| pb::ChatMessage {
        role: "system".into(),
        content,
    });
    if interactive {
        eprintln!("chatting with {} (/clear forgets, /bye leaves)", a.model);
    }
    loop {
        if interactive {
            eprint!(">>> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = read_line().await? else {
            break;
        };
        let line = line.trim_end_matches(['\n', '\r']).to_string();
        match line.trim() {
            "" => continue,
            "/bye" | "/exit" => break,
            "/clear" => {
                history.clear();
                continue;
            }
            _ => {}
        }
        history.push(pb::ChatMessage {
            role: "user".into(),
            content: line,
        });
        let req = pb::GenerateRequest {
            messages: system.iter().chain(&history).cloned().collect(),
            ..a.sampling.request(&a.model)
        };
        let mut stream = c.generate(req).await?.into_inner();
        let mut reply = String::new();
        let mut started = false;
        let mut finished = false;
        while let Some(ev) = stream.next().await {
            match ev.map_err(|s| stream_failure(s, started))?.event {
                Some(pb::generate_event::Event::Started(_)) => started = true,
                Some(pb::generate_event::Event::Token(t)) => {
                    out.text(&t.text)?;
                    reply.push_str(&t.text);
                }
                Some(pb::generate_event::Event::Done(d)) => {
                    out.text(&d.trailing_text)?;
                    reply.push_str(&d.trailing_text);
                    finished = d.finish_reason != "shutdown";
                }
                None => {}
            }
        }
        if !finished {
            out.line("")?;
            return Err(Failure::Cut(
                "the reply was cut off (halod stopped or the connection broke)".into(),
            ));
        }
        out.line("")?;
        history.push(pb::ChatMessage {
            role: "assistant".into(),
            content: reply.trim().to_string(),
        });
    }
    Ok(())
}

fn device_json(d: &pb::Device) -> Value {
    json!({
        "index": d.index,
        "name": d.name,
        "type": d.device_type,
        "driver": d.driver,
        "driver_info": d.driver_info,
        "api_version": d.api_version,
        "vendor_id": d.vendor_id,
        "device_id": d.device_id,
        "heaps": d.heaps.iter().map(|h| json!({
            "size": h.size, "device_local": h.device_local,
            "budget": (h.budget > 0).then_some(h.budget), "usage": (h.budget > 0).then_some(h.usage),
        })).collect::<Vec<_>>(),
        "max_allocation_bytes": d.max_allocation_bytes,
        "max_storage_buffer_range": d.max_storage_buffer_range,
        "shared_memory_bytes": d.shared_memory_bytes,
        "subgroup_size": d.subgroup_size,
        "external_memory_host": d.external_memory_host,
        "host_pointer_alignment": (d.host_pointer_alignment > 0).then_some(d.host_pointer_alignment),
        "memory_budget_ext": d.memory_budget_ext,
    })
}

async fn status(c: &mut HaloClient<Channel>, json: bool, out: &mut Out) -> Result<()> {
    let s = c.status(pb::StatusRequest {}).await?.into_inner();
    let b = s.budget.clone().unwrap_or_default();
    let nz = |v: u64| (v > 0).then_some(v);
    if json {
        return out.json(&json!({
            "version": s.version,
            "uptime_s": s.uptime_ms / 1000,
            "config_path": (!s.config_path.is_empty()).then_some(&s.config_path),
            "listen": s.listen,
            "device": s.device.as_ref().map(device_json),
            "device_error": (!s.device_error.is_empty()).then_some(&s.device_error),
            "devices": s.devices.iter().map(device_json).collect::<Vec<_>>(),
            "budget_bytes": s.budget_bytes,
            "used_bytes": s.used_bytes,
            "free_bytes": s.budget_bytes.saturating_sub(s.used_bytes),
            "budget": {
                "mode": b.mode,
                "configured_bytes": nz(b.configured_bytes),
                "reserve_bytes": b.reserve_bytes,
                "vulkan_visible_bytes": nz(b.vulkan_visible_bytes),
                "sysfs_vram_bytes": nz(b.sysfs_vram_bytes),
                "sysfs_gtt_bytes": nz(b.sysfs_gtt_bytes),
                "physical_ram_bytes": b.physical_ram_bytes,
                "gpu_visible_bytes": b.gpu_visible_bytes,
                "cap_bytes": b.cap_bytes,
                "explanation": b.explanation,
            },
            "gpu_allocated_bytes": s.gpu_allocated_bytes,
            "runtime_error": (!s.runtime_error.is_empty()).then_some(&s.runtime_error),
            "resident_models": s.resident_models,
            "active_jobs": s.active_jobs,
        }));
    }
    let mut t = Table::new(&["", ""]).headerless();
    t.row(vec![
        "halod".into(),
        format!("{} (up {})", s.version, fmt_secs(s.uptime_ms / 1000)),
    ]);
    t.row(vec!["listening".into(), s.listen.join(", ")]);
    t.row(vec![
        "config".into(),
        if s.config_path.is_empty() {
            "built-in defaults".into()
        } else {
            s.config_path.clone()
        },
    ]);
    match &s.device {
        Some(d) => {
            t.row(vec![
                "device".into(),
                format!(
                    "{} ({}, {} {}, Vulkan {})",
                    d.name, d.device_type, d.driver, d.driver_info, d.api_version
                ),
            ]);
            t.row(vec![
                "limits".into(),
                format!(
                    "max alloc {}, storage range {}, shared mem {} KiB, subgroup {}{}",
                    fmt_bytes(d.max_allocation_bytes),
                    fmt_bytes(d.max_storage_buffer_range),
                    d.shared_memory_bytes / 1024,
                    d.subgroup_size,
                    if d.external_memory_host {
                        ", host import"
                    } else {
                        ""
                    }
                ),
            ]);
        }
        None => t.row(vec!["device".into(), format!("none: {}", s.device_error)]),
    }
    if !s.runtime_error.is_empty() && s.device.is_some() {
        t.row(vec![
            "runtime".into(),
            format!("unavailable: {}", s.runtime_error),
        ]);
    }
    t.row(vec![
        "memory".into(),
        format!(
            "{} used of {} budget ({} free)",
            fmt_bytes(s.used_bytes),
            fmt_bytes(s.budget_bytes),
            fmt_bytes(s.budget_bytes.saturating_sub(s.used_bytes))
        ),
    ]);
    t.row(vec![
        "gpu memory".into(),
        format!(
            "{} held by the device, {} charged to the budget",
            fmt_bytes(s.gpu_allocated_bytes),
            fmt_bytes(s.used_bytes)
        ),
    ]);
    t.row(vec!["budget".into(), b.explanation.clone()]);
    let mut src = vec![format!("RAM {}", fmt_bytes(b.physical_ram_bytes))];
    if b.vulkan_visible_bytes > 0 {
        src.push(format!(
            "Vulkan heaps {}",
            fmt_bytes(b.vulkan_visible_bytes)
        ));
    }
    if b.sysfs_vram_bytes > 0 || b.sysfs_gtt_bytes > 0 {
        src.push(format!(
            "sysfs VRAM {} + GTT {}",
            fmt_bytes(b.sysfs_vram_bytes),
            fmt_bytes(b.sysfs_gtt_bytes)
        ));
    }
    t.row(vec!["sources".into(), src.join(", ")]);
    t.row(vec![
        "models".into(),
        format!(
            "{} resident, {} active jobs",
            s.resident_models, s.active_jobs
        ),
    ]);
    out.table(&t)
}

async fn models(c: &mut HaloClient<Channel>, json: bool, out: &mut Out) -> Result<()> {
    let r = c.list_models(pb::ListModelsRequest {}).await?.into_inner();
    if json {
        let v: Vec<Value> = r
            .models
            .iter()
            .map(|m| {
                json!({
                    "name": m.name, "kind": m.kind, "path": m.path,
                    "estimated_bytes": m.estimated_bytes, "state": m.state, "pinned": m.pinned,
                    "context": (m.context > 0).then_some(m.context),
                    "keep_alive": m.keep_alive,
                    "error": (!m.error.is_empty()).then_some(&m.error),
                    "note": (!m.note.is_empty()).then_some(&m.note),
                })
            })
            .collect();
        return out.json(&Value::Array(v));
    }
    let mut t = Table::new(&[
        "NAME",
        "KIND",
        "SIZE",
        "STATE",
        "PINNED",
        "KEEP ALIVE",
        "PATH",
    ]);
    for m in &r.models {
        t.row(vec![
            m.name.clone(),
            m.kind.clone(),
            if m.state == "missing" {
                "-".into()
            } else {
                fmt_bytes(m.estimated_bytes)
            },
            m.state.clone(),
            if m.pinned { "yes" } else { "" }.into(),
            m.keep_alive.clone(),
            m.path.clone(),
        ]);
    }
    out.table(&t)?;
    for m in r.models.iter().filter(|m| !m.note.is_empty()) {
        eprintln!("{}: {}", m.name, m.note);
    }
    for m in r.models.iter().filter(|m| !m.error.is_empty()) {
        eprintln!("{}: {}", m.name, m.error);
    }
    Ok(())
}

fn resident_json(m: &pb::ResidentModel) -> Value {
    json!({
        "name": m.name, "kind": m.kind, "bytes": m.bytes, "pinned": m.pinned, "state": m.state,
        "last_used": output::rfc3339_ms(m.last_used_unix_ms),
        "last_used_unix_ms": m.last_used_unix_ms,
        "idle_s": m.idle_ms / 1000,
        "expires_in_s": m.expires_in_s,
        "running_jobs": m.running_jobs,
    })
}

async fn ps(c: &mut HaloClient<Channel>, json: bool, out: &mut Out) -> Result<()> {
    let r = c
        .list_resident(pb::ListResidentRequest {})
        .await?
        .into_inner();
    if json {
        return out.json(&Value::Array(r.models.iter().map(resident_json).collect()));
    }
    let mut t = Table::new(&[
        "NAME", "KIND", "SIZE", "STATE", "PINNED", "JOBS", "IDLE", "UNTIL",
    ]);
    for m in &r.models {
        t.row(vec![
            m.name.clone(),
            m.kind.clone(),
            fmt_bytes(m.bytes),
            m.state.clone(),
            if m.pinned { "yes" } else { "" }.into(),
            m.running_jobs.to_string(),
            fmt_secs(m.idle_ms / 1000),
            match m.expires_in_s {
                Some(s) => format!("{} from now", fmt_secs(s)),
                None if m.pinned => "pinned".into(),
                None if m.running_jobs > 0 => "busy".into(),
                None => "forever".into(),
            },
        ]);
    }
    out.table(&t)
}

async fn jobs(c: &mut HaloClient<Channel>, json: bool, out: &mut Out) -> Result<()> {
    let r = c.list_jobs(pb::ListJobsRequest {}).await?.into_inner();
    if json {
        let v: Vec<Value> = r
            .jobs
            .iter()
            .map(|j| {
                json!({
                    "id": j.id, "model": j.model, "kind": j.kind, "state": j.state,
                    "age_s": j.age_ms / 1000, "queue_position": j.queue_position,
                    "error": (!j.error.is_empty()).then_some(&j.error),
                })
            })
            .collect();
        return out.json(&Value::Array(v));
    }
    let mut t = Table::new(&["ID", "MODEL", "KIND", "STATE", "AGE", "DETAIL"]);
    for j in &r.jobs {
        t.row(vec![
            j.id.to_string(),
            j.model.clone(),
            j.kind.clone(),
            j.state.clone(),
            fmt_secs(j.age_ms / 1000),
            match j.queue_position {
                Some(p) => format!("position {p} in queue"),
                None => j.error.clone(),
            },
        ]);
    }
    out.table(&t)
}

async fn generate(c: &mut HaloClient<Channel>, a: GenerateArgs, out: &mut Out) -> Result<()> {
    use std::io::IsTerminal;
    let prompt = match (a.tokens, a.prompt) {
        (Some(ids), _) => pb::generate_request::Prompt::Tokens(pb::TokenList { ids }),
        (None, Some(text)) if text == "-" => {
            pb::generate_request::Prompt::Text(read_stdin().await?)
        }
        (None, Some(text)) => pb::generate_request::Prompt::Text(text),
        (None, None) if !std::io::stdin().is_terminal() => {
            pb::generate_request::Prompt::Text(read_stdin().await?)
        }
        (None, None) => {
            return Err(Failure::Usage(
                "give a prompt, `-` to read it from standard input, or --tokens".into(),
            ))
        }
    };
    let req = pb::GenerateRequest {
        prompt: Some(prompt),
        chat: a.chat,
        stop: a.stop,
        logprobs: a.logprobs,
        ..a.sampling.request(&a.model)
    };
    let mut stream = c.generate(req).await?.into_inner();
    let mut job = None;
    let mut interrupted = false;
    let mut finish = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = &mut ctrl_c, if !interrupted => {
                // Ctrl-C cancels the job; the daemon then ends the stream with its summary.
                interrupted = true;
                let Some(id) = job else { return Err(Failure::Interrupted) };
                let _ = c.cancel_job(pb::CancelJobRequest { job_id: id }).await;
                eprintln!("\ncancelling job {id}");
                continue;
            }
            _ = tokio::time::sleep(SUMMARY_WAIT), if interrupted => {
                return Err(Failure::Cut("no summary came within 10 s of cancelling".into()));
            }
        };
        let Some(ev) = next else { break };
        match ev.map_err(|s| stream_failure(s, job.is_some()))?.event {
            Some(pb::generate_event::Event::Started(s)) => job = Some(s.job_id),
            Some(pb::generate_event::Event::Token(t)) => {
                if a.json {
                    out.json_line(&json!({
                        "token": t.token, "text": t.text, "logprob": t.logprob,
                        "top_logprobs": t.top_logprobs.iter()
                            .map(|l| json!({"token": l.token, "logprob": l.logprob}))
                            .collect::<Vec<_>>(),
                    }))?;
                } else {
                    out.text(&t.text)?;
                }
            }
            Some(pb::generate_event::Event::Done(d)) => {
                if a.json {
                    out.json_line(&json!({
                        "done": true, "finish_reason": d.finish_reason,
                        "prompt_tokens": d.prompt_tokens, "cached_tokens": d.cached_tokens,
                        "completion_tokens": d.completion_tokens,
                        "prompt_ms": d.prompt_ms, "generation_ms": d.generation_ms,
                        "peak_batch": d.peak_batch,
                    }))?;
                } else {
                    out.text(&d.trailing_text)?;
                    out.line("")?;
                    if d.finish_reason == "cancelled" {
                        eprintln!("(cancelled)");
                    }
                }
                finish = Some(d.finish_reason);
            }
            None => {}
        }
    }
    match finish.as_deref() {
        None => Err(Failure::Cut(
            "the stream ended without a summary; the output above is incomplete".into(),
        )),
        Some("shutdown") => Err(Failure::Cut(
            "halod shut down before the job finished; the output above is incomplete".into(),
        )),
        Some(_) if interrupted => Err(Failure::Interrupted),
        Some(_) => Ok(()),
    }
}

/// How long a cancelled stream may take to bring its summary.
const SUMMARY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// An error in the middle of a stream: the daemon's own (it says so in the metadata) is a
/// refusal; anything else after the job started means the connection broke.
fn stream_failure(s: tonic::Status, started: bool) -> Failure {
    if started && s.metadata().get(halo_proto::ERROR_REASON_KEY).is_none() {
        Failure::Cut(format!(
            "the stream was cut ({}); the output above is incomplete",
            s.message()
        ))
    } else {
        Failure::Refused(s)
    }
}

/// All of standard input as text.
async fn read_stdin() -> Result<String> {
    tokio::task::spawn_blocking(|| {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map(|_| text)
            .map_err(|e| Failure::Local(format!("cannot read standard input: {e}")))
    })
    .await
    .map_err(|e| Failure::Local(e.to_string()))?
}

/// The file for image `index` of a batch: `out.png`, then `out-1.png`, `out-2.png`, ….
fn batch_path(base: &std::path::Path, index: u32) -> std::path::PathBuf {
    if index == 0 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match base.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    base.with_file_name(name)
}

/// Writes `bytes` to `path` through a temporary file beside it, so a reader never sees half a
/// file.
fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.part",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Failure::Local(format!("cannot write {}: {e}", path.display())))
}

/// `step 3/30 [######··········] 1.25 s/it, ETA 34 s`
fn progress_line(step: u32, total: u32, elapsed_ms: u64) -> String {
    const WIDTH: u32 = 24;
    let filled = (step * WIDTH).checked_div(total).unwrap_or(0).min(WIDTH);
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    let per = elapsed_ms as f64 / 1000.0 / step.max(1) as f64;
    let eta = per * total.saturating_sub(step) as f64;
    let rate = if per >= 1.0 || per == 0.0 {
        format!("{per:.2} s/it")
    } else {
        format!("{:.2} it/s", 1.0 / per)
    };
    format!("step {step}/{total} [{bar}] {rate}, ETA {}", fmt_eta(eta))
}

fn fmt_eta(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.0} s")
    } else {
        format!("{}m{:02.0}s", (s / 60.0) as u64, s % 60.0)
    }
}

async fn image(c: &mut HaloClient<Channel>, a: ImageArgs, out: &mut Out) -> Result<()> {
    use std::io::IsTerminal;
    for (what, v) in [("--width", a.width), ("--height", a.height)] {
        if let Some(v) = v {
            if v % 8 != 0 {
                return Err(Failure::Usage(format!("{what} {v} is not a multiple of 8")));
            }
        }
    }
    let req = pb::GenerateImageRequest {
        model: a.model,
        prompt: a.prompt,
        negative_prompt: a.negative.unwrap_or_default(),
        width: a.width.unwrap_or(0),
        height: a.height.unwrap_or(0),
        steps: a.steps.unwrap_or(0),
        cfg_scale: a.cfg,
        seed: a.seed,
        sampler: a.sampler.unwrap_or_default(),
        scheduler: a.scheduler.unwrap_or_default(),
        rng: a.rng,
        batch: a.batch,
        vae_tile: a.vae_tile.unwrap_or(0),
        preview_every: if a.preview.is_some() {
            a.preview_every
        } else {
            0
        },
    };
    let mut stream = c.generate_image(req).await?.into_inner();
    let tty = std::io::stderr().is_terminal();
    let mut job = None;
    let mut interrupted = false;
    let mut paths: Vec<std::path::PathBuf> = Vec::new();
    let mut drew = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let done = loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                let Some(id) = job else { return Err(Failure::Interrupted) };
                let _ = c.cancel_job(pb::CancelJobRequest { job_id: id }).await;
                eprintln!("\ncancelling job {id}");
                continue;
            }
            _ = tokio::time::sleep(SUMMARY_WAIT), if interrupted => {
                return Err(Failure::Cut("no summary came within 10 s of cancelling".into()));
            }
        };
        let Some(ev) = next else {
            return Err(Failure::Cut(
                "the stream ended without a summary; the image was not made".into(),
            ));
        };
        match ev.map_err(|s| stream_failure(s, job.is_some()))?.event {
            Some(pb::image_event::Event::Started(s)) => job = Some(s.job_id),
            Some(pb::image_event::Event::Progress(p)) => {
                if let (Some(path), false) = (&a.preview, p.preview_png.is_empty()) {
                    write_file(path, &p.preview_png)?;
                }
                if a.json {
                    out.json_line(&json!({
                        "step": p.step, "total": p.total_steps, "elapsed_ms": p.elapsed_ms,
                    }))?;
                } else if tty {
                    eprint!("\r{}", progress_line(p.step, p.total_steps, p.elapsed_ms));
                    let _ = std::io::stderr().flush();
                    drew = true;
                } else {
                    eprintln!("{}", progress_line(p.step, p.total_steps, p.elapsed_ms));
                }
            }
            Some(pb::image_event::Event::Image(img)) => {
                let base = a
                    .output
                    .clone()
                    .unwrap_or_else(|| format!("halo-{}.png", job.unwrap_or(0)).into());
                let path = batch_path(&base, img.index);
                write_file(&path, &img.png)?;
                paths.push(path);
            }
            Some(pb::image_event::Event::Done(d)) => break d,
            None => {}
        }
    };
    if drew {
        eprintln!();
    }
    match done.finish_reason.as_str() {
        "done" => {}
        _ if interrupted => return Err(Failure::Interrupted),
        "shutdown" => {
            return Err(Failure::Cut(
                "halod shut down before the image was done; nothing was written".into(),
            ))
        }
        why => {
            return Err(Failure::Cut(format!(
                "the job ended ({why}) before the image was done; nothing was written"
            )))
        }
    }
    if a.json {
        return out.json_line(&json!({
            "done": true,
            "seed": done.seed,
            "paths": paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "width": done.width,
            "height": done.height,
            "steps": done.steps,
            "estimated_bytes": done.estimated_bytes,
            "peak_bytes": done.peak_bytes,
            "encode_ms": done.encode_ms,
            "denoise_ms": done.denoise_ms,
            "decode_ms": done.decode_ms,
            "vae_tile": done.vae_tile,
        }));
    }
    for p in &paths {
        out.line(&format!(
            "{} ({}x{}, seed {})",
            p.display(),
            done.width,
            done.height,
            done.seed
        ))?;
    }
    let tile = if done.vae_tile > 0 {
        format!(", {} px VAE tiles", done.vae_tile)
    } else {
        String::new()
    };
    eprintln!(
        "{} steps in {:.1} s ({:.2} s/it); encode {:.2} s, decode {:.2} s{tile}; working memory {} (estimated {})",
        done.steps,
        done.denoise_ms as f64 / 1000.0,
        done.denoise_ms as f64 / 1000.0 / done.steps.max(1) as f64,
        done.encode_ms as f64 / 1000.0,
        done.decode_ms as f64 / 1000.0,
        fmt_bytes(done.peak_bytes),
        fmt_bytes(done.estimated_bytes),
    );
    Ok(())
}
