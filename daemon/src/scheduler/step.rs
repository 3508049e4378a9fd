//! The step policy: which piece of GPU work the executor runs next.
//!
//! The executor holds lanes of work. An LLM lane is one loaded model with its running
//! sequences: one step of it is one forward over every decoding sequence plus at most one chunk
//! of one waiting prompt. An image lane is one image job: one step of it is a chunk of its work
//! (some UNet blocks, an encoder, a piece of the VAE decode) sized by the job to take about the
//! time budget the policy gives it. A running dispatch is never preempted by the GPU, so the
//! policy keeps chat responsive by choosing small pieces and their order:
//!
//! - Decode first. While any LLM lane has work, image chunks and LLM rounds alternate: after
//!   one image chunk, every LLM lane with work gets one step before the next image chunk. So at
//!   most one diffusion chunk runs between two steps of a chat, and an image still advances by
//!   one chunk per round, however many chats keep arriving (no starvation either way).
//! - An image chunk aims at the target time, and beside decoding sequences at no more than half
//!   the LLM round before it, so a token waits at most about 1.5× its own step.
//! - With no LLM work, image chunks run back to back, the least recently run job first.
//! - Prompt chunks are sized so that a step stays near the target time while anything else is
//!   waiting (decoding sequences or an image): the policy learns the time per row of an LLM step
//!   from the steps it is told about. Alone, a prompt goes in chunks of `step_tokens`.
//! - Budgets never exceed the ceiling; a piece of work that took longer than the ceiling is
//!   reported back as overrun, for the executor to log with its time.
//!
//! Architecture invariant: pure like the rest of the scheduler core: no I/O, no clock (the
//! caller reports each piece's measured time; the tests drive it with a fake clock), no
//! knowledge of models or devices.

use std::collections::HashMap;
use std::time::Duration;

/// The policy's settings (`[daemon] chunk_ms`, `ceiling_ms`, `step_tokens`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConfig {
    /// What one diffusion chunk (and a prompt chunk beside other work) aims to take.
    pub target: Duration,
    /// What no submission may take; longer ones are logged.
    pub ceiling: Duration,
    /// Prompt tokens one step takes at most.
    pub step_tokens: usize,
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig {
            target: Duration::from_millis(50),
            ceiling: Duration::from_millis(200),
            step_tokens: 256,
        }
    }
}

/// An LLM lane as the policy sees it. `key` names the lane across calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlmLane {
    pub key: u64,
    /// Sequences with a token to feed (past their prompt).
    pub decoding: usize,
    /// Jobs with prompt tokens left (or not yet tokenized).
    pub prefilling: usize,
}

impl LlmLane {
    fn has_work(&self) -> bool {
        self.decoding + self.prefilling > 0
    }
}

/// What to run next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// One step of the LLM lane at this index, taking at most this many prompt tokens.
    Llm { lane: usize, prefill_tokens: usize },
    /// One chunk of the image lane at this index, aiming at this device time.
    Image { lane: usize, budget: Duration },
}

/// How a piece of work went, as the executor measured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ran {
    /// The lane's key.
    pub key: u64,
    pub image: bool,
    /// Device time (or wall time where the device keeps no timestamps).
    pub took: Duration,
    /// Rows an LLM step ran (decode tokens plus prompt tokens); 0 for images.
    pub rows: usize,
}

/// The policy's state between picks.
#[derive(Debug)]
pub struct StepPolicy {
    cfg: StepConfig,
    /// Pieces of work run so far: orders the lanes by when they last ran.
    count: u64,
    /// When (in `count`) each lane last ran; lanes that never ran count as oldest.
    last_run: HashMap<(bool, u64), u64>,
    /// When the last image chunk ran.
    last_image: Option<u64>,
    /// Device time of the LLM steps since the last image chunk (the round so far).
    round: Duration,
    /// Smoothed time per row of an LLM step, per lane, in seconds.
    per_row: HashMap<u64, f64>,
}

impl StepPolicy {
    pub fn new(cfg: StepConfig) -> StepPolicy {
        StepPolicy {
            cfg: StepConfig {
                target: cfg.target.min(cfg.ceiling),
                step_tokens: cfg.step_tokens.max(1),
                ..cfg
            },
            count: 0,
            last_run: HashMap::new(),
            last_image: None,
            round: Duration::ZERO,
            per_row: HashMap::new(),
        }
    }

    pub fn config(&self) -> StepConfig {
        self.cfg
    }

    /// The next piece of work for these LLM lanes and image lanes (their keys), or None when
    /// no lane has any.
    pub fn next(&self, llm: &[LlmLane], images: &[u64]) -> Option<Pick> {
        let last = |image: bool, key: u64| self.last_run.get(&(image, key)).copied();
        // LLM lanes with work, and among them those that have not run since the last image
        // chunk: decode first means they all step before the next one.
        let working = (0..llm.len()).filter(|&i| llm[i].has_work());
        let lane = if images.is_empty() {
            working.min_by_key(|&i| last(false, llm[i].key))
        } else {
            working
                .filter(|&i| last(false, llm[i].key) < self.last_image)
                .min_by_key(|&i| last(false, llm[i].key))
        };
        if let Some(i) = lane {
            return Some(Pick::Llm {
                lane: i,
                prefill_tokens: self.prefill_tokens(llm, i),
            });
        }
        let i = (0..images.len()).min_by_key(|&i| last(true, images[i]))?;
        // Beside decoding sequences, a chunk is also held to half the round of LLM steps it
        // follows, so a token waits at most 1.5× its own step for the chunk between.
        let decoding = llm.iter().any(|l| l.decoding > 0);
        let budget = if decoding && !self.round.is_zero() {
            self.cfg
                .target
                .min((self.round / 2).max(Duration::from_millis(1)))
        } else {
            self.cfg.target
        };
        Some(Pick::Image { lane: i, budget })
    }

    /// Prompt tokens for a step of lane `i`: `step_tokens` while no sequence is decoding (a
    /// prompt that fits one chunk then waits at most one image chunk), else as many as fit the
    /// target time beside the lane's decoding rows, so that decoding keeps its pace.
    fn prefill_tokens(&self, llm: &[LlmLane], i: usize) -> usize {
        let max = self.cfg.step_tokens;
        if llm.iter().all(|l| l.decoding == 0) {
            return max;
        }
        match self.per_row.get(&llm[i].key) {
            Some(&per_row) if per_row > 0.0 => {
                let rows = self.cfg.target.as_secs_f64() / per_row;
                let room = rows - llm[i].decoding as f64;
                (room.floor().max(1.0) as usize).min(max)
            }
            // Before the lane's first measurement: a small chunk.
            _ => max.min(16),
        }
    }

    /// Records a piece of work that ran; true when it took longer than the ceiling.
    pub fn ran(&mut self, r: Ran) -> bool {
        self.count += 1;
        self.last_run.insert((r.image, r.key), self.count);
        if r.image {
            self.last_image = Some(self.count);
            self.round = Duration::ZERO;
        } else {
            self.round += r.took;
        }
        if !r.image && r.rows > 0 {
            let sample = r.took.as_secs_f64() / r.rows as f64;
            let e = self.per_row.entry(r.key).or_insert(sample);
            *e = 0.7 * *e + 0.3 * sample;
        }
        r.took > self.cfg.ceiling
    }

    /// Forgets a lane that has gone (its last job ended).
    pub fn forget(&mut self, key: u64, image: bool) {
        self.last_run.remove(&(image, key));
        if !image {
            self.per_row.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::residency::Now;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A simulated chat: prompt tokens left, then tokens to generate.
    #[derive(Clone, Debug)]
    struct Chat {
        lane: u64,
        arrives: Now,
        prompt: usize,
        decode: usize,
        first_token: Option<Now>,
        done: Option<Now>,
    }

    /// A simulated image job: chunks of work left, each of a fixed device time.
    #[derive(Clone, Debug)]
    struct Image {
        key: u64,
        arrives: Now,
        chunks: usize,
        chunk: Duration,
        done: Option<Now>,
    }

    /// What the simulation saw, pick by pick.
    #[derive(Debug, Default)]
    struct Trace {
        picks: Vec<(Now, Pick, Vec<LlmLane>, Vec<u64>)>,
    }

    /// Runs the policy over chats and images on a fake clock; an LLM step costs `fixed` plus
    /// `per_row` per row. Returns the trace, or the time when it gave up (a job never ended).
    fn simulate(
        cfg: StepConfig,
        chats: &mut [Chat],
        images: &mut [Image],
        fixed: Duration,
        per_row: Duration,
    ) -> Result<Trace, Now> {
        let mut p = StepPolicy::new(cfg);
        let mut now = Duration::ZERO;
        let mut trace = Trace::default();
        for _ in 0..200_000 {
            let lanes: Vec<u64> = {
                let mut v: Vec<u64> = chats
                    .iter()
                    .filter(|c| c.arrives <= now && c.done.is_none())
                    .map(|c| c.lane)
                    .collect();
                v.sort();
                v.dedup();
                v
            };
            let llm: Vec<LlmLane> = lanes
                .iter()
                .map(|&k| {
                    let live = chats
                        .iter()
                        .filter(|c| c.lane == k && c.arrives <= now && c.done.is_none());
                    let (mut decoding, mut prefilling) = (0, 0);
                    for c in live {
                        if c.prompt > 0 {
                            prefilling += 1
                        } else {
                            decoding += 1
                        }
                    }
                    LlmLane {
                        key: k,
                        decoding,
                        prefilling,
                    }
                })
                .collect();
            let imgs: Vec<u64> = images
                .iter()
                .filter(|i| i.arrives <= now && i.done.is_none())
                .map(|i| i.key)
                .collect();
            let Some(pick) = p.next(&llm, &imgs) else {
                let next = chats
                    .iter()
                    .filter(|c| c.done.is_none())
                    .map(|c| c.arrives)
                    .chain(
                        images
                            .iter()
                            .filter(|i| i.done.is_none())
                            .map(|i| i.arrives),
                    )
                    .filter(|t| *t > now)
                    .min();
                match next {
                    Some(t) => {
                        now = t;
                        continue;
                    }
                    None => return Ok(trace),
                }
            };
            trace.picks.push((now, pick, llm.clone(), imgs.clone()));
            match pick {
                Pick::Llm {
                    lane,
                    prefill_tokens,
                } => {
                    let key = llm[lane].key;
                    let mut rows = 0;
                    let mut prefilled = false;
                    let mut ends = Vec::new();
                    for (ci, c) in chats.iter_mut().enumerate() {
                        if c.lane != key || c.arrives > now || c.done.is_some() {
                            continue;
                        }
                        if c.prompt == 0 {
                            rows += 1;
                            ends.push(ci);
                        } else if !prefilled {
                            let n = c.prompt.min(prefill_tokens);
                            c.prompt -= n;
                            rows += n;
                            prefilled = true;
                            if c.prompt == 0 {
                                ends.push(ci);
                            }
                        }
                    }
                    let took = fixed + per_row * rows as u32;
                    now += took;
                    for ci in ends {
                        let c = &mut chats[ci];
                        if c.first_token.is_none() {
                            c.first_token = Some(now);
                        } else {
                            c.decode -= 1;
                        }
                        if c.decode == 0 {
                            c.done = Some(now);
                        }
                    }
                    let over = p.ran(Ran {
                        key,
                        image: false,
                        took,
                        rows,
                    });
                    assert!(!over || took > cfg.ceiling);
                }
                Pick::Image { lane, budget } => {
                    assert!(budget <= cfg.ceiling, "budget {budget:?} over the ceiling");
                    let img = images.iter_mut().find(|i| i.key == imgs[lane]).unwrap();
                    let took = img.chunk;
                    now += took;
                    img.chunks -= 1;
                    if img.chunks == 0 {
                        img.done = Some(now);
                    }
                    let key = img.key;
                    p.ran(Ran {
                        key,
                        image: true,
                        took,
                        rows: 0,
                    });
                }
            }
        }
        Err(now)
    }

    fn chat(lane: u64, at: u64, prompt: usize, decode: usize) -> Chat {
        Chat {
            lane,
            arrives: ms(at),
            prompt,
            decode,
            first_token: None,
            done: None,
        }
    }

    fn image(key: u64, at: u64, chunks: usize, chunk_ms: u64) -> Image {
        Image {
            key,
            arrives: ms(at),
            chunks,
            chunk: ms(chunk_ms),
            done: None,
        }
    }

    #[test]
    fn a_chat_during_a_render_waits_at_most_one_chunk_per_step() {
        let cfg = StepConfig::default();
        let mut chats = vec![chat(1, 100, 10, 50)];
        let mut images = vec![image(7, 0, 200, 50)];
        let trace = simulate(cfg, &mut chats, &mut images, ms(15), ms(1)).unwrap();
        // Between two steps of the chat's lane, at most one image chunk.
        let mut images_since = 0;
        let mut seen_llm = false;
        for (_, pick, llm, _) in &trace.picks {
            match pick {
                Pick::Image { .. } => {
                    if seen_llm && llm.iter().any(|l| l.has_work()) {
                        images_since += 1;
                        assert!(images_since <= 1, "two image chunks between chat steps");
                    }
                }
                Pick::Llm { .. } => {
                    seen_llm = true;
                    images_since = 0;
                }
            }
        }
        // Time to first token: at most one chunk of waiting, then its prefill (one step).
        let c = &chats[0];
        let ttft = c.first_token.unwrap() - c.arrives;
        assert!(ttft <= ms(50) + ms(15) + ms(10), "ttft {ttft:?}");
        assert!(images[0].done.is_some());
    }

    #[test]
    fn with_no_chat_image_chunks_run_back_to_back_least_recent_first() {
        let cfg = StepConfig::default();
        let mut images = vec![image(1, 0, 5, 40), image(2, 0, 5, 40)];
        let trace = simulate(cfg, &mut [], &mut images, ms(15), ms(1)).unwrap();
        let keys: Vec<usize> = trace
            .picks
            .iter()
            .map(|(_, p, _, _)| match p {
                Pick::Image { lane, .. } => *lane,
                Pick::Llm { .. } => panic!("no chat"),
            })
            .collect();
        assert_eq!(keys.len(), 10);
        // Alternating between the two jobs (indices shift when one ends, so check the keys'
        // finishing times instead): both end within one chunk of each other.
        let (a, b) = (images[0].done.unwrap(), images[1].done.unwrap());
        assert!(a.abs_diff(b) <= ms(40), "{a:?} vs {b:?}");
        // Back to back: the last ends after exactly the total work.
        assert_eq!(a.max(b), ms(400));
    }

    #[test]
    fn a_prompt_beside_decoding_goes_in_chunks_near_the_target() {
        let cfg = StepConfig {
            step_tokens: 256,
            ..StepConfig::default()
        };
        // One sequence decoding, another with a long prompt on the same model.
        let mut chats = vec![chat(1, 0, 1, 200), chat(1, 10, 2000, 5)];
        let trace = simulate(cfg, &mut chats, &mut [], ms(2), ms(1)).unwrap();
        let mut chunks = Vec::new();
        for (_, pick, llm, _) in &trace.picks {
            if let Pick::Llm { prefill_tokens, .. } = pick {
                if llm[0].decoding > 0 && llm[0].prefilling > 0 {
                    chunks.push(*prefill_tokens);
                }
            }
        }
        assert!(!chunks.is_empty());
        // After the first measured steps the chunk is about 50 ms of rows at ~1 ms per row.
        let late = &chunks[chunks.len() / 2..];
        assert!(late.iter().all(|&c| (30..=60).contains(&c)), "{late:?}");
        // Alone (once the first chat is done) a prompt would take whole 256-token chunks.
        let mut alone = vec![chat(1, 0, 2000, 1)];
        let t = simulate(cfg, &mut alone, &mut [], ms(2), ms(1)).unwrap();
        assert!(matches!(
            t.picks[0].1,
            Pick::Llm {
                prefill_tokens: 256,
                ..
            }
        ));
    }

    #[test]
    fn beside_decoding_an_image_chunk_is_held_to_half_the_round() {
        let mut p = StepPolicy::new(StepConfig::default());
        let lanes = [LlmLane {
            key: 1,
            decoding: 1,
            prefilling: 0,
        }];
        p.ran(Ran {
            key: 9,
            image: true,
            took: ms(50),
            rows: 0,
        });
        assert!(matches!(
            p.next(&lanes, &[9]),
            Some(Pick::Llm { lane: 0, .. })
        ));
        p.ran(Ran {
            key: 1,
            image: false,
            took: ms(16),
            rows: 1,
        });
        assert_eq!(
            p.next(&lanes, &[9]),
            Some(Pick::Image {
                lane: 0,
                budget: ms(8)
            })
        );
        // A slow step leaves the target as the limit; with nothing decoding, the target.
        p.ran(Ran {
            key: 1,
            image: false,
            took: ms(400),
            rows: 1,
        });
        assert_eq!(
            p.next(&lanes, &[9]),
            Some(Pick::Image {
                lane: 0,
                budget: ms(50)
            })
        );
        let idle = [LlmLane {
            decoding: 0,
            ..lanes[0]
        }];
        assert_eq!(
            p.next(&idle, &[9]),
            Some(Pick::Image {
                lane: 0,
                budget: ms(50)
            })
        );
    }

    #[test]
    fn a_chunk_over_the_ceiling_is_reported() {
        let mut p = StepPolicy::new(StepConfig::default());
        let r = |took| Ran {
            key: 1,
            image: true,
            took,
            rows: 0,
        };
        assert!(!p.ran(r(ms(200))));
        assert!(p.ran(r(ms(201))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any mix of chats and images on a fake clock: every job ends; while any LLM lane has
        /// work, no two image chunks run without every working lane stepping in between; no
        /// lane waits more than a round; budgets and prompt chunks stay in bounds.
        #[test]
        fn every_job_ends_and_no_one_starves(
            chats in proptest::collection::vec((0u64..3, 0u64..2000, 1usize..300, 1usize..40), 0..12),
            images in proptest::collection::vec((0u64..2000, 1usize..40, 1u64..120), 0..4),
            fixed in 1u64..20,
            target in 10u64..100,
            step_tokens in 1usize..300,
        ) {
            let cfg = StepConfig {
                target: ms(target),
                ceiling: ms(200),
                step_tokens,
            };
            let mut chats: Vec<Chat> =
                chats.into_iter().map(|(l, at, p, d)| chat(l, at, p, d)).collect();
            let mut imgs: Vec<Image> = images
                .into_iter()
                .enumerate()
                .map(|(k, (at, n, c))| image(100 + k as u64, at, n, c))
                .collect();
            let trace = simulate(cfg, &mut chats, &mut imgs, ms(fixed), Duration::from_micros(300));
            let trace = match trace {
                Ok(t) => t,
                Err(at) => return Err(TestCaseError::fail(format!("gave up at {at:?}"))),
            };
            prop_assert!(chats.iter().all(|c| c.done.is_some()));
            prop_assert!(imgs.iter().all(|i| i.done.is_some()));
            // Decode first and no starvation of chats: between two image chunks while LLM
            // lanes have work, each of those lanes steps once.
            let mut stepped: Vec<u64> = Vec::new();
            let mut after_image: Option<Vec<u64>> = None;
            for (_, pick, llm, imgs) in &trace.picks {
                match pick {
                    Pick::Image { budget, .. } => {
                        prop_assert!(*budget <= cfg.ceiling);
                        if let Some(owed) = &after_image {
                            for k in owed {
                                let still = llm.iter().any(|l| l.key == *k && l.has_work());
                                prop_assert!(!still || stepped.contains(k),
                                    "lane {} skipped between image chunks", k);
                            }
                        }
                        after_image =
                            Some(llm.iter().filter(|l| l.has_work()).map(|l| l.key).collect());
                        stepped.clear();
                    }
                    Pick::Llm { lane, prefill_tokens } => {
                        prop_assert!(*prefill_tokens >= 1 && *prefill_tokens <= step_tokens);
                        if imgs.is_empty() {
                            stepped.clear();
                            after_image = None;
                        }
                        // No starvation of images: while one waits, no lane steps twice before
                        // the next image chunk.
                        let key = llm[*lane].key;
                        prop_assert!(imgs.is_empty() || !stepped.contains(&key),
                            "lane {} stepped twice while an image waited", key);
                        stepped.push(key);
                    }
                }
            }
        }
    }
}
