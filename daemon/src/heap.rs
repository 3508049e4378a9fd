//! Giving freed heap memory back to the system after large requests.
//!
//! A multi-megabyte Tokenize or Generate text allocates the text, its pre-tokenized pieces and
//! the token ids, then frees them all when the request ends. glibc's malloc keeps most of that
//! freed memory in its arenas: tokio runs requests on several threads, each with its own arena,
//! and after one large block is freed glibc raises its mmap threshold, so later blocks of that
//! size come from the arenas too. The resident size would then ratchet up to the largest request
//! ever seen, per thread. `malloc_trim(0)` hands free pages in every arena back to the kernel.
//!
//! Requests call [`note`] with their size; a background task ([`run_trimmer`]) trims on its next
//! few ticks after a large one, so the trim comes after the request's buffers are dropped.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Requests at least this large are followed by a trim.
pub const LARGE_REQUEST: usize = 1 << 20;

/// How many ticks still trim. A large request sets it; each tick that trims takes one off.
static PENDING: AtomicU32 = AtomicU32::new(0);

/// Ticks trimmed after a large request: the request's buffers may be freed some time after the
/// call that noted it (a response still being written, a job that tokenizes on the executor).
const TRIM_TICKS: u32 = 3;
const TICK: Duration = Duration::from_secs(1);

/// Notes a request of `bytes`; a large one makes the trimmer give freed memory back.
pub fn note(bytes: usize) {
    if bytes >= LARGE_REQUEST {
        PENDING.store(TRIM_TICKS, Ordering::Relaxed);
    }
}

/// Takes one pending trim, if any.
fn take() -> bool {
    PENDING
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// Returns free heap pages to the kernel. Returns whether anything was released.
#[allow(unsafe_code)]
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks and releases the allocator's own free lists; it takes
        // the arena locks itself and is safe to call from any thread at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Runs forever: on each tick with a trim pending, trims.
pub async fn run_trimmer() {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if take() {
            let released = trim();
            tracing::debug!(released, "trimmed the heap after a large request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_request_sets_a_few_trims_and_a_small_one_none() {
        while take() {}
        note(LARGE_REQUEST - 1);
        assert!(!take());
        note(LARGE_REQUEST);
        for _ in 0..TRIM_TICKS {
            assert!(take());
        }
        assert!(!take());
    }

    #[test]
    fn trimming_gives_freed_memory_back() {
        let rss = || {
            let s = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        };
        // 256 MiB in blocks below the mmap threshold, so they come from an arena, each followed
        // by a small block that stays: freeing the big ones leaves holes that malloc cannot
        // return by shrinking the heap's top, which is how a tokenizer's many buffers end up.
        let mut big = Vec::new();
        let mut pins = Vec::new();
        for i in 0..4096 {
            big.push(vec![i as u8; 64 << 10]);
            pins.push(vec![i as u8; 16]);
        }
        let full = rss();
        drop(big);
        let freed = rss();
        assert!(
            freed + (128 << 20) > full,
            "malloc gave the holes back by itself ({full} -> {freed}); this test shows nothing"
        );
        trim();
        let trimmed = rss();
        assert!(
            trimmed + (128 << 20) < full,
            "RSS {full} with the blocks, {freed} after freeing them, {trimmed} after the trim"
        );
        drop(pins);
    }
}
