//! Queues jobs per model and decides when each one loads, runs or stops.
//!
//! [`Scheduler`] keeps a FIFO queue of jobs for every model and runs up to
//! a caller-given number of jobs per model at once (the model's capacity,
//! asked for on every poll). The daemon drives it: it submits jobs, calls
//! [`Scheduler::poll`] to learn which models to load and which jobs to run,
//! and reports back with [`Scheduler::load_finished`] and
//! [`Scheduler::job_finished`]. The scheduler answers with [`Action`]s; it
//! never loads or runs anything itself.
//!
//! A job moves Queued -> Loading (only if its model is not in memory) ->
//! Running -> Done / Failed / Cancelled. While a model loads, the job at the
//! head of its queue waits in Loading and no other job of that model starts;
//! once the model is resident, queued jobs start in FIFO order until the
//! model's capacity is reached. Lowering a capacity never stops jobs already
//! running; it only keeps new ones from starting. Finished jobs are
//! remembered for listing up to a fixed history size, oldest forgotten
//! first.
//!
//! Architecture invariant: does no I/O and never reads a clock; the current
//! time is always passed in as [`Now`].
//! Architecture invariant: knows nothing of tokio, gRPC or Vulkan, nor of
//! memory budgets; whether a model is resident and how many of its jobs may
//! run at once are asked of the caller.
//! Architecture invariant: at most one load per model is outstanding, so at
//! most one job per model is Loading.
//! Architecture invariant: a job starts, or a load is started for it, only
//! while fewer of its model's jobs are running than the model's capacity as
//! given to poll, and no job of a model starts while its load is
//! outstanding; lowering a capacity stops no running job.
//! Architecture invariant: job ids start at 1, increase, and are never
//! reused.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::error::Error;
use std::fmt;

use crate::residency::Now;

pub mod step;

/// Identifies a job. Displays as the bare number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a job asks the model to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    Generate,
    Image,
}

impl JobKind {
    /// Lowercase name, for logs and listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobKind::Generate => "generate",
            JobKind::Image => "image",
        }
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting behind other jobs of the same model.
    Queued,
    /// Waiting for its model to load.
    Loading,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    /// True for states a job never leaves.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    /// Lowercase name, for logs and listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Loading => "loading",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a running job ended, as reported by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed(String),
    Cancelled,
}

/// A snapshot of one job, for listings and status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobView {
    pub id: JobId,
    pub model: String,
    pub kind: JobKind,
    pub state: JobState,
    pub submitted_at: Now,
    /// When the job started running.
    pub started_at: Option<Now>,
    /// When the job reached a terminal state.
    pub finished_at: Option<Now>,
    /// Why the job failed.
    pub error: Option<String>,
    /// A running job was asked to stop and has not stopped yet.
    pub cancel_requested: bool,
    /// Place in its model's queue while Queued; 0 means next in line.
    pub queue_position: Option<usize>,
}

/// Something the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Load the model, then call `load_finished`.
    Load { model: String },
    /// Run the job on its (resident) model, then call `job_finished`.
    Run { job: JobId, model: String },
    /// Stop the running job, then call `job_finished`.
    Abort { job: JobId },
}

/// Why a job was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull { model: String, max_queue: usize },
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::QueueFull { model, max_queue } => write!(
                f,
                "the queue for model {model:?} is full ({max_queue} jobs waiting); \
                 retry once some finish, cancel queued jobs, or raise the queue limit"
            ),
        }
    }
}

impl Error for SubmitError {}

/// Why a job could not be cancelled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelError {
    /// No such job, or it finished long enough ago to be forgotten.
    NotFound(JobId),
    AlreadyFinished {
        job: JobId,
        state: JobState,
    },
}

impl fmt::Display for CancelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelError::NotFound(job) => write!(
                f,
                "job {job} not found; check the id (finished jobs are forgotten after a while)"
            ),
            CancelError::AlreadyFinished { job, state } => {
                write!(
                    f,
                    "job {job} already ended ({state}); there is nothing to cancel"
                )
            }
        }
    }
}

impl Error for CancelError {}

/// What a successful cancel did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job had not started running and is now cancelled.
    Cancelled,
    /// The job is running: the caller must stop it and then report
    /// `job_finished(.., Outcome::Cancelled)`.
    Aborting,
}

/// Everything tracked for one job.
#[derive(Clone, Debug)]
struct Job {
    model: String,
    kind: JobKind,
    state: JobState,
    submitted_at: Now,
    started_at: Option<Now>,
    finished_at: Option<Now>,
    error: Option<String>,
    cancel_requested: bool,
}

/// Whether a model is being loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum LoadState {
    #[default]
    Idle,
    /// A load is in progress on behalf of this job, or of no job if that job
    /// was cancelled meanwhile. Either way no job of the model starts until
    /// `load_finished`.
    Pending(Option<JobId>),
}

/// Per-model queue and activity.
#[derive(Clone, Debug, Default)]
struct Lane {
    queued: VecDeque<JobId>,
    load: LoadState,
    running: BTreeSet<JobId>,
}

impl Lane {
    fn is_empty(&self) -> bool {
        self.queued.is_empty() && self.load == LoadState::Idle && self.running.is_empty()
    }
}

/// Job queues for all models.
#[derive(Clone, Debug)]
pub struct Scheduler {
    max_queue: usize,
    history: usize,
    next_id: u64,
    /// Active jobs and remembered finished ones.
    jobs: BTreeMap<JobId, Job>,
    lanes: BTreeMap<String, Lane>,
    /// Remembered finished jobs, oldest first.
    finished: VecDeque<JobId>,
}

impl Scheduler {
    /// Creates a scheduler allowing `max_queue` queued jobs per model and
    /// remembering the last `history` finished jobs.
    pub fn new(max_queue: usize, history: usize) -> Self {
        Scheduler {
            max_queue,
            history,
            next_id: 1,
            jobs: BTreeMap::new(),
            lanes: BTreeMap::new(),
            finished: VecDeque::new(),
        }
    }

    /// Changes the per-model queue limit. Jobs already queued stay queued
    /// even if there are now more than the limit.
    pub fn set_max_queue(&mut self, max_queue: usize) {
        self.max_queue = max_queue;
    }

    /// Queues a job for `model`. Fails when the model already has
    /// `max_queue` jobs waiting (jobs loading or running do not count).
    pub fn submit(&mut self, model: &str, kind: JobKind, now: Now) -> Result<JobId, SubmitError> {
        let lane = self.lanes.entry(model.to_owned()).or_default();
        if lane.queued.len() >= self.max_queue {
            if lane.is_empty() {
                self.lanes.remove(model);
            }
            return Err(SubmitError::QueueFull {
                model: model.to_owned(),
                max_queue: self.max_queue,
            });
        }
        let id = JobId(self.next_id);
        self.next_id += 1;
        lane.queued.push_back(id);
        self.jobs.insert(
            id,
            Job {
                model: model.to_owned(),
                kind,
                state: JobState::Queued,
                submitted_at: now,
                started_at: None,
                finished_at: None,
                error: None,
                cancel_requested: false,
            },
        );
        Ok(id)
    }

    /// Starts queued jobs of every model that has room, in FIFO order.
    ///
    /// `capacity(model)` is how many jobs of the model may run at once (0
    /// counts as 1). For a resident model, queued jobs run at once (`Run`)
    /// while fewer than that many are running. For a model that is not
    /// resident, the job at the head of the queue waits for it and a single
    /// `Load` is returned, provided a running slot is free for that job.
    /// A model with a load in progress starts nothing until `load_finished`.
    pub fn poll(
        &mut self,
        is_resident: &dyn Fn(&str) -> bool,
        capacity: &dyn Fn(&str) -> usize,
        now: Now,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for (model, lane) in &mut self.lanes {
            if lane.load != LoadState::Idle || lane.queued.is_empty() {
                continue;
            }
            let capacity = capacity(model).max(1);
            if lane.running.len() >= capacity {
                continue;
            }
            if !is_resident(model) {
                let id = lane.queued.pop_front().expect("queue is not empty");
                let job = self.jobs.get_mut(&id).expect("queued jobs are tracked");
                job.state = JobState::Loading;
                lane.load = LoadState::Pending(Some(id));
                actions.push(Action::Load {
                    model: model.clone(),
                });
                continue;
            }
            while lane.running.len() < capacity {
                let Some(id) = lane.queued.pop_front() else {
                    break;
                };
                let job = self.jobs.get_mut(&id).expect("queued jobs are tracked");
                job.state = JobState::Running;
                job.started_at = Some(now);
                lane.running.insert(id);
                actions.push(Action::Run {
                    job: id,
                    model: model.clone(),
                });
            }
        }
        actions
    }

    /// Records the end of a `Load` for `model`.
    ///
    /// On success the job that waited for it starts running; if that job was
    /// cancelled meanwhile, the next queued job runs instead. Only that one
    /// job starts here; the next `poll` starts more up to the model's
    /// capacity. On failure the waiting job and every queued job of the
    /// model fail with the error; jobs already running are left alone.
    /// Does nothing if no load was pending for the model.
    pub fn load_finished(
        &mut self,
        model: &str,
        result: Result<(), String>,
        now: Now,
    ) -> Vec<Action> {
        let Some(lane) = self.lanes.get_mut(model) else {
            return Vec::new();
        };
        let LoadState::Pending(waiting) = lane.load else {
            return Vec::new();
        };
        lane.load = LoadState::Idle;

        let mut actions = Vec::new();
        match result {
            Ok(()) => {
                if let Some(id) = waiting.or_else(|| lane.queued.pop_front()) {
                    let job = self.jobs.get_mut(&id).expect("active jobs are tracked");
                    job.state = JobState::Running;
                    job.started_at = Some(now);
                    lane.running.insert(id);
                    actions.push(Action::Run {
                        job: id,
                        model: model.to_owned(),
                    });
                }
            }
            Err(error) => {
                let failed: Vec<JobId> = waiting.into_iter().chain(lane.queued.drain(..)).collect();
                for id in failed {
                    self.finish(id, JobState::Failed, Some(error.clone()), now);
                }
            }
        }
        self.drop_lane_if_empty(model);
        actions
    }

    /// Records that a running job ended. A job that was asked to stop counts
    /// as cancelled unless it reports `Done`. Does nothing for a job that is
    /// not running.
    pub fn job_finished(&mut self, job: JobId, outcome: Outcome, now: Now) {
        let Some(entry) = self.jobs.get(&job) else {
            return;
        };
        if entry.state != JobState::Running {
            return;
        }
        let cancel_requested = entry.cancel_requested;
        let model = entry.model.clone();
        let (state, error) = match outcome {
            Outcome::Done => (JobState::Done, None),
            _ if cancel_requested => (JobState::Cancelled, None),
            Outcome::Failed(error) => (JobState::Failed, Some(error)),
            Outcome::Cancelled => (JobState::Cancelled, None),
        };
        if let Some(lane) = self.lanes.get_mut(&model) {
            let was_running = lane.running.remove(&job);
            debug_assert!(was_running, "running job {job} missing from its lane");
        }
        self.finish(job, state, error, now);
        self.drop_lane_if_empty(&model);
    }

    /// Cancels a job. A queued or loading job is cancelled at once; a
    /// running one is marked and `Aborting` tells the caller to stop it.
    pub fn cancel(&mut self, job: JobId, now: Now) -> Result<CancelOutcome, CancelError> {
        let entry = self.jobs.get_mut(&job).ok_or(CancelError::NotFound(job))?;
        let model = entry.model.clone();
        match entry.state {
            state if state.is_terminal() => Err(CancelError::AlreadyFinished { job, state }),
            JobState::Running => {
                entry.cancel_requested = true;
                Ok(CancelOutcome::Aborting)
            }
            _ => {
                if let Some(lane) = self.lanes.get_mut(&model) {
                    if lane.load == LoadState::Pending(Some(job)) {
                        // The load itself carries on; load_finished will hand
                        // the model to the next queued job.
                        lane.load = LoadState::Pending(None);
                    } else {
                        lane.queued.retain(|&id| id != job);
                    }
                }
                self.finish(job, JobState::Cancelled, None, now);
                self.drop_lane_if_empty(&model);
                Ok(CancelOutcome::Cancelled)
            }
        }
    }

    /// For shutdown: cancels every queued and loading job and returns an
    /// `Abort` for each running one, in id order.
    pub fn cancel_all(&mut self, now: Now) -> Vec<Action> {
        let active: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, job)| !job.state.is_terminal())
            .map(|(&id, _)| id)
            .collect();
        let mut actions = Vec::new();
        for id in active {
            if let Ok(CancelOutcome::Aborting) = self.cancel(id, now) {
                actions.push(Action::Abort { job: id });
            }
        }
        actions
    }

    /// Active jobs and remembered finished ones, by ascending id.
    pub fn jobs(&self) -> Vec<JobView> {
        self.jobs.keys().filter_map(|&id| self.job(id)).collect()
    }

    /// One job, if it is active or still remembered.
    pub fn job(&self, id: JobId) -> Option<JobView> {
        let job = self.jobs.get(&id)?;
        let queue_position = match job.state {
            JobState::Queued => self
                .lanes
                .get(&job.model)
                .and_then(|lane| lane.queued.iter().position(|&queued| queued == id)),
            _ => None,
        };
        Some(JobView {
            id,
            model: job.model.clone(),
            kind: job.kind,
            state: job.state,
            submitted_at: job.submitted_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            error: job.error.clone(),
            cancel_requested: job.cancel_requested,
            queue_position,
        })
    }

    /// Number of jobs of `model` that have not ended: queued, loading or
    /// running.
    pub fn active_jobs(&self, model: &str) -> usize {
        self.lanes.get(model).map_or(0, |lane| {
            let loading = match lane.load {
                LoadState::Pending(Some(_)) => 1,
                LoadState::Idle | LoadState::Pending(None) => 0,
            };
            lane.queued.len() + loading + lane.running.len()
        })
    }

    /// Moves a job to a terminal state and remembers it, forgetting the
    /// oldest finished jobs beyond the history size. The caller has already
    /// taken the job out of its lane.
    fn finish(&mut self, id: JobId, state: JobState, error: Option<String>, now: Now) {
        let job = self.jobs.get_mut(&id).expect("finished jobs are tracked");
        debug_assert!(!job.state.is_terminal(), "job {id} finished twice");
        job.state = state;
        job.error = error;
        job.finished_at = Some(now);
        self.finished.push_back(id);
        while self.finished.len() > self.history {
            if let Some(old) = self.finished.pop_front() {
                self.jobs.remove(&old);
            }
        }
    }

    /// Forgets a model's lane once it has nothing queued or in progress.
    fn drop_lane_if_empty(&mut self, model: &str) {
        if self.lanes.get(model).is_some_and(Lane::is_empty) {
            self.lanes.remove(model);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn t(s: u64) -> Now {
        Duration::from_secs(s)
    }

    fn resident(_: &str) -> bool {
        true
    }

    fn nothing_resident(_: &str) -> bool {
        false
    }

    fn one(_: &str) -> usize {
        1
    }

    fn two(_: &str) -> usize {
        2
    }

    fn state(s: &Scheduler, id: JobId) -> JobState {
        s.job(id).unwrap().state
    }

    #[test]
    fn display_forms() {
        assert_eq!(JobId(42).to_string(), "42");
        assert_eq!(JobState::Cancelled.to_string(), "cancelled");
        assert_eq!(JobKind::Image.as_str(), "image");
        assert!(JobState::Failed.is_terminal() && !JobState::Loading.is_terminal());
    }

    #[test]
    fn runs_jobs_of_one_model_in_fifo_order() {
        let mut s = Scheduler::new(8, 100);
        let a = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let b = s.submit("m", JobKind::Generate, t(1)).unwrap();
        let c = s.submit("m", JobKind::Image, t(2)).unwrap();
        let other = s.submit("n", JobKind::Generate, t(3)).unwrap();
        assert_eq!((a, b, c, other), (JobId(1), JobId(2), JobId(3), JobId(4)));
        assert_eq!(s.job(c).unwrap().queue_position, Some(2));

        let actions = s.poll(&resident, &one, t(4));
        assert_eq!(
            actions,
            vec![
                Action::Run {
                    job: a,
                    model: "m".into()
                },
                Action::Run {
                    job: other,
                    model: "n".into()
                },
            ]
        );
        // With capacity 1, one job per model at a time.
        assert!(s.poll(&resident, &one, t(5)).is_empty());
        assert_eq!(s.job(b).unwrap().queue_position, Some(0));
        assert_eq!(s.active_jobs("m"), 3);

        s.job_finished(a, Outcome::Done, t(6));
        assert_eq!(
            s.poll(&resident, &one, t(7)),
            vec![Action::Run {
                job: b,
                model: "m".into()
            }]
        );
        s.job_finished(b, Outcome::Failed("out of memory".into()), t(8));
        assert_eq!(s.job(b).unwrap().error.as_deref(), Some("out of memory"));
        assert_eq!(
            s.poll(&resident, &one, t(9)),
            vec![Action::Run {
                job: c,
                model: "m".into()
            }]
        );
        let view = s.job(c).unwrap();
        assert_eq!((view.started_at, view.submitted_at), (Some(t(9)), t(2)));
    }

    #[test]
    fn queue_full_refuses_until_a_job_leaves_the_queue() {
        let mut s = Scheduler::new(2, 10);
        s.submit("m", JobKind::Generate, t(0)).unwrap();
        s.submit("m", JobKind::Generate, t(0)).unwrap();
        let err = s.submit("m", JobKind::Generate, t(0)).unwrap_err();
        assert_eq!(
            err,
            SubmitError::QueueFull {
                model: "m".into(),
                max_queue: 2
            }
        );
        assert!(err.to_string().contains("queue for model \"m\" is full"));
        // Other models have their own queues.
        s.submit("n", JobKind::Generate, t(0)).unwrap();
        // The running job does not count against the queue.
        s.poll(&resident, &one, t(1));
        s.submit("m", JobKind::Generate, t(2)).unwrap();
        assert_eq!(s.active_jobs("m"), 3);

        s.set_max_queue(0);
        assert!(s.submit("z", JobKind::Generate, t(3)).is_err());
        assert_eq!(s.active_jobs("z"), 0);
    }

    #[test]
    fn cancelling_queued_loading_and_running_jobs() {
        let mut s = Scheduler::new(8, 100);
        let a = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let b = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let c = s.submit("m", JobKind::Generate, t(0)).unwrap();
        assert_eq!(
            s.poll(&nothing_resident, &one, t(1)),
            vec![Action::Load { model: "m".into() }]
        );
        assert_eq!(state(&s, a), JobState::Loading);

        // Cancelling the loading job does not start a second load.
        assert_eq!(s.cancel(a, t(2)), Ok(CancelOutcome::Cancelled));
        assert_eq!(s.cancel(b, t(2)), Ok(CancelOutcome::Cancelled));
        assert!(s.poll(&nothing_resident, &one, t(3)).is_empty());
        assert_eq!(
            s.cancel(a, t(3)),
            Err(CancelError::AlreadyFinished {
                job: a,
                state: JobState::Cancelled
            })
        );

        // The finished load goes to the next job still waiting.
        assert_eq!(
            s.load_finished("m", Ok(()), t(4)),
            vec![Action::Run {
                job: c,
                model: "m".into()
            }]
        );
        assert_eq!(s.cancel(c, t(5)), Ok(CancelOutcome::Aborting));
        assert!(s.job(c).unwrap().cancel_requested);
        assert_eq!(state(&s, c), JobState::Running);
        s.job_finished(c, Outcome::Failed("interrupted".into()), t(6));
        let view = s.job(c).unwrap();
        assert_eq!(
            (view.state, view.error, view.finished_at),
            (JobState::Cancelled, None, Some(t(6)))
        );

        assert_eq!(
            s.cancel(JobId(99), t(7)),
            Err(CancelError::NotFound(JobId(99)))
        );
    }

    #[test]
    fn done_wins_over_a_late_cancel() {
        let mut s = Scheduler::new(8, 100);
        let a = s.submit("m", JobKind::Generate, t(0)).unwrap();
        s.poll(&resident, &one, t(1));
        s.cancel(a, t(2)).unwrap();
        s.job_finished(a, Outcome::Done, t(3));
        assert_eq!(state(&s, a), JobState::Done);
    }

    #[test]
    fn load_failure_fails_the_whole_queue() {
        let mut s = Scheduler::new(8, 100);
        let a = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let b = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let other = s.submit("n", JobKind::Generate, t(0)).unwrap();
        s.poll(&|model: &str| model == "n", &one, t(1));
        assert!(s
            .load_finished("m", Err("file not found".into()), t(2))
            .is_empty());
        for id in [a, b] {
            let view = s.job(id).unwrap();
            assert_eq!(view.state, JobState::Failed);
            assert_eq!(view.error.as_deref(), Some("file not found"));
        }
        assert_eq!(state(&s, other), JobState::Running);
        assert_eq!(s.active_jobs("m"), 0);
        // A stray report for a model with no pending load changes nothing.
        assert!(s.load_finished("m", Ok(()), t(3)).is_empty());
    }

    #[test]
    fn cancel_all_aborts_running_and_cancels_the_rest() {
        let mut s = Scheduler::new(8, 100);
        let a = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let b = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let c = s.submit("n", JobKind::Generate, t(0)).unwrap();
        s.poll(&|model: &str| model == "m", &one, t(1));
        assert_eq!(s.cancel_all(t(2)), vec![Action::Abort { job: a }]);
        assert_eq!(state(&s, b), JobState::Cancelled);
        assert_eq!(state(&s, c), JobState::Cancelled);
        s.job_finished(a, Outcome::Cancelled, t(3));
        assert!(s.jobs().iter().all(|job| job.state.is_terminal()));
        // The abandoned load of "n" finishes with nobody waiting.
        assert!(s.load_finished("n", Ok(()), t(4)).is_empty());
    }

    #[test]
    fn history_forgets_oldest_finished_jobs() {
        let mut s = Scheduler::new(8, 2);
        let ids: Vec<JobId> = (0..4)
            .map(|_| s.submit("m", JobKind::Generate, t(0)).unwrap())
            .collect();
        for &id in &ids[..3] {
            s.cancel(id, t(1)).unwrap();
        }
        let listed: Vec<JobId> = s.jobs().into_iter().map(|job| job.id).collect();
        assert_eq!(listed, vec![ids[1], ids[2], ids[3]]);
        assert_eq!(s.cancel(ids[0], t(2)), Err(CancelError::NotFound(ids[0])));
    }

    fn run(job: JobId, model: &str) -> Action {
        Action::Run {
            job,
            model: model.into(),
        }
    }

    #[test]
    fn capacity_two_runs_two_jobs_and_the_third_waits() {
        let mut s = Scheduler::new(8, 100);
        let a = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let b = s.submit("m", JobKind::Generate, t(1)).unwrap();
        let c = s.submit("m", JobKind::Image, t(2)).unwrap();

        assert_eq!(
            s.poll(&resident, &two, t(3)),
            vec![run(a, "m"), run(b, "m")]
        );
        assert_eq!(
            (state(&s, a), state(&s, b)),
            (JobState::Running, JobState::Running)
        );
        assert_eq!(state(&s, c), JobState::Queued);
        assert_eq!(s.job(c).unwrap().queue_position, Some(0));
        assert_eq!(s.active_jobs("m"), 3);
        // Both slots are taken.
        assert!(s.poll(&resident, &two, t(4)).is_empty());

        s.job_finished(b, Outcome::Done, t(5));
        assert_eq!(s.poll(&resident, &two, t(6)), vec![run(c, "m")]);
        assert_eq!(s.job(c).unwrap().started_at, Some(t(6)));
        assert_eq!(s.active_jobs("m"), 2);
        s.job_finished(a, Outcome::Done, t(7));
        s.job_finished(c, Outcome::Done, t(8));
        assert_eq!(s.active_jobs("m"), 0);
        assert!(s.poll(&resident, &two, t(9)).is_empty());
    }

    #[test]
    fn capacity_may_change_between_polls() {
        let mut s = Scheduler::new(8, 100);
        let ids: Vec<JobId> = (0..5)
            .map(|_| s.submit("m", JobKind::Generate, t(0)).unwrap())
            .collect();
        let zero = |_: &str| 0;
        let three = |_: &str| 3;

        // Capacity 0 counts as 1.
        assert_eq!(s.poll(&resident, &zero, t(1)), vec![run(ids[0], "m")]);
        assert!(s.poll(&resident, &zero, t(1)).is_empty());
        // Raising it starts more jobs next to the running one.
        assert_eq!(
            s.poll(&resident, &three, t(2)),
            vec![run(ids[1], "m"), run(ids[2], "m")]
        );
        // Lowering it stops nothing, but nothing new starts until fewer
        // than the new capacity are running.
        assert!(s.poll(&resident, &one, t(3)).is_empty());
        assert_eq!(running(&s), ids[..3].to_vec());
        s.job_finished(ids[0], Outcome::Done, t(4));
        s.job_finished(ids[1], Outcome::Done, t(4));
        assert!(s.poll(&resident, &one, t(5)).is_empty());
        s.job_finished(ids[2], Outcome::Done, t(6));
        assert_eq!(s.poll(&resident, &one, t(7)), vec![run(ids[3], "m")]);
        // Each model has its own capacity.
        let n = s.submit("n", JobKind::Generate, t(8)).unwrap();
        let m_one_n_two = |model: &str| if model == "m" { 1 } else { 2 };
        assert_eq!(s.poll(&resident, &m_one_n_two, t(9)), vec![run(n, "n")]);
        assert_eq!(state(&s, ids[4]), JobState::Queued);
    }

    #[test]
    fn one_load_at_a_time_then_poll_fills_the_capacity() {
        let mut s = Scheduler::new(8, 100);
        let a = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let b = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let c = s.submit("m", JobKind::Generate, t(0)).unwrap();

        assert_eq!(
            s.poll(&nothing_resident, &two, t(1)),
            vec![Action::Load { model: "m".into() }]
        );
        assert_eq!(state(&s, a), JobState::Loading);
        assert_eq!(state(&s, b), JobState::Queued);
        // No second load, and nothing runs before the load is reported,
        // even if the model looks resident meanwhile.
        assert!(s.poll(&nothing_resident, &two, t(2)).is_empty());
        assert!(s.poll(&resident, &two, t(2)).is_empty());

        // The load starts only the job that waited for it.
        assert_eq!(s.load_finished("m", Ok(()), t(3)), vec![run(a, "m")]);
        assert_eq!(s.poll(&resident, &two, t(4)), vec![run(b, "m")]);
        assert_eq!(state(&s, c), JobState::Queued);
        assert_eq!(s.active_jobs("m"), 3);
    }

    #[test]
    fn load_failure_spares_running_jobs() {
        let mut s = Scheduler::new(8, 100);
        let a = s.submit("m", JobKind::Generate, t(0)).unwrap();
        assert_eq!(s.poll(&resident, &two, t(1)), vec![run(a, "m")]);
        // The model left memory while a ran; the next job must reload it.
        let b = s.submit("m", JobKind::Generate, t(2)).unwrap();
        let c = s.submit("m", JobKind::Generate, t(2)).unwrap();
        assert_eq!(
            s.poll(&nothing_resident, &two, t(3)),
            vec![Action::Load { model: "m".into() }]
        );
        assert_eq!(state(&s, b), JobState::Loading);
        assert_eq!(s.active_jobs("m"), 3);

        assert!(s
            .load_finished("m", Err("no memory".into()), t(4))
            .is_empty());
        assert_eq!(state(&s, a), JobState::Running);
        for id in [b, c] {
            assert_eq!(state(&s, id), JobState::Failed);
        }
        assert_eq!(s.active_jobs("m"), 1);
        s.job_finished(a, Outcome::Done, t(5));
        assert_eq!(state(&s, a), JobState::Done);
        assert_eq!(s.active_jobs("m"), 0);
    }

    #[test]
    fn no_load_while_the_running_jobs_fill_the_capacity() {
        let mut s = Scheduler::new(8, 100);
        let a = s.submit("m", JobKind::Generate, t(0)).unwrap();
        let b = s.submit("m", JobKind::Generate, t(0)).unwrap();
        s.poll(&resident, &one, t(1));
        // The waiting job would need a slot of its own once loaded.
        assert!(s.poll(&nothing_resident, &one, t(2)).is_empty());
        assert_eq!(state(&s, b), JobState::Queued);
        s.job_finished(a, Outcome::Done, t(3));
        assert_eq!(
            s.poll(&nothing_resident, &one, t(4)),
            vec![Action::Load { model: "m".into() }]
        );
    }

    // ---- Property tests over random event sequences ----

    #[derive(Clone, Debug)]
    enum Op {
        Submit {
            model: usize,
            image: bool,
        },
        /// Cancel a job id in 1..=next id (so some are unknown).
        Cancel {
            pick: usize,
        },
        /// Poll with the models whose bit is set resident.
        Poll {
            resident: u8,
        },
        /// Change the capacity later polls give a model.
        SetCapacity {
            model: usize,
            capacity: usize,
        },
        LoadFinished {
            model: usize,
            ok: bool,
        },
        /// Finish a running job picked among the running ones.
        JobFinished {
            pick: usize,
            outcome: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4usize, any::<bool>()).prop_map(|(model, image)| Op::Submit { model, image }),
            2 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
            3 => any::<u8>().prop_map(|resident| Op::Poll { resident }),
            1 => (0..4usize, 1..=3usize)
                .prop_map(|(model, capacity)| Op::SetCapacity { model, capacity }),
            2 => (0..4usize, prop::bool::weighted(0.8))
                .prop_map(|(model, ok)| Op::LoadFinished { model, ok }),
            3 => (any::<usize>(), 0..3u8).prop_map(|(pick, outcome)| Op::JobFinished { pick, outcome }),
        ]
    }

    const MODELS: [&str; 4] = ["a", "b", "c", "d"];

    fn model_index(model: &str) -> usize {
        MODELS.iter().position(|&m| m == model).unwrap()
    }

    /// What the property test tracks next to the scheduler.
    struct Tracker {
        max_queue: usize,
        /// The capacity each poll hands out, per model.
        capacity: [usize; 4],
        /// How many jobs of each model may be running, counting an
        /// outstanding load as one. This is the capacity, except after the
        /// capacity was lowered: jobs already running then run on, and the
        /// ceiling comes down as they finish.
        ceiling: [usize; 4],
        /// Models with a Load handed out and no load_finished yet.
        loads_pending: BTreeSet<&'static str>,
        /// Every job seen in a terminal state, with that state.
        terminal: BTreeMap<JobId, JobState>,
    }

    impl Tracker {
        fn new(max_queue: usize, capacity: [usize; 4]) -> Self {
            Tracker {
                max_queue,
                capacity,
                ceiling: capacity,
                loads_pending: BTreeSet::new(),
                terminal: BTreeMap::new(),
            }
        }
    }

    fn count(jobs: &[JobView], model: &str, state: JobState) -> usize {
        jobs.iter()
            .filter(|job| job.model == model && job.state == state)
            .count()
    }

    fn check_invariants(s: &Scheduler, m: &mut Tracker) -> Result<(), TestCaseError> {
        let jobs = s.jobs();
        let ids: Vec<JobId> = jobs.iter().map(|job| job.id).collect();
        prop_assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids not ascending: {:?}",
            ids
        );
        for job in &jobs {
            if let Some(&state) = m.terminal.get(&job.id) {
                prop_assert_eq!(job.state, state, "job {} left a terminal state", job.id);
            } else if job.state.is_terminal() {
                m.terminal.insert(job.id, job.state);
            }
        }
        for (index, model) in MODELS.into_iter().enumerate() {
            let queued = count(&jobs, model, JobState::Queued);
            let loading = count(&jobs, model, JobState::Loading);
            let running = count(&jobs, model, JobState::Running);
            let load_pending = m.loads_pending.contains(model);
            prop_assert!(queued <= m.max_queue, "{} queued for {}", queued, model);
            prop_assert!(loading <= 1, "{} loading for {}", loading, model);
            prop_assert!(
                loading == 0 || load_pending,
                "{} loading with no load",
                model
            );
            let busy = running + usize::from(load_pending);
            prop_assert!(
                busy <= m.ceiling[index],
                "{} running (load pending: {}) for {} with room for {}",
                running,
                load_pending,
                model,
                m.ceiling[index]
            );
            m.ceiling[index] = m.capacity[index].max(busy);
            prop_assert_eq!(s.active_jobs(model), queued + loading + running);
            let mut positions: Vec<usize> = jobs
                .iter()
                .filter(|job| job.model == model)
                .filter_map(|job| job.queue_position)
                .collect();
            positions.sort_unstable();
            prop_assert_eq!(positions, (0..queued).collect::<Vec<_>>());
        }
        Ok(())
    }

    fn running(s: &Scheduler) -> Vec<JobId> {
        s.jobs()
            .into_iter()
            .filter(|job| job.state == JobState::Running)
            .map(|job| job.id)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn invariants_hold_over_random_events(
            max_queue in 1..5usize,
            history in 0..20usize,
            capacity in prop::array::uniform4(1..=3usize),
            ops in prop::collection::vec(op(), 1..120),
        ) {
            let mut s = Scheduler::new(max_queue, history);
            let mut m = Tracker::new(max_queue, capacity);
            let mut now = t(0);
            let mut last_id = 0u64;
            let mut seen = BTreeSet::new();

            for op in ops {
                now += Duration::from_millis(250);
                match op {
                    Op::Submit { model, image } => {
                        let kind = if image { JobKind::Image } else { JobKind::Generate };
                        let queued_before = count(&s.jobs(), MODELS[model], JobState::Queued);
                        match s.submit(MODELS[model], kind, now) {
                            Ok(id) => {
                                prop_assert!(queued_before < max_queue);
                                prop_assert!(id.0 > last_id);
                                prop_assert!(seen.insert(id));
                                last_id = id.0;
                            }
                            Err(SubmitError::QueueFull { .. }) => {
                                prop_assert_eq!(queued_before, max_queue);
                            }
                        }
                    }
                    Op::Cancel { pick } => {
                        let id = JobId(pick as u64 % (last_id + 2));
                        let before = s.job(id);
                        let result = s.cancel(id, now);
                        match before {
                            None => prop_assert_eq!(result, Err(CancelError::NotFound(id))),
                            Some(view) if view.state.is_terminal() => prop_assert_eq!(
                                result,
                                Err(CancelError::AlreadyFinished { job: id, state: view.state })
                            ),
                            Some(view) if view.state == JobState::Running => {
                                prop_assert_eq!(result, Ok(CancelOutcome::Aborting));
                                prop_assert!(s.job(id).unwrap().cancel_requested);
                            }
                            Some(_) => {
                                prop_assert_eq!(result, Ok(CancelOutcome::Cancelled));
                                if let Some(after) = s.job(id) {
                                    prop_assert_eq!(after.state, JobState::Cancelled);
                                }
                            }
                        }
                    }
                    Op::SetCapacity { model, capacity } => {
                        m.capacity[model] = capacity;
                    }
                    Op::Poll { resident } => {
                        let is_resident =
                            |model: &str| resident & (1 << model_index(model)) != 0;
                        let capacity = m.capacity;
                        let capacity_of = |model: &str| capacity[model_index(model)];
                        let before = s.jobs();
                        let actions = s.poll(&is_resident, &capacity_of, now);
                        let mut loads = BTreeSet::new();
                        for action in actions {
                            match action {
                                Action::Load { model } => {
                                    let model = MODELS[model_index(&model)];
                                    prop_assert!(!is_resident(model));
                                    // Never two loads in flight for one model.
                                    prop_assert!(m.loads_pending.insert(model));
                                    loads.insert(model);
                                }
                                Action::Run { job, model } => {
                                    prop_assert!(is_resident(&model));
                                    prop_assert_eq!(s.job(job).unwrap().state, JobState::Running);
                                }
                                Action::Abort { .. } => prop_assert!(false, "poll never aborts"),
                            }
                        }
                        // Poll leaves no room unused: a model with queued
                        // jobs and no load in progress has its capacity
                        // full, or a load under way for the next job.
                        let after = s.jobs();
                        for model in MODELS {
                            if m.loads_pending.contains(model) && !loads.contains(model) {
                                continue;
                            }
                            let running_before = count(&before, model, JobState::Running);
                            let running = count(&after, model, JobState::Running);
                            if count(&after, model, JobState::Queued) > 0 {
                                prop_assert!(
                                    running >= capacity_of(model) || loads.contains(model),
                                    "poll left room for {} unused", model
                                );
                            }
                            if loads.contains(model) {
                                prop_assert!(running < capacity_of(model));
                                prop_assert_eq!(running, running_before);
                            }
                        }
                    }
                    Op::LoadFinished { model, ok } => {
                        let model = MODELS[model];
                        let result = if ok { Ok(()) } else { Err("load failed".to_owned()) };
                        let running_before = count(&s.jobs(), model, JobState::Running);
                        let actions = s.load_finished(model, result, now);
                        if !m.loads_pending.remove(model) {
                            // Stray report: nothing was waiting for a load.
                            prop_assert!(actions.is_empty());
                        } else if ok {
                            // Only the job that waited starts; poll fills the rest.
                            prop_assert!(actions.len() <= 1);
                        } else {
                            prop_assert!(actions.is_empty());
                            // Running jobs carry on; everything else failed.
                            prop_assert_eq!(s.active_jobs(model), running_before);
                        }
                    }
                    Op::JobFinished { pick, outcome } => {
                        let running = running(&s);
                        if running.is_empty() {
                            continue;
                        }
                        let id = running[pick % running.len()];
                        let outcome = match outcome {
                            0 => Outcome::Done,
                            1 => Outcome::Failed("boom".to_owned()),
                            _ => Outcome::Cancelled,
                        };
                        s.job_finished(id, outcome, now);
                        if let Some(view) = s.job(id) {
                            prop_assert!(view.state.is_terminal());
                        }
                    }
                }
                check_invariants(&s, &mut m)?;
            }

            // Drain: finish every pending load, then keep running everything.
            for model in std::mem::take(&mut m.loads_pending) {
                s.load_finished(model, Ok(()), now);
            }
            for _ in 0..1000 {
                let capacity = m.capacity;
                let capacity_of = |model: &str| capacity[model_index(model)];
                let mut progressed = !s.poll(&resident, &capacity_of, now).is_empty();
                for id in running(&s) {
                    s.job_finished(id, Outcome::Done, now);
                    progressed = true;
                }
                check_invariants(&s, &mut m)?;
                if !progressed {
                    break;
                }
            }
            for job in s.jobs() {
                prop_assert!(job.state.is_terminal(), "job {} left {}", job.id, job.state);
            }
            for model in MODELS {
                prop_assert_eq!(s.active_jobs(model), 0);
            }
        }
    }
}
