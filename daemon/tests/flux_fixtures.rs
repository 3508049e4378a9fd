//! Flux's parts against the tiny Flux pipeline and diffusers' recorded outputs
//! (fixtures/diffusion, made by gen_tiny_flux.py): the flow_euler schedule, the starting noise
//! and its packing, T5's token ids, buckets and hidden states, CLIP-L's pooled output.

mod common;

use std::path::PathBuf;

use halod::diffusion::clip::ClipTextEncoder;
use halod::diffusion::clip_tokenizer::ClipTokenizer;
use halod::diffusion::config::{self, ClipTextConfig, FluxConfig, T5Config};
use halod::diffusion::flow::{self, FlowSchedulerConfig};
use halod::diffusion::flux::{FluxInput, FluxTransformer};
use halod::diffusion::rng::TorchRng;
use halod::diffusion::t5::{relative_bucket, T5Encoder};
use halod::diffusion::t5_tokenizer::T5Tokenizer;
use halod::safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion")
}

fn pipeline() -> PathBuf {
    dir().join("tiny-flux")
}

fn refs_json() -> Value {
    let text = std::fs::read_to_string(dir().join("tiny-flux-refs.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

struct Refs {
    bytes: Vec<u8>,
}

impl Refs {
    fn load() -> Refs {
        Refs {
            bytes: std::fs::read(dir().join("tiny-flux-refs.safetensors")).unwrap(),
        }
    }

    fn st(&self) -> SafeTensors {
        SafeTensors::parse(&self.bytes).unwrap()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not recorded"));
        assert_eq!(t.dtype, Dtype::F32);
        st.data(&self.bytes, t)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        let st = self.st();
        let t = st
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not recorded"));
        assert_eq!(t.dtype, Dtype::I32);
        st.data(&self.bytes, t)
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect()
    }
}

fn cases() -> Vec<Value> {
    refs_json()["cases"].as_array().unwrap().clone()
}

fn name<'a>(case: &'a Value, key: &str) -> &'a str {
    case["tensors"][key].as_str().unwrap()
}

#[test]
fn flow_euler_gives_diffusers_sigmas_for_each_size() {
    let refs = Refs::load();
    let cfg: FlowSchedulerConfig =
        config::read(&pipeline().join("scheduler/scheduler_config.json")).unwrap();
    for case in cases() {
        let steps = case["steps"].as_u64().unwrap() as usize;
        let tokens = case["image_tokens"].as_u64().unwrap();
        let got = flow::flow_sigmas(&cfg, steps, tokens).unwrap();
        let want = refs.f32s(name(&case, "sigmas"));
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6,
                "{}: {got:?} vs {want:?}",
                case["name"]
            );
        }
        // The model's timestep is σ (diffusers' t / 1000).
        let t0 = refs.f32s(name(&case, "call_timestep"));
        assert_eq!(t0, vec![got[0]]);
    }
}

#[test]
fn the_starting_noise_is_torchs_and_packs_as_diffusers_packs_it() {
    let refs = Refs::load();
    for case in cases() {
        let seed = case["seed"].as_u64().unwrap();
        let (h, w) = (
            case["height"].as_u64().unwrap() as usize / 8,
            case["width"].as_u64().unwrap() as usize / 8,
        );
        let noise = TorchRng::new(seed).randn(16 * h * w);
        assert_eq!(noise, refs.f32s(name(&case, "noise")), "{}", case["name"]);
        // The first call's input is the packed noise (σ = 1), with (0, row, column) ids.
        let packed = flow::pack(&noise, 1, 16, h, w);
        assert_eq!(packed, refs.f32s(name(&case, "call_x")));
        let ids: Vec<f32> = flow::image_ids(h, w).into_iter().flatten().collect();
        assert_eq!(ids, refs.f32s(name(&case, "call_img_ids")));
        let last = refs.f32s(name(&case, &format!("latents_step{}", case["steps"])));
        assert_eq!(
            flow::unpack(&last, 1, 16, h, w),
            refs.f32s(name(&case, "latents_final"))
        );
    }
}

#[test]
fn the_t5_tokenizer_gives_transformers_ids() {
    let refs = Refs::load();
    let tok = T5Tokenizer::load(&pipeline().join("tokenizer_2")).unwrap();
    for case in cases() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt, 512).unwrap(),
            refs.ids(name(&case, "ids2")),
            "{prompt}"
        );
    }
    for check in refs_json()["t5_tokenizer"].as_array().unwrap() {
        let text = check["text"].as_str().unwrap();
        let want: Vec<u32> = check["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, 512).unwrap(), want, "{text:?}");
    }
    let e = T5Tokenizer::load(&pipeline().join("tokenizer"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no </s>") || e.contains("not a tokenizer.json"),
        "{e}"
    );
}

/// max |a − b| / max |b|: the difference relative to the tensor's scale.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn t5_buckets_are_transformers_buckets() {
    let refs = Refs::load();
    let want = refs.ids("t5_buckets");
    for (i, &w) in want.iter().enumerate() {
        let rel = i as i64 - 600;
        assert_eq!(relative_bucket(rel, 32, 128), w, "offset {rel}");
    }
}

#[test]
fn the_t5_encoder_gives_transformers_hidden_states() {
    let Some(dev) = common::device() else { return };
    let refs = Refs::load();
    let owner = halo_kernels::OwnerId(80);
    let part = pipeline().join("text_encoder_2");
    let cfg: T5Config = config::read(&part.join("config.json")).unwrap();
    let t5 = T5Encoder::load(
        &dev,
        &part.join("model.safetensors"),
        "",
        cfg,
        halo_kernels::LoadStrategy::Auto,
        owner,
    )
    .unwrap();
    let mut all_ids = Vec::new();
    let mut all_want = Vec::new();
    for case in cases() {
        let ids = refs.ids(name(&case, "ids2"));
        let want = refs.f32s(name(&case, "t5"));
        let got = t5.encode(&ids, 512, owner).unwrap();
        let d = rel(&got, &want);
        eprintln!("{}: T5 within {d:e} of its scale", case["name"]);
        assert!(
            d < 1e-3,
            "{}: T5 differs by {d:e} of its scale",
            case["name"]
        );
        all_ids.extend(ids);
        all_want.extend(want);
    }
    // Its memory plan is what an encode holds (the bias and the rows it is gathered from are
    // 4 MiB each here, the rest shares small chunks; at T5-XXL's 64 heads the bias is 64 MiB).
    let enc_owner = halo_kernels::OwnerId(88);
    dev.watch_peak(enc_owner);
    t5.encode(&all_ids[..512], 512, enc_owner).unwrap();
    assert_eq!(t5.peak_bytes(1, 512), dev.peak(enc_owner).unwrap());
    // Every case at once, in chunks of one piece: the same states.
    let mut run = t5.begin(&all_ids, 512, owner).unwrap();
    let mut chunks = 0;
    let got = loop {
        chunks += 1;
        let tiny = Some(std::time::Duration::from_nanos(1));
        if let (Some(out), _) = t5.advance_for(&mut run, tiny).unwrap() {
            break out;
        }
    };
    assert_eq!(chunks, t5.layers() + 2);
    assert!(rel(&got, &all_want) < 1e-3);
    drop(run);
    assert_eq!(
        dev.ledger().owner(owner),
        t5.bytes(),
        "only the weights stay"
    );
    let e = t5
        .encode(&[9999; 512], 512, owner)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("past the vocabulary"), "{e}");
}

#[test]
fn clip_l_gives_transformers_pooled_output() {
    let Some(dev) = common::device() else { return };
    let refs = Refs::load();
    let owner = halo_kernels::OwnerId(81);
    let part = pipeline().join("text_encoder");
    let cfg: ClipTextConfig = config::read(&part.join("config.json")).unwrap();
    let clip = ClipTextEncoder::load(
        &dev,
        &part.join("model.safetensors"),
        "",
        cfg,
        halo_kernels::LoadStrategy::Auto,
        owner,
    )
    .unwrap();
    assert_eq!(clip.projection_dim(), None);
    let tok = ClipTokenizer::from_folder(&pipeline().join("tokenizer")).unwrap();
    for case in cases() {
        let ids = tok.encode(case["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(ids, refs.ids(name(&case, "ids1")));
        let out = clip.encode(&ids, tok.eos(), true, owner).unwrap();
        let want = refs.f32s(name(&case, "pooled"));
        let d = rel(out.pooled.as_ref().unwrap(), &want);
        eprintln!("{}: pooled within {d:e} of its scale", case["name"]);
        assert!(d < 1e-3, "{}: pooled differs by {d:e}", case["name"]);
    }
}

fn transformer(dev: &halo_kernels::Device, owner: halo_kernels::OwnerId) -> FluxTransformer {
    let part = pipeline().join("transformer");
    let cfg: FluxConfig = config::read(&part.join("config.json")).unwrap();
    FluxTransformer::load(
        dev,
        &part.join("diffusion_pytorch_model.safetensors"),
        "",
        cfg,
        halo_kernels::LoadStrategy::Auto,
        owner,
    )
    .unwrap()
}

/// The first transformer call of every case, on diffusers' own inputs: whole, and one piece
/// per chunk.
#[test]
fn the_transformer_gives_diffusers_velocity() {
    let Some(dev) = common::device() else { return };
    let refs = Refs::load();
    let owner = halo_kernels::OwnerId(82);
    let flux = transformer(&dev, owner);
    assert!(flux.has_guidance());
    for case in cases() {
        let ids: Vec<[f32; 3]> = refs
            .f32s(name(&case, "call_img_ids"))
            .chunks(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        let (x, context, pooled) = (
            refs.f32s(name(&case, "call_x")),
            refs.f32s(name(&case, "call_context")),
            refs.f32s(name(&case, "call_pooled")),
        );
        let input = FluxInput {
            x: &x,
            context: &context,
            pooled: &pooled,
            sigma: refs.f32s(name(&case, "call_timestep"))[0],
            guidance: Some(refs.f32s(name(&case, "call_guidance"))[0]),
            img_ids: &ids,
        };
        let want = refs.f32s(name(&case, "call_out"));
        let call_owner = halo_kernels::OwnerId(85);
        dev.watch_peak(call_owner);
        let got = flux.forward(&input, call_owner).unwrap();
        let peak = dev.peak(call_owner).unwrap();
        let txt = (context.len() / 32) as u64;
        let plan = flux.peak_bytes(txt, ids.len() as u64, &[]);
        eprintln!(
            "{}: a call held {peak} bytes, its plan says {plan}",
            case["name"]
        );
        assert_eq!(plan, peak, "{}", case["name"]);
        let d = rel(&got, &want);
        eprintln!("{}: the velocity within {d:e} of its scale", case["name"]);
        assert!(d < 1e-3, "{}: {d:e}", case["name"]);
        let mut call = flux.begin(&input, owner).unwrap();
        let mut chunks = 0;
        let tiny = Some(std::time::Duration::from_nanos(1));
        let pieced = loop {
            chunks += 1;
            if let (Some(v), _) = flux.advance_for(&mut call, owner, tiny).unwrap() {
                break v;
            }
        };
        assert_eq!(chunks, flux.pieces() - 1);

        assert_eq!(pieced, got, "chunking changes nothing");
        drop(call);
        assert_eq!(
            dev.ledger().owner(owner),
            flux.bytes(),
            "only the weights stay"
        );
        let e = flux
            .begin(
                &FluxInput {
                    guidance: None,
                    ..input
                },
                owner,
            )
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("needs a guidance scale"), "{e}");
    }
}

/// The pixels of diffusers' PNG for a case.
fn png_pixels(case: &Value) -> Vec<u8> {
    let file = std::fs::read(dir().join(case["png"].as_str().unwrap())).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

/// Every case end to end from its prompt and seed: the latents after each step, the decoded
/// image and its PNG against diffusers'.
#[test]
fn the_whole_flux_pipeline_makes_diffusers_images() {
    use halod::diffusion::flux_pipeline::{FluxPipeline, FluxRequest};
    use halod::diffusion::png::to_rgb8;
    let Some(dev) = common::device() else { return };
    let refs = Refs::load();
    let owner = halo_kernels::OwnerId(83);
    let pipe =
        FluxPipeline::load_folder(&dev, &pipeline(), halo_kernels::LoadStrategy::Auto, owner)
            .unwrap();
    for case in cases() {
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let steps = case["steps"].as_u64().unwrap() as usize;
        let req = FluxRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            width: w,
            height: h,
            steps,
            guidance: Some(case["guidance"].as_f64().unwrap() as f32),
            seed: case["seed"].as_u64().unwrap(),
            batch: 1,
        };
        let mut worst = 0f32;
        let mut seen = 0;
        let images = pipe
            .generate(
                &req,
                owner,
                |_, _| {},
                |_, step, x| {
                    let want = refs.f32s(name(&case, &format!("latents_step{step}")));
                    worst = worst.max(rel(x, &want));
                    seen += 1;
                },
            )
            .unwrap();
        assert_eq!(seen, steps);
        let image_diff = rel(&images[0], &refs.f32s(name(&case, "image")));
        let got = to_rgb8(&images[0], w, h);
        let want = png_pixels(&case);
        assert_eq!(got.len(), want.len());
        let mad = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / got.len() as f64;
        eprintln!(
            "{}: latents within {worst:e}, image within {image_diff:e} of scale, PNG mean \
             |Δ| {mad:.4}",
            case["name"]
        );
        assert!(worst < 1e-3, "{}: latents {worst:e}", case["name"]);
        assert!(image_diff < 1e-3, "{}: image {image_diff:e}", case["name"]);
        assert!(mad <= 1.0, "{}: PNG {mad}", case["name"]);
    }
    // Requests it cannot run, refused with the reason.
    let base = FluxRequest {
        prompt: "a fox".into(),
        width: 64,
        height: 64,
        steps: 2,
        guidance: Some(3.5),
        seed: 1,
        batch: 1,
    };
    for (req, want) in [
        (
            FluxRequest {
                width: 72,
                ..base.clone()
            },
            "multiple of 16",
        ),
        (
            FluxRequest {
                guidance: None,
                ..base.clone()
            },
            "needs a guidance scale",
        ),
        (FluxRequest { steps: 0, ..base }, "at least 1"),
    ] {
        let e = pipe.check(&req).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// The memory plan of a call at 1024² (4096 image tokens, so the joined and MLP buffers get
/// chunks of their own and the rest share small ones) is what the call holds at most.
#[test]
fn a_flux_calls_memory_plan_is_what_it_holds() {
    let Some(dev) = common::device() else { return };
    let owner = halo_kernels::OwnerId(86);
    let flux = transformer(&dev, owner);
    let mut rng = halo_kernels::reference::Rng::new(5);
    let (lh, lw) = (128, 128);
    let ids = flow::image_ids(lh, lw);
    let x = rng.f32s(ids.len() * 64, 1.0);
    let context = rng.f32s(512 * 32, 1.0);
    let pooled = rng.f32s(24, 1.0);
    let input = FluxInput {
        x: &x,
        context: &context,
        pooled: &pooled,
        sigma: 0.5,
        guidance: Some(3.5),
        img_ids: &ids,
    };
    let call_owner = halo_kernels::OwnerId(87);
    dev.watch_peak(call_owner);
    let v = flux.forward(&input, call_owner).unwrap();
    assert_eq!(v.len(), ids.len() * 64);
    let peak = dev.peak(call_owner).unwrap();
    let plan = flux.peak_bytes(512, ids.len() as u64, &[]);
    eprintln!("1024²: a call held {peak} bytes, its plan says {plan}");
    assert_eq!(plan, peak);
}

/// The transformer from the BFL-layout file (made from the folder's weights and checked by
/// diffusers' converter): the same velocity as the folder's, bit for bit; its config from the
/// shapes matches the folder's but for the rotary axes, which only a config can give at this
/// head width.
#[test]
fn a_bfl_layout_transformer_runs_as_its_folder() {
    use halod::diffusion::flux_file;
    let Some(dev) = common::device() else { return };
    let refs = Refs::load();
    let owner = halo_kernels::OwnerId(84);
    let path = dir().join("tiny-flux-bfl.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::parse(&bytes).unwrap();
    assert!(flux_file::is_bfl(st.tensors()));
    let folder_cfg: FluxConfig = config::read(&pipeline().join("transformer/config.json")).unwrap();
    let e = flux_file::config(st.tensors(), None).unwrap_err();
    assert!(e.contains("rotary axes"), "{e}");
    let cfg = flux_file::config(st.tensors(), Some(folder_cfg.clone())).unwrap();
    let bfl = FluxTransformer::load(
        &dev,
        &path,
        flux_file::names(),
        cfg,
        halo_kernels::LoadStrategy::Auto,
        owner,
    )
    .unwrap();
    let folder = transformer(&dev, owner);
    assert_eq!(bfl.bytes(), folder.bytes());
    let case = &cases()[1];
    let ids: Vec<[f32; 3]> = refs
        .f32s(name(case, "call_img_ids"))
        .chunks(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    let (x, context, pooled) = (
        refs.f32s(name(case, "call_x")),
        refs.f32s(name(case, "call_context")),
        refs.f32s(name(case, "call_pooled")),
    );
    let input = FluxInput {
        x: &x,
        context: &context,
        pooled: &pooled,
        sigma: 0.7,
        guidance: Some(4.0),
        img_ids: &ids,
    };
    assert_eq!(
        bfl.forward(&input, owner).unwrap(),
        folder.forward(&input, owner).unwrap()
    );
}

/// Inferring a FLUX.1-sized config from BFL names and shapes alone (headers only, no data):
/// dev with its guidance embedding, schnell without.
#[test]
fn a_bfl_config_comes_from_the_shapes() {
    use halod::diffusion::flux_file;
    use halod::safetensors::Tensor;
    let t = |name: &str, shape: &[u64]| Tensor {
        name: name.into(),
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        range: 0..0,
    };
    let mut ts = vec![
        t("img_in.weight", &[3072, 64]),
        t("txt_in.weight", &[3072, 4096]),
        t("vector_in.in_layer.weight", &[3072, 768]),
        t("final_layer.linear.weight", &[64, 3072]),
        t("guidance_in.in_layer.weight", &[3072, 256]),
    ];
    for i in 0..19 {
        ts.push(t(
            &format!("double_blocks.{i}.img_attn.norm.query_norm.scale"),
            &[128],
        ));
    }
    for i in 0..38 {
        ts.push(t(
            &format!("single_blocks.{i}.linear2.weight"),
            &[3072, 15360],
        ));
    }
    let c = flux_file::config(&ts, None).unwrap();
    assert_eq!(
        (
            c.num_layers,
            c.num_single_layers,
            c.num_attention_heads,
            c.attention_head_dim
        ),
        (19, 38, 24, 128)
    );
    assert_eq!(c.axes_dims_rope, vec![16, 56, 56]);
    assert_eq!(
        (c.joint_attention_dim, c.pooled_projection_dim),
        (4096, 768)
    );
    assert!(c.guidance_embeds);
    ts.retain(|t| !t.name.starts_with("guidance_in"));
    assert!(!flux_file::config(&ts, None).unwrap().guidance_embeds);
}
