//! The `halod` binary itself: config errors and exit codes, the socket it makes, signals, health.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HALOD: &str = env!("CARGO_BIN_EXE_halod");

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("halod.toml");
    std::fs::write(&p, body).unwrap();
    p
}

/// Starts `halod --config CFG --listen unix:SOCK` and waits until the socket accepts.
fn spawn(cfg: &Path, sock: &Path) -> Child {
    let child = Command::new(HALOD)
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--listen", &format!("unix:{}", sock.display())])
        .env("HALO_LOG", "warn")
        .env("XDG_STATE_HOME", cfg.parent().unwrap().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "halod did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// Waits for the child to exit, at most `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("halod did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn bad_config_key_names_file_line_and_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[daemon]\nlog = \"info\"\n\n[memory]\nbudget = \"8GiB\"\nreserv = \"1GiB\"\n",
    );
    let out = Command::new(HALOD)
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:6: memory.reserv: unknown field `reserv`",
            cfg.display()
        )),
        "{err}"
    );

    let out = Command::new(HALOD)
        .args(["check-config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(":6: memory.reserv"));
}

/// Issue 8, item 11: a keep-alive too long for a duration is a config error, as an oversized
/// size is, instead of wrapping to an hour.
#[test]
fn an_overflowing_keep_alive_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[defaults]\nkeep_alive = \"5124095576030432h\"\n",
    );
    let out = Command::new(HALOD)
        .args(["check-config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("defaults.keep_alive") && err.contains("too long"),
        "{err}"
    );
}

/// Issue 8, item 17: a load that fails (a model file halo cannot use) is logged by the daemon,
/// not only answered to the client, and the answer marks it as a model-file problem.
#[test]
fn a_failed_load_is_logged_and_marked_as_a_model_file_problem() {
    let dir = tempfile::tempdir().unwrap();
    // The tiny fixture's header is sound (it has an estimate), but it carries no tokenizer, so
    // only the load itself fails.
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/tiny-llama-F32.gguf");
    let cfg = write_config(
        dir.path(),
        &format!(
            "[[models]]\nname = \"notok\"\nkind = \"llm\"\npath = {:?}\n",
            model.display().to_string()
        ),
    );
    let sock = dir.path().join("halod.sock");
    let mut child = spawn(&cfg, &sock);
    let addr = halo_proto::Addr::Unix(sock.clone());
    let (gpu, status) = rt().block_on(async {
        let mut c = halo_proto::connect(&addr).await.unwrap();
        let s = c
            .status(halo_proto::v1::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let r = c
            .load(halo_proto::v1::LoadRequest {
                model: "notok".into(),
                pin: false,
            })
            .await;
        (s.runtime_error.is_empty() && s.device.is_some(), r.err())
    });
    signal(&child, "TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    if !gpu {
        assert!(
            std::env::var("HALO_REQUIRE_VULKAN").as_deref() != Ok("1"),
            "no GPU runtime"
        );
        eprintln!("skipping: without a GPU runtime an LLM's files are only mapped");
        return;
    }
    let status = status.expect("the load fails");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        status.metadata().get(halo_proto::ERROR_REASON_KEY).unwrap(),
        "model-file"
    );
    assert!(
        status.message().contains("tokenizer"),
        "{}",
        status.message()
    );
    assert!(
        log.contains("loading the model failed")
            && log.contains("notok")
            && log.contains("tokenizer"),
        "{log}"
    );
}

#[test]
fn missing_config_file_exits_2() {
    let out = Command::new(HALOD)
        .args(["--config", "/nonexistent/halod.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/halod.toml: cannot read config"));
}

#[test]
fn the_demo_config_is_valid() {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/demo.toml");
    let out = Command::new(HALOD)
        .args(["check-config", demo])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("SmolLM2-135M-Instruct.Q4_1.gguf"));
}

#[test]
fn the_documented_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/halod.toml");
    let out = Command::new(HALOD)
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(
        printed.contains("[[models]]") && printed.contains("budget = \"auto\""),
        "{printed}"
    );
    // What check-config prints is itself a valid config.
    let dir = tempfile::tempdir().unwrap();
    let again = write_config(dir.path(), &printed);
    let out = Command::new(HALOD)
        .args(["check-config", again.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), printed);
}

#[test]
fn sigterm_exits_0_quickly_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let sock = dir.path().join("run/halod.sock");
    let mut child = spawn(&cfg, &sock);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");

    // A second daemon on the same socket refuses to start.
    let out = Command::new(HALOD)
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--listen", &format!("unix:{}", sock.display())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("already listening"));

    let start = Instant::now();
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn sigint_exits_0_and_a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let sock = dir.path().join("halod.sock");
    // A socket file nobody listens on, as a crashed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut child = spawn(&cfg, &sock);
    signal(&child, "INT");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

/// Issue 8, item 2: only a stale *socket* is replaced; a regular file (or a folder) at the
/// listen path is somebody's data: halod refuses to start, names the path, and leaves it alone.
#[test]
fn a_file_at_the_listen_path_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let important = dir.path().join("important.txt");
    std::fs::write(&important, "do not delete").unwrap();
    let folder = dir.path().join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    for path in [&important, &folder] {
        let out = Command::new(HALOD)
            .args(["--config", cfg.to_str().unwrap()])
            .args(["--listen", &format!("unix:{}", path.display())])
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(
            err.contains(&path.display().to_string()) && err.contains("not a socket"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&important).unwrap(),
        "do not delete"
    );
    assert!(folder.is_dir());
}

#[test]
fn sighup_reloads_and_health_reports_serving() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("m.gguf"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let cfg = write_config(dir.path(), "");
    let sock = dir.path().join("halod.sock");
    let mut child = spawn(&cfg, &sock);
    let addr = halo_proto::Addr::Unix(sock.clone());
    let count = |addr: &halo_proto::Addr| {
        rt().block_on(async {
            let mut c = halo_proto::connect(addr).await.unwrap();
            c.list_models(halo_proto::v1::ListModelsRequest {})
                .await
                .unwrap()
                .into_inner()
                .models
                .len()
        })
    };
    assert_eq!(count(&addr), 0);
    write_config(
        dir.path(),
        "[[models]]\nname = \"m\"\nkind = \"llm\"\npath = \"m.gguf\"\n",
    );
    signal(&child, "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&addr) != 1 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A bad file on SIGHUP: logged, and the daemon keeps serving with the old config.
    write_config(dir.path(), "nonsense = [");
    signal(&child, "HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(&addr), 1);

    let serving = rt().block_on(async {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let path = sock.clone();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .unwrap();
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "halo.v1.Halo".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    });
    assert_eq!(serving, 1, "SERVING");

    signal(&child, "TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn systemd_unit_verifies() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed; skipping");
        return;
    };
    assert!(out.status.success());
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/halod.service"
    ))
    .unwrap();
    for needed in [
        "RuntimeDirectory=halo",
        "ConfigurationDirectory=halo",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "DeviceAllow=char-drm rw",
        "LimitMEMLOCK=infinity",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    // verify checks that ExecStart exists, so point it at the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("halod.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/halod", HALOD)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}
