//! Image jobs end to end: the real daemon (`halod::run`) and the real `halo` binary on the tiny
//! SDXL fixture (daemon/tests/fixtures/diffusion/tiny-sdxl, random weights) and, where an LLM
//! must run beside it, SmolLM2. Skips without a Vulkan device or the models unless
//! HALO_REQUIRE_VULKAN=1 / HALO_REQUIRE_MODELS=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{json_lines, model, text, TestDaemon};
use serde_json::Value;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn tiny_sdxl() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../daemon/tests/fixtures/diffusion/tiny-sdxl")
}

fn sdxl(name: &str, path: &Path, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\nkind = \"sdxl\"\npath = {:?}\n{extra}\n",
        path.display().to_string()
    )
}

fn llm(name: &str, path: &Path) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\nkind = \"llm\"\npath = {:?}\ncontext = 256\nparallel = 1\n",
        path.display().to_string()
    )
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

/// The models' estimated bytes added up, from a daemon on `models` alone.
fn estimates(models: &str) -> Option<u64> {
    let d = daemon(models)?;
    let m = d.json(&["models", "--json"]);
    Some(
        m.as_array()
            .unwrap()
            .iter()
            .map(|m| m["estimated_bytes"].as_u64().unwrap())
            .sum(),
    )
}

fn used(d: &TestDaemon) -> (u64, u64) {
    let s = d.json(&["status", "--json"]);
    (
        s["used_bytes"].as_u64().unwrap(),
        s["gpu_allocated_bytes"].as_u64().unwrap(),
    )
}

/// Width, height and the tEXt chunks of a PNG file (checked to be 8-bit RGB).
fn png_facts(path: &Path) -> (u32, u32, Vec<(String, String)>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    let mut at = 8;
    let (mut w, mut h) = (0, 0);
    let mut texts = Vec::new();
    while at + 8 <= bytes.len() {
        let n = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let body = &bytes[at + 8..at + 8 + n];
        if kind == b"IHDR" {
            w = u32::from_be_bytes(body[0..4].try_into().unwrap());
            h = u32::from_be_bytes(body[4..8].try_into().unwrap());
            assert_eq!((body[8], body[9]), (8, 2), "8-bit RGB");
        }
        if kind == b"tEXt" {
            let z = body.iter().position(|&b| b == 0).unwrap();
            texts.push((
                String::from_utf8_lossy(&body[..z]).into_owned(),
                String::from_utf8_lossy(&body[z + 1..]).into_owned(),
            ));
        }
        at += 12 + n;
    }
    (w, h, texts)
}

/// One job with `--json`: progress lines then one summary with the contract's fields; the PNGs
/// are 8-bit RGB at the asked size, named out.png, out-1.png, with the parameters in tEXt; the
/// working memory's estimate is within 2% of its peak, and the used bytes go back afterwards.
/// The model's configured defaults apply when the request leaves a value out, and bad sizes are
/// refused before any work.
#[test]
fn an_image_job_streams_progress_and_writes_its_pngs() {
    let cfg = sdxl("tiny", &tiny_sdxl(), "width = 96\nheight = 64\nsteps = 3");
    let Some(d) = daemon(&cfg) else { return };
    d.ok(&["load", "tiny"]);
    let before = used(&d);
    let out = d.path("out.png");
    let preview = d.path("preview.png");
    let lines = json_lines(&d.ok(&[
        "image",
        "tiny",
        "a red fox in the snow",
        "--negative",
        "blurry",
        "--batch",
        "2",
        "--seed",
        "42",
        "--sampler",
        "dpmpp_2m",
        "--scheduler",
        "karras",
        "--preview",
        preview.to_str().unwrap(),
        "--preview-every",
        "1",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(lines.len(), 4, "{lines:?}");
    for (i, l) in lines[..3].iter().enumerate() {
        assert_eq!(l["step"], i as u64 + 1, "{l}");
        assert_eq!(l["total"], 3, "{l}");
        assert!(l["elapsed_ms"].is_u64(), "{l}");
    }
    let done = &lines[3];
    assert_eq!(done["done"], true, "{done}");
    assert_eq!(done["seed"], 42);
    assert_eq!(
        (done["width"].as_u64(), done["height"].as_u64()),
        (Some(96), Some(64))
    );
    for k in ["encode_ms", "denoise_ms", "decode_ms"] {
        assert!(done[k].is_u64(), "{k}: {done}");
    }
    let (est, peak) = (
        done["estimated_bytes"].as_u64().unwrap(),
        done["peak_bytes"].as_u64().unwrap(),
    );
    assert!(
        peak > 0 && est.abs_diff(peak) as f64 <= 0.02 * peak as f64,
        "{done}"
    );
    let paths: Vec<&str> = done["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let second = d.path("out-1.png");
    assert_eq!(paths, [out.to_str().unwrap(), second.to_str().unwrap()]);
    for p in [&out, &second] {
        let (w, h, texts) = png_facts(p);
        assert_eq!((w, h), (96, 64));
        let params = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
        for want in [
            "a red fox in the snow",
            "Negative prompt: blurry",
            "Steps: 3",
            "Sampler: dpmpp_2m",
            "Schedule type: karras",
            "Seed: 42",
            "Size: 96x64",
            "Batch size: 2",
        ] {
            assert!(params.contains(want), "{want:?} not in {params:?}");
        }
    }
    // Two images of one batch draw different noise.
    assert_ne!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&second).unwrap()
    );
    // The preview: latents, one pixel each.
    assert_eq!(png_facts(&preview).0, 96 / 8);
    assert_eq!(used(&d), before, "the job's working memory went back");

    // Without --json: the path and the seed on stdout, a progress line per step on stderr; a
    // random seed is printed.
    let o = d.halo(&["image", "tiny", "a fox", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(
        stdout.starts_with(out.to_str().unwrap()) && stdout.contains("seed "),
        "{stdout}"
    );
    let stderr = text(&o.stderr);
    assert!(
        stderr.contains("step 3/3") && stderr.contains("ETA"),
        "{stderr}"
    );

    // Sizes that are not multiples of 8 never reach the GPU.
    let e = d.fails(&["image", "tiny", "a fox", "--width", "100"], 2);
    assert!(e.contains("multiple of 8"), "{e}");
    let e = d.fails(&["image", "tiny", "a fox", "--height", "8192"], 3);
    assert!(
        e.contains("invalid argument") && e.contains("height 8192"),
        "{e}"
    );
    let e = d.fails(&["image", "tiny", "a fox", "--sampler", "ddim"], 3);
    assert!(e.contains("unknown sampler"), "{e}");
    let e = d.fails(&["image", "tiny", "a fox", "--vae-tile", "60"], 3);
    assert!(e.contains("VAE tile"), "{e}");
}

/// The pixel data (IDAT chunks) of a PNG file.
fn png_pixels(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let (mut at, mut data) = (8, Vec::new());
    while at + 8 <= bytes.len() {
        let n = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if &bytes[at + 4..at + 8] == b"IDAT" {
            data.extend_from_slice(&bytes[at + 8..at + 8 + n]);
        }
        at += 12 + n;
    }
    data
}

/// The tiny model as one original-layout file, its configs and tokenizers from the folder
/// (`diffusers_config`): through the daemon it draws exactly the folder's image.
#[test]
fn a_single_file_checkpoint_draws_what_its_folder_draws() {
    let file = tiny_sdxl().with_file_name("tiny-sdxl-single.safetensors");
    let described = format!("diffusers_config = {:?}", tiny_sdxl().display().to_string());
    let cfg = sdxl("tiny", &tiny_sdxl(), "") + &sdxl("single", &file, &described);
    let Some(d) = daemon(&cfg) else { return };
    let mut pixels = Vec::new();
    for name in ["tiny", "single"] {
        let out = d.path(&format!("{name}.png"));
        d.ok(&[
            "image",
            name,
            "a castle in the clouds",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "11",
            "-o",
            out.to_str().unwrap(),
        ]);
        pixels.push(png_pixels(&out));
    }
    assert!(!pixels[0].is_empty());
    assert!(pixels[0] == pixels[1], "the single file drew another image");

    // `halo bench` on an image model: phase times from a real job, and the kernels' figures
    // beside the matmul's; the estimate it prints for the size is the job's own.
    let b: Value = serde_json::from_str(&d.ok(&[
        "bench", "single", "--width", "64", "--height", "64", "--steps", "1", "-r", "1", "--json",
    ]))
    .unwrap();
    assert!(b["s_per_step"].as_f64().unwrap() > 0.0, "{b}");
    assert!(
        b["text_encode_ms"].is_u64() && b["vae_decode_ms"].is_u64(),
        "{b}"
    );
    assert_eq!(b["estimates"][0]["bytes"], b["job_estimated_bytes"], "{b}");
    assert_eq!(b["estimates"][1]["width"], 1024, "{b}");
    let kernels: Vec<&str> = b["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert!(k["gflop_per_s"].as_f64().unwrap() > 0.0, "{k}");
            k["kernel"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        kernels,
        [
            "conv2d f16 3x3",
            "attention self",
            "attention cross",
            "matmul f16"
        ]
    );
    let e = d.fails(&["bench", "single", "--width", "60"], 2);
    assert!(e.contains("multiple of 8"), "{e}");
}

/// `halo cancel` stops a running image job within one UNet call: the client exits 5 saying so,
/// no PNG is written, and the budget and the device get every byte of its working memory back.
#[test]
fn cancelling_an_image_job_frees_its_memory() {
    let Some(d) = daemon(&sdxl("tiny", &tiny_sdxl(), "")) else {
        return;
    };
    d.ok(&["load", "tiny"]);
    let before = used(&d);
    let out = d.path("never.png");
    let mut child = d
        .command(&[
            "image", "tiny", "a fox", "--steps", "500", "--width", "128", "--height", "128",
            "--json", "-o",
        ])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first progress line: the job holds its working memory now.
    let mut stdout = child.stdout.take().unwrap();
    let p: Value = serde_json::from_str(&read_line(&mut stdout)).unwrap();
    assert_eq!(p["step"], 1, "{p}");
    let during = used(&d);
    assert!(during.0 > before.0, "{during:?} vs {before:?}");
    let jobs = d.json(&["jobs", "--json"]);
    let id = jobs[0]["id"].as_u64().unwrap();
    d.ok(&["cancel", &id.to_string()]);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("cancelled"), "{}", text(&o.stderr));
    assert!(!out.exists());
    assert_eq!(used(&d), before);
    let jobs = d.json(&["jobs", "--json"]);
    assert_eq!(jobs[0]["state"], "cancelled", "{jobs}");
}

/// An image job that can never fit is refused with RESOURCE_EXHAUSTED naming its need and the
/// budget, while an LLM job keeps generating.
#[test]
fn an_image_job_that_can_never_fit_is_refused_while_llms_run() {
    let Some(smol) = model(SMOL) else { return };
    let models = format!(
        "{}{}",
        llm("smol", &smol),
        sdxl("tiny", &tiny_sdxl(), "steps = 2")
    );
    let Some(sizes) = estimates(&models) else {
        return;
    };
    // Both models and 48 MiB of working memory.
    let cfg = format!("[memory]\nbudget = \"{}\"\n{models}", sizes + (48 << 20));
    let Some(d) = daemon(&cfg) else { return };
    let mut gen = d
        .command(&common::COUNTING)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its first token: it is generating.
    let mut gen_out = gen.stdout.take().unwrap();
    let first = read_line(&mut gen_out);
    assert!(first.contains("\"token\""), "{first}");
    // A whole 2048² decode needs about 1 GiB of activations.
    let e = d.fails(
        &[
            "image",
            "tiny",
            "a fox",
            "--width",
            "2048",
            "--height",
            "2048",
            "--vae-tile",
            "2048",
        ],
        3,
    );
    assert!(
        e.contains("out of room")
            && e.contains("2048×2048")
            && e.contains("working memory")
            && e.contains("memory budget")
            && e.contains("never fit"),
        "{e}"
    );
    // The generation is still going; stopped now, it reports the tokens it made.
    let jobs = d.json(&["jobs", "--json"]);
    let llm_job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "generate")
        .unwrap();
    assert_eq!(llm_job["state"], "running", "{jobs}");
    d.ok(&["cancel", &llm_job["id"].to_string()]);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut gen_out, &mut rest).unwrap();
    assert!(gen.wait().unwrap().success());
    let lines = json_lines(&rest);
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true, "{last}");
    assert!(last["completion_tokens"].as_u64().unwrap() > 0, "{last}");
    // With smol pinned, a whole 640² decode (about 64 MiB) does not fit the 48 MiB left: the job
    // picks VAE tiles that do, by itself.
    d.ok(&["pin", "smol"]);
    let out = d.path("tiled.png");
    let args = [
        "image", "tiny", "a fox", "--width", "640", "--height", "640",
    ];
    let more = ["--steps", "1", "--json", "-o", out.to_str().unwrap()];
    let lines = json_lines(&d.ok(&[&args[..], &more[..]].concat()));
    let done = lines.last().unwrap();
    eprintln!("640² with tiles: {done}");
    assert_eq!(done["done"], true, "{done}");
    assert!(done["vae_tile"].as_u64().unwrap() > 0, "{done}");
    assert_eq!(png_facts(&out).0, 640);
    assert_eq!(d.resident(), ["smol", "tiny"]);
}

/// With a budget that holds the LLM or the SDXL model but not both, each evicts the other when
/// idle: the SDXL model is evicted by the LLM and comes back for the next image.
#[test]
fn an_sdxl_model_is_evicted_by_an_llm_and_comes_back() {
    let Some(smol) = model(SMOL) else { return };
    let models = format!(
        "{}{}",
        llm("smol", &smol),
        sdxl("tiny", &tiny_sdxl(), "steps = 2\nwidth = 64\nheight = 64")
    );
    let Some(sizes) = estimates(&models) else {
        return;
    };
    let cfg = format!("[memory]\nbudget = \"{}\"\n{models}", sizes - 1024);
    let Some(d) = daemon(&cfg) else { return };
    d.ok(&["generate", "smol", "Hi", "--max-tokens", "2"]);
    assert_eq!(d.resident(), ["smol"]);
    d.ok(&[
        "image",
        "tiny",
        "a fox",
        "-o",
        d.path("a.png").to_str().unwrap(),
    ]);
    assert_eq!(d.resident(), ["tiny"]);
    d.ok(&["generate", "smol", "Hi", "--max-tokens", "2"]);
    assert_eq!(d.resident(), ["smol"]);
    d.ok(&[
        "image",
        "tiny",
        "a fox",
        "-o",
        d.path("b.png").to_str().unwrap(),
    ]);
    assert_eq!(d.resident(), ["tiny"]);
    // The same request with the same seed: the same image after the round trip.
    let args = ["image", "tiny", "a fox", "--seed", "3", "-o"];
    let one = d.path("c.png");
    let two = d.path("d.png");
    d.ok(&[&args[..], &[one.to_str().unwrap()]].concat());
    d.ok(&["generate", "smol", "Hi", "--max-tokens", "2"]);
    d.ok(&[&args[..], &[two.to_str().unwrap()]].concat());
    assert_eq!(std::fs::read(one).unwrap(), std::fs::read(two).unwrap());
}

/// A diffusers folder whose UNet file is corrupt is answered with an error naming the file, and
/// the daemon keeps serving: the intact model beside it still makes images.
#[test]
fn a_corrupt_safetensors_file_is_an_error_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    copy_dir(&tiny_sdxl(), &broken);
    let unet = broken.join("unet/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&unet).unwrap();
    // A header length far past the end of the file.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&unet, bytes).unwrap();
    let cfg = format!(
        "{}{}",
        sdxl("broken", &broken, "width = 64\nheight = 64\nsteps = 1"),
        sdxl("tiny", &tiny_sdxl(), "width = 64\nheight = 64\nsteps = 1")
    );
    let Some(d) = daemon(&cfg) else { return };
    let e = d.fails(&["image", "broken", "a fox"], 3);
    assert!(
        e.contains("unusable model file") && e.contains("diffusion_pytorch_model.safetensors"),
        "{e}"
    );
    d.ok(&[
        "image",
        "tiny",
        "a fox",
        "-o",
        d.path("ok.png").to_str().unwrap(),
    ]);
    assert_eq!(png_facts(&d.path("ok.png")).0, 64);
}

/// One line from a child's output, without its newline.
fn read_line(r: &mut impl std::io::Read) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while r.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// A chat and an image job on one GPU at once: both run (the chat's steps come between the
/// image's chunks), both finish, and the chat gives the tokens it gives alone. Then an image
/// cancelled mid-render stops while a chat started beside it carries on to its end.
#[test]
fn a_chat_and_an_image_share_the_gpu_and_a_cancelled_image_leaves_the_chat_running() {
    let Some(smol) = model(SMOL) else { return };
    let cfg = format!(
        "{}{}",
        llm("smol", &smol),
        sdxl("tiny", &tiny_sdxl(), "width = 128\nheight = 128")
    );
    let Some(d) = daemon(&cfg) else { return };
    d.ok(&["load", "smol"]);
    d.ok(&["load", "tiny"]);
    let chat = |n: &str| {
        d.command(&[
            "generate",
            "smol",
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
    let tokens = |out: &str| -> Vec<u64> {
        json_lines(out)
            .iter()
            .filter(|l| l["done"].is_null())
            .map(|l| l["token"].as_u64().unwrap())
            .collect()
    };
    let alone = tokens(&text(&chat("8").wait_with_output().unwrap().stdout));

    // Both at once: the image starts first, the chat arrives during its render.
    let out = d.path("both.png");
    let image = d
        .command(&["image", "tiny", "a fox", "--steps", "6", "--json", "-o"])
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let c = chat("8");
    let (image, c) = (
        image.wait_with_output().unwrap(),
        c.wait_with_output().unwrap(),
    );
    assert!(image.status.success() && c.status.success());
    assert!(out.exists());
    let done = json_lines(&text(&image.stdout)).pop().unwrap();
    assert_eq!(done["steps"], 6, "{done}");
    assert_eq!(
        tokens(&text(&c.stdout)),
        alone,
        "a render beside it changes no token"
    );

    // Cancel an image mid-render: the chat beside it goes on to its last token.
    let never = d.path("never.png");
    let mut image = d
        .command(&["image", "tiny", "a fox", "--steps", "500", "--json", "-o"])
        .arg(&never)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = image.stdout.take().unwrap();
    let p: Value = serde_json::from_str(&read_line(&mut stdout)).unwrap();
    assert_eq!(p["step"], 1, "{p}");
    let c = chat("24");
    let jobs = d.json(&["jobs", "--json"]);
    let id = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["model"] == "tiny" && j["state"] == "running")
        .map(|j| j["id"].as_u64().unwrap())
        .expect("the image job is running");
    d.ok(&["cancel", &id.to_string()]);
    let o = image.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
    assert!(!never.exists());
    let c = c.wait_with_output().unwrap();
    assert!(c.status.success());
    let lines = json_lines(&text(&c.stdout));
    let done = lines.last().unwrap();
    assert!(
        done["finish_reason"] == "length" || done["finish_reason"] == "eos",
        "{done}"
    );
    assert_eq!(&tokens(&text(&c.stdout))[..alone.len()], &alone[..]);
}
