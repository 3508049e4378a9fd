//! Issue 8 end to end: what an adversarial run of halod broke, each kept fixed through the real
//! daemon (`halod::run`) and the real `halo` binary on the real models. Every test names the item
//! it covers. Skips without the models or a Vulkan device unless HALO_REQUIRE_MODELS=1 /
//! HALO_REQUIRE_VULKAN=1.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{json_lines, model, text, TestDaemon, COUNTING};
use serde_json::Value;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

/// A copy of the tiny random llama (vocabulary 256, no tokenizer in its GGUF) with a small
/// SentencePiece-style vocabulary added, so the daemon can load it: a real model file far below
/// the 8020 tokens `halo bench` once assumed.
fn tiny_with_tokenizer(dst: &std::path::Path) {
    use halod::gguf::{GgufFile, Value};
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../daemon/tests/fixtures/tiny/tiny-llama-F32.gguf");
    let file = GgufFile::open(&src).unwrap();
    let g = &file.header;
    let n_vocab = 256usize;
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let ascii: Vec<char> = (33u8..127).map(char::from).collect();
    tokens.extend(ascii.iter().map(|c| c.to_string()));
    tokens.push("\u{2581}".into());
    tokens.extend(ascii.iter().map(|c| format!("\u{2581}{c}")));
    let letters: Vec<char> = ('a'..='z').collect();
    'pairs: for a in &letters {
        for b in &letters {
            if tokens.len() == n_vocab {
                break 'pairs;
            }
            tokens.push(format!("{a}{b}"));
        }
    }
    let mut meta = g.metadata.clone();
    let n = tokens.len();
    meta.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    meta.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    meta.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array((0..n).map(|i| Value::F32(-(i as f32))).collect()),
    );
    meta.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(
            (0..n)
                .map(|i| {
                    Value::I32(match i {
                        0 => 2,
                        1 | 2 => 3,
                        _ => 1,
                    })
                })
                .collect(),
        ),
    );
    meta.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    meta.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn tag(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }
    fn value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend(x.to_le_bytes()),
            Value::I16(x) => out.extend(x.to_le_bytes()),
            Value::U32(x) => out.extend(x.to_le_bytes()),
            Value::I32(x) => out.extend(x.to_le_bytes()),
            Value::F32(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(x) => string(out, x),
            Value::Array(items) => {
                out.extend(items.first().map(tag).unwrap_or(0).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    value(out, i);
                }
            }
            Value::U64(x) => out.extend(x.to_le_bytes()),
            Value::I64(x) => out.extend(x.to_le_bytes()),
            Value::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((g.tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        string(&mut out, k);
        out.extend(tag(v).to_le_bytes());
        value(&mut out, v);
    }
    for t in &g.tensors {
        string(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ty.ggml_id().to_le_bytes());
        out.extend(t.offset.to_le_bytes());
    }
    out.resize(
        out.len().div_ceil(g.alignment as usize) * g.alignment as usize,
        0,
    );
    out.extend(&file.map.bytes()[g.data_offset as usize..]);
    std::fs::write(dst, out).unwrap();
}

/// A copy of `src` at `dst` whose chat template key is renamed (same length), so the model has
/// no template of its own.
fn without_template(src: &std::path::Path, dst: &std::path::Path) {
    let mut bytes = std::fs::read(src).unwrap();
    let key = b"tokenizer.chat_template";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the model has a chat template");
    bytes[at + key.len() - 1] = b'X';
    std::fs::write(dst, bytes).unwrap();
}

/// A daemon on `cfg`, or None (skip) without a GPU runtime.
fn daemon(cfg: &str) -> Option<TestDaemon> {
    let d = TestDaemon::start(cfg, &[]);
    let s = d.json(&["status", "--json"]);
    if s["device"].is_null() || !s["runtime_error"].is_null() {
        assert!(
            std::env::var("HALO_REQUIRE_VULKAN").as_deref() != Ok("1"),
            "no GPU runtime: {s}"
        );
        eprintln!("skipping: no Vulkan runtime");
        return None;
    }
    Some(d)
}

fn llm(name: &str, path: &std::path::Path, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\nkind = \"llm\"\npath = {:?}\n{extra}\n",
        path.display().to_string()
    )
}

fn greedy_tokens(d: &TestDaemon, model: &str, n: u32) -> Vec<u64> {
    let out = d.ok(&[
        "generate",
        model,
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        &n.to_string(),
        "--json",
    ]);
    json_lines(&out)
        .iter()
        .filter_map(|l| l["token"].as_u64())
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn job_state(d: &TestDaemon, id: u64) -> String {
    let jobs = d.json(&["jobs", "--json"]);
    jobs.as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .map(|j| j["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Ids of the jobs in `state`, oldest first.
fn jobs_in(d: &TestDaemon, state: &str) -> Vec<u64> {
    let jobs = d.json(&["jobs", "--json"]);
    let mut ids: Vec<u64> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == state)
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    ids.sort();
    ids
}

/// Reads a child's stdout line by line on a thread.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).is_ok_and(|n| n == 1) {
            if byte[0] == b'\n' {
                let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
                buf.clear();
            } else {
                buf.push(byte[0]);
            }
        }
    });
    rx
}

/// Item 1: a loaded model's file truncated or rewritten in place no longer kills the daemon with
/// SIGBUS or turns the output into garbage: the writer breaks halod's lease, the model is taken
/// out of service (a running job fails naming the file), and the next load reads the new file.
#[test]
fn a_model_file_changed_under_the_daemon_is_taken_out_of_service() {
    let Some(smol) = model(SMOL) else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("smol.gguf");
    std::fs::copy(&smol, &file).unwrap();
    let Some(d) = daemon(&llm("smol", &file, "context = 256\nparallel = 1")) else {
        return;
    };
    let reference = greedy_tokens(&d, "smol", 4);
    assert_eq!(reference.len(), 4);
    let models = d.json(&["models", "--json"]);
    assert_eq!(
        models[0]["note"],
        Value::Null,
        "weights used in place: {models}"
    );

    // A job is streaming when the file is truncated (greedy counting runs to max-tokens).
    let mut child = d
        .command(&COUNTING)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut child);
    lines
        .recv_timeout(Duration::from_secs(120))
        .expect("a first token");
    // coreutils' truncate opens without blocking: the lease refuses it, and the break it starts
    // is what halod acts on.
    let out = Command::new("truncate")
        .args(["-s", "1000"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the lease holds writers off");
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(
        err.contains(&file.display().to_string()) && err.contains("changed"),
        "{err}"
    );
    wait_for("the model to leave memory", Duration::from_secs(30), || {
        d.resident().is_empty()
    });
    // The old copy was charged until its job ended; now nothing is held or charged.
    let s = d.json(&["status", "--json"]);
    assert_eq!(
        (s["gpu_allocated_bytes"].as_u64(), s["used_bytes"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );

    // Now the writer gets through (once the executor has let go of the model); the next load
    // reads the truncated file and says so.
    wait_for("truncate to get through", Duration::from_secs(30), || {
        Command::new("truncate")
            .args(["-s", "1000"])
            .arg(&file)
            .status()
            .unwrap()
            .success()
    });
    let err = d.fails(&["generate", "smol", "Hi", "--max-tokens", "1"], 3);
    assert!(
        err.contains("unusable model file") && err.contains("smol.gguf"),
        "{err}"
    );

    // Restored with a blocking writer (`cat > file`, same size) while resident: the writer
    // waits for halod to let the model go, then the model serves the new file's tokens.
    std::fs::copy(&smol, &file).unwrap();
    assert_eq!(greedy_tokens(&d, "smol", 4), reference);
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cat '{}' > '{}'", smol.display(), file.display()))
        .status()
        .unwrap();
    assert!(status.success());
    wait_for(
        "the rewritten model to leave memory",
        Duration::from_secs(30),
        || d.resident().is_empty(),
    );
    assert_eq!(greedy_tokens(&d, "smol", 4), reference);
}

/// Item 1, the fallback: without a lease (another process holds the file open for writing) the
/// weights are copied and `halo models` says why.
#[test]
fn without_a_lease_weights_are_copied_and_models_says_so() {
    let Some(path) = model(SMOL) else { return };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.gguf");
    std::fs::copy(&path, &file).unwrap();
    let Some(d) = daemon(&llm("t", &file, "context = 64\nparallel = 1")) else {
        return;
    };
    let writer = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    d.ok(&["load", "t"]);
    let m = d.json(&["models", "--json"]);
    let note = m[0]["note"].as_str().unwrap_or_default().to_string();
    assert!(
        note.contains("copied") && note.contains("open for writing"),
        "{m}"
    );
    drop(writer);
    d.ok(&["generate", "t", "Hi", "--max-tokens", "2"]);
}

/// Item 3: a queued client that disconnects gives its queue slot back at once.
#[test]
fn a_queued_client_that_leaves_frees_its_queue_slot() {
    let Some(smol) = model(SMOL) else { return };
    let cfg = format!(
        "[defaults]\nmax_queue = 1\n{}",
        llm("smol", &smol, "context = 256\nparallel = 1")
    );
    let Some(d) = daemon(&cfg) else { return };
    d.ok(&["load", "smol"]);
    let mut running = d.command(&COUNTING).stdout(Stdio::null()).spawn().unwrap();
    wait_for("a running job", Duration::from_secs(60), || {
        !jobs_in(&d, "running").is_empty()
    });
    let mut queued = d.command(&COUNTING).stdout(Stdio::null()).spawn().unwrap();
    wait_for("a queued job", Duration::from_secs(30), || {
        !jobs_in(&d, "queued").is_empty()
    });
    let gone = jobs_in(&d, "queued")[0];
    queued.kill().unwrap();
    queued.wait().unwrap();
    wait_for(
        "the left job to be cancelled",
        Duration::from_secs(10),
        || job_state(&d, gone) == "cancelled",
    );
    // Its slot is free: the next request queues instead of being refused.
    let mut next = d
        .command(&["generate", "smol", "Hi", "--max-tokens", "1", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the next job to queue", Duration::from_secs(30), || {
        jobs_in(&d, "queued").len() == 1 || next.try_wait().unwrap().is_some()
    });
    let first = jobs_in(&d, "running")[0];
    d.ok(&["cancel", &first.to_string()]);
    let out = next.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_lines(&text(&out.stdout)).last().unwrap()["done"], true);
    let _ = running.wait();
}

/// Item 4: a long prompt goes through in chunks of `step_tokens`, so a short request on another
/// model finishes while the long prompt is still being processed, and cancelling the long one
/// takes effect within a chunk.
#[test]
fn long_prompts_do_not_block_other_models() {
    let (Some(smol), Some(gemma)) = (model(SMOL), model(GEMMA)) else {
        return;
    };
    let cfg = format!(
        "[daemon]\nstep_tokens = 8\n{}{}",
        llm("smol", &smol, "context = 512\nparallel = 1"),
        llm("gemma", &gemma, "context = 64\nparallel = 1")
    );
    let Some(d) = daemon(&cfg) else { return };
    d.ok(&["load", "smol"]);
    d.ok(&["load", "gemma"]);
    let ids: Vec<String> = (0..200)
        .map(|i| (100 + i * 37 % 5000).to_string())
        .collect();
    let ids = ids.join(",");
    let long = d
        .command(&[
            "generate",
            "smol",
            "--tokens",
            &ids,
            "--max-tokens",
            "1",
            "--json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the long prompt to run", Duration::from_secs(60), || {
        !jobs_in(&d, "running").is_empty()
    });
    let long_id = jobs_in(&d, "running")[0];
    let out = d.ok(&["generate", "gemma", "Hi", "--max-tokens", "1", "--json"]);
    assert_eq!(json_lines(&out).last().unwrap()["done"], true);
    // The short request on the other model is done; the long prompt is still in its chunks.
    assert_eq!(job_state(&d, long_id), "running");
    d.ok(&["cancel", &long_id.to_string()]);
    let out = long.wait_with_output().unwrap();
    let last = json_lines(&text(&out.stdout)).pop().unwrap();
    assert_eq!(last["finish_reason"], "cancelled", "{last}");
    assert_eq!(last["completion_tokens"], 0);
}

/// Item 5: request sizes are bounded before any work: a text over `max_request` is refused by the
/// transport, a prompt no context could hold is refused before it is tokenized.
#[test]
fn oversized_requests_are_refused_before_work() {
    let Some(smol) = model(SMOL) else { return };
    let cfg = format!(
        "[daemon]\nmax_request = \"64KiB\"\n{}",
        llm("smol", &smol, "context = 256\nparallel = 1")
    );
    let Some(d) = daemon(&cfg) else { return };
    let big = "word ".repeat(40_000); // 200 kB
    let started = Instant::now();
    let mut child = d
        .command(&["tokenize", "smol", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(big.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("too large"),
        "{}",
        text(&out.stderr)
    );
    // 50 kB fits the request limit, but not 256 tokens of context.
    let prompt = "word ".repeat(10_000);
    let mut child = d
        .command(&["generate", "smol", "-", "--max-tokens", "1"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(prompt.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("context of 256 tokens could ever hold"),
        "{err}"
    );
    eprintln!("both refusals took {:?}", started.elapsed());
    // And the daemon serves as before.
    d.ok(&["generate", "smol", "Hi", "--max-tokens", "1"]);
}

/// Item 6: every stream ends with a summary or an exit code that says it was cut: `halo cancel`
/// gives the real token counts, Ctrl-C prints the cancelled summary (exit 130), a daemon
/// shutting down ends the stream with `shutdown` (exit 5), a connection that dies mid-stream
/// exits 5, never 0 or 3.
#[test]
fn every_stream_ends_with_a_summary_or_says_it_was_cut() {
    let Some(smol) = model(SMOL) else { return };
    let Some(d) = daemon(&llm("smol", &smol, "context = 256\nparallel = 2")) else {
        return;
    };
    d.ok(&["load", "smol"]);
    let long = COUNTING;

    // halo cancel: the summary counts the tokens that streamed.
    let mut child = d.command(&long).stdout(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut child);
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(120)).unwrap();
    }
    let id = jobs_in(&d, "running")[0];
    d.ok(&["cancel", &id.to_string()]);
    assert!(child.wait().unwrap().success());
    let lines: Vec<Value> = rx
        .iter()
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["finish_reason"], "cancelled");
    let streamed = 3 + lines.len() as u64 - 1;
    assert_eq!(last["completion_tokens"], streamed, "{last}");
    assert!(last["prompt_tokens"].as_u64().unwrap() > 0);

    // Ctrl-C: the client cancels, prints the summary and exits 130.
    let mut child = d.command(&long).stdout(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(&mut child);
    rx.recv_timeout(Duration::from_secs(120)).unwrap();
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let last: Value = serde_json::from_str(&rx.iter().last().unwrap()).unwrap();
    assert_eq!(last["finish_reason"], "cancelled", "{last}");

    // A connection that dies mid-stream (as when the daemon is killed): exit 5, not 3.
    let proxy = Proxy::start(&d.sock);
    let mut child = Command::new(env!("CARGO_BIN_EXE_halo"))
        .args(["--addr", &format!("http://{}", proxy.addr)])
        .args(long)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    rx.recv_timeout(Duration::from_secs(120)).unwrap();
    proxy.cut();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(5), "{err}");
    assert!(err.contains("cut") || err.contains("incomplete"), "{err}");

    // The daemon shutting down (SIGTERM): the summary says so and the client exits 5.
    let mut child = d
        .command(&long)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    rx.recv_timeout(Duration::from_secs(120)).unwrap();
    d.shutdown();
    let status = child.wait().unwrap();
    let last: Value = serde_json::from_str(&rx.iter().last().unwrap()).unwrap();
    assert_eq!(last["finish_reason"], "shutdown", "{last}");
    assert!(last["completion_tokens"].as_u64().unwrap() >= 1);
    assert_eq!(status.code(), Some(5));
}

/// A TCP front for the daemon's unix socket that can be cut, as a dying daemon cuts streams.
struct Proxy {
    addr: String,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(sock: &std::path::Path) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = conns.clone();
        let sock = sock.to_path_buf();
        std::thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(c) = c else { return };
                let Ok(u) = std::os::unix::net::UnixStream::connect(&sock) else {
                    return;
                };
                keep.lock().unwrap().push(c.try_clone().unwrap());
                let (mut c2, mut u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
                let (mut c, mut u) = (c, u);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c, &mut u);
                    let _ = u.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut u2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy { addr, conns }
    }

    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Item 7 (and 8): a stock Python grpcio client, with grpcio's own :authority, drives halod over
/// its unix socket: status, models, a streamed generation with the CLI's tokens; a request with
/// both a prompt and messages is INVALID_ARGUMENT.
#[test]
fn a_stock_grpcio_client_talks_to_the_unix_socket() {
    let Some(smol) = model(SMOL) else { return };
    let pythonpath = std::env::var("HALO_PYTHONPATH").unwrap_or_default();
    let have = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .env("PYTHONPATH", &pythonpath)
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var("HALO_REQUIRE_MODELS").as_deref() != Ok("1"),
            "grpcio is missing: `make pydeps` installs it into target/pydeps"
        );
        eprintln!("skipping: no grpcio");
        return;
    }
    let Some(d) = daemon(&llm("smol", &smol, "context = 256\nparallel = 1")) else {
        return;
    };
    let reference = greedy_tokens(&d, "smol", 3);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("tests/grpcio_client.py"))
        .arg(&d.sock)
        .arg(root.join("../proto"))
        .arg("smol")
        .env("PYTHONPATH", &pythonpath)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["models"], serde_json::json!(["smol"]), "{r}");
    assert_eq!(r["job_started"], true);
    assert_eq!(r["tokens"], serde_json::json!(reference), "{r}");
    assert_eq!(r["finish_reason"], "length");
    assert_eq!(r["both"], "INVALID_ARGUMENT", "{r}");
    assert!(r["both_message"]
        .as_str()
        .unwrap()
        .contains("both a prompt and chat messages"));
}

/// Items 9 and 10: what the device holds is what the budget is charged, and the estimate shown
/// before a load is the bytes held after it, to the byte (a 2.4 MiB file whose weights are
/// imported once held 512 MiB of chunks, and small files were a few KiB over their estimate).
#[test]
fn device_bytes_charged_bytes_and_estimates_agree() {
    let (Some(smol), Some(gemma)) = (model(SMOL), model(GEMMA)) else {
        return;
    };
    let mut cfg = String::new();
    for (name, file) in [("smol", &smol), ("gemma", &gemma)] {
        cfg.push_str(&llm(name, file, "context = 100\nparallel = 2"));
    }
    let Some(d) = daemon(&cfg) else { return };
    let models = d.json(&["models", "--json"]);
    for m in models.as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        d.ok(&["load", name]);
        let ps = d.json(&["ps", "--json"]);
        let held = ps
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()["bytes"]
            .clone();
        assert_eq!(held, m["estimated_bytes"], "{name}: {m} vs {ps}");
        let s = d.json(&["status", "--json"]);
        assert_eq!(s["gpu_allocated_bytes"], s["used_bytes"], "{name}: {s}");
    }
    let human = d.ok(&["status"]);
    assert!(human.contains("held by the device"), "{human}");
    for m in models.as_array().unwrap() {
        d.ok(&["unload", m["name"].as_str().unwrap()]);
    }
    let s = d.json(&["status", "--json"]);
    assert_eq!(
        (s["gpu_allocated_bytes"].as_u64(), s["used_bytes"].as_u64()),
        (Some(0), Some(0))
    );
}

/// Items 12 to 16: negative numbers reach the daemon's range check, prompts come from stdin,
/// chat on a model without a template gives advice that works, help texts say the defaults,
/// bench works on a small vocabulary and rejects -p 0 as a usage error.
#[test]
fn cli_details() {
    let Some(smol) = model(SMOL) else { return };
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.gguf");
    without_template(&smol, &plain);
    let small = dir.path().join("small.gguf");
    tiny_with_tokenizer(&small);
    let cfg = format!(
        "{}{}{}",
        llm("smol", &smol, "context = 256\nparallel = 1"),
        llm("tiny", &plain, "context = 64\nparallel = 1"),
        llm("small", &small, "context = 64\nparallel = 1")
    );
    let Some(d) = daemon(&cfg) else { return };
    // 12
    let err = d.fails(&["generate", "smol", "Hi", "--temperature", "-1"], 3);
    assert!(err.contains("temperature -1 is out of range"), "{err}");
    // 13: `-` and a piped stdin without a prompt give the same tokens as the argument.
    let reference = greedy_tokens(&d, "smol", 3);
    for args in [vec!["-"], vec![]] {
        let mut a = vec!["generate", "smol"];
        a.extend(args);
        a.extend(["--temperature", "0", "--max-tokens", "3", "--json"]);
        let mut child = d
            .command(&a)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"The capital of France is")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let toks: Vec<u64> = json_lines(&text(&out.stdout))
            .iter()
            .filter_map(|l| l["token"].as_u64())
            .collect();
        assert_eq!(toks, reference, "{a:?}");
    }
    // 14: this copy of the model has no chat template.
    let mut child = d
        .command(&["chat", "tiny"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("no chat template") && !err.contains("drop --chat"),
        "{err}"
    );
    // 15
    let help = d.ok(&["generate", "--help"]);
    for want in [
        "The model, by its name",
        "[default: 40]",
        "[default: 0.95]",
        "[default: 0.05]",
        "[default: 0.8]",
        "[default: at end of generation",
    ] {
        assert!(
            help.contains(want),
            "generate --help lacks {want:?}:\n{help}"
        );
    }
    let help = d.ok(&["image", "--help"]);
    assert!(!help.contains("[default: 0]"), "{help}");
    assert!(help.contains("[default: the model's, else 1024]"), "{help}");
    assert!(!help.contains("[default: \"\"]"), "{help}");
    // 16: a vocabulary of 256 tokens (bench once sent token 8019), and -p 0 is a usage error.
    d.ok(&["generate", "small", "ab cd", "--max-tokens", "2"]);
    let out = d.ok(&["bench", "small", "-p", "40", "-n", "4", "-r", "1", "--json"]);
    let b: Value = serde_json::from_str(&out).unwrap();
    assert!(b["pp_tokens_per_s"].as_f64().unwrap() > 0.0, "{b}");
    assert!(b["tg_tokens_per_s"].as_f64().unwrap() > 0.0, "{b}");
    d.fails(&["bench", "small", "-p", "0", "-n", "0"], 2);
}

/// Items 17 to 19: a corrupt file is an "unusable model file", `halo models` follows the file
/// without a load, random bytes are not a flux model, and a link to a file that is not a model
/// never shows that file's bytes.
#[test]
fn model_file_problems_are_reported_right() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("secret"), "root:$6$verysecret:19000:0:99999:7:::\n").unwrap();
    std::os::unix::fs::symlink(p("secret"), p("link.gguf")).unwrap();
    let noise: Vec<u8> = (0..100u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(p("noise.safetensors"), &noise).unwrap();
    let cfg = format!(
        "{}{}[[models]]\nname = \"flux\"\nkind = \"flux\"\npath = {:?}\n",
        llm("later", &p("later.gguf"), "context = 64\nparallel = 1"),
        llm("link", &p("link.gguf"), "context = 64\nparallel = 1"),
        p("noise.safetensors").display().to_string()
    );
    let Some(d) = daemon(&cfg) else { return };
    let state = |name: &str| {
        let m = d.json(&["models", "--json"]);
        let row = m
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
            .clone();
        (row["state"].as_str().unwrap().to_string(), row)
    };
    // 19
    let err = d.fails(&["load", "link"], 3);
    assert!(
        err.contains("unusable model file") && err.contains("bad magic"),
        "{err}"
    );
    assert!(!err.contains("root") && !err.contains("[114"), "{err}");
    // 18
    assert_eq!(state("flux").0, "invalid");
    let err = d.fails(&["load", "flux"], 3);
    assert!(
        err.contains("unusable model file") && err.contains("safetensors"),
        "{err}"
    );
    // 17: missing, then the file appears: `halo models` sees it without a load.
    assert_eq!(state("later").0, "missing");
    let Some(smol) = model(SMOL) else { return };
    std::fs::copy(&smol, p("later.gguf")).unwrap();
    let (s, row) = state("later");
    assert_eq!(s, "unloaded", "{row}");
    assert!(row["estimated_bytes"].as_u64().unwrap() > 0);
    // Corrupted: reported as such, permanent wording, until the file is fixed.
    std::fs::write(p("later.gguf"), b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let err = d.fails(&["load", "later"], 3);
    assert!(err.contains("unusable model file"), "{err}");
    assert_eq!(state("later").0, "invalid");
    std::fs::copy(&smol, p("later.gguf")).unwrap();
    assert_eq!(state("later").0, "unloaded");
    d.ok(&["load", "later"]);
}

/// A diffusers SDXL folder (the tiny fixture) and the same model as a single original-layout
/// file load onto the GPU: the estimate `halo models` shows is what `halo ps` holds and what the
/// device's ledger charges, to the byte; unloading returns every byte. (Image jobs on them:
/// tests/image.rs.)
#[test]
fn an_sdxl_folder_loads_onto_the_gpu_at_its_estimate() {
    let fixtures =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../daemon/tests/fixtures/diffusion");
    let folder = fixtures.join("tiny-sdxl").display().to_string();
    let file = fixtures
        .join("tiny-sdxl-single.safetensors")
        .display()
        .to_string();
    let cfg = format!(
        "[[models]]\nname = \"tiny\"\nkind = \"sdxl\"\npath = {folder:?}\n\
         [[models]]\nname = \"single\"\nkind = \"sdxl\"\npath = {file:?}\ndiffusers_config = {folder:?}\n"
    );
    let Some(d) = daemon(&cfg) else { return };
    let models = d.json(&["models", "--json"]);
    for name in ["tiny", "single"] {
        let entry = models
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name);
        let estimate = entry.unwrap()["estimated_bytes"].clone();
        assert!(estimate.as_u64().unwrap() > 0, "{models}");
        d.ok(&["load", name]);
        let ps = d.json(&["ps", "--json"]);
        assert_eq!(ps[0]["bytes"], estimate, "{ps}");
        let s = d.json(&["status", "--json"]);
        assert_eq!(s["gpu_allocated_bytes"], s["used_bytes"], "{s}");
        assert_eq!(s["used_bytes"], estimate, "{s}");
        d.ok(&["unload", name]);
        let s = d.json(&["status", "--json"]);
        assert_eq!(
            (s["gpu_allocated_bytes"].as_u64(), s["used_bytes"].as_u64()),
            (Some(0), Some(0)),
            "{s}"
        );
    }
}
