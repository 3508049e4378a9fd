//! End-to-end LLM serving on the real models (scripts/fetch-models.sh), through the real daemon
//! and the real `halo` binary: streamed generation, the JSON contract, seeds, stop strings, the
//! chat template, tokenize, concurrent requests (to one model and to two), prompt reuse,
//! cancellation, eviction of one LLM by another,
//! and a corrupt GGUF answered with a clear error while the daemon keeps serving.
//!
//! Skips when the models or a Vulkan device are missing, unless HALO_REQUIRE_MODELS=1 /
//! HALO_REQUIRE_VULKAN=1. Generation lengths are short: lavapipe runs these on the CPU.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{json_lines, model, text, TestDaemon, COUNTING};
use serde_json::Value;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

fn gpu_required() -> bool {
    std::env::var("HALO_REQUIRE_VULKAN").as_deref() == Ok("1")
}

/// A daemon serving SmolLM2 (two parallel sequences of 256 tokens), or None to skip.
fn smol_daemon(extra: &str) -> Option<TestDaemon> {
    let path = model(SMOL)?;
    let cfg = format!(
        "[[models]]\nname = \"smol\"\nkind = \"llm\"\npath = {:?}\ncontext = 256\nparallel = 2\n{extra}",
        path.display().to_string()
    );
    let d = TestDaemon::start(&cfg, &[]);
    let s = d.json(&["status", "--json"]);
    if s["device"].is_null() || !s["runtime_error"].is_null() {
        assert!(!gpu_required(), "no GPU runtime: {s}");
        eprintln!("skipping: no Vulkan runtime");
        return None;
    }
    Some(d)
}

#[test]
fn generate_streams_tokens_and_follows_the_contract() {
    let Some(d) = smol_daemon("") else { return };
    let out = d.ok(&["tokenize", "smol", "The capital of France is", "--json"]);
    let toks: Value = serde_json::from_str(&out).unwrap();
    // llama.cpp's tokenization of the same text (SmolLM2 adds no BOS).
    assert_eq!(
        toks["tokens"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );

    let out = d.ok(&[
        "generate",
        "smol",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--logprobs",
        "3",
        "--json",
    ]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 5, "{out}");
    for l in &lines[..4] {
        assert!(l["token"].is_u64() && l["text"].is_string(), "{l}");
        let lp = l["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = l["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], l["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
    }
    let done = &lines[4];
    assert_eq!(done["done"], true);
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["prompt_tokens"], 5);
    assert_eq!(done["completion_tokens"], 4);
    assert!(done["cached_tokens"].is_u64(), "{done}");
    assert!(done["prompt_ms"].is_u64() && done["generation_ms"].is_u64());
    let text: String = lines[..4]
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert!(text.starts_with(" Paris"), "{text:?}");

    // Plain output streams the same text.
    let plain = d.ok(&[
        "generate",
        "smol",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
    ]);
    assert_eq!(plain, format!("{text}\n"));

    // A stop string ends generation before it and is not printed.
    let out = d.ok(&[
        "generate",
        "smol",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--stop",
        ".",
        "--json",
    ]);
    let lines = json_lines(&out);
    let done = lines.last().unwrap();
    assert_eq!(done["finish_reason"], "stop", "{out}");
    let text: String = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    assert_eq!(text, " Paris", "{out}");

    // Token ids as the prompt give the same answer as the text.
    let by_ids = d.ok(&[
        "generate",
        "smol",
        "--tokens",
        "504,3575,282,4649,314",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
    ]);
    assert_eq!(by_ids, plain);
}

/// Greedy tokens and the final line of `generate --json` for `prompt`.
fn greedy(d: &TestDaemon, prompt: &str, n: u32) -> (Vec<u64>, Value) {
    let n = n.to_string();
    let out = d.ok(&[
        "generate",
        "smol",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        &n,
        "--json",
    ]);
    let mut lines = json_lines(&out);
    let done = lines.pop().unwrap();
    let tokens = lines.iter().map(|l| l["token"].as_u64().unwrap()).collect();
    (tokens, done)
}

/// A request whose prompt starts with what a free sequence's cache already holds skips those
/// tokens, and its output is exactly what it is without the reuse.
#[test]
fn prompt_prefix_reuse_keeps_the_output_exact() {
    let Some(d) = smol_daemon("") else { return };
    let long = "The capital of France is Paris. The capital of Germany is";
    let short = "The capital of France is";
    // A fresh sequence: nothing to reuse. This is the reference output.
    let (want_long, done) = greedy(&d, long, 6);
    assert_eq!(done["cached_tokens"], 0, "{done}");
    // The short prompt is a start of the long one: all but its last token are reused.
    let (short_toks, done) = greedy(&d, short, 3);
    assert_eq!(done["prompt_tokens"], 5);
    assert_eq!(done["cached_tokens"], 4, "{done}");
    // " Paris" (token 7042) first, as without reuse (see the contract test).
    assert_eq!(short_toks[0], 7042, "{short_toks:?}");
    // The cache now holds the short prompt and its continuation; the long prompt reuses what
    // matches and must come out as it did from a fresh sequence.
    let (got_long, done) = greedy(&d, long, 6);
    let cached = done["cached_tokens"].as_u64().unwrap();
    assert!(cached >= 5, "{done}");
    assert_eq!(got_long, want_long);
    // The same prompt again: everything but the last token is reused.
    let (again, done) = greedy(&d, long, 6);
    assert_eq!(
        done["cached_tokens"].as_u64().unwrap(),
        done["prompt_tokens"].as_u64().unwrap() - 1
    );
    assert_eq!(again, want_long);
}

#[test]
fn seeds_chat_and_concurrency() {
    let Some(d) = smol_daemon("") else { return };
    let sample = |seed: &str| {
        d.ok(&[
            "generate",
            "smol",
            "Once upon a time",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--max-tokens",
            "6",
        ])
    };
    assert_eq!(sample("42"), sample("42"), "same seed, same output");

    // The chat template turns the prompt into a conversation the instruct model answers.
    let out = d.ok(&[
        "generate",
        "smol",
        "What is the capital of France?",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
    ]);
    assert!(out.contains("Paris"), "{out:?}");

    // `halo chat` keeps the conversation and answers each line.
    let mut child = d
        .command(&["chat", "smol", "--temperature", "0", "--max-tokens", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        b"What is the capital of France?\nAnd of Italy?\n/bye\n",
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let replies = text(&out.stdout);
    assert!(replies.contains("Paris"), "{replies:?}");
    assert!(
        replies.contains("Rome"),
        "the second answer uses the history: {replies:?}"
    );

    // Two requests at once each get their own sequence and both finish.
    let spawn = |prompt: &str| {
        d.command(&[
            "generate",
            "smol",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "5",
            "--json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let a = spawn("The capital of France is");
    let b = spawn("1, 2, 3, 4,");
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    for out in [&a, &b] {
        let lines = json_lines(&text(&out.stdout));
        assert_eq!(lines.last().unwrap()["completion_tokens"], 5);
    }
    let alone = d.ok(&[
        "generate",
        "smol",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "5",
        "--json",
    ]);
    // The same tokens and text. The log-probabilities may move in the fifth decimal: a request
    // that reuses a cached prompt start computed those keys in a different batch split.
    let tokens = |out: &str| -> Vec<(u64, String, f64)> {
        json_lines(out)
            .into_iter()
            .filter(|l| l["done"].is_null())
            .map(|l| {
                (
                    l["token"].as_u64().unwrap(),
                    l["text"].as_str().unwrap().to_string(),
                    l["logprob"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (together, alone) = (tokens(&text(&a.stdout)), tokens(&alone));
    assert_eq!(together.len(), alone.len());
    for (x, y) in together.iter().zip(&alone) {
        assert_eq!(
            (x.0, &x.1),
            (y.0, &y.1),
            "running beside another request changes nothing"
        );
        assert!((x.2 - y.2).abs() < 1e-3, "{x:?} vs {y:?}");
    }
}

/// Waits until a job is running and returns its id.
fn running_job(d: &TestDaemon) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = d.json(&["jobs", "--json"]);
        if let Some(j) = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["state"] == "running")
        {
            return j["id"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cancelling_stops_the_job_and_returns_its_sequence() {
    let Some(d) = smol_daemon("") else { return };
    d.ok(&["load", "smol"]);
    let held = d.json(&["ps", "--json"])[0]["bytes"].as_u64().unwrap();
    let child = d.command(&COUNTING).stdout(Stdio::piped()).spawn().unwrap();
    let id = running_job(&d);
    d.ok(&["cancel", &id.to_string()]);
    let out = child.wait_with_output().unwrap();
    let lines = json_lines(&text(&out.stdout));
    assert_eq!(lines.last().unwrap()["finish_reason"], "cancelled");
    assert!(lines.len() < 200);
    let jobs = d.json(&["jobs", "--json"]);
    let j = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap();
    assert_eq!(j["state"], "cancelled");
    // The model holds exactly what it held before: the sequence went back to its pool.
    assert_eq!(
        d.json(&["ps", "--json"])[0]["bytes"].as_u64().unwrap(),
        held
    );
    assert_eq!(d.json(&["ps", "--json"])[0]["running_jobs"], 0);
    // A client that goes away is the same as a cancel: its job stops and frees its sequence.
    let mut child = d.command(&COUNTING).stdout(Stdio::null()).spawn().unwrap();
    let id = running_job(&d);
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = d.json(&["jobs", "--json"]);
        let j = jobs
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .unwrap()
            .clone();
        if j["state"] == "cancelled" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job kept running without its client: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And it serves the next request.
    d.ok(&["generate", "smol", "Hi", "--max-tokens", "1"]);
}

#[test]
fn estimates_eviction_and_a_corrupt_file() {
    let (Some(smol), Some(gemma)) = (model(SMOL), model(GEMMA)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    let bytes = std::fs::read(&smol).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let cfg = format!(
        "[memory]\nbudget = \"300MiB\"\n\
         [[models]]\nname = \"smol\"\nkind = \"llm\"\npath = {:?}\ncontext = 256\nparallel = 1\n\
         [[models]]\nname = \"gemma\"\nkind = \"llm\"\npath = {:?}\ncontext = 256\nparallel = 1\n\
         [[models]]\nname = \"bad\"\nkind = \"llm\"\npath = {:?}\n",
        smol.display().to_string(),
        gemma.display().to_string(),
        bad.display().to_string()
    );
    let d = TestDaemon::start(&cfg, &[]);
    let s = d.json(&["status", "--json"]);
    if !s["runtime_error"].is_null() {
        assert!(!gpu_required(), "{s}");
        return;
    }
    let models = d.json(&["models", "--json"]);
    let find = |n: &str| {
        models
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(find("bad")["state"], "invalid");
    assert!(
        find("bad")["error"]
            .as_str()
            .unwrap()
            .contains("past the end"),
        "{}",
        find("bad")
    );

    // The estimate is what the load really allocates (within 2%).
    for name in ["smol", "gemma"] {
        let est = find(name)["estimated_bytes"].as_u64().unwrap();
        let r = d.json(&["load", name, "--json"]);
        let actual = r["model"]["bytes"].as_u64().unwrap();
        let err = (actual as f64 - est as f64).abs() / est as f64;
        assert!(err <= 0.02, "{name}: estimate {est}, actual {actual}");
        if name == "gemma" {
            // 300 MiB holds one of them: loading gemma evicted smol.
            assert_eq!(r["evicted"], serde_json::json!(["smol"]));
        }
    }
    assert_eq!(d.resident(), ["gemma"]);

    let err = d.fails(&["generate", "bad", "hi"], 3);
    assert!(
        err.contains("bad.gguf") && err.contains("past the end"),
        "{err}"
    );
    // The daemon keeps serving: generating with smol evicts gemma and works.
    let out = d.ok(&[
        "generate",
        "smol",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "2",
    ]);
    assert!(out.starts_with(" Paris"), "{out:?}");
    assert_eq!(d.resident(), ["smol"]);
}

/// Two different resident models generate at the same time on the one device (the executor
/// interleaves their steps), and each gives what it gives alone: gemma's first greedy tokens as
/// llama.cpp and exact arithmetic give them (tests/fixtures/llm/greedy.json, all four with
/// margins above 0.5), smol's " Paris".
#[test]
fn two_models_generate_side_by_side() {
    let (Some(smol), Some(gemma)) = (model(SMOL), model(GEMMA)) else {
        return;
    };
    let cfg = format!(
        "[[models]]\nname = \"smol\"\nkind = \"llm\"\npath = {:?}\ncontext = 256\nparallel = 1\n\
         [[models]]\nname = \"gemma\"\nkind = \"llm\"\npath = {:?}\ncontext = 256\nparallel = 1\n",
        smol.display().to_string(),
        gemma.display().to_string(),
    );
    let d = TestDaemon::start(&cfg, &[]);
    let s = d.json(&["status", "--json"]);
    if !s["runtime_error"].is_null() {
        assert!(!gpu_required(), "{s}");
        return;
    }
    d.ok(&["load", "smol"]);
    d.ok(&["load", "gemma"]);
    let spawn = |model: &str, n: &str| {
        d.command(&[
            "generate",
            model,
            "The capital of France is",
            "--temperature",
            "0",
            "--max-tokens",
            n,
            "--json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let g = spawn("gemma", "4");
    let s = spawn("smol", "24");
    // Both are running at some moment (each takes seconds on lavapipe).
    let start = Instant::now();
    let mut together = false;
    while start.elapsed() < Duration::from_secs(120) {
        let jobs = d.json(&["jobs", "--json"]);
        let running: Vec<&Value> = jobs
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "running")
            .collect();
        if running.len() == 2 {
            let mut models: Vec<&str> = running
                .iter()
                .map(|j| j["model"].as_str().unwrap())
                .collect();
            models.sort();
            assert_eq!(models, ["gemma", "smol"]);
            together = true;
            break;
        }
        if jobs
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "done")
            .count()
            > 0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (g, s) = (g.wait_with_output().unwrap(), s.wait_with_output().unwrap());
    assert!(g.status.success() && s.status.success());
    assert!(together, "the two jobs never ran at the same time");
    let tokens = |out: &[u8]| -> Vec<u64> {
        json_lines(&text(out))
            .iter()
            .filter(|l| l["done"].is_null())
            .map(|l| l["token"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(tokens(&g.stdout), [506, 5279, 529, 506]);
    let smol_tokens = tokens(&s.stdout);
    assert_eq!(smol_tokens[0], 7042, "{smol_tokens:?}");
}

/// `halo bench` reports prompt and generation speed and the roofline; the bandwidth probe's
/// buffers count against the budget while it runs and are given back after.
#[test]
fn bench_reports_speed_and_roofline_and_returns_its_scratch() {
    let Some(d) = smol_daemon("") else { return };
    d.ok(&["load", "smol"]);
    let used = |d: &TestDaemon| d.json(&["status", "--json"])["used_bytes"].clone();
    let before = used(&d);
    assert!(before.as_u64().unwrap() > 0, "{before}");
    let b = d.json(&["bench", "smol", "-p", "16", "-n", "3", "-r", "1", "--json"]);
    for key in [
        "pp_tokens_per_s",
        "tg_tokens_per_s",
        "bandwidth_bytes_per_s",
    ] {
        assert!(b[key].as_f64().unwrap() > 0.0, "{key}: {b}");
    }
    let pct = b["tg_percent_of_roofline"].as_f64().unwrap();
    assert!(pct > 0.0 && pct.is_finite(), "{b}");
    // SmolLM2-135M Q4_1 reads about 92 MiB of weights per generated token.
    assert!(
        b["weight_bytes_per_token"].as_u64().unwrap() > 90 << 20,
        "{b}"
    );
    assert_eq!(used(&d), before, "the probe's scratch is given back");
}

/// Two requests to one model run batched (one forward per step over both sequences: each
/// reports a peak batch of 2) and each gives the tokens it gives alone, its log-probabilities
/// within 1e-3 (the batch's matrix kernel rounds differently from a lone token's).
#[test]
fn two_requests_batched_on_one_model_give_their_solo_tokens() {
    let Some(d) = smol_daemon("") else { return };
    let prompts = ["The capital of France is", "1, 2, 3, 4,"];
    let run = |prompt: &str| {
        d.command(&[
            "generate",
            "smol",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "--json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let children: Vec<_> = prompts.iter().map(|p| run(p)).collect();
    let together: Vec<Vec<Value>> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success());
            json_lines(&text(&o.stdout))
        })
        .collect();
    for lines in &together {
        let done = lines.last().unwrap();
        assert_eq!(
            done["peak_batch"], 2,
            "the two requests shared steps: {done}"
        );
    }
    for (p, got) in prompts.iter().zip(&together) {
        let o = run(p).wait_with_output().unwrap();
        let alone = json_lines(&text(&o.stdout));
        assert_eq!(alone.last().unwrap()["peak_batch"], 1);
        assert_eq!(alone.len(), got.len());
        for (x, y) in got.iter().zip(&alone).filter(|(x, _)| x["done"].is_null()) {
            assert_eq!(x["token"], y["token"], "{p:?}: batched {x} vs alone {y}");
            let (a, b) = (
                x["logprob"].as_f64().unwrap(),
                y["logprob"].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-3, "{p:?}: batched {x} vs alone {y}");
        }
    }
}
