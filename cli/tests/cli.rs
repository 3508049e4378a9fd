//! End-to-end: the real daemon (`halod::run`) on a temporary unix socket with a temporary config
//! naming real files, driven by the real `halo` binary.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{text, Gpu, TestDaemon, MB};
use serde_json::Value;

/// Three 1 MB models and a budget that fits two of them.
const THREE: &str = r#"
[memory]
budget = "2.5MB"
[[models]]
name = "a"
kind = "flux"
path = "a.safetensors"
[[models]]
name = "b"
kind = "flux"
path = "b.safetensors"
[[models]]
name = "c"
kind = "flux"
path = "c.safetensors"
"#;
const THREE_FILES: &[(&str, u64)] = &[
    ("a.safetensors", MB),
    ("b.safetensors", MB),
    ("c.safetensors", MB),
];

#[test]
fn status_reports_device_and_budget() {
    let d = TestDaemon::start(THREE, THREE_FILES);
    let s = d.json(&["status", "--json"]);
    assert_eq!(s["budget_bytes"], 2_500_000);
    assert_eq!(s["used_bytes"], 0);
    assert_eq!(s["budget"]["mode"], "fixed");
    assert!(s["budget"]["physical_ram_bytes"].as_u64().unwrap() > 0);
    match &s["device"] {
        Value::Null => assert!(s["device_error"].is_string(), "{s}"),
        dev => {
            assert!(!dev["name"].as_str().unwrap().is_empty());
            assert!(dev["api_version"].as_str().unwrap().starts_with("1."));
            assert!(dev["max_storage_buffer_range"].as_u64().unwrap() > 0);
            assert!(dev["subgroup_size"].as_u64().unwrap() >= 1);
        }
    }
    if std::env::var("HALO_REQUIRE_VULKAN").as_deref() == Ok("1") {
        assert!(s["device"].is_object(), "a Vulkan device is required: {s}");
        assert_eq!(s["runtime_error"], Value::Null, "{s}");
        assert_eq!(s["gpu_allocated_bytes"], 0, "nothing allocated yet: {s}");
    }
    let human = d.ok(&["status"]);
    assert!(human.contains("2.4 MiB budget"), "{human}");
}

#[test]
fn models_lists_estimates_and_missing_files() {
    let cfg =
        format!("{THREE}\n[[models]]\nname = \"gone\"\nkind = \"flux\"\npath = \"nothere\"\n");
    let d = TestDaemon::start(&cfg, THREE_FILES);
    let m = d.json(&["models", "--json"]);
    let m = m.as_array().unwrap();
    assert_eq!(m.len(), 4);
    assert_eq!(m[0]["name"], "a");
    assert_eq!(m[0]["kind"], "flux");
    assert_eq!(m[0]["estimated_bytes"], MB);
    assert_eq!(m[0]["state"], "unloaded");
    assert_eq!(m[0]["pinned"], false);
    assert_eq!(m[0]["path"], d.path("a.safetensors").to_str().unwrap());
    let gone = m.iter().find(|x| x["name"] == "gone").unwrap();
    assert_eq!(gone["state"], "missing");
    assert!(gone["error"].as_str().unwrap().contains("does not exist"));
    let table = d.ok(&["models"]);
    assert!(table.starts_with("NAME "), "{table}");
    assert!(table.contains("976.6 KiB"), "{table}");
}

#[test]
fn load_then_ps_shows_real_bytes() {
    let d = TestDaemon::start(THREE, THREE_FILES);
    let r = d.json(&["load", "a", "--json"]);
    assert_eq!(r["model"]["bytes"], MB);
    assert_eq!(r["evicted"], Value::Array(vec![]));
    let ps = d.json(&["ps", "--json"]);
    assert_eq!(ps[0]["name"], "a");
    assert_eq!(ps[0]["kind"], "flux");
    assert_eq!(ps[0]["bytes"], MB);
    assert_eq!(ps[0]["pinned"], false);
    assert!(ps[0]["last_used"].as_str().unwrap().ends_with('Z'));
    let exp = ps[0]["expires_in_s"].as_u64().unwrap();
    assert!((290..=300).contains(&exp), "keep-alive 5m: {exp}");
    assert_eq!(d.json(&["status", "--json"])["used_bytes"], MB);
    let m = d.json(&["models", "--json"]);
    assert_eq!(m[0]["state"], "resident");
}

#[test]
fn eviction_is_least_recently_used_first() {
    let d = TestDaemon::start(THREE, THREE_FILES);
    d.ok(&["load", "a"]);
    d.ok(&["load", "b"]);
    let r = d.json(&["load", "c", "--json"]);
    assert_eq!(r["evicted"], serde_json::json!(["a"]));
    assert_eq!(d.resident(), ["b", "c"]);
    // Using b again makes c the least recently used.
    d.ok(&["load", "b"]);
    let r = d.json(&["load", "a", "--json"]);
    assert_eq!(r["evicted"], serde_json::json!(["c"]));
    assert_eq!(d.resident(), ["a", "b"]);
    assert_eq!(d.json(&["status", "--json"])["used_bytes"], 2 * MB);
}

#[test]
fn pinned_models_are_never_evicted() {
    let d = TestDaemon::start(THREE, THREE_FILES);
    let r = d.json(&["load", "a", "--pin", "--json"]);
    assert_eq!(r["model"]["pinned"], true);
    d.ok(&["load", "b"]);
    d.json(&["load", "c", "--json"]);
    assert_eq!(d.resident(), ["a", "c"], "b, not the pinned a, is evicted");
    let err = d.fails(&["unload", "a"], 3);
    assert!(err.contains("unpin"), "{err}");
    // Pin c too: now nothing can be evicted to make room for b.
    d.ok(&["pin", "c"]);
    let err = d.fails(&["load", "b"], 3);
    assert!(err.contains("out of room"), "{err}");
    assert!(
        err.contains("\"a\"") && err.contains("\"c\"") && err.contains("pinned"),
        "{err}"
    );
    assert_eq!(d.resident(), ["a", "c"]);
    d.ok(&["unpin", "c"]);
    d.ok(&["load", "b"]);
    assert_eq!(d.resident(), ["a", "b"]);
    let ps = d.json(&["ps", "--json"]);
    assert_eq!(ps[0]["pinned"], true);
    assert_eq!(ps[0]["expires_in_s"], Value::Null);
}

#[test]
fn a_model_that_can_never_fit_is_refused() {
    let cfg = r#"
[memory]
budget = "1MB"
[[models]]
name = "huge"
kind = "flux"
path = "huge.safetensors"
"#;
    let d = TestDaemon::start(cfg, &[("huge.safetensors", 3 * MB)]);
    let err = d.fails(&["load", "huge"], 3);
    assert!(err.contains("out of room"), "{err}");
    assert!(err.contains("\"huge\""), "{err}");
    assert!(
        err.contains("2.9 MiB") && err.contains("976.6 KiB"),
        "{err}"
    );
    assert!(err.contains("never fit"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(d.resident().is_empty());
}

#[test]
fn unload_frees_the_bytes() {
    let d = TestDaemon::start(THREE, THREE_FILES);
    d.ok(&["load", "a"]);
    let out = d.ok(&["unload", "a"]);
    assert!(out.contains("freed 976.6 KiB"), "{out}");
    assert!(d.resident().is_empty());
    assert_eq!(d.json(&["status", "--json"])["used_bytes"], 0);
    let err = d.fails(&["unload", "a"], 3);
    assert!(
        err.contains("not resident") || err.contains("not loaded"),
        "{err}"
    );
}

#[test]
fn unknown_and_missing_models_get_clear_errors() {
    let cfg = format!(
        "{THREE}\n[[models]]\nname = \"gone\"\nkind = \"flux\"\npath = \"gone.safetensors\"\n"
    );
    let d = TestDaemon::start(&cfg, THREE_FILES);
    let err = d.fails(&["load", "nope"], 3);
    assert!(
        err.contains("not found") && err.contains("unknown model \"nope\""),
        "{err}"
    );
    let err = d.fails(&["load", "gone"], 3);
    assert!(err.contains("gone.safetensors does not exist"), "{err}");
    // The file appears: now it loads.
    std::fs::write(d.path("gone.safetensors"), common::safetensors(MB / 2)).unwrap();
    let r = d.json(&["load", "gone", "--json"]);
    assert_eq!(r["model"]["bytes"], MB / 2);
}

#[test]
fn jobs_fail_honestly_and_cancel_reports_state() {
    let d = TestDaemon::start(THREE, THREE_FILES);
    let err = d.fails(&["cancel", "999"], 3);
    assert!(err.contains("no job 999"), "{err}");
    // Flux is not run yet: image queues a job, maps the file, and says UNIMPLEMENTED.
    let out = d.halo(&["image", "a", "a cat"]);
    let err = text(&out.stderr);
    if std::env::var("HALO_REQUIRE_VULKAN").as_deref() == Ok("1") || out.status.code() == Some(4) {
        assert_eq!(out.status.code(), Some(4), "{err}");
        assert!(
            err.contains("not implemented") && err.contains("flux engine is not built yet"),
            "{err}"
        );
        let jobs = d.json(&["jobs", "--json"]);
        assert_eq!(jobs[0]["id"], 1);
        assert_eq!(jobs[0]["model"], "a");
        assert_eq!(jobs[0]["kind"], "image");
        assert_eq!(jobs[0]["state"], "failed");
        assert_eq!(d.resident(), ["a"]);
        let err = d.fails(&["cancel", "1"], 3);
        assert!(err.contains("already finished"), "{err}");
    }
    let err = d.fails(&["generate", "a", "a cat"], 3);
    assert!(
        err.contains("flux model") && err.contains("halo image"),
        "{err}"
    );
    let err = d.fails(&["generate", "nope", "hi"], 3);
    assert!(err.contains("unknown model"), "{err}");
    let err = d.fails(&["generate", "a", "hi", "--top-p", "2"], 3);
    assert!(err.contains("top_p"), "{err}");
}

#[test]
fn without_a_device_jobs_fail_with_failed_precondition() {
    let d = TestDaemon::start_with(THREE, THREE_FILES, Gpu::None);
    let s = d.json(&["status", "--json"]);
    assert_eq!(s["device"], Value::Null);
    assert!(s["device_error"].as_str().unwrap().contains("no devices"));
    let err = d.fails(&["image", "a", "a cat"], 3);
    assert!(
        err.contains("cannot do that now") && err.contains("no GPU device"),
        "{err}"
    );
    // Residency still works without a device.
    d.ok(&["load", "a"]);
    assert_eq!(d.resident(), ["a"]);
}

#[test]
fn keep_alive_expiry_unloads_idle_models() {
    let cfg = r#"
[memory]
budget = "10MB"
[defaults]
keep_alive = "1s"
[[models]]
name = "short"
kind = "flux"
path = "a.safetensors"
[[models]]
name = "forever"
kind = "flux"
path = "b.safetensors"
keep_alive = "-1"
"#;
    let d = TestDaemon::start(cfg, &[("a.safetensors", MB), ("b.safetensors", MB)]);
    d.ok(&["load", "short"]);
    d.ok(&["load", "forever"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while d.resident().contains(&"short".to_string()) {
        assert!(Instant::now() < deadline, "short never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(d.resident(), ["forever"]);
}

#[test]
fn reload_applies_a_good_config_and_keeps_the_old_on_a_bad_one() {
    let d = TestDaemon::start(THREE, THREE_FILES);
    d.ok(&["load", "a"]);
    let cfg = d.path("halod.toml");
    let more =
        format!("{THREE}\n[[models]]\nname = \"d\"\nkind = \"flux\"\npath = \"a.safetensors\"\n");
    std::fs::write(&cfg, more).unwrap();
    let r = d.json(&["reload", "--json"]);
    assert_eq!(r["models"], 4);
    assert_eq!(d.json(&["models", "--json"]).as_array().unwrap().len(), 4);
    assert_eq!(d.resident(), ["a"], "a reload keeps resident models");

    std::fs::write(&cfg, "[memory]\nbudgit = 1\n").unwrap();
    let err = d.fails(&["reload"], 3);
    assert!(err.contains("halod.toml:2: memory.budgit"), "{err}");
    assert!(err.contains("old one stays"), "{err}");
    assert_eq!(d.json(&["models", "--json"]).as_array().unwrap().len(), 4);

    // A new config without a: it is unloaded.
    std::fs::write(
        &cfg,
        "[memory]\nbudget = \"2.5MB\"\n[[models]]\nname = \"b\"\nkind = \"flux\"\npath = \"b.safetensors\"\n",
    )
    .unwrap();
    let r = d.json(&["reload", "--json"]);
    assert_eq!(r["unloaded"], serde_json::json!(["a"]));
    assert!(d.resident().is_empty());
}

#[test]
fn unreachable_daemon_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_halo"))
        .args(["--addr", &format!("unix:{}", sock.display()), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(err.contains("is it running"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_command_lines_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_halo"))
        .args(["--addr", "nowhere", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("bad address"));
}

#[test]
fn tables_are_aligned() {
    let d = TestDaemon::start(THREE, THREE_FILES);
    d.ok(&["load", "a", "--pin"]);
    d.ok(&["load", "b"]);
    let ps = d.ok(&["ps"]);
    let lines: Vec<&str> = ps.lines().collect();
    assert_eq!(lines.len(), 3, "{ps}");
    let col = |l: &str, w: &str| l.find(w);
    assert_eq!(col(lines[0], "SIZE"), col(lines[1], "976.6"), "{ps}");
    assert!(lines[1].contains("pinned"), "{ps}");
    assert!(lines[2].contains("from now"), "{ps}");
}
