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

    /// Records that `pieces` together took `took`.
    pub fn learn(&self, shape: u64, pieces: &[usize], took: Duration) {
        let took = took.as_secs_f64();
        let mut costs = self.lock();
        if let [one] = pieces {
            let e = costs.entry((shape, *one)).or_insert(took);
            *e = 0.5 * *e + 0.5 * took;
            return;
        }
        let known: f64 = pieces.iter().filter_map(|p| costs.get(&(shape, *p))).sum();
        if known <= 0.0 {
            return;
        }
        // Move every piece's cost halfway towards what the chunk measured.
        let ratio = 1.0 + 0.5 * (took / known - 1.0);
        for p in pieces {
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
pub struct Chunk<'a> {
    pacer: &'a Pacer,
    shape: u64,
    budget: Option<Duration>,
    started: Instant,
    ran: Vec<usize>,
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
        if self.closed {
            return false;
        }
        let cost = self.pacer.cost(self.shape, id);
        if let (Some(b), false) = (self.budget, self.ran.is_empty()) {
            match cost {
                Some(c) if self.predicted + c <= b.as_secs_f64() => {}
                _ => return false,
            }
        }
        self.ran.push(id);
        self.predicted += cost.unwrap_or(0.0);
        // A piece of unknown cost runs alone, so that its time is its own.
        self.closed = self.budget.is_some() && cost.is_none();
        true
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
