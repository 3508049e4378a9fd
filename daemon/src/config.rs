//! The daemon's TOML config: parsing, validation with file/line/key in every error, and the
//! resolved [`Config`] the rest of the daemon uses.
//!
//! Architecture invariant: parsing is pure over the file's text ([`Config::parse`]); only
//! [`Config::load`] touches the filesystem, and nothing here looks at devices or models' files.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use halo_proto::Addr;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::residency::KeepAlive;

/// Where `halod` looks for its config when neither `--config` nor `$HALO_CONFIG` names one.
pub const SYSTEM_CONFIG: &str = "/etc/halo/halod.toml";
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "HALO_CONFIG";
/// The `auto` budget never exceeds this: about what a 128 GiB Strix Halo lets the GPU map.
pub const AUTO_BUDGET_CAP: u64 = 110 << 30;

/// What kind of engine a model needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Llm,
    Sdxl,
    Flux,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Llm => "llm",
            ModelKind::Sdxl => "sdxl",
            ModelKind::Flux => "flux",
        }
    }
}

/// `[memory] budget`: a fixed byte count, or `auto` (see [`crate::memory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetSetting {
    Auto,
    Fixed(u64),
}

/// One `[[models]]` entry after validation. Relative paths are resolved against the config
/// file's folder.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    pub kind: ModelKind,
    pub path: PathBuf,
    /// Context length in tokens (LLMs only); `None` means "the model's own default".
    pub context: Option<u32>,
    pub pinned: bool,
    pub keep_alive: KeepAlive,
    /// LLMs: how many requests may run at once (each gets its own KV cache, allocated at load).
    pub parallel: u32,
    /// LLMs: the KV cache's element type.
    pub kv_cache: KvCacheType,
    /// Image models: the defaults of their jobs.
    pub image: ImageDefaults,
    /// Single-file image checkpoints: a diffusers folder whose `config.json` files, scheduler
    /// and tokenizers describe the checkpoint (as diffusers' `from_single_file(config=...)`).
    /// Without one, halod infers the shapes from the tensors, takes the rest from the public
    /// SDXL base configuration, and tokenizes with its built-in CLIP vocabulary.
    pub diffusers_config: Option<PathBuf>,
}

/// What an image model's jobs use when a request leaves a value out (`None`: halo's default).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageDefaults {
    pub steps: Option<u32>,
    pub cfg: Option<f32>,
    pub sampler: Option<crate::diffusion::sampler::SamplerKind>,
    pub scheduler: Option<crate::diffusion::sampler::Schedule>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// The element type of an LLM's KV cache: f16 (the default: half the memory) or f32 (exact
/// keys and values, twice the memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvCacheType {
    #[default]
    F16,
    F32,
}

impl KvCacheType {
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheType::F16 => "f16",
            KvCacheType::F32 => "f32",
        }
    }

    /// Bytes per cached value.
    pub fn bytes(self) -> u64 {
        match self {
            KvCacheType::F16 => 2,
            KvCacheType::F32 => 4,
        }
    }
}

impl std::str::FromStr for KvCacheType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(KvCacheType::F16),
            "f32" => Ok(KvCacheType::F32),
            other => Err(format!(
                "invalid kv_cache {other:?}: use \"f16\" or \"f32\""
            )),
        }
    }
}

/// The resolved configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it came from; `None` for built-in defaults.
    pub source: Option<PathBuf>,
    /// Addresses to listen on; empty means the default unix socket.
    pub listen: Vec<Addr>,
    /// A tracing filter such as `info` or `halod=debug`; `HALO_LOG` wins over it.
    pub log: Option<String>,
    pub budget: BudgetSetting,
    pub reserve: u64,
    pub keep_alive: KeepAlive,
    pub max_queue: usize,
    /// Default for `[[models]] parallel`.
    pub parallel: u32,
    /// How weights reach the GPU: copy, import (zero-copy from the mapped file) or auto.
    pub weights: halo_kernels::LoadStrategy,
    /// The largest request a client may send, in bytes (a prompt, a text to tokenize): bigger
    /// ones are refused before any work is done on them.
    pub max_request: u64,
    /// Prompt tokens one step of an LLM job processes at most, so other jobs' steps (of any
    /// model) and cancellation get in between the chunks of a long prompt.
    pub step_tokens: u32,
    /// What one chunk of diffusion work aims to take on the device (`chunk_ms`), so chat steps
    /// get in between; and what no single submission may take (`ceiling_ms`, far below the
    /// amdgpu 10 s watchdog), logged when one does.
    pub chunk_ms: u32,
    pub ceiling_ms: u32,
    pub models: Vec<ModelConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            source: None,
            listen: Vec::new(),
            log: None,
            budget: BudgetSetting::Auto,
            reserve: DEFAULT_RESERVE,
            keep_alive: DEFAULT_KEEP_ALIVE,
            max_queue: DEFAULT_MAX_QUEUE,
            parallel: DEFAULT_PARALLEL,
            weights: halo_kernels::LoadStrategy::Auto,
            max_request: DEFAULT_MAX_REQUEST,
            step_tokens: DEFAULT_STEP_TOKENS,
            chunk_ms: DEFAULT_CHUNK_MS,
            ceiling_ms: DEFAULT_CEILING_MS,
            models: Vec::new(),
        }
    }
}

impl Config {
    /// The step policy's settings.
    pub fn step_config(&self) -> crate::scheduler::step::StepConfig {
        crate::scheduler::step::StepConfig {
            target: Duration::from_millis(self.chunk_ms as u64),
            ceiling: Duration::from_millis(self.ceiling_ms as u64),
            step_tokens: self.step_tokens as usize,
        }
    }
}

/// 4 MiB: a prompt of well over 128k tokens of text.
pub const DEFAULT_MAX_REQUEST: u64 = 4 << 20;
/// The request size limit may not go below what a status call with a few models needs.
const MIN_MAX_REQUEST: u64 = 4 << 10;
/// A forward pass takes at most this many tokens (the LLM engine's batch).
const MAX_STEP_TOKENS: u32 = crate::llm::model::MAX_BATCH as u32;
/// What one decode token costs on a big MoE is a few ms; a 64-token prompt chunk is of the same
/// order on a GPU, and its matrix products still run on full tiles.
pub const DEFAULT_STEP_TOKENS: u32 = 64;
/// A chat's decode step is ~15 ms on a big MoE: a 50 ms chunk keeps its pace within a few×.
pub const DEFAULT_CHUNK_MS: u32 = 50;
pub const DEFAULT_CEILING_MS: u32 = 200;
/// The longest ceiling accepted: well below the 10 s the amdgpu watchdog allows a submission.
const MAX_CEILING_MS: u32 = 5000;
const DEFAULT_RESERVE: u64 = 2 << 30;
const DEFAULT_KEEP_ALIVE: KeepAlive = KeepAlive::For(Duration::from_secs(300));
const DEFAULT_MAX_QUEUE: usize = 16;
const DEFAULT_PARALLEL: u32 = 2;

/// A config problem, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line; `None` when the problem is not tied to a place (an unreadable file).
    pub line: Option<usize>,
    /// Dotted key such as `memory.budget` or `models[2].path`, when known.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---- raw TOML shape -------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    memory: RawMemory,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    models: Vec<RawModel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    #[serde(default, deserialize_with = "de_listen")]
    listen: Vec<Addr>,
    log: Option<String>,
    #[serde(default, deserialize_with = "de_size_spanned")]
    max_request: Option<Spanned<u64>>,
    step_tokens: Option<Spanned<u32>>,
    chunk_ms: Option<Spanned<u32>>,
    ceiling_ms: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    #[serde(default, deserialize_with = "de_budget")]
    budget: Option<BudgetSetting>,
    #[serde(default, deserialize_with = "de_size_opt")]
    reserve: Option<u64>,
    #[serde(default, deserialize_with = "de_weights")]
    weights: Option<halo_kernels::LoadStrategy>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default, deserialize_with = "de_keep_alive_opt")]
    keep_alive: Option<KeepAlive>,
    max_queue: Option<Spanned<usize>>,
    parallel: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Spanned<String>,
    kind: ModelKind,
    path: Spanned<PathBuf>,
    context: Option<Spanned<u32>>,
    #[serde(default)]
    pinned: bool,
    #[serde(default, deserialize_with = "de_keep_alive_opt")]
    keep_alive: Option<KeepAlive>,
    parallel: Option<Spanned<u32>>,
    kv_cache: Option<Spanned<String>>,
    steps: Option<Spanned<u32>>,
    cfg: Option<Spanned<f64>>,
    sampler: Option<Spanned<String>>,
    scheduler: Option<Spanned<String>>,
    width: Option<Spanned<u32>>,
    height: Option<Spanned<u32>>,
    diffusers_config: Option<Spanned<PathBuf>>,
}

/// An entry's image-job keys, as the TOML gave them.
struct RawImage {
    steps: Option<Spanned<u32>>,
    cfg: Option<Spanned<f64>>,
    sampler: Option<Spanned<String>>,
    scheduler: Option<Spanned<String>>,
    width: Option<Spanned<u32>>,
    height: Option<Spanned<u32>>,
}

/// The job defaults of an image model's entry, each checked; set on an LLM, an error naming the
/// key.
fn image_defaults(
    m: RawImage,
    kind: ModelKind,
    i: usize,
    err_at: &dyn Fn(usize, String, String) -> ConfigError,
) -> Result<ImageDefaults, ConfigError> {
    use crate::diffusion::sampler::{SamplerKind, Schedule};
    let at = |offset: usize, key: &str, message: String| {
        err_at(offset, format!("models[{i}].{key}"), message)
    };
    let image_only = |key: &str, offset: usize| {
        at(
            offset,
            key,
            format!("{key} applies to image models (sdxl, flux) only, not llm"),
        )
    };
    let llm = kind == ModelKind::Llm;
    let mut d = ImageDefaults::default();
    if let Some(v) = &m.steps {
        if llm {
            return Err(image_only("steps", v.span().start));
        }
        if !(1..=1000).contains(v.get_ref()) {
            return Err(at(
                v.span().start,
                "steps",
                "steps must be 1 to 1000".into(),
            ));
        }
        d.steps = Some(*v.get_ref());
    }
    if let Some(v) = &m.cfg {
        if llm {
            return Err(image_only("cfg", v.span().start));
        }
        let c = *v.get_ref();
        if !(c.is_finite() && (0.0..=30.0).contains(&c)) {
            return Err(at(v.span().start, "cfg", "cfg must be 0 to 30".into()));
        }
        d.cfg = Some(c as f32);
    }
    for (key, v, slot) in [
        ("width", &m.width, &mut d.width),
        ("height", &m.height, &mut d.height),
    ] {
        if let Some(v) = v {
            if llm {
                return Err(image_only(key, v.span().start));
            }
            let px = *v.get_ref();
            if px % 8 != 0 || !(64..=4096).contains(&px) {
                return Err(at(
                    v.span().start,
                    key,
                    format!("{key} must be a multiple of 8 from 64 to 4096, not {px}"),
                ));
            }
            *slot = Some(px);
        }
    }
    if let Some(v) = &m.sampler {
        if llm {
            return Err(image_only("sampler", v.span().start));
        }
        d.sampler = Some(SamplerKind::parse(v.get_ref()).ok_or_else(|| {
            at(
                v.span().start,
                "sampler",
                format!(
                    "unknown sampler {:?}: use euler, euler_a or dpmpp_2m",
                    v.get_ref()
                ),
            )
        })?);
    }
    if let Some(v) = &m.scheduler {
        if llm {
            return Err(image_only("scheduler", v.span().start));
        }
        d.scheduler = Some(Schedule::parse(v.get_ref()).ok_or_else(|| {
            at(
                v.span().start,
                "scheduler",
                format!("unknown scheduler {:?}: use normal or karras", v.get_ref()),
            )
        })?);
    }
    Ok(d)
}

// ---- value parsers (also used by tests and by the CLI-facing code) ---------------------------

/// Parses a byte size: `"110GiB"`, `"512MiB"`, `"1.5 GB"`, `"4096"`. Binary (KiB, MiB, GiB, TiB)
/// and decimal (KB, MB, GB, TB) units; a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!(
            "invalid size {s:?}: expected a number with a unit such as \"110GiB\" or \"512MiB\""
        )
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ))
        }
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("invalid size {s:?}: too large"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a keep-alive: `"5m"`, `"30s"`, `"1h30m"`, `"0"` (unload as soon as idle), `"-1"` or
/// `"forever"` (never unload).
pub fn parse_keep_alive(s: &str) -> Result<KeepAlive, String> {
    let t = s.trim();
    if t == "-1" || t.eq_ignore_ascii_case("forever") {
        return Ok(KeepAlive::Forever);
    }
    parse_duration(t).map(KeepAlive::For).map_err(|e| {
        format!(
            "invalid keep_alive {s:?}: {e}; use e.g. \"5m\", \"90s\", \"0\" or \"-1\" (forever)"
        )
    })
}

fn parse_duration(t: &str) -> Result<Duration, String> {
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or("a number needs a unit (s, m, h, d)")?;
        if digits == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| "number too large")?;
        let too_long = || format!("{t:?} is too long a duration");
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ms" => {
                total = total
                    .checked_add(Duration::from_millis(n))
                    .ok_or_else(too_long)?;
                rest = &rest[unit_len..];
                continue;
            }
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            "d" => n.checked_mul(86400),
            u => return Err(format!("unknown unit {u:?}")),
        }
        .ok_or_else(too_long)?;
        total = total
            .checked_add(Duration::from_secs(secs))
            .ok_or_else(too_long)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Formats a keep-alive the way the config spells it.
pub fn format_keep_alive(k: KeepAlive) -> String {
    match k {
        KeepAlive::Forever => "forever".into(),
        KeepAlive::For(d) => {
            let s = d.as_secs();
            if d.subsec_millis() != 0 {
                format!("{}ms", d.as_millis())
            } else if s == 0 {
                "0".into()
            } else if s % 3600 == 0 {
                format!("{}h", s / 3600)
            } else if s % 60 == 0 {
                format!("{}m", s / 60)
            } else {
                format!("{s}s")
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrInt {
    Str(String),
    Int(i64),
}

fn de_size_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match StrOrInt::deserialize(d)? {
        StrOrInt::Str(s) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
        StrOrInt::Int(n) => u64::try_from(n)
            .map(Some)
            .map_err(|_| serde::de::Error::custom("a size cannot be negative")),
    }
}

fn de_size_spanned<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Spanned<u64>>, D::Error> {
    let v = Spanned::<StrOrInt>::deserialize(d)?;
    let span = v.span();
    let n = match v.into_inner() {
        StrOrInt::Str(s) => parse_size(&s).map_err(serde::de::Error::custom)?,
        StrOrInt::Int(n) => {
            u64::try_from(n).map_err(|_| serde::de::Error::custom("a size cannot be negative"))?
        }
    };
    Ok(Some(Spanned::new(span, n)))
}

fn de_budget<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BudgetSetting>, D::Error> {
    match StrOrInt::deserialize(d)? {
        StrOrInt::Str(s) if s.trim().eq_ignore_ascii_case("auto") => Ok(Some(BudgetSetting::Auto)),
        StrOrInt::Str(s) => parse_size(&s)
            .map(|b| Some(BudgetSetting::Fixed(b)))
            .map_err(|e| serde::de::Error::custom(format!("{e}, or \"auto\""))),
        StrOrInt::Int(n) => u64::try_from(n)
            .map(|b| Some(BudgetSetting::Fixed(b)))
            .map_err(|_| serde::de::Error::custom("a budget cannot be negative")),
    }
}

fn de_keep_alive_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<KeepAlive>, D::Error> {
    match StrOrInt::deserialize(d)? {
        StrOrInt::Str(s) => parse_keep_alive(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
        StrOrInt::Int(-1) => Ok(Some(KeepAlive::Forever)),
        StrOrInt::Int(n) if n >= 0 => Ok(Some(KeepAlive::For(Duration::from_secs(n as u64)))),
        StrOrInt::Int(n) => Err(serde::de::Error::custom(format!(
            "invalid keep_alive {n}: use seconds, a string like \"5m\", or -1 for forever"
        ))),
    }
}

fn de_weights<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<halo_kernels::LoadStrategy>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Addr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    list.iter()
        .map(|s| s.parse::<Addr>().map_err(serde::de::Error::custom))
        .collect()
}

// ---- parse + validate ------------------------------------------------------------------------

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Model paths are relative to the config's folder: anchor them at its real location.
        let canonical = std::fs::canonicalize(path);
        let path = canonical.as_deref().unwrap_or(path);
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: format!("cannot read config: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses the text of a config file; `path` names it in errors and anchors relative model
    /// paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span();
            let (line, key) = match span {
                Some(s) => locate(text, s.start),
                None => (None, None),
            };
            ConfigError {
                file: path.to_path_buf(),
                line,
                key,
                message: e.message().trim().to_string(),
            }
        })?;
        let err_at = |offset: usize, key: String, message: String| ConfigError {
            file: path.to_path_buf(),
            line: locate(text, offset).0,
            key: Some(key),
            message,
        };
        let base = path.parent().unwrap_or(Path::new("."));

        let max_request = match raw.daemon.max_request {
            Some(m) if *m.get_ref() < MIN_MAX_REQUEST => {
                return Err(err_at(
                    m.span().start,
                    "daemon.max_request".into(),
                    format!("max_request must be at least {}", size_str(MIN_MAX_REQUEST)),
                ))
            }
            Some(m) => m.into_inner(),
            None => DEFAULT_MAX_REQUEST,
        };
        let step_tokens = match raw.daemon.step_tokens {
            Some(s) if !(1..=MAX_STEP_TOKENS).contains(s.get_ref()) => {
                return Err(err_at(
                    s.span().start,
                    "daemon.step_tokens".into(),
                    format!("step_tokens must be between 1 and {MAX_STEP_TOKENS}"),
                ))
            }
            Some(s) => s.into_inner(),
            None => DEFAULT_STEP_TOKENS,
        };
        let ceiling_ms = match raw.daemon.ceiling_ms {
            Some(c) if !(1..=MAX_CEILING_MS).contains(c.get_ref()) => {
                return Err(err_at(
                    c.span().start,
                    "daemon.ceiling_ms".into(),
                    format!(
                        "ceiling_ms must be between 1 and {MAX_CEILING_MS} (the GPU watchdog \
                         resets a submission at 10 s)"
                    ),
                ))
            }
            Some(c) => c.into_inner(),
            None => DEFAULT_CEILING_MS,
        };
        let chunk_ms = match raw.daemon.chunk_ms {
            Some(c) if !(1..=ceiling_ms).contains(c.get_ref()) => {
                return Err(err_at(
                    c.span().start,
                    "daemon.chunk_ms".into(),
                    format!("chunk_ms must be between 1 and ceiling_ms ({ceiling_ms})"),
                ))
            }
            Some(c) => c.into_inner(),
            None => DEFAULT_CHUNK_MS.min(ceiling_ms),
        };

        let max_queue = match raw.defaults.max_queue {
            Some(q) if *q.get_ref() == 0 => {
                return Err(err_at(
                    q.span().start,
                    "defaults.max_queue".into(),
                    "max_queue must be at least 1".into(),
                ))
            }
            Some(q) => q.into_inner(),
            None => DEFAULT_MAX_QUEUE,
        };
        let keep_alive = raw.defaults.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE);
        let check_parallel =
            |p: Option<Spanned<u32>>, key: String| -> Result<Option<u32>, ConfigError> {
                match p {
                    Some(v) if !(1..=64).contains(v.get_ref()) => Err(err_at(
                        v.span().start,
                        key,
                        "parallel must be between 1 and 64".into(),
                    )),
                    Some(v) => Ok(Some(v.into_inner())),
                    None => Ok(None),
                }
            };
        let parallel = check_parallel(raw.defaults.parallel, "defaults.parallel".into())?
            .unwrap_or(DEFAULT_PARALLEL);

        let mut models: Vec<ModelConfig> = Vec::with_capacity(raw.models.len());
        for (i, m) in raw.models.into_iter().enumerate() {
            let name_at = m.name.span().start;
            let image = image_defaults(
                RawImage {
                    steps: m.steps,
                    cfg: m.cfg,
                    sampler: m.sampler,
                    scheduler: m.scheduler,
                    width: m.width,
                    height: m.height,
                },
                m.kind,
                i,
                &err_at,
            )?;
            let name = m.name.into_inner();
            if !valid_name(&name) {
                return Err(err_at(
                    name_at,
                    format!("models[{i}].name"),
                    format!("invalid model name {name:?}: use letters, digits, '.', '_', '-' and ':' (1-64 characters)"),
                ));
            }
            if models.iter().any(|o| o.name == name) {
                return Err(err_at(
                    name_at,
                    format!("models[{i}].name"),
                    format!("model name {name:?} is used twice; names must be unique"),
                ));
            }
            let path_at = m.path.span().start;
            let raw_path = m.path.into_inner();
            if raw_path.as_os_str().is_empty() {
                return Err(err_at(
                    path_at,
                    format!("models[{i}].path"),
                    "path is empty".into(),
                ));
            }
            // A key that only LLMs take, set on another kind.
            let llm_only = |key: &str, offset: usize| {
                err_at(
                    offset,
                    format!("models[{i}].{key}"),
                    format!("{key} applies to llm models only, not {}", m.kind.as_str()),
                )
            };
            let context = match m.context {
                Some(c) if m.kind != ModelKind::Llm => {
                    return Err(llm_only("context", c.span().start))
                }
                Some(c) if *c.get_ref() == 0 => {
                    return Err(err_at(
                        c.span().start,
                        format!("models[{i}].context"),
                        "context must be at least 1 token".into(),
                    ))
                }
                Some(c) => Some(c.into_inner()),
                None => None,
            };
            let model_parallel = check_parallel(m.parallel, format!("models[{i}].parallel"))?;
            let kv_cache = match m.kv_cache {
                Some(k) if m.kind != ModelKind::Llm => {
                    return Err(llm_only("kv_cache", k.span().start))
                }
                Some(k) => {
                    let at = k.span().start;
                    k.into_inner()
                        .parse()
                        .map_err(|e| err_at(at, format!("models[{i}].kv_cache"), e))?
                }
                None => KvCacheType::default(),
            };
            let diffusers_config = match m.diffusers_config {
                Some(d) if m.kind == ModelKind::Llm => {
                    return Err(err_at(
                        d.span().start,
                        format!("models[{i}].diffusers_config"),
                        "diffusers_config applies to image models (sdxl, flux) only, not llm"
                            .into(),
                    ))
                }
                Some(d) => Some(base.join(d.into_inner())),
                None => None,
            };
            models.push(ModelConfig {
                name,
                kind: m.kind,
                path: base.join(raw_path),
                context,
                pinned: m.pinned,
                keep_alive: m.keep_alive.unwrap_or(keep_alive),
                parallel: model_parallel.unwrap_or(parallel),
                kv_cache,
                image,
                diffusers_config,
            });
        }

        Ok(Config {
            source: Some(path.to_path_buf()),
            listen: raw.daemon.listen,
            log: raw.daemon.log,
            budget: raw.memory.budget.unwrap_or(BudgetSetting::Auto),
            reserve: raw.memory.reserve.unwrap_or(DEFAULT_RESERVE),
            keep_alive,
            max_queue,
            parallel,
            weights: raw
                .memory
                .weights
                .unwrap_or(halo_kernels::LoadStrategy::Auto),
            max_request,
            step_tokens,
            chunk_ms,
            ceiling_ms,
            models,
        })
    }

    /// Finds the config file: `explicit` (from `--config`), else `$HALO_CONFIG`, else
    /// [`SYSTEM_CONFIG`] if it exists. `None` means built-in defaults.
    pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
        if let Some(p) = explicit {
            return Some(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let system = Path::new(SYSTEM_CONFIG);
        system.exists().then(|| system.to_path_buf())
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The resolved config written back as TOML, for `halod check-config`.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        out.push_str("[daemon]\n");
        let listen: Vec<String> = if self.listen.is_empty() {
            vec![halo_proto::Addr::Unix(halo_proto::default_socket_path()).to_string()]
        } else {
            self.listen.iter().map(|a| a.to_string()).collect()
        };
        out.push_str(&format!(
            "listen = [{}]\n",
            listen.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
        ));
        if let Some(log) = &self.log {
            out.push_str(&format!("log = {}\n", q(log)));
        }
        out.push_str(&format!(
            "max_request = {}\nstep_tokens = {}\nchunk_ms = {}\nceiling_ms = {}\n",
            q(&size_str(self.max_request)),
            self.step_tokens,
            self.chunk_ms,
            self.ceiling_ms
        ));
        out.push_str("\n[memory]\n");
        match self.budget {
            BudgetSetting::Auto => out.push_str("budget = \"auto\"\n"),
            BudgetSetting::Fixed(b) => out.push_str(&format!("budget = {}\n", q(&size_str(b)))),
        }
        out.push_str(&format!("reserve = {}\n", q(&size_str(self.reserve))));
        out.push_str(&format!("weights = {}\n", q(self.weights.as_str())));
        out.push_str("\n[defaults]\n");
        out.push_str(&format!(
            "keep_alive = {}\nmax_queue = {}\nparallel = {}\n",
            q(&format_keep_alive(self.keep_alive)),
            self.max_queue,
            self.parallel
        ));
        for m in &self.models {
            out.push_str("\n[[models]]\n");
            out.push_str(&format!("name = {}\n", q(&m.name)));
            out.push_str(&format!("kind = {}\n", q(m.kind.as_str())));
            out.push_str(&format!("path = {}\n", q(&m.path.to_string_lossy())));
            if let Some(c) = m.context {
                out.push_str(&format!("context = {c}\n"));
            }
            out.push_str(&format!("pinned = {}\n", m.pinned));
            out.push_str(&format!(
                "keep_alive = {}\n",
                q(&format_keep_alive(m.keep_alive))
            ));
            if m.kind == ModelKind::Llm {
                out.push_str(&format!("parallel = {}\n", m.parallel));
                out.push_str(&format!("kv_cache = {}\n", q(m.kv_cache.as_str())));
            }
            let d = &m.image;
            for (key, v) in [("steps", d.steps), ("width", d.width), ("height", d.height)] {
                if let Some(v) = v {
                    out.push_str(&format!("{key} = {v}\n"));
                }
            }
            if let Some(c) = d.cfg {
                out.push_str(&format!("cfg = {c:?}\n"));
            }
            if let Some(s) = d.sampler {
                out.push_str(&format!("sampler = {}\n", q(s.as_str())));
            }
            if let Some(s) = d.scheduler {
                out.push_str(&format!("scheduler = {}\n", q(s.as_str())));
            }
        }
        out
    }
}

/// Exact byte count in the largest binary unit that divides it.
fn size_str(b: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if b != 0 && b.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", b >> shift);
        }
    }
    format!("{b}B")
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
}

/// Turns a byte offset into a 1-based line and, when the line is a `key = value` assignment,
/// the dotted key (section header plus key, with `[[models]]` entries numbered).
fn locate(text: &str, offset: usize) -> (Option<usize>, Option<String>) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    // The section in force at `line_no`, and for `[[array]]` sections which entry it is.
    let mut section: Option<String> = None;
    let mut entry: Option<usize> = None;
    let mut seen_entries: Vec<(String, usize)> = Vec::new();
    for line in text.lines().take(line_no) {
        let t = line.trim();
        if let Some(h) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let h = h.trim().to_string();
            let n = match seen_entries.iter_mut().find(|(name, _)| *name == h) {
                Some((_, count)) => {
                    *count += 1;
                    *count - 1
                }
                None => {
                    seen_entries.push((h.clone(), 1));
                    0
                }
            };
            section = Some(h);
            entry = Some(n);
        } else if let Some(h) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            section = Some(h.trim().to_string());
            entry = None;
        }
    }
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('[') && !k.starts_with('#'))
        .map(|k| k.trim_matches('"').to_string());
    let full = match (key, section) {
        (Some(k), Some(s)) => Some(match entry {
            Some(n) => format!("{s}[{n}].{k}"),
            None => format!("{s}.{k}"),
        }),
        (Some(k), None) => Some(k),
        (None, Some(s)) => Some(match entry {
            Some(n) => format!("{s}[{n}]"),
            None => s,
        }),
        (None, None) => None,
    };
    (Some(line_no), full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/halo/halod.toml"))
    }

    #[test]
    fn chunk_and_ceiling_times_are_checked() {
        let c = parse("").unwrap();
        assert_eq!((c.chunk_ms, c.ceiling_ms), (50, 200));
        let sc = c.step_config();
        assert_eq!(sc.target, Duration::from_millis(50));
        let c = parse("[daemon]\nchunk_ms = 20\nceiling_ms = 100\n").unwrap();
        assert_eq!((c.chunk_ms, c.ceiling_ms), (20, 100));
        let back = Config::parse(&c.to_toml(), Path::new("/x.toml")).unwrap();
        assert_eq!((back.chunk_ms, back.ceiling_ms), (20, 100));
        // A chunk longer than the ceiling, a ceiling near the watchdog, zero: refused.
        let e = parse("[daemon]\nchunk_ms = 300\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("daemon.chunk_ms"), "{e}");
        let e = parse("[daemon]\nceiling_ms = 9000\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("daemon.ceiling_ms"), "{e}");
        assert!(e.message.contains("watchdog"), "{e}");
        let e = parse("[daemon]\nchunk_ms = 0\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("daemon.chunk_ms"), "{e}");
        // A small ceiling pulls the default chunk down with it.
        assert_eq!(parse("[daemon]\nceiling_ms = 30\n").unwrap().chunk_ms, 30);
    }

    #[test]
    fn request_limits_are_checked() {
        let c = parse("[daemon]\nmax_request = \"1MiB\"\nstep_tokens = 8\n").unwrap();
        assert_eq!((c.max_request, c.step_tokens), (1 << 20, 8));
        let e = parse("[daemon]\nmax_request = 10\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("daemon.max_request"), "{e}");
        let e = parse("[daemon]\nstep_tokens = 0\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("daemon.step_tokens"))
        );
        let c = parse("").unwrap();
        assert_eq!(
            Config::parse(&c.to_toml(), Path::new("/x.toml"))
                .unwrap()
                .max_request,
            c.max_request
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.budget, BudgetSetting::Auto);
        assert_eq!(c.reserve, DEFAULT_RESERVE);
        assert_eq!(c.max_queue, DEFAULT_MAX_QUEUE);
        assert!(c.models.is_empty());
    }

    #[test]
    fn full_config_resolves() {
        let c = parse(
            r#"
[daemon]
listen = ["unix:/tmp/h.sock", ":7870"]
log = "debug"
[memory]
budget = "96GiB"
reserve = "512MiB"
[defaults]
keep_alive = "10m"
max_queue = 4
[[models]]
name = "qwen3"
kind = "llm"
path = "models/qwen3.gguf"
context = 8192
kv_cache = "f32"
[[models]]
name = "sdxl"
kind = "sdxl"
path = "/srv/sdxl"
pinned = true
keep_alive = "-1"
steps = 20
cfg = 5.5
sampler = "euler_a"
"#,
        )
        .unwrap();
        assert_eq!(
            c.listen,
            vec![
                Addr::Unix("/tmp/h.sock".into()),
                Addr::Tcp("127.0.0.1:7870".into())
            ]
        );
        assert_eq!(c.budget, BudgetSetting::Fixed(96 << 30));
        assert_eq!(c.reserve, 512 << 20);
        assert_eq!(c.max_queue, 4);
        assert_eq!(
            c.models[0].path,
            PathBuf::from("/etc/halo/models/qwen3.gguf")
        );
        assert_eq!(
            c.models[0].keep_alive,
            KeepAlive::For(Duration::from_secs(600))
        );
        assert_eq!(c.models[0].context, Some(8192));
        assert_eq!(c.models[0].kv_cache, KvCacheType::F32);
        assert_eq!(c.models[1].kv_cache, KvCacheType::F16);
        assert_eq!(c.models[1].keep_alive, KeepAlive::Forever);
        assert!(c.models[1].pinned);
        assert_eq!(
            (c.models[1].image.steps, c.models[1].image.cfg),
            (Some(20), Some(5.5))
        );
        // The printed form parses back to the same config.
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(again.models, c.models);
        assert_eq!(again.budget, c.budget);
        assert_eq!(again.keep_alive, c.keep_alive);
    }

    #[test]
    fn kv_cache_is_f16_or_f32_and_for_llms_only() {
        let llm = "[[models]]\nname = \"a\"\nkind = \"llm\"\npath = \"a.gguf\"\n";
        let e = parse(&format!("{llm}kv_cache = \"q8\"\n")).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(5), Some("models[0].kv_cache"))
        );
        assert!(e.message.contains("\"f16\" or \"f32\""), "{e}");
        let e =
            parse("[[models]]\nname = \"s\"\nkind = \"sdxl\"\npath = \"s\"\nkv_cache = \"f32\"\n")
                .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(5), Some("models[0].kv_cache"))
        );
        assert!(e.message.contains("llm models only"), "{e}");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("[memory]\nbudget = \"8GiB\"\nbudgte = 3\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key.as_deref(), Some("memory.budgte"));
        assert!(e.message.contains("unknown field"), "{e}");
        assert!(e
            .to_string()
            .starts_with("/etc/halo/halod.toml:3: memory.budgte: "));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse("[memory]\nbudget = \"lots\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("memory.budget")));
        assert!(e.message.contains("invalid size"), "{e}");

        let e = parse("[[models]]\nname = \"a\"\nkind = \"llm\"\npath = \"a.gguf\"\n[[models]]\nname = \"b\"\nkind = \"gpt\"\npath = \"b\"\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(7), Some("models[1].kind"))
        );

        let e = parse("[[models]]\nname = \"a\"\nkind = \"sdxl\"\npath = \"x\"\ncontext = 10\n")
            .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(5), Some("models[0].context"))
        );

        let e = parse("[defaults]\nmax_queue = 0\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("defaults.max_queue"));

        let e = parse("[daemon]\nlisten = \"nowhere\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("daemon.listen"));

        let e = parse("[[models]]\nname = \"a\"\nkind = \"llm\"\npath = \"a\"\n[[models]]\nname = \"a\"\nkind = \"llm\"\npath = \"b\"\n").unwrap_err();
        assert!(e.message.contains("used twice"), "{e}");
        assert_eq!(e.line, Some(6));
    }

    #[test]
    fn missing_field_is_reported() {
        let e = parse("[[models]]\nname = \"a\"\nkind = \"llm\"\n").unwrap_err();
        assert!(e.message.contains("missing field `path`"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("110GiB").unwrap(), 110 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5 GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
        assert_eq!(size_str(110 << 30), "110GiB");
        assert_eq!(size_str(1000), "1000B");
    }

    #[test]
    fn image_models_take_job_defaults_and_llms_refuse_them() {
        use crate::diffusion::sampler::{SamplerKind, Schedule};
        let c = parse(
            "[[models]]\nname = \"x\"\nkind = \"sdxl\"\npath = \"x\"\nsteps = 25\ncfg = 6.5\nsampler = \"dpmpp_2m\"\nscheduler = \"karras\"\nwidth = 832\nheight = 1216\n",
        )
        .unwrap();
        let d = &c.models[0].image;
        assert_eq!(
            (d.steps, d.cfg, d.sampler, d.scheduler, d.width, d.height),
            (
                Some(25),
                Some(6.5),
                Some(SamplerKind::DpmPp2m),
                Some(Schedule::Karras),
                Some(832),
                Some(1216)
            )
        );
        for (line, key, want) in [
            ("steps = 0", "steps", "1 to 1000"),
            ("cfg = 31.0", "cfg", "0 to 30"),
            ("sampler = \"ddim\"", "sampler", "unknown sampler \"ddim\""),
            ("scheduler = \"exp\"", "scheduler", "unknown scheduler"),
            ("width = 100", "width", "multiple of 8"),
            ("height = 8", "height", "from 64 to 4096"),
        ] {
            let e = parse(&format!(
                "[[models]]\nname = \"x\"\nkind = \"sdxl\"\npath = \"x\"\n{line}\n"
            ))
            .unwrap_err();
            assert_eq!(
                e.key.as_deref(),
                Some(format!("models[0].{key}").as_str()),
                "{e}"
            );
            assert!(e.to_string().contains(want), "{e}");
        }
        let e = parse("[[models]]\nname = \"l\"\nkind = \"llm\"\npath = \"l\"\nsteps = 20\n")
            .unwrap_err();
        assert!(
            e.to_string().contains("image models (sdxl, flux) only"),
            "{e}"
        );
        // A single file's describing folder sits beside the config like every path.
        let c = Config::parse(
            "[[models]]\nname = \"x\"\nkind = \"sdxl\"\npath = \"x.safetensors\"\ndiffusers_config = \"sdxl-base\"\n",
            Path::new("/etc/halo/halo.toml"),
        )
        .unwrap();
        assert_eq!(
            c.models[0].diffusers_config.as_deref(),
            Some(Path::new("/etc/halo/sdxl-base"))
        );
        let e = parse(
            "[[models]]\nname = \"l\"\nkind = \"llm\"\npath = \"l\"\ndiffusers_config = \"d\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("models[0].diffusers_config"), "{e}");
    }

    #[test]
    fn keep_alives() {
        let s = |n| KeepAlive::For(Duration::from_secs(n));
        assert_eq!(parse_keep_alive("5m").unwrap(), s(300));
        assert_eq!(parse_keep_alive("1h30m").unwrap(), s(5400));
        assert_eq!(parse_keep_alive("0").unwrap(), s(0));
        assert_eq!(parse_keep_alive("-1").unwrap(), KeepAlive::Forever);
        assert_eq!(parse_keep_alive("forever").unwrap(), KeepAlive::Forever);
        assert!(parse_keep_alive("5 minutes").is_err());
        // Overflow is an error, not a wrap (5124095576030432h once became 3584 s).
        let e = parse_keep_alive("5124095576030432h").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        assert!(parse_keep_alive("18446744073709551615s1s").is_err());
        assert!(parse_keep_alive("213503982334602d").is_err());
        assert!(parse_keep_alive("5").is_err());
        for k in ["5m", "90s", "2h", "0", "forever", "250ms"] {
            assert_eq!(format_keep_alive(parse_keep_alive(k).unwrap()), k);
        }
    }
}
