//! Cutting a recorded pass into chunks that fit a time budget on the device.
//!
//! A UNet call or a VAE decode is a list of pieces (a resnet, a transformer, an upsample, …).
//! The executor gives each image chunk a time budget; the pass runs pieces until the next one's
//! learned cost would overrun it. A piece's cost is what the executor is held up for: the
//! chunk's wall time from recording to the end of its wait, never less than its device time
//! (the sum of its dispatches' GPU timestamps, which the chunk also reports for the submission
//! ceiling). Where the CPU records and the device runs on the same cores (lavapipe) the two
//! differ by the recording; on a GPU, by the submission and wake-up. A piece whose cost is not
//! known yet runs alone, so its time is measured exactly; a chunk of several known pieces
//! rescales their costs by how far their sum was off. Costs are kept per shape (batch and
//! latent size), since they scale with it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use halo_kernels::Stream;

/// Learned piece costs, in seconds, by (shape, piece).
#[derive(Default)]
pub struct Pacer {
    costs: Mutex<HashMap<(u64, usize), f64>>,
}

impl Pacer {
    pub fn cost(&self, shape: u64, piece: usize) -> Option<f64> {
        self.lock().get(&(shape, piece)).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, usize), f64>> {
        self.costs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `pieces` together took `took`, each given with the share of it that ran.
    pub fn learn(&self, shape: u64, pieces: &[(usize, f64)], took: Duration) {
        let took = took.as_secs_f64();
        let mut costs = self.lock();
        if let [(one, share)] = pieces {
            let whole = took / share.max(f64::MIN_POSITIVE);
            let e = costs.entry((shape, *one)).or_insert(whole);
            *e = 0.5 * *e + 0.5 * whole;
            return;
        }
        let known: f64 = pieces
            .iter()
            .filter_map(|(p, share)| costs.get(&(shape, *p)).map(|c| c * share))
            .sum();
        if known <= 0.0 {
            return;
        }
        // Move every piece's cost halfway towards what the chunk measured.
        let ratio = 1.0 + 0.5 * (took / known - 1.0);
        for (p, _) in pieces {
            if let Some(c) = costs.get_mut(&(shape, *p)) {
                *c *= ratio;
            }
        }
    }
}

/// A chunk's device time: the sum of its profiled dispatches, or the wall time since `started`
/// where the device keeps no timestamps.
pub fn device_time(s: &mut Stream, started: Instant) -> Duration {
    let gpu: Duration = s.take_profile().iter().map(|(_, d)| *d).sum();
    if gpu.is_zero() {
        started.elapsed()
    } else {
        gpu
    }
}

/// A shape key for costs: batch and latent size.
pub fn shape_key(batch: usize, height: usize, width: usize) -> u64 {
    ((batch as u64) << 40) | ((height as u64) << 20) | width as u64
}

/// The pieces of one chunk as they are chosen: each is admitted while the learned costs so far
/// fit the budget (the first always; with no budget, every one), a piece of unknown cost ends
/// the chunk after itself, and [`Chunk::end`] teaches the pacer what the chunk took.
///
/// A piece made of rows (a convolution's output rows) can run in part: as a chunk's first piece,
/// one whose learned cost alone overruns the budget runs only the rows that fit it, and later
/// chunks take the rest, each charged for its share.
pub struct Chunk<'a> {
    pacer: &'a Pacer,
    shape: u64,
    budget: Option<Duration>,
    started: Instant,
    /// The pieces run so far, each with the share of it that ran.
    ran: Vec<(usize, f64)>,
    predicted: f64,
    closed: bool,
}

impl<'a> Chunk<'a> {
    /// A chunk of pieces of a pass of `shape`, timed from `started`.
    pub fn new(pacer: &'a Pacer, shape: u64, budget: Option<Duration>, started: Instant) -> Self {
        Chunk {
            pacer,
            shape,
            budget,
            started,
            ran: Vec::new(),
            predicted: 0.0,
            closed: false,
        }
    }

    /// Whether piece `id` runs in this chunk (then it counts as run).
    pub fn admit(&mut self, id: usize) -> bool {
        self.admit_rows(id, 1, 1) == 1
    }

    /// How many of the `left` rows still to run of piece `id` (of `total` rows) run in this
    /// chunk: all of them, none, or as the chunk's first piece the share of the piece the budget
    /// holds (at least one row; the chunk then holds nothing else). A piece of unknown cost runs
    /// an eighth of its rows first, alone, so that a long convolution is measured without
    /// overrunning a submission.
    pub fn admit_rows(&mut self, id: usize, left: u64, total: u64) -> u64 {
        let total = total.max(1);
        let left = left.min(total);
        if self.closed || left == 0 {
            return 0;
        }
        let share = left as f64 / total as f64;
        let whole = self.pacer.cost(self.shape, id);
        let cost = whole.map(|c| c * share);
        let mut rows = left;
        if let Some(b) = self.budget.map(|b| b.as_secs_f64()) {
            match (cost, self.ran.is_empty()) {
                (Some(c), false) if self.predicted + c > b => return 0,
                (None, false) => return 0,
                // Unknown: a first band, to be measured.
                (None, true) => rows = total.div_ceil(8).min(left),
                (Some(c), true) if c > b => {
                    let fit = (b / whole.unwrap_or(c) * total as f64).floor() as u64;
                    rows = fit.clamp(1, left);
                    self.closed = true;
                }
                _ => {}
            }
        }
        let share = rows as f64 / total as f64;
        self.ran.push((id, share));
        self.predicted += whole.map_or(0.0, |c| c * share);
        // A piece of unknown cost runs alone, so that its time is its own.
        self.closed |= self.budget.is_some() && whole.is_none();
        rows
    }

    /// After the chunk's wait: its device time (see [`device_time`]); with a budget, the
    /// pieces' costs learn from it.
    pub fn end(self, s: &mut Stream) -> Duration {
        let took = device_time(s, self.started);
        if self.budget.is_some() {
            self.pacer
                .learn(self.shape, &self.ran, self.started.elapsed().max(took));
        }
        took
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(p: &Pacer, budget_ms: Option<u64>) -> Chunk<'_> {
        Chunk::new(p, 1, budget_ms.map(Duration::from_millis), Instant::now())
    }

    #[test]
    fn a_piece_of_rows_runs_in_bands_the_budget_holds() {
        let p = Pacer::default();
        // Unknown: an eighth of the rows, alone.
        let mut c = chunk(&p, Some(50));
        assert_eq!(c.admit_rows(0, 100, 100), 13);
        assert!(!c.admit(1));
        // That eighth took 25 ms: the whole is taken to cost 25 / (13/100) ms.
        p.learn(1, &c.ran, Duration::from_millis(25));
        let whole = p.cost(1, 0).unwrap();
        assert!((whole - 0.025 * 100.0 / 13.0).abs() < 1e-9, "{whole}");
        // Known and over the budget: the rows that fit, alone.
        let mut c = chunk(&p, Some(50));
        let rows = c.admit_rows(0, 87, 100);
        assert_eq!(rows, (0.05 / whole * 100.0).floor() as u64);
        assert!(!c.admit(1));
        // A rest that fits runs whole, and the chunk goes on.
        p.learn(1, &[(1, 1.0)], Duration::from_millis(1));
        let mut c = chunk(&p, Some(50));
        assert_eq!(c.admit_rows(0, 10, 100), 10);
        assert!(c.admit(1));
        // A rest that does not fit after another piece waits for the next chunk.
        let mut c = chunk(&p, Some(50));
        assert!(c.admit(1));
        assert_eq!(c.admit_rows(0, 100, 100), 0);
        // A tiny budget still moves: one row at a time.
        let mut c = chunk(&p, Some(0));
        assert_eq!(c.admit_rows(0, 100, 100), 1);
        // No budget: everything, whole.
        let mut c = chunk(&p, None);
        assert_eq!(c.admit_rows(0, 100, 100), 100);
        assert_eq!(c.admit_rows(2, 5, 5), 5);
        assert!(c.admit(3));
    }

    #[test]
    fn a_chunk_of_parts_learns_each_at_its_share() {
        let p = Pacer::default();
        p.learn(1, &[(0, 1.0)], Duration::from_millis(40));
        p.learn(1, &[(1, 1.0)], Duration::from_millis(10));
        // Half of piece 0 (20 ms) and piece 1 (10 ms) took 60 ms, twice the prediction: both
        // move halfway to twice their cost.
        p.learn(1, &[(0, 0.5), (1, 1.0)], Duration::from_millis(60));
        assert!((p.cost(1, 0).unwrap() - 0.060).abs() < 1e-9);
        assert!((p.cost(1, 1).unwrap() - 0.015).abs() < 1e-9);
    }
}
