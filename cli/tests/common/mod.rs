//! The test harness shared by the end-to-end suites: a real daemon (`halod::run`) on a temporary
//! socket and config, driven by the real `halo` binary.
#![allow(dead_code)] // each suite uses a different part

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use halo_proto::Addr;
use halod::core::DeviceFacts;
use halod::memory::MemorySources;
use halod::{Config, Control};
use serde_json::Value;
use tokio::sync::mpsc;

pub const MB: u64 = 1_000_000;

/// A generation that runs to its token limit: greedy counting does not stop early.
pub const COUNTING: [&str; 8] = [
    "generate",
    "smol",
    "Count to 500: 1, 2, 3, 4, 5, 6, 7,",
    "--temperature",
    "0",
    "--max-tokens",
    "200",
    "--json",
];

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    ctl: mpsc::Sender<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub enum Gpu {
    Probe,
    None,
}

impl TestDaemon {
    /// Writes `files` (name, size) and `config` into a temp folder and starts the daemon on it.
    pub fn start(config: &str, files: &[(&str, u64)]) -> Self {
        Self::start_with(config, files, Gpu::Probe)
    }

    pub fn start_with(config: &str, files: &[(&str, u64)], gpu: Gpu) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, size) in files {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            f.set_len(*size).unwrap();
            if name.ends_with(".safetensors") {
                std::fs::write(dir.path().join(name), safetensors(*size)).unwrap();
            }
        }
        let cfg_path = dir.path().join("halod.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let config = Config::load(&cfg_path).unwrap();
        let sock = dir.path().join("halod.sock");
        let (ctl, rx) = mpsc::channel(4);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let addr = Addr::Unix(sock.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = halod::bind(&addr).await.unwrap();
                let facts = match gpu {
                    Gpu::Probe => halod::probe_device(None).await,
                    Gpu::None => Arc::new(DeviceFacts {
                        discovery: Err("the Vulkan loader found no devices".into()),
                        runtime: Err("the Vulkan loader found no devices".into()),
                        memory: MemorySources {
                            physical_ram: 16 << 30,
                            ..Default::default()
                        },
                    }),
                };
                ready_tx.send(()).unwrap();
                halod::run(vec![listener], config, facts, rx).await.unwrap();
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        TestDaemon {
            dir,
            sock,
            ctl,
            thread: Some(thread),
        }
    }

    /// Asks the daemon to shut down, as SIGTERM does, without waiting for it.
    pub fn shutdown(&self) {
        let _ = self.ctl.try_send(Control::Shutdown);
    }

    /// `halo ARGS` pointed at this daemon, for tests that spawn it themselves.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_halo"));
        c.args(args)
            .env("HALO_ADDR", format!("unix:{}", self.sock.display()));
        c
    }

    pub fn halo(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs `halo ARGS`, requires success, and parses stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.halo(args);
        assert!(
            out.status.success(),
            "halo {args:?} failed: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("halo {args:?}: bad JSON ({e}): {}", text(&out.stdout)))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.halo(args);
        assert!(
            out.status.success(),
            "halo {args:?} failed: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs `halo ARGS`, requires exit code `code`, returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.halo(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "halo {args:?}: stdout {} stderr {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stderr)
    }

    pub fn resident(&self) -> Vec<String> {
        let ps = self.json(&["ps", "--json"]);
        ps.as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let _ = self.ctl.try_send(Control::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A valid safetensors file of exactly `len` bytes (one U8 tensor filling the data section), so
/// placeholder diffusion models pass halod's layout check.
pub fn safetensors(len: u64) -> Vec<u8> {
    let mut pad = 0;
    loop {
        let header = |data: u64| {
            format!(
                "{{\"w\":{{\"dtype\":\"U8\",\"shape\":[{data}],\"data_offsets\":[0,{data}]}}}}{}",
                " ".repeat(pad)
            )
        };
        let guess = len.saturating_sub(8 + header(0).len() as u64);
        for data in guess.saturating_sub(20)..=guess {
            let h = header(data);
            if 8 + h.len() as u64 + data == len {
                let mut out = (h.len() as u64).to_le_bytes().to_vec();
                out.extend_from_slice(h.as_bytes());
                out.resize(len as usize, 0);
                return out;
            }
        }
        pad += 1;
    }
}

/// A real model fetched by scripts/fetch-models.sh, or None (skip) when it is missing; with
/// HALO_REQUIRE_MODELS=1 a missing model fails the test instead.
pub fn model(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("HALO_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{} is missing; run scripts/fetch-models.sh", p.display());
    }
    eprintln!("skipping: {} is missing", p.display());
    None
}

/// Parses `--json` output: one JSON object per line.
pub fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
