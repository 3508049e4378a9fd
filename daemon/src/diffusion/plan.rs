//! Memory a forward pass will need, worked out before it runs: the job's reservation under the
//! budget comes from here, and a test holds it to what the allocator's ledger records.
//!
//! [`Sim`] replays a pass's allocations as the recording code makes them (see `graph.rs`):
//! every op's output is a new buffer, and a buffer the code lets go of stays allocated until
//! the next flush, because the stream still holds it. It charges each allocation as the
//! kernels crate's allocator does: requests of 1 MiB or more get a chunk of their own, rounded
//! to the sub-allocation alignment, and smaller ones share the owner's 4 MiB chunks.

use halo_kernels::{charged_bytes, SMALL_CHUNK, SMALL_REQUEST};

/// A handle to a simulated buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot(usize);

/// A replay of one pass's allocations, tracking the most it holds at once.
#[derive(Default, Debug)]
pub(crate) struct Sim {
    /// Bytes of every buffer ever allocated; `None` once freed.
    sizes: Vec<Option<u64>>,
    /// Buffers let go of since the last flush.
    held: Vec<usize>,
    large: u64,
    small: u64,
    peak: u64,
}

impl Sim {
    /// A replay that starts with buffers of these many f32 values already held (a job's own,
    /// kept through the pass): they share chunks with what the pass allocates.
    pub(crate) fn holding(held: &[u64]) -> Sim {
        let mut sim = Sim::default();
        for &n in held {
            sim.keep(n);
        }
        sim
    }

    /// What the live buffers are charged: large ones exactly, small ones by the chunks they
    /// fill.
    fn charge(&self) -> u64 {
        self.large + self.small.div_ceil(SMALL_CHUNK) * SMALL_CHUNK
    }

    /// A new buffer of `floats` f32 values that the code keeps.
    pub(crate) fn keep(&mut self, floats: u64) -> Slot {
        let bytes = charged_bytes(floats.max(1) * 4);
        if bytes >= SMALL_REQUEST {
            self.large += bytes;
        } else {
            self.small += bytes;
        }
        self.peak = self.peak.max(self.charge());
        self.sizes.push(Some(bytes));
        Slot(self.sizes.len() - 1)
    }

    /// A new buffer the code drops before the next flush (an op's temporary).
    pub(crate) fn temp(&mut self, floats: u64) {
        let s = self.keep(floats);
        self.drop(s);
    }

    /// The code lets go of a buffer: it is freed at the next flush.
    pub(crate) fn drop(&mut self, s: Slot) {
        self.held.push(s.0);
    }

    /// The code lets go of a buffer no recorded work reads (just after a flush): it is freed
    /// at once.
    pub(crate) fn free(&mut self, s: Slot) {
        if let Some(bytes) = self.sizes[s.0].take() {
            if bytes >= SMALL_REQUEST {
                self.large -= bytes;
            } else {
                self.small -= bytes;
            }
        }
    }

    /// The stream is run and waited for: what was let go of is freed.
    pub(crate) fn flush(&mut self) {
        for i in std::mem::take(&mut self.held) {
            self.free(Slot(i));
        }
    }

    /// The most the pass held at once, in bytes as the ledger charges them.
    pub(crate) fn peak(&self) -> u64 {
        self.peak
    }
}

/// An activation in a replay: its buffer and its shape (per image).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SimAct {
    pub slot: Slot,
    pub c: u64,
    pub h: u64,
    pub w: u64,
}

/// The replays of `graph.rs`'s building blocks, one per `Cx` method that allocates.
pub(crate) struct SimCx<'a> {
    pub sim: &'a mut Sim,
    pub batch: u64,
}

impl SimCx<'_> {
    pub(crate) fn act(&mut self, c: u64, h: u64, w: u64) -> SimAct {
        SimAct {
            slot: self.sim.keep(self.batch * c * h * w),
            c,
            h,
            w,
        }
    }

    /// An op that reads `x` and makes a new activation (conv, norm, copy, upsample), then
    /// lets `x` go when `drop_input`.
    pub(crate) fn op(&mut self, x: SimAct, c: u64, h: u64, w: u64, drop_input: bool) -> SimAct {
        let y = self.act(c, h, w);
        if drop_input {
            self.sim.drop(x.slot);
        }
        y
    }

    /// `Cx::resnet`: norm, conv, the time projection (if any), norm, conv, the shortcut (a
    /// 1×1 conv or a copy), and a flush; the input is freed after it.
    pub(crate) fn resnet(&mut self, x: SimAct, co: u64, temb: bool) -> SimAct {
        self.resnet_run(x, co, temb, false)
    }

    /// `Cx::resnet` run as its two halves with a flush between (the VAE's pieces): conv1's
    /// output is kept over the flush, norm1's temporary is not.
    pub(crate) fn resnet_halves(&mut self, x: SimAct, co: u64) -> SimAct {
        self.resnet_run(x, co, false, true)
    }

    fn resnet_run(&mut self, x: SimAct, co: u64, temb: bool, halves: bool) -> SimAct {
        let n_in = self.batch * x.c * x.h * x.w;
        let n_out = self.batch * co * x.h * x.w;
        self.sim.temp(n_in); // norm1
        let h = self.sim.keep(n_out); // conv1
        if temb {
            self.sim.temp(self.batch * co);
        }
        if halves {
            self.sim.flush();
        }
        self.sim.temp(n_out); // norm2
        let out = self.sim.keep(n_out); // conv2
        self.sim.temp(n_out); // shortcut
        self.sim.drop(h);
        self.sim.flush();
        self.sim.free(x.slot);
        SimAct {
            slot: out,
            c: co,
            ..x
        }
    }

    /// `Cx::transformer` with `depth` blocks of `heads` heads whose feed-forward is `inner`
    /// wide, over `kv_tokens` context rows per image; flushed at its end, the input freed after
    /// it.
    pub(crate) fn transformer(
        &mut self,
        x: SimAct,
        depth: u32,
        heads: u32,
        inner: u64,
        kv_tokens: u64,
    ) -> SimAct {
        let tokens = self.batch * x.h * x.w;
        let n = tokens * x.c;
        let kv = self.batch * kv_tokens * x.c;
        // Each attention's running state: a maximum and a sum per (image, head, query).
        let state = 2 * heads as u64 * tokens;
        self.sim.temp(n); // norm
        self.sim.temp(n); // rows
        self.sim.temp(n); // proj_in: the blocks' residual stream
        for _ in 0..depth {
            for _ in 0..6 {
                // norm1; self-attention's q, k, v, o and out
                self.sim.temp(n);
            }
            self.sim.temp(state);
            self.sim.temp(state);
            for _ in 0..3 {
                // norm2; cross-attention's q and o
                self.sim.temp(n);
            }
            self.sim.temp(kv); // k
            self.sim.temp(kv); // v
            self.sim.temp(n); // cross-attention's out
            self.sim.temp(n); // norm3
            self.sim.temp(tokens * inner); // GEGLU value
            self.sim.temp(tokens * inner); // GEGLU gate
            self.sim.temp(n); // ff out
        }
        self.sim.temp(n); // proj_out
        let back = self.sim.keep(n);
        self.sim.flush();
        self.sim.free(x.slot);
        SimAct { slot: back, ..x }
    }
}
