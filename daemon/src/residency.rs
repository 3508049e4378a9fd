//! Decides which models are held in memory, keeping their total size under a
//! byte budget.
//!
//! [`Residency`] is the bookkeeping behind model loading. It knows the model
//! catalog and, for every model, its state (unloaded, loading, resident),
//! whether it is pinned, how many jobs are running on it and when it was last
//! used. From that it decides which idle models to evict when another model
//! needs room, when the budget shrinks, or when a keep-alive runs out. It only
//! decides: the caller performs the real loads and unloads and reports back.
//!
//! A load goes like this:
//! 1. [`Residency::begin_load`] reserves the model's estimated size and names
//!    the models to unload first (they are already marked unloaded here).
//! 2. The caller unloads those, loads the model, and then calls
//!    [`Residency::finish_load`] with the real size, or
//!    [`Residency::fail_load`] if loading went wrong.
//!
//! Every method that returns model names returns models the caller must
//! unload now; they are already marked unloaded (or forgotten) here.
//!
//! Architecture invariant: does no I/O and never reads a clock; the current
//! time is always passed in as [`Now`].
//! Architecture invariant: knows nothing of tokio, gRPC or Vulkan; it is a
//! plain synchronous state machine owned and driven by the daemon.
//! Architecture invariant: `used() <= budget()` holds after every call.
//! Architecture invariant: a pinned model, or one with running jobs, is never
//! evicted; only an explicit unload after unpinning removes it.

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt;
use std::time::Duration;

/// Time since the daemon started. Always supplied by the caller.
pub type Now = Duration;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Formats a byte count for people: "12.0 GiB", "512.5 MiB", "3.2 KiB" or "900 B" (the same
/// format the CLI prints).
pub fn format_bytes(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else if bytes >= KIB {
        format!("{:.1} KiB", bytes as f64 / KIB as f64)
    } else {
        format!("{bytes} B")
    }
}

/// How long an idle, unpinned model stays in memory after its last use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    /// Stay until evicted to make room or unloaded explicitly.
    Forever,
    /// Unload once this long has passed since the last use.
    For(Duration),
}

/// A model the daemon knows about, as read from the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    /// Expected memory use once loaded; reserved while the model loads.
    pub estimated_bytes: u64,
    pub keep_alive: KeepAlive,
}

/// Where a model is in its load cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelState {
    Unloaded,
    /// Being loaded; `reserved` bytes of the budget are set aside for it.
    Loading {
        reserved: u64,
    },
    /// In memory, using `bytes` of the budget.
    Resident {
        bytes: u64,
    },
}

impl ModelState {
    /// Bytes this state counts against the budget.
    pub fn bytes(&self) -> u64 {
        match *self {
            ModelState::Unloaded => 0,
            ModelState::Loading { reserved } => reserved,
            ModelState::Resident { bytes } => bytes,
        }
    }
}

/// A snapshot of one model, for listings and status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelView {
    pub name: String,
    pub estimated_bytes: u64,
    pub state: ModelState,
    pub pinned: bool,
    /// Number of jobs running on the model.
    pub busy: u32,
    pub last_used: Option<Now>,
    pub keep_alive: KeepAlive,
    /// When the keep-alive will unload the model. `Some` only while the model
    /// is resident, idle, unpinned and has a finite keep-alive.
    pub expires_at: Option<Now>,
}

/// A model that currently holds part of the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub name: String,
    pub bytes: u64,
    pub pinned: bool,
    /// Number of jobs running on the model.
    pub busy: u32,
    /// True while the bytes are a reservation for a model being loaded.
    pub loading: bool,
    /// True for a copy taken out of service whose last jobs are still ending (see
    /// [`Residency::withdraw`]).
    pub withdrawn: bool,
    /// For a job's working memory (see [`Residency::reserve_job`]): the job's id; `name` is
    /// then its model.
    pub job: Option<u64>,
}

impl Holder {
    /// Whether eviction could take these bytes back.
    fn is_evictable(&self) -> bool {
        !self.pinned && self.busy == 0 && !self.loading && !self.withdrawn && self.job.is_none()
    }
}

impl fmt::Display for Holder {
    /// `"name" 3.0 GiB (pinned, running 1 job)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(job) = self.job {
            return write!(
                f,
                "job {job} on {:?} {} (running)",
                self.name,
                format_bytes(self.bytes)
            );
        }
        let mut reasons = Vec::new();
        if self.loading {
            reasons.push("loading".to_owned());
        }
        if self.withdrawn {
            reasons.push("withdrawn".to_owned());
        }
        if self.pinned {
            reasons.push("pinned".to_owned());
        }
        if self.busy > 0 {
            let plural = if self.busy == 1 { "" } else { "s" };
            reasons.push(format!("running {} job{plural}", self.busy));
        }
        if reasons.is_empty() {
            reasons.push("idle".to_owned());
        }
        write!(
            f,
            "{:?} {} ({})",
            self.name,
            format_bytes(self.bytes),
            reasons.join(", ")
        )
    }
}

/// Writes holders as a comma-separated list.
fn write_holders(f: &mut fmt::Formatter<'_>, holders: &[Holder]) -> fmt::Result {
    for (i, holder) in holders.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{holder}")?;
    }
    Ok(())
}

/// What the caller has to do to get a model into memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadPlan {
    /// Nothing to do; the model is in memory.
    AlreadyResident,
    /// Another request already started loading it; wait for that load.
    AlreadyLoading,
    /// Unload the `evict` models (in order), then load this one and report
    /// back with `finish_load` or `fail_load`.
    Load { evict: Vec<String> },
}

/// Why a model cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The name is not in the model catalog.
    UnknownModel { name: String },
    /// The model is larger than the whole budget.
    NeverFits {
        name: String,
        bytes: u64,
        budget: u64,
    },
    /// The model would fit the budget, but pinned, busy or loading models
    /// hold too much of it right now.
    NoRoom {
        name: String,
        bytes: u64,
        budget: u64,
        /// Unused budget before any eviction.
        free: u64,
        /// Every model holding bytes, largest first.
        holders: Vec<Holder>,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::UnknownModel { name } => write!(
                f,
                "unknown model {name:?}; check the name or add the model to the config"
            ),
            LoadError::NeverFits {
                name,
                bytes,
                budget,
            } => write!(
                f,
                "model {name:?} needs {} but the memory budget is {}; it can never fit: \
                 raise [memory] budget or use a smaller quantization",
                format_bytes(*bytes),
                format_bytes(*budget)
            ),
            LoadError::NoRoom {
                name,
                bytes,
                budget,
                free,
                holders,
            } => {
                write!(
                    f,
                    "model {name:?} needs {} but only {} of the {} budget is free \
                     and nothing more can be evicted: ",
                    format_bytes(*bytes),
                    format_bytes(*free),
                    format_bytes(*budget)
                )?;
                write_holders(f, holders)?;
                f.write_str("; unpin or unload a model, or raise the budget")
            }
        }
    }
}

impl Error for LoadError {}

/// Why a job's working memory cannot be reserved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobMemoryError {
    /// The job and its model together are larger than the whole budget.
    NeverFits {
        job: u64,
        model: String,
        bytes: u64,
        model_bytes: u64,
        budget: u64,
    },
    /// Pinned, busy or loading models and other jobs hold too much right now.
    NoRoom {
        job: u64,
        bytes: u64,
        budget: u64,
        free: u64,
        holders: Vec<Holder>,
    },
}

impl fmt::Display for JobMemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobMemoryError::NeverFits {
                job,
                model,
                bytes,
                model_bytes,
                budget,
            } => write!(
                f,
                "job {job} needs {} of working memory beside the {} of model {model:?}, more \
                 than the {} memory budget; it can never fit",
                format_bytes(*bytes),
                format_bytes(*model_bytes),
                format_bytes(*budget)
            ),
            JobMemoryError::NoRoom {
                job,
                bytes,
                budget,
                free,
                holders,
            } => {
                write!(
                    f,
                    "job {job} needs {} of working memory but only {} of the {} budget is \
                     free and nothing more can be evicted: ",
                    format_bytes(*bytes),
                    format_bytes(*free),
                    format_bytes(*budget)
                )?;
                write_holders(f, holders)?;
                f.write_str("; wait for other jobs, unpin or unload a model, or raise the budget")
            }
        }
    }
}

impl Error for JobMemoryError {}

/// Why an explicit unload was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnloadError {
    UnknownModel { name: String },
    NotResident { name: String },
    Loading { name: String },
    Pinned { name: String },
    Busy { name: String, jobs: u32 },
}

impl fmt::Display for UnloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnloadError::UnknownModel { name } => write!(
                f,
                "unknown model {name:?}; check the name or add the model to the config"
            ),
            UnloadError::NotResident { name } => {
                write!(
                    f,
                    "model {name:?} is not loaded; there is nothing to unload"
                )
            }
            UnloadError::Loading { name } => write!(
                f,
                "model {name:?} is still loading; wait for the load to finish, then unload it"
            ),
            UnloadError::Pinned { name } => {
                write!(f, "model {name:?} is pinned; unpin it first")
            }
            UnloadError::Busy { name, jobs } => {
                let plural = if *jobs == 1 { "" } else { "s" };
                write!(
                    f,
                    "model {name:?} is running {jobs} job{plural}; \
                     wait for them to finish or cancel them, then unload it"
                )
            }
        }
    }
}

impl Error for UnloadError {}

/// Why a pin or unpin was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinError {
    UnknownModel { name: String },
    NotResident { name: String },
}

impl fmt::Display for PinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinError::UnknownModel { name } => write!(
                f,
                "unknown model {name:?}; check the name or add the model to the config"
            ),
            PinError::NotResident { name } => write!(
                f,
                "model {name:?} is not loaded; only a loaded or loading model can be \
                 pinned or unpinned (load it with pinning requested instead)"
            ),
        }
    }
}

impl Error for PinError {}

/// Why the budget could not be changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BudgetError {
    /// Models that cannot be evicted hold more than the requested budget.
    TooSmall {
        budget: u64,
        /// Bytes held by models that cannot be evicted.
        held: u64,
        /// The models that cannot be evicted, largest first.
        holders: Vec<Holder>,
    },
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BudgetError::TooSmall {
                budget,
                held,
                holders,
            } => {
                write!(
                    f,
                    "cannot set the memory budget to {}: {} is held by models that cannot \
                     be evicted: ",
                    format_bytes(*budget),
                    format_bytes(*held)
                )?;
                write_holders(f, holders)?;
                write!(
                    f,
                    "; unpin or unload a model, or choose a budget of at least {}",
                    format_bytes(*held)
                )
            }
        }
    }
}

impl Error for BudgetError {}

/// Everything tracked for one model.
#[derive(Clone, Debug)]
struct Entry {
    estimated_bytes: u64,
    keep_alive: KeepAlive,
    state: ModelState,
    pinned: bool,
    busy: u32,
    last_used: Option<Now>,
    /// No longer in the catalog; forgotten as soon as it becomes idle.
    removed: bool,
}

impl Entry {
    fn new(spec: &ModelSpec) -> Self {
        Entry {
            estimated_bytes: spec.estimated_bytes,
            keep_alive: spec.keep_alive,
            state: ModelState::Unloaded,
            pinned: false,
            busy: 0,
            last_used: None,
            removed: false,
        }
    }

    fn is_resident(&self) -> bool {
        matches!(self.state, ModelState::Resident { .. })
    }

    fn is_loading(&self) -> bool {
        matches!(self.state, ModelState::Loading { .. })
    }

    /// Resident, idle and unpinned: eviction may take it.
    fn is_evictable(&self) -> bool {
        self.is_resident() && !self.pinned && self.busy == 0
    }

    fn expires_at(&self) -> Option<Now> {
        match (self.keep_alive, self.last_used) {
            (KeepAlive::For(keep), Some(last)) if self.is_evictable() => {
                Some(last.saturating_add(keep))
            }
            _ => None,
        }
    }

    fn view(&self, name: &str) -> ModelView {
        ModelView {
            name: name.to_owned(),
            estimated_bytes: self.estimated_bytes,
            state: self.state,
            pinned: self.pinned,
            busy: self.busy,
            last_used: self.last_used,
            keep_alive: self.keep_alive,
            expires_at: self.expires_at(),
        }
    }
}

/// The set of known models and which of them hold memory.
#[derive(Clone, Debug)]
pub struct Residency {
    budget: u64,
    models: BTreeMap<String, Entry>,
    /// Short-lived working memory outside any model (the bandwidth probe's buffers).
    scratch: u64,
    /// Models taken out of service while jobs ran on them: the bytes those jobs still hold,
    /// and how many of them are still ending. Charged until the last one ends.
    draining: BTreeMap<String, Draining>,
    /// Running jobs' working memory (an image job's activations): job id → (model, bytes).
    jobs: BTreeMap<u64, (String, u64)>,
}

/// What a withdrawn model still holds while its last jobs end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Draining {
    bytes: u64,
    jobs: u32,
}

impl Residency {
    /// Creates an empty table with a budget of `budget` bytes.
    pub fn new(budget: u64) -> Self {
        Residency {
            budget,
            models: BTreeMap::new(),
            scratch: 0,
            draining: BTreeMap::new(),
            jobs: BTreeMap::new(),
        }
    }

    /// The memory budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes held by resident models, reservations for loading ones, scratch, and withdrawn
    /// models whose jobs are still ending.
    pub fn used(&self) -> u64 {
        self.models.values().map(|e| e.state.bytes()).sum::<u64>()
            + self.scratch
            + self.draining.values().map(|d| d.bytes).sum::<u64>()
            + self.jobs.values().map(|(_, b)| b).sum::<u64>()
    }

    /// Whether `bytes` of working memory for a job on `model` could be reserved now, evicting
    /// idle models if need be (what [`Self::reserve_job`] would do, without doing it).
    pub fn job_fits(&self, model: &str, bytes: u64) -> bool {
        let model_bytes = self.models.get(model).map(|e| e.state.bytes()).unwrap_or(0);
        bytes.saturating_add(model_bytes) <= self.budget
            && self
                .plan_evictions(bytes.saturating_sub(self.free()))
                .is_some()
    }

    /// Reserves `bytes` of working memory for running job `job` on `model` (whose weights are
    /// resident and busy), evicting the least recently used idle models as a load would; the
    /// evicted models are returned for the caller to unload. Held until [`Self::release_job`].
    pub fn reserve_job(
        &mut self,
        job: u64,
        model: &str,
        bytes: u64,
    ) -> Result<Vec<String>, JobMemoryError> {
        let model_bytes = self.models.get(model).map(|e| e.state.bytes()).unwrap_or(0);
        if bytes.saturating_add(model_bytes) > self.budget {
            return Err(JobMemoryError::NeverFits {
                job,
                model: model.to_owned(),
                bytes,
                model_bytes,
                budget: self.budget,
            });
        }
        let evict = self
            .plan_evictions(bytes.saturating_sub(self.free()))
            .ok_or_else(|| JobMemoryError::NoRoom {
                job,
                bytes,
                budget: self.budget,
                free: self.free(),
                holders: self.holders(),
            })?;
        self.evict(&evict);
        self.jobs.insert(job, (model.to_owned(), bytes));
        Ok(evict)
    }

    /// Returns a job's working memory; nothing if it had none.
    pub fn release_job(&mut self, job: u64) {
        self.jobs.remove(&job);
    }

    /// Reserves `bytes` of short-lived working memory if the budget has that much free now
    /// (nothing is evicted for it); loads see it as used until [`Self::release_scratch`].
    pub fn reserve_scratch(&mut self, bytes: u64) -> bool {
        if bytes > self.free() {
            return false;
        }
        self.scratch += bytes;
        true
    }

    /// Returns scratch reserved by [`Self::reserve_scratch`].
    pub fn release_scratch(&mut self, bytes: u64) {
        self.scratch = self.scratch.saturating_sub(bytes);
    }

    /// Bytes of the budget not yet used.
    pub fn free(&self) -> u64 {
        self.budget.saturating_sub(self.used())
    }

    /// Replaces the known models, on config load or reload.
    ///
    /// Models that stay keep their state, pin and last use; their estimate
    /// and keep-alive are updated. Removed models that are unloaded are
    /// forgotten. Removed models that are resident and idle (pinned or not)
    /// are forgotten and returned: the caller must unload them. Removed models that are busy or
    /// loading are kept until they become idle; `job_finished`,
    /// `finish_load` and `fail_load` forget them then (the first two return
    /// the name so the caller unloads it). A removed model can no longer be
    /// loaded or pinned.
    pub fn set_catalog(&mut self, specs: Vec<ModelSpec>) -> Vec<String> {
        let mut next: BTreeMap<String, Entry> = BTreeMap::new();
        for spec in specs {
            // A name listed twice takes its last spec.
            let existing = next
                .remove(&spec.name)
                .or_else(|| self.models.remove(&spec.name));
            let entry = match existing {
                Some(mut entry) => {
                    entry.estimated_bytes = spec.estimated_bytes;
                    entry.keep_alive = spec.keep_alive;
                    entry.removed = false;
                    entry
                }
                None => Entry::new(&spec),
            };
            next.insert(spec.name, entry);
        }

        let mut to_unload = Vec::new();
        for (name, mut entry) in std::mem::take(&mut self.models) {
            if entry.busy > 0 || entry.is_loading() {
                entry.removed = true;
                next.insert(name, entry);
            } else if entry.is_resident() {
                to_unload.push(name);
            }
        }
        self.models = next;
        to_unload
    }

    /// Changes the budget, evicting least recently used idle, unpinned models
    /// until everything fits. Returns the evicted models.
    ///
    /// If pinned, busy and loading models alone exceed `budget`, nothing
    /// changes and `TooSmall` is returned. `_now` is accepted so every
    /// state change takes the time, but eviction order only uses last use.
    pub fn set_budget(&mut self, budget: u64, _now: Now) -> Result<Vec<String>, BudgetError> {
        let excess = self.used().saturating_sub(budget);
        match self.plan_evictions(excess) {
            Some(evict) => {
                self.evict(&evict);
                self.budget = budget;
                Ok(evict)
            }
            None => {
                let holders: Vec<Holder> = self
                    .holders()
                    .into_iter()
                    .filter(|h| !h.is_evictable())
                    .collect();
                Err(BudgetError::TooSmall {
                    budget,
                    held: holders.iter().map(|h| h.bytes).sum(),
                    holders,
                })
            }
        }
    }

    /// Starts bringing `name` into memory, pinning it if `pin` is set.
    ///
    /// A resident model counts as used now; a loading one is left to its
    /// load. Otherwise the least recently used idle, unpinned models (ties
    /// broken by name) are evicted, as few as needed, and the model's
    /// estimated size is reserved. The evicted models are marked unloaded at
    /// once; the caller must unload them before loading.
    pub fn begin_load(&mut self, name: &str, pin: bool, now: Now) -> Result<LoadPlan, LoadError> {
        let budget = self.budget;
        let free = self.free();
        let entry = self.catalog_entry_mut(name).ok_or_else(|| unknown(name))?;
        match entry.state {
            ModelState::Resident { .. } => {
                entry.last_used = Some(now);
                entry.pinned |= pin;
                return Ok(LoadPlan::AlreadyResident);
            }
            ModelState::Loading { .. } => {
                entry.pinned |= pin;
                return Ok(LoadPlan::AlreadyLoading);
            }
            ModelState::Unloaded => {}
        }

        let bytes = entry.estimated_bytes;
        if bytes > budget {
            return Err(LoadError::NeverFits {
                name: name.to_owned(),
                bytes,
                budget,
            });
        }
        let evict = self
            .plan_evictions(bytes.saturating_sub(free))
            .ok_or_else(|| self.no_room(name, bytes))?;
        self.evict(&evict);
        let entry = self.entry_mut(name);
        entry.state = ModelState::Loading { reserved: bytes };
        entry.pinned = pin;
        Ok(LoadPlan::Load { evict })
    }

    /// Records that `name` finished loading and really uses `actual_bytes`.
    ///
    /// If the model turned out larger than its reservation, more idle models
    /// are evicted and returned; the caller must unload them. If it cannot
    /// fit at all, the model goes back to unloaded (losing any pin) and the
    /// error says why; the caller must drop what it loaded.
    ///
    /// If the model was removed from the catalog while loading, it is
    /// forgotten and its own name is returned so the caller unloads it.
    pub fn finish_load(
        &mut self,
        name: &str,
        actual_bytes: u64,
        now: Now,
    ) -> Result<Vec<String>, LoadError> {
        let budget = self.budget;
        let entry = self.models.get_mut(name).ok_or_else(|| unknown(name))?;
        debug_assert!(
            entry.is_loading(),
            "finish_load({name:?}) while not loading"
        );
        if !entry.is_loading() {
            return Ok(Vec::new());
        }
        if entry.removed {
            self.models.remove(name);
            return Ok(vec![name.to_owned()]);
        }

        // Release the reservation; the real size takes its place if it fits.
        entry.state = ModelState::Unloaded;
        if actual_bytes > budget {
            entry.pinned = false;
            return Err(LoadError::NeverFits {
                name: name.to_owned(),
                bytes: actual_bytes,
                budget,
            });
        }
        match self.plan_evictions(actual_bytes.saturating_sub(self.free())) {
            Some(evict) => {
                self.evict(&evict);
                let entry = self.entry_mut(name);
                entry.state = ModelState::Resident {
                    bytes: actual_bytes,
                };
                entry.last_used = Some(now);
                Ok(evict)
            }
            None => {
                self.entry_mut(name).pinned = false;
                Err(self.no_room(name, actual_bytes))
            }
        }
    }

    /// Records that loading `name` failed: its reservation is released and
    /// its pin cleared. Does nothing if the model is not loading.
    pub fn fail_load(&mut self, name: &str) {
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        if !entry.is_loading() {
            return;
        }
        if entry.removed {
            self.models.remove(name);
        } else {
            entry.state = ModelState::Unloaded;
            entry.pinned = false;
        }
    }

    /// Marks `name` unloaded on a user's request. Refuses pinned models and
    /// models with running jobs. The caller performs the unload.
    pub fn unload(&mut self, name: &str) -> Result<(), UnloadError> {
        let entry = self
            .models
            .get_mut(name)
            .ok_or_else(|| UnloadError::UnknownModel {
                name: name.to_owned(),
            })?;
        let name = name.to_owned();
        match entry.state {
            ModelState::Unloaded => Err(UnloadError::NotResident { name }),
            ModelState::Loading { .. } => Err(UnloadError::Loading { name }),
            ModelState::Resident { .. } if entry.pinned => Err(UnloadError::Pinned { name }),
            ModelState::Resident { .. } if entry.busy > 0 => Err(UnloadError::Busy {
                name,
                jobs: entry.busy,
            }),
            ModelState::Resident { .. } => {
                entry.state = ModelState::Unloaded;
                Ok(())
            }
        }
    }

    /// Takes a resident model out of service whatever its pins and jobs: its file changed under
    /// it, so it must not be used again. The model is unloaded at once, so the next load starts
    /// from scratch (and may run beside the old copy). Jobs still running on the old copy keep
    /// its memory until they end: its bytes stay charged until each has been reported through
    /// [`Self::withdrawn_job_finished`] (not `job_finished`). Returns whether it was resident.
    pub fn withdraw(&mut self, name: &str) -> bool {
        let Some(entry) = self.models.get_mut(name).filter(|e| e.is_resident()) else {
            return false;
        };
        let bytes = entry.state.bytes();
        let jobs = std::mem::take(&mut entry.busy);
        entry.state = ModelState::Unloaded;
        entry.pinned = false;
        // A model removed from the catalog lingered only for its jobs, which are now draining.
        if entry.removed {
            self.models.remove(name);
        }
        if jobs > 0 {
            let d = self
                .draining
                .entry(name.to_owned())
                .or_insert(Draining { bytes: 0, jobs: 0 });
            d.bytes += bytes;
            d.jobs += jobs;
        }
        true
    }

    /// Records that one of the jobs that were running on `name` when it was withdrawn ended;
    /// after the last one the old copy's bytes are no longer charged.
    pub fn withdrawn_job_finished(&mut self, name: &str) {
        let Some(d) = self.draining.get_mut(name) else {
            debug_assert!(
                false,
                "withdrawn_job_finished({name:?}) with nothing draining"
            );
            return;
        };
        d.jobs -= 1;
        if d.jobs == 0 {
            self.draining.remove(name);
        }
    }

    /// Pins a resident or loading model so nothing evicts it.
    pub fn pin(&mut self, name: &str) -> Result<(), PinError> {
        let entry = self
            .catalog_entry_mut(name)
            .ok_or_else(|| PinError::UnknownModel {
                name: name.to_owned(),
            })?;
        if entry.state == ModelState::Unloaded {
            return Err(PinError::NotResident {
                name: name.to_owned(),
            });
        }
        entry.pinned = true;
        Ok(())
    }

    /// Unpins a resident or loading model. Its keep-alive counts from `now`.
    pub fn unpin(&mut self, name: &str, now: Now) -> Result<(), PinError> {
        let entry = self
            .models
            .get_mut(name)
            .ok_or_else(|| PinError::UnknownModel {
                name: name.to_owned(),
            })?;
        match entry.state {
            ModelState::Unloaded => Err(PinError::NotResident {
                name: name.to_owned(),
            }),
            ModelState::Loading { .. } => {
                entry.pinned = false;
                Ok(())
            }
            ModelState::Resident { .. } => {
                if entry.pinned {
                    entry.pinned = false;
                    entry.last_used = Some(now);
                }
                Ok(())
            }
        }
    }

    /// Records a use of a resident model outside a job (it restarts its keep-alive).
    pub fn touch(&mut self, name: &str, now: Now) {
        if let Some(entry) = self.models.get_mut(name).filter(|e| e.is_resident()) {
            entry.last_used = Some(now);
        }
    }

    /// Records that a job started running on `name`, which must be resident.
    pub fn job_started(&mut self, name: &str, now: Now) {
        let entry = self.models.get_mut(name).filter(|e| e.is_resident());
        debug_assert!(
            entry.is_some(),
            "job_started({name:?}) on a model that is not resident"
        );
        if let Some(entry) = entry {
            entry.busy += 1;
            entry.last_used = Some(now);
        }
    }

    /// Records that a job on `name` ended. Returns the model's name if it was
    /// removed from the catalog and is now idle: the caller must unload it.
    pub fn job_finished(&mut self, name: &str, now: Now) -> Vec<String> {
        let entry = self.models.get_mut(name).filter(|e| e.busy > 0);
        debug_assert!(
            entry.is_some(),
            "job_finished({name:?}) with no job running"
        );
        let Some(entry) = entry else {
            return Vec::new();
        };
        entry.busy -= 1;
        entry.last_used = Some(now);
        if entry.removed && entry.busy == 0 {
            self.models.remove(name);
            return vec![name.to_owned()];
        }
        Vec::new()
    }

    /// Unloads idle, unpinned resident models whose keep-alive has run out.
    /// Returns their names, sorted; the caller must unload them.
    pub fn tick(&mut self, now: Now) -> Vec<String> {
        let expired: Vec<String> = self
            .models
            .iter()
            .filter(|(_, e)| e.expires_at().is_some_and(|at| now >= at))
            .map(|(name, _)| name.clone())
            .collect();
        self.evict(&expired);
        expired
    }

    /// All tracked models, sorted by name.
    pub fn models(&self) -> Vec<ModelView> {
        self.models
            .iter()
            .map(|(name, entry)| entry.view(name))
            .collect()
    }

    /// One model, if it is tracked.
    pub fn view(&self, name: &str) -> Option<ModelView> {
        self.models.get(name).map(|entry| entry.view(name))
    }

    /// Models holding part of the budget now, largest first (ties by name).
    pub fn holders(&self) -> Vec<Holder> {
        let mut holders: Vec<Holder> = self
            .models
            .iter()
            .filter(|(_, e)| e.state != ModelState::Unloaded)
            .map(|(name, e)| Holder {
                name: name.clone(),
                bytes: e.state.bytes(),
                pinned: e.pinned,
                busy: e.busy,
                loading: e.is_loading(),
                withdrawn: false,
                job: None,
            })
            .chain(self.draining.iter().map(|(name, d)| Holder {
                name: name.clone(),
                bytes: d.bytes,
                pinned: false,
                busy: d.jobs,
                loading: false,
                withdrawn: true,
                job: None,
            }))
            .chain(self.jobs.iter().map(|(id, (model, bytes))| Holder {
                name: model.clone(),
                bytes: *bytes,
                pinned: false,
                busy: 1,
                loading: false,
                withdrawn: false,
                job: Some(*id),
            }))
            .collect();
        // Stable sort keeps name order among equal sizes.
        holders.sort_by_key(|h| std::cmp::Reverse(h.bytes));
        holders
    }

    /// A model that is in the current catalog (not merely lingering after
    /// removal).
    fn catalog_entry_mut(&mut self, name: &str) -> Option<&mut Entry> {
        self.models.get_mut(name).filter(|e| !e.removed)
    }

    /// A model known to be tracked; used right after looking it up.
    fn entry_mut(&mut self, name: &str) -> &mut Entry {
        self.models
            .get_mut(name)
            .expect("model looked up earlier in the same call")
    }

    /// The shortest run of evictable models, least recently used first (ties
    /// by name), that frees at least `needed` bytes. `None` if evicting all
    /// of them would not be enough.
    fn plan_evictions(&self, needed: u64) -> Option<Vec<String>> {
        let mut candidates: Vec<(&String, &Entry)> = self
            .models
            .iter()
            .filter(|(_, e)| e.is_evictable())
            .collect();
        // The map iterates in name order and the sort is stable, so equal
        // last-use times stay ordered by name.
        candidates.sort_by_key(|(_, e)| e.last_used);

        let mut freed = 0u64;
        let mut evict = Vec::new();
        for (name, entry) in candidates {
            if freed >= needed {
                break;
            }
            freed += entry.state.bytes();
            evict.push(name.clone());
        }
        (freed >= needed).then_some(evict)
    }

    fn evict(&mut self, names: &[String]) {
        for name in names {
            if let Some(entry) = self.models.get_mut(name) {
                entry.state = ModelState::Unloaded;
            }
        }
    }

    fn no_room(&self, name: &str, bytes: u64) -> LoadError {
        LoadError::NoRoom {
            name: name.to_owned(),
            bytes,
            budget: self.budget,
            free: self.free(),
            holders: self.holders(),
        }
    }
}

fn unknown(name: &str) -> LoadError {
    LoadError::UnknownModel {
        name: name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn secs(s: u64) -> Now {
        Duration::from_secs(s)
    }

    fn spec(name: &str, bytes: u64, keep_alive: KeepAlive) -> ModelSpec {
        ModelSpec {
            name: name.to_owned(),
            estimated_bytes: bytes,
            keep_alive,
        }
    }

    /// Loads `name` at its estimated size, unloading whatever it evicts.
    fn load(r: &mut Residency, name: &str, now: Now) -> Vec<String> {
        let LoadPlan::Load { evict } = r.begin_load(name, false, now).unwrap() else {
            panic!("{name} should need a load");
        };
        let bytes = r.view(name).unwrap().estimated_bytes;
        assert!(r.finish_load(name, bytes, now).unwrap().is_empty());
        evict
    }

    fn three_models(budget: u64) -> Residency {
        let mut r = Residency::new(budget);
        r.set_catalog(vec![
            spec("a", 4 * GIB, KeepAlive::Forever),
            spec("b", 4 * GIB, KeepAlive::Forever),
            spec("c", 4 * GIB, KeepAlive::Forever),
        ]);
        r
    }

    #[test]
    fn format_bytes_picks_a_readable_unit() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(512 * 1024), "512.0 KiB");
        assert_eq!(format_bytes(MIB), "1.0 MiB");
        assert_eq!(format_bytes(1536 * MIB / 2), "768.0 MiB");
        assert_eq!(format_bytes(GIB), "1.0 GiB");
        assert_eq!(format_bytes(12 * GIB + GIB / 2), "12.5 GiB");
    }

    #[test]
    fn evicts_least_recently_used_when_budget_fits_two() {
        let mut r = three_models(8 * GIB);
        assert!(load(&mut r, "a", secs(1)).is_empty());
        assert!(load(&mut r, "b", secs(2)).is_empty());
        // Using "a" again makes "b" the least recently used.
        assert_eq!(
            r.begin_load("a", false, secs(3)),
            Ok(LoadPlan::AlreadyResident)
        );
        assert_eq!(load(&mut r, "c", secs(4)), vec!["b".to_owned()]);
        assert_eq!(r.view("b").unwrap().state, ModelState::Unloaded);
        assert_eq!(load(&mut r, "b", secs(5)), vec!["a".to_owned()]);
        assert_eq!(r.used(), 8 * GIB);
    }

    #[test]
    fn pinned_and_busy_models_are_not_evicted() {
        let mut r = three_models(8 * GIB);
        load(&mut r, "a", secs(1));
        load(&mut r, "b", secs(2));
        r.pin("a").unwrap();
        assert_eq!(load(&mut r, "c", secs(3)), vec!["b".to_owned()]);

        r.job_started("c", secs(4));
        let err = r.begin_load("b", false, secs(5)).unwrap_err();
        assert!(matches!(err, LoadError::NoRoom { free: 0, .. }), "{err:?}");
        assert_eq!(
            r.view("a").unwrap().state,
            ModelState::Resident { bytes: 4 * GIB }
        );
        assert_eq!(
            r.unload("a"),
            Err(UnloadError::Pinned {
                name: "a".to_owned()
            })
        );
        assert_eq!(
            r.unload("c"),
            Err(UnloadError::Busy {
                name: "c".to_owned(),
                jobs: 1
            })
        );

        r.job_finished("c", secs(6));
        assert_eq!(load(&mut r, "b", secs(7)), vec!["c".to_owned()]);
        r.unpin("a", secs(8)).unwrap();
        r.unload("a").unwrap();
        assert_eq!(r.used(), 4 * GIB);
    }

    #[test]
    fn keep_alive_expires_idle_models_only() {
        let mut r = Residency::new(16 * GIB);
        r.set_catalog(vec![
            spec("short", GIB, KeepAlive::For(secs(60))),
            spec("forever", GIB, KeepAlive::Forever),
        ]);
        load(&mut r, "short", secs(0));
        load(&mut r, "forever", secs(0));
        assert_eq!(r.view("short").unwrap().expires_at, Some(secs(60)));
        assert_eq!(r.view("forever").unwrap().expires_at, None);
        assert!(r.tick(secs(59)).is_empty());

        // A running job holds the model and restarts the timer when it ends.
        r.job_started("short", secs(30));
        assert_eq!(r.view("short").unwrap().expires_at, None);
        assert!(r.tick(secs(90)).is_empty());
        r.job_finished("short", secs(100));
        assert!(r.tick(secs(159)).is_empty());
        assert_eq!(r.tick(secs(160)), vec!["short".to_owned()]);
        assert_eq!(r.view("short").unwrap().state, ModelState::Unloaded);
        assert!(r.tick(secs(100_000)).is_empty());

        // Pinned models do not expire; unpinning restarts the timer.
        load(&mut r, "short", secs(200));
        r.pin("short").unwrap();
        assert!(r.tick(secs(1000)).is_empty());
        r.unpin("short", secs(1000)).unwrap();
        assert!(r.tick(secs(1059)).is_empty());
        assert_eq!(r.tick(secs(1060)), vec!["short".to_owned()]);
    }

    #[test]
    fn no_room_message_names_holders() {
        let mut r = Residency::new(8 * GIB);
        r.set_catalog(vec![
            spec("a", 3 * GIB, KeepAlive::Forever),
            spec("b", 3 * GIB, KeepAlive::Forever),
            spec("x", 5 * GIB, KeepAlive::Forever),
        ]);
        r.begin_load("a", true, secs(0)).unwrap();
        r.finish_load("a", 3 * GIB, secs(0)).unwrap();
        load(&mut r, "b", secs(1));
        r.job_started("b", secs(2));
        let err = r.begin_load("x", false, secs(3)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model \"x\" needs 5.0 GiB but only 2.0 GiB of the 8.0 GiB budget is free \
             and nothing more can be evicted: \"a\" 3.0 GiB (pinned), \
             \"b\" 3.0 GiB (running 1 job); unpin or unload a model, or raise the budget"
        );
    }

    #[test]
    fn never_fits_message_suggests_a_fix() {
        let mut r = Residency::new(8 * GIB);
        r.set_catalog(vec![spec("big", 12 * GIB, KeepAlive::Forever)]);
        let err = r.begin_load("big", false, secs(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model \"big\" needs 12.0 GiB but the memory budget is 8.0 GiB; it can never fit: \
             raise [memory] budget or use a smaller quantization"
        );
        assert_eq!(
            r.begin_load("nope", false, secs(0)),
            Err(LoadError::UnknownModel {
                name: "nope".to_owned()
            })
        );
    }

    #[test]
    fn finish_load_larger_than_estimate_evicts_more_or_gives_up() {
        let mut r = three_models(10 * GIB);
        load(&mut r, "a", secs(1));
        load(&mut r, "b", secs(2));
        assert_eq!(
            r.begin_load("c", false, secs(3)),
            Ok(LoadPlan::Load {
                evict: vec!["a".to_owned()]
            })
        );
        // "c" turns out to need 7 GiB: "b" has to go as well.
        assert_eq!(
            r.finish_load("c", 7 * GIB, secs(4)),
            Ok(vec!["b".to_owned()])
        );
        assert_eq!(r.used(), 7 * GIB);

        // With "c" busy, a model that turns out bigger than the free space
        // cannot be placed and goes back to unloaded.
        r.job_started("c", secs(5));
        r.set_catalog(vec![
            spec("a", 2 * GIB, KeepAlive::Forever),
            spec("b", GIB, KeepAlive::Forever),
            spec("c", 4 * GIB, KeepAlive::Forever),
        ]);
        r.begin_load("a", true, secs(6)).unwrap();
        let err = r.finish_load("a", 4 * GIB, secs(7)).unwrap_err();
        assert!(
            matches!(err, LoadError::NoRoom { free, .. } if free == 3 * GIB),
            "{err:?}"
        );
        let a = r.view("a").unwrap();
        assert_eq!((a.state, a.pinned), (ModelState::Unloaded, false));
        assert_eq!(r.used(), 7 * GIB);

        r.begin_load("b", false, secs(8)).unwrap();
        assert!(matches!(
            r.finish_load("b", 11 * GIB, secs(9)),
            Err(LoadError::NeverFits { .. })
        ));
        assert_eq!(r.used(), 7 * GIB);
    }

    #[test]
    fn set_budget_evicts_or_refuses() {
        let mut r = three_models(12 * GIB);
        load(&mut r, "a", secs(1));
        load(&mut r, "b", secs(2));
        load(&mut r, "c", secs(3));
        r.pin("b").unwrap();
        assert_eq!(r.set_budget(8 * GIB, secs(4)), Ok(vec!["a".to_owned()]));
        r.job_started("c", secs(5));
        let err = r.set_budget(4 * GIB, secs(6)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot set the memory budget to 4.0 GiB: 8.0 GiB is held by models that cannot \
             be evicted: \"b\" 4.0 GiB (pinned), \"c\" 4.0 GiB (running 1 job); unpin or \
             unload a model, or choose a budget of at least 8.0 GiB"
        );
        assert_eq!(r.budget(), 8 * GIB);
        assert_eq!(r.used(), 8 * GIB);
    }

    #[test]
    fn a_withdrawn_model_stays_charged_until_its_last_job_ends() {
        let mut r = three_models(8 * GIB);
        load(&mut r, "a", secs(1));
        load(&mut r, "b", secs(2));
        r.pin("a").unwrap();
        r.job_started("a", secs(3));
        r.job_started("a", secs(3));
        assert!(r.withdraw("a"));
        let a = r.view("a").unwrap();
        assert_eq!(
            (a.state, a.pinned, a.busy),
            (ModelState::Unloaded, false, 0)
        );
        // The old copy's jobs still hold its 4 GiB; loading the new copy must evict b.
        assert_eq!(r.used(), 8 * GIB);
        assert_eq!(
            r.begin_load("a", false, secs(4)),
            Ok(LoadPlan::Load {
                evict: vec!["b".to_owned()]
            })
        );
        r.finish_load("a", 4 * GIB, secs(5)).unwrap();
        r.pin("a").unwrap();
        assert_eq!(r.used(), 8 * GIB);
        let err = r.begin_load("c", false, secs(6)).unwrap_err();
        assert!(
            err.to_string().contains("(withdrawn, running 2 jobs)"),
            "{err}"
        );
        r.withdrawn_job_finished("a");
        assert_eq!(r.used(), 8 * GIB);
        r.withdrawn_job_finished("a");
        assert_eq!(r.used(), 4 * GIB);
        // An idle model is simply unloaded.
        assert!(r.withdraw("a"));
        assert_eq!(r.used(), 0);
        assert!(!r.withdraw("a"));
    }

    #[test]
    fn scratch_counts_as_used_until_released() {
        let mut r = three_models(10 * GIB);
        load(&mut r, "a", secs(1));
        // 6 GiB free: 3 GiB of scratch fits, 4 more do not.
        assert!(r.reserve_scratch(3 * GIB));
        assert!(!r.reserve_scratch(4 * GIB));
        assert_eq!(r.used(), 7 * GIB);
        // With the scratch held, b (4 GiB) only fits by evicting a.
        let LoadPlan::Load { evict } = r.begin_load("b", false, secs(2)).unwrap() else {
            panic!("b needs a load");
        };
        assert_eq!(evict, ["a"]);
        r.release_scratch(3 * GIB);
        // What is left is b's reservation for its load.
        assert_eq!(r.used(), 4 * GIB);
    }

    #[test]
    fn catalog_reload_drops_removed_models_when_idle() {
        let mut r = three_models(12 * GIB);
        load(&mut r, "a", secs(1));
        load(&mut r, "b", secs(2));
        r.job_started("b", secs(3));
        r.begin_load("c", false, secs(4)).unwrap();

        let dropped = r.set_catalog(vec![spec("d", GIB, KeepAlive::Forever)]);
        assert_eq!(dropped, vec!["a".to_owned()]);
        assert!(r.view("a").is_none());
        // Lingering models can no longer be loaded or pinned.
        assert!(matches!(
            r.begin_load("b", false, secs(5)),
            Err(LoadError::UnknownModel { .. })
        ));
        assert!(matches!(r.pin("b"), Err(PinError::UnknownModel { .. })));
        assert_eq!(r.job_finished("b", secs(6)), vec!["b".to_owned()]);
        assert_eq!(
            r.finish_load("c", 4 * GIB, secs(7)),
            Ok(vec!["c".to_owned()])
        );
        assert_eq!(r.used(), 0);
        let names: Vec<String> = r.models().into_iter().map(|m| m.name).collect();
        assert_eq!(names, vec!["d".to_owned()]);

        // A kept model keeps its state and takes the new estimate; a name
        // listed twice takes its last spec.
        load(&mut r, "d", secs(8));
        r.set_catalog(vec![
            spec("d", 3 * GIB, KeepAlive::Forever),
            spec("d", 2 * GIB, KeepAlive::For(secs(5))),
        ]);
        let d = r.view("d").unwrap();
        assert_eq!(d.state, ModelState::Resident { bytes: GIB });
        assert_eq!(d.estimated_bytes, 2 * GIB);
        assert_eq!(d.expires_at, Some(secs(13)));
    }

    #[test]
    fn fail_load_releases_the_reservation_and_pin() {
        let mut r = three_models(8 * GIB);
        assert_eq!(
            r.begin_load("a", true, secs(0)),
            Ok(LoadPlan::Load { evict: vec![] })
        );
        assert_eq!(
            r.begin_load("a", false, secs(1)),
            Ok(LoadPlan::AlreadyLoading)
        );
        assert_eq!(r.used(), 4 * GIB);
        assert_eq!(
            r.unload("a"),
            Err(UnloadError::Loading {
                name: "a".to_owned()
            })
        );
        r.fail_load("a");
        let a = r.view("a").unwrap();
        assert_eq!((a.state, a.pinned), (ModelState::Unloaded, false));
        assert_eq!(r.used(), 0);
        assert!(matches!(r.pin("a"), Err(PinError::NotResident { .. })));
    }

    // ---- Property tests over random event sequences ----

    #[derive(Clone, Debug)]
    enum Op {
        BeginLoad {
            model: usize,
            pin: bool,
        },
        /// Finish a load at `percent` of the estimate.
        FinishLoad {
            model: usize,
            percent: u64,
        },
        FailLoad {
            model: usize,
        },
        Unload {
            model: usize,
        },
        Pin {
            model: usize,
        },
        Unpin {
            model: usize,
        },
        JobStarted {
            model: usize,
        },
        JobFinished {
            model: usize,
        },
        /// The model's file changed: out of service, whatever its pins and jobs.
        Withdraw {
            model: usize,
        },
        /// A job that ran on a withdrawn copy of the model ended.
        WithdrawnJobFinished {
            model: usize,
        },
        Tick,
        SetBudget {
            budget: u64,
        },
        /// Keep only the catalog models whose bit is set.
        SetCatalog {
            keep: u8,
        },
        /// `BeginLoad` immediately followed by `FinishLoad`.
        LoadThrough {
            model: usize,
            pin: bool,
            percent: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let model = 0..6usize;
        prop_oneof![
            3 => (model.clone(), prop::bool::weighted(0.15))
                .prop_map(|(model, pin)| Op::BeginLoad { model, pin }),
            6 => (model.clone(), prop::bool::weighted(0.15), 50..160u64)
                .prop_map(|(model, pin, percent)| Op::LoadThrough { model, pin, percent }),
            4 => (model.clone(), 50..160u64)
                .prop_map(|(model, percent)| Op::FinishLoad { model, percent }),
            1 => model.clone().prop_map(|model| Op::FailLoad { model }),
            1 => model.clone().prop_map(|model| Op::Unload { model }),
            1 => model.clone().prop_map(|model| Op::Pin { model }),
            2 => model.clone().prop_map(|model| Op::Unpin { model }),
            2 => model.clone().prop_map(|model| Op::JobStarted { model }),
            3 => model.clone().prop_map(|model| Op::JobFinished { model }),
            1 => model.clone().prop_map(|model| Op::Withdraw { model }),
            2 => model.clone().prop_map(|model| Op::WithdrawnJobFinished { model }),
            2 => Just(Op::Tick),
            1 => (1..400u64).prop_map(|budget| Op::SetBudget { budget }),
            // Drop one model from the catalog, or restore all of them.
            1 => (0..8u8).prop_map(|k| Op::SetCatalog { keep: !(1u8 << k) }),
        ]
    }

    fn catalog() -> impl Strategy<Value = Vec<ModelSpec>> {
        let keep_alive = prop_oneof![
            Just(KeepAlive::Forever),
            (10..400u64).prop_map(|s| KeepAlive::For(secs(s))),
        ];
        prop::collection::vec((1..150u64, keep_alive), 1..=6).prop_map(|models| {
            models
                .into_iter()
                .enumerate()
                .map(|(i, (bytes, keep_alive))| spec(&format!("m{i}"), bytes, keep_alive))
                .collect()
        })
    }

    fn by_name(r: &Residency) -> BTreeMap<String, ModelView> {
        r.models()
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect()
    }

    fn is_resident(view: Option<&ModelView>) -> bool {
        matches!(view.map(|v| v.state), Some(ModelState::Resident { .. }))
    }

    fn evictable(view: &ModelView) -> bool {
        is_resident(Some(view)) && !view.pinned && view.busy == 0
    }

    /// Every evicted model must have been resident, idle and unpinned.
    fn assert_evictable(before: &BTreeMap<String, ModelView>, evicted: &[String]) {
        for name in evicted {
            let view = &before[name];
            assert!(evictable(view), "evicted {name}, which was {view:?}");
        }
    }

    /// What begin_load should evict: the shortest LRU prefix that frees
    /// enough, computed independently of the implementation.
    fn expected_evictions(
        before: &BTreeMap<String, ModelView>,
        needed: u64,
    ) -> Option<Vec<String>> {
        let mut candidates: Vec<&ModelView> = before.values().filter(|v| evictable(v)).collect();
        candidates.sort_by(|a, b| (a.last_used, &a.name).cmp(&(b.last_used, &b.name)));
        let mut freed = 0;
        let mut evict = Vec::new();
        for view in candidates {
            if freed >= needed {
                break;
            }
            freed += view.state.bytes();
            evict.push(view.name.clone());
        }
        (freed >= needed).then_some(evict)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn invariants_hold_over_random_events(
            specs in catalog(),
            budget in 1..400u64,
            steps in prop::collection::vec((op(), 0..60u64), 1..100),
        ) {
            let mut r = Residency::new(budget);
            prop_assert!(r.set_catalog(specs.clone()).is_empty());
            let mut in_catalog: BTreeSet<String> = specs.iter().map(|s| s.name.clone()).collect();
            // Withdrawn copies whose jobs are still ending: (bytes, jobs) per model.
            let mut draining: BTreeMap<String, (u64, u32)> = BTreeMap::new();
            let mut now = secs(0);
            let steps = steps.into_iter().flat_map(|(op, advance)| match op {
                Op::LoadThrough { model, pin, percent } => vec![
                    (Op::BeginLoad { model, pin }, advance),
                    (Op::FinishLoad { model, percent }, 0),
                ],
                op => vec![(op, advance)],
            });

            for (op, advance) in steps {
                now += secs(advance);
                let before = by_name(&r);
                let budget_before = r.budget();
                let used_before = r.used();
                let name_of = |model: usize| specs[model % specs.len()].name.clone();
                let mut withdrawn = None;

                match op {
                    Op::BeginLoad { model, pin } => {
                        let name = name_of(model);
                        let view = before.get(&name);
                        let result = r.begin_load(&name, pin, now);
                        let known = in_catalog.contains(&name);
                        let unloaded = known && view.unwrap().state == ModelState::Unloaded;
                        let estimate = spec_bytes(&specs, &name);
                        prop_assert_eq!(
                            matches!(result, Err(LoadError::NeverFits { .. })),
                            unloaded && estimate > budget_before
                        );
                        match result {
                            Err(LoadError::UnknownModel { .. }) => prop_assert!(!known),
                            Ok(LoadPlan::AlreadyResident) => prop_assert!(is_resident(view)),
                            Ok(LoadPlan::AlreadyLoading) => {
                                let loading = matches!(view.unwrap().state, ModelState::Loading { .. });
                                prop_assert!(loading);
                            }
                            Err(LoadError::NeverFits { .. }) => {}
                            Ok(LoadPlan::Load { evict }) => {
                                prop_assert!(unloaded);
                                let needed = estimate.saturating_sub(budget_before - used_before);
                                prop_assert_eq!(Some(evict.clone()), expected_evictions(&before, needed));
                                assert_evictable(&before, &evict);
                                let after = r.view(&name).unwrap();
                                prop_assert_eq!(after.state, ModelState::Loading { reserved: estimate });
                                prop_assert_eq!(after.pinned, pin);
                            }
                            Err(LoadError::NoRoom { .. }) => {
                                prop_assert!(unloaded);
                                let needed = estimate.saturating_sub(budget_before - used_before);
                                prop_assert_eq!(expected_evictions(&before, needed), None);
                                prop_assert_eq!(&by_name(&r), &before);
                            }
                        }
                    }
                    Op::FinishLoad { model, percent } => {
                        let name = name_of(model);
                        let Some(view) = before.get(&name) else { continue };
                        if !matches!(view.state, ModelState::Loading { .. }) {
                            continue;
                        }
                        let actual = view.estimated_bytes * percent / 100;
                        match r.finish_load(&name, actual, now) {
                            Ok(evicted) => {
                                if in_catalog.contains(&name) {
                                    assert_evictable(&before, &evicted);
                                    prop_assert_eq!(
                                        r.view(&name).unwrap().state,
                                        ModelState::Resident { bytes: actual }
                                    );
                                } else {
                                    prop_assert_eq!(evicted, vec![name.clone()]);
                                    prop_assert!(r.view(&name).is_none());
                                }
                            }
                            Err(err) => {
                                prop_assert_eq!(
                                    matches!(err, LoadError::NeverFits { .. }),
                                    actual > budget_before
                                );
                                let after = r.view(&name).unwrap();
                                prop_assert_eq!(after.state, ModelState::Unloaded);
                                prop_assert!(!after.pinned);
                            }
                        }
                    }
                    Op::FailLoad { model } => r.fail_load(&name_of(model)),
                    Op::Unload { model } => {
                        let name = name_of(model);
                        let result = r.unload(&name);
                        if let Some(view) = before.get(&name) {
                            if view.pinned || view.busy > 0 {
                                prop_assert!(result.is_err());
                            }
                        }
                        if result.is_ok() {
                            prop_assert_eq!(r.view(&name).unwrap().state, ModelState::Unloaded);
                        }
                    }
                    Op::Pin { model } => {
                        let name = name_of(model);
                        if r.pin(&name).is_ok() {
                            prop_assert!(r.view(&name).unwrap().pinned);
                        }
                    }
                    Op::Unpin { model } => {
                        let name = name_of(model);
                        if r.unpin(&name, now).is_ok() {
                            prop_assert!(!r.view(&name).unwrap().pinned);
                        }
                    }
                    Op::JobStarted { model } => {
                        let name = name_of(model);
                        if is_resident(before.get(&name)) {
                            r.job_started(&name, now);
                            prop_assert_eq!(r.view(&name).unwrap().busy, before[&name].busy + 1);
                        }
                    }
                    Op::JobFinished { model } => {
                        let name = name_of(model);
                        if before.get(&name).is_some_and(|v| v.busy > 0) {
                            let dropped = r.job_finished(&name, now);
                            if !dropped.is_empty() {
                                prop_assert_eq!(dropped, vec![name.clone()]);
                                prop_assert!(!in_catalog.contains(&name));
                            }
                        }
                    }
                    Op::Withdraw { model } => {
                        let name = name_of(model);
                        let view = before.get(&name);
                        prop_assert_eq!(r.withdraw(&name), is_resident(view));
                        if let Some(v) = view.filter(|v| is_resident(Some(v))) {
                            if v.busy > 0 {
                                let d = draining.entry(name.clone()).or_insert((0, 0));
                                d.0 += v.state.bytes();
                                d.1 += v.busy;
                            }
                            if let Some(after) = r.view(&name) {
                                prop_assert_eq!(after.state, ModelState::Unloaded);
                                prop_assert_eq!(after.busy, 0);
                                prop_assert!(!after.pinned);
                            }
                            withdrawn = Some(name);
                        }
                    }
                    Op::WithdrawnJobFinished { model } => {
                        let name = name_of(model);
                        if let Some(d) = draining.get_mut(&name) {
                            r.withdrawn_job_finished(&name);
                            d.1 -= 1;
                            if d.1 == 0 {
                                draining.remove(&name);
                            }
                        }
                    }
                    Op::Tick => {
                        let expired = r.tick(now);
                        let expected: Vec<String> = before
                            .values()
                            .filter(|v| {
                                evictable(v)
                                    && match v.keep_alive {
                                        KeepAlive::Forever => false,
                                        KeepAlive::For(keep) => now >= v.last_used.unwrap() + keep,
                                    }
                            })
                            .map(|v| v.name.clone())
                            .collect();
                        prop_assert_eq!(&expired, &expected);
                        for name in &expired {
                            prop_assert_eq!(r.view(name).unwrap().state, ModelState::Unloaded);
                        }
                    }
                    Op::SetBudget { budget } => match r.set_budget(budget, now) {
                        Ok(evicted) => {
                            assert_evictable(&before, &evicted);
                            prop_assert_eq!(r.budget(), budget);
                        }
                        Err(BudgetError::TooSmall { held, .. }) => {
                            prop_assert!(held > budget);
                            prop_assert_eq!(r.budget(), budget_before);
                            prop_assert_eq!(&by_name(&r), &before);
                        }
                    },
                    Op::LoadThrough { .. } => unreachable!("expanded above"),
                    Op::SetCatalog { keep } => {
                        let kept: Vec<ModelSpec> = specs
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| keep & (1 << i) != 0)
                            .map(|(_, s)| s.clone())
                            .collect();
                        in_catalog = kept.iter().map(|s| s.name.clone()).collect();
                        for name in r.set_catalog(kept) {
                            prop_assert!(!in_catalog.contains(&name));
                            prop_assert!(is_resident(before.get(&name)));
                            prop_assert_eq!(before[&name].busy, 0);
                        }
                    }
                }

                // Global invariants after every operation.
                let after = by_name(&r);
                prop_assert!(r.used() <= r.budget(), "used {} > budget {}", r.used(), r.budget());
                prop_assert_eq!(
                    r.used(),
                    after.values().map(|v| v.state.bytes()).sum::<u64>()
                        + draining.values().map(|d| d.0).sum::<u64>()
                );
                // Draining copies are holders that eviction cannot take.
                for (name, (bytes, jobs)) in &draining {
                    let h = r.holders().into_iter().find(|h| h.withdrawn && &h.name == name);
                    prop_assert_eq!(h.map(|h| (h.bytes, h.busy)), Some((*bytes, *jobs)));
                }
                for (name, view) in &before {
                    let protected = is_resident(Some(view)) && (view.pinned || view.busy > 0);
                    if !protected || withdrawn.as_ref() == Some(name) {
                        continue;
                    }
                    if !protected {
                        continue;
                    }
                    match after.get(name) {
                        Some(now_view) => prop_assert_eq!(
                            now_view.state, view.state,
                            "protected model {} lost its memory", name
                        ),
                        // Only a model that left the catalog may be forgotten.
                        None => prop_assert!(!in_catalog.contains(name)),
                    }
                }
            }
        }
    }

    fn spec_bytes(specs: &[ModelSpec], name: &str) -> u64 {
        specs
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .estimated_bytes
    }
}
