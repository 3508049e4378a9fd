//! The diffusion parts against the tiny SDXL pipeline and diffusers' recorded outputs
//! (fixtures/diffusion, made by gen_tiny_sdxl.py): its files parse, its configs resolve to the
//! shapes diffusers built, and both CLIP tokenizers give diffusers' token ids.

mod common;

use std::path::PathBuf;

use halod::diffusion::clip_tokenizer::ClipTokenizer;
use halod::diffusion::config::{self, ClipTextConfig, SchedulerConfig, UnetConfig, VaeConfig};
use halod::safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusion")
}

fn pipeline() -> PathBuf {
    dir().join("tiny-sdxl")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("tiny-sdxl-refs.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

/// The recorded int32 tensor `name`.
fn ids(refs: &[u8], st: &SafeTensors, name: &str) -> Vec<u32> {
    let t = st
        .get(name)
        .unwrap_or_else(|| panic!("{name} is not recorded"));
    assert_eq!(t.dtype, Dtype::I32);
    st.data(refs, t)
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

#[test]
fn every_weight_file_of_the_pipeline_parses() {
    let mut tensors = 0;
    for part in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let files: Vec<PathBuf> = std::fs::read_dir(pipeline().join(part))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        assert_eq!(files.len(), 1, "{part}");
        let bytes = std::fs::read(&files[0]).unwrap();
        let st = SafeTensors::parse(&bytes).unwrap();
        assert!(st.tensors().iter().all(|t| t.dtype == Dtype::F32), "{part}");
        // The tensors tile the data section: nothing between or after them.
        let mut at = st.data_start;
        for t in st.tensors() {
            assert_eq!(t.range.start, at, "{part}: {}", t.name);
            at = t.range.end;
        }
        assert_eq!(at, bytes.len() as u64);
        tensors += st.len();
    }
    assert!(tensors > 300, "{tensors}");
}

#[test]
fn configs_resolve_to_the_shapes_diffusers_built() {
    let unet_path = pipeline().join("unet/config.json");
    let unet: UnetConfig = config::read(&unet_path).unwrap();
    let shape = unet.shape(&unet_path).unwrap();
    assert_eq!(shape.groups, 4);
    assert_eq!(shape.context_dim, 64);
    assert_eq!(shape.text_time, Some((8, 88)));
    assert_eq!(shape.time_embed_dim, 32);
    assert_eq!(shape.mid_transformer_depth, 2);
    let levels: Vec<(u32, u32, u32, u32)> = shape
        .levels
        .iter()
        .map(|l| (l.channels, l.transformer_depth, l.heads, l.head_dim))
        .collect();
    assert_eq!(levels, [(8, 0, 1, 0), (16, 1, 2, 8), (32, 2, 2, 16)]);
    assert!(shape.linear_projection && shape.flip_sin_to_cos);

    let vae: VaeConfig = config::read(&pipeline().join("vae/config.json")).unwrap();
    assert_eq!(
        (
            vae.latent_channels,
            vae.norm_num_groups,
            vae.block_out_channels.len()
        ),
        (4, 4, 4)
    );
    assert_eq!(vae.scaling_factor, 0.13025);
    let te1: ClipTextConfig = config::read(&pipeline().join("text_encoder/config.json")).unwrap();
    let te2: ClipTextConfig = config::read(&pipeline().join("text_encoder_2/config.json")).unwrap();
    assert_eq!(
        (te1.hidden_size, te1.hidden_act.as_str()),
        (24, "quick_gelu")
    );
    assert_eq!(
        (te2.hidden_size, te2.hidden_act.as_str(), te2.projection_dim),
        (40, "gelu", Some(40))
    );
    let sched: SchedulerConfig =
        config::read(&pipeline().join("scheduler/scheduler_config.json")).unwrap();
    assert_eq!(
        (
            sched.beta_schedule.as_str(),
            sched.timestep_spacing.as_str(),
            sched.steps_offset
        ),
        ("scaled_linear", "leading", 1)
    );
}

#[test]
fn a_config_halo_cannot_run_is_an_error_naming_the_key() {
    let path = pipeline().join("unet/config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (from, to, want) in [
        (
            "\"norm_num_groups\": 4",
            "\"norm_num_groups\": 3",
            "not a multiple of norm_num_groups = 3",
        ),
        (
            "\"act_fn\": \"silu\"",
            "\"act_fn\": \"gelu\"",
            "act_fn \"gelu\"",
        ),
        (
            "\"CrossAttnDownBlock2D\"",
            "\"SimpleCrossAttnDownBlock2D\"",
            "is not supported",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let p = tmp.path().join("config.json");
        std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
        let c: UnetConfig = config::read(&p).unwrap();
        let e = c.shape(&p).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("config.json"), "{e}");
    }
    let p = tmp.path().join("broken.json");
    std::fs::write(&p, "{\"block_out_channels\": ").unwrap();
    let e = config::read::<UnetConfig>(&p).unwrap_err().to_string();
    assert!(e.contains("broken.json: not a valid config"), "{e}");
}

fn tokenizer(part: &str) -> ClipTokenizer {
    ClipTokenizer::from_folder(&pipeline().join(part)).unwrap()
}

#[test]
fn both_tokenizers_give_diffusers_ids() {
    let refs = std::fs::read(dir().join("tiny-sdxl-refs.safetensors")).unwrap();
    let st = SafeTensors::parse(&refs).unwrap();
    let (t1, t2) = (tokenizer("tokenizer"), tokenizer("tokenizer_2"));
    let mut checked = 0;
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        for (text, key) in [(&case["prompt"], ""), (&case["negative"], "neg_")] {
            let text = text.as_str().unwrap();
            if text.is_empty() {
                continue;
            }
            for (i, t) in [(1, &t1), (2, &t2)] {
                let want = ids(&refs, &st, &format!("{name}.{key}ids{i}"));
                assert_eq!(
                    t.encode(text).unwrap(),
                    want,
                    "{name} {key}ids{i}: {text:?}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 16, "{checked}");
}

#[test]
fn tokenizing_normalizes_and_truncates_like_clip() {
    let t = tokenizer("tokenizer");
    let a = t.encode("A  Photograph\tof an ASTRONAUT").unwrap();
    let b = t.encode("a photograph of an astronaut").unwrap();
    assert_eq!(a, b);
    let long = "horse ".repeat(200);
    let ids = t.encode(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], t.eos());
    assert_ne!(ids[75], t.eos());
}

#[test]
fn a_broken_tokenizer_folder_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let e = ClipTokenizer::from_folder(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab.json"), "{e}");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(pipeline().join("tokenizer").join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(tmp.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
    let e = ClipTokenizer::from_folder(tmp.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2 is not a pair"), "{e}");
}

/// A recorded f32 tensor.
fn floats(refs: &[u8], st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st
        .get(name)
        .unwrap_or_else(|| panic!("{name} is not recorded"));
    assert_eq!(t.dtype, Dtype::F32);
    st.data(refs, t)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// max |a − b| / max |b|: the difference relative to the tensor's scale.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A case's image size in pixels (width, height).
fn size(case: &Value) -> (usize, usize) {
    (
        case["width"].as_u64().unwrap() as usize,
        case["height"].as_u64().unwrap() as usize,
    )
}

/// The pixels of diffusers' PNG for a case.
fn png_pixels(case: &Value) -> Vec<u8> {
    let file = std::fs::read(dir().join(case["png"].as_str().unwrap())).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width as usize, info.height as usize), size(case));
    buf.truncate(info.buffer_size());
    buf
}

/// Mean absolute difference of two images' bytes.
fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

fn load_vae(
    dev: &halo_kernels::Device,
    owner: halo_kernels::OwnerId,
) -> halod::diffusion::vae::Vae {
    let cfg: VaeConfig = config::read(&pipeline().join("vae/config.json")).unwrap();
    halod::diffusion::vae::Vae::load(
        dev,
        &pipeline().join("vae/diffusion_pytorch_model.safetensors"),
        "",
        cfg,
        halo_kernels::LoadStrategy::Copy,
        owner,
    )
    .unwrap()
}

#[test]
fn samplers_follow_diffusers_step_by_step() {
    use halod::diffusion::rng::TorchRng;
    use halod::diffusion::sampler::{Sampler, SamplerKind, Schedule};
    let refs = std::fs::read(dir().join("tiny-sdxl-refs.safetensors")).unwrap();
    let st = SafeTensors::parse(&refs).unwrap();
    let sched: SchedulerConfig =
        config::read(&pipeline().join("scheduler/scheduler_config.json")).unwrap();
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let kind = SamplerKind::parse(case["sampler"].as_str().unwrap()).unwrap();
        let schedule = Schedule::parse(case["scheduler"].as_str().unwrap()).unwrap();
        let steps = case["steps"].as_u64().unwrap() as u32;
        let mut s = Sampler::new(&sched, kind, schedule, steps).unwrap();
        let want_sigmas = floats(&refs, &st, &format!("{name}.sigmas"));
        let want_ts = floats(&refs, &st, &format!("{name}.timesteps"));
        assert!(
            rel(s.sigmas(), &want_sigmas) < 1e-6,
            "{name}: sigmas {:?} vs {want_sigmas:?}",
            s.sigmas()
        );
        assert!(
            rel(s.timesteps(), &want_ts) < 1e-6,
            "{name}: timesteps {:?} vs {want_ts:?}",
            s.timesteps()
        );
        // Start from the recorded noise, feed the recorded guided predictions, compare each step.
        let mut rng = TorchRng::new(case["seed"].as_u64().unwrap());
        let noise = floats(&refs, &st, &format!("{name}.latents0"));
        assert_eq!(rng.randn(noise.len()), noise, "{name}: starting noise");
        let mut x: Vec<f32> = noise.iter().map(|v| v * s.init_noise_sigma()).collect();
        for i in 0..steps as usize {
            let eps = floats(&refs, &st, &format!("{name}.eps_step{}", i + 1));
            s.step(i, &eps, &mut x, &mut rng);
            let want = floats(&refs, &st, &format!("{name}.latents_step{}", i + 1));
            let d = rel(&x, &want);
            assert!(d < 1e-5, "{name}: step {} differs by {d:e}", i + 1);
        }
    }
}

#[test]
fn the_text_encoders_give_diffusers_embeddings() {
    use halod::diffusion::clip::ClipTextEncoder;
    let Some(dev) = common::device() else { return };
    let refs = std::fs::read(dir().join("tiny-sdxl-refs.safetensors")).unwrap();
    let st = SafeTensors::parse(&refs).unwrap();
    let owner = halo_kernels::OwnerId(40);
    let load = |part: &str| {
        let cfg: ClipTextConfig = config::read(&pipeline().join(part).join("config.json")).unwrap();
        ClipTextEncoder::load(
            &dev,
            &pipeline().join(part).join("model.safetensors"),
            "",
            cfg,
            halo_kernels::LoadStrategy::Copy,
            owner,
        )
        .unwrap()
    };
    let (e1, e2) = (load("text_encoder"), load("text_encoder_2"));
    assert_eq!((e1.projection_dim(), e2.projection_dim()), (None, Some(40)));
    let (t1, t2) = (tokenizer("tokenizer"), tokenizer("tokenizer_2"));
    let mut checked = 0;
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        for (text, embeds, pooled) in [
            (&case["prompt"], "prompt_embeds", "pooled"),
            (&case["negative"], "negative_embeds", "negative_pooled"),
        ] {
            let want = floats(&refs, &st, &format!("{name}.{embeds}"));
            let want_pooled = floats(&refs, &st, &format!("{name}.{pooled}"));
            let text = text.as_str().unwrap();
            if text.is_empty() {
                // SDXL's force_zeros_for_empty_prompt: no negative prompt is all zeros.
                assert!(want.iter().chain(&want_pooled).all(|&v| v == 0.0), "{name}");
                continue;
            }
            let a = e1
                .encode(&t1.encode(text).unwrap(), t1.eos(), false, owner)
                .unwrap();
            let b = e2
                .encode(&t2.encode(text).unwrap(), t2.eos(), true, owner)
                .unwrap();
            // SDXL's context: both penultimate states side by side, per token.
            let (c1, c2) = (e1.hidden_size() as usize, e2.hidden_size() as usize);
            let got: Vec<f32> = (0..77)
                .flat_map(|i| {
                    a.penultimate[i * c1..(i + 1) * c1]
                        .iter()
                        .chain(&b.penultimate[i * c2..(i + 1) * c2])
                        .copied()
                        .collect::<Vec<f32>>()
                })
                .collect();
            let d = rel(&got, &want);
            assert!(d < 1e-4, "{name} {embeds}: {d:e}");
            let d = rel(b.pooled.as_ref().unwrap(), &want_pooled);
            assert!(d < 1e-4, "{name} {pooled}: {d:e}");
            checked += 1;
        }
    }
    assert!(checked >= 8, "{checked}");
    // A batch of two prompts gives each prompt's own result.
    let ids: Vec<u32> = ["a red fox", "a lighthouse"]
        .iter()
        .flat_map(|p| t2.encode(p).unwrap())
        .collect();
    let both = e2.encode(&ids, t2.eos(), true, owner).unwrap();
    let one = e2.encode(&ids[77..], t2.eos(), true, owner).unwrap();
    assert!(rel(&both.pooled.unwrap()[40..], &one.pooled.unwrap()) < 1e-6);
}

#[test]
fn a_text_encoder_file_with_a_wrong_shape_is_refused_naming_the_tensor() {
    use halod::diffusion::clip::ClipTextEncoder;
    let Some(dev) = common::device() else { return };
    let mut cfg: ClipTextConfig =
        config::read(&pipeline().join("text_encoder/config.json")).unwrap();
    cfg.intermediate_size += 1;
    let e = ClipTextEncoder::load(
        &dev,
        &pipeline().join("text_encoder/model.safetensors"),
        "",
        cfg,
        halo_kernels::LoadStrategy::Copy,
        halo_kernels::OwnerId(41),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("fc1.weight") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn pixels_are_diffusers_pixels() {
    use halod::diffusion::png::to_rgb8;
    let refs = std::fs::read(dir().join("tiny-sdxl-refs.safetensors")).unwrap();
    let st = SafeTensors::parse(&refs).unwrap();
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let (w, h) = size(&case);
        let image = floats(&refs, &st, &format!("{name}.image"));
        assert_eq!(to_rgb8(&image, w, h), png_pixels(&case), "{name}");
    }
}

#[test]
fn one_unet_call_equals_diffusers() {
    use halod::diffusion::unet::{Unet, UnetInput};
    let Some(dev) = common::device() else { return };
    let refs = std::fs::read(dir().join("tiny-sdxl-refs.safetensors")).unwrap();
    let st = SafeTensors::parse(&refs).unwrap();
    let cfg_path = pipeline().join("unet/config.json");
    let shape = config::read::<UnetConfig>(&cfg_path)
        .unwrap()
        .shape(&cfg_path)
        .unwrap();
    let owner = halo_kernels::OwnerId(42);
    let unet = Unet::load(
        &dev,
        &pipeline().join("unet/diffusion_pytorch_model.safetensors"),
        "",
        shape,
        halo_kernels::LoadStrategy::Copy,
        owner,
    )
    .unwrap();
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize / 8,
            case["height"].as_u64().unwrap() as usize / 8,
        );
        let f = |k: &str| floats(&refs, &st, &format!("{name}.unet_{k}"));
        let (sample, context) = (f("sample"), f("context"));
        let (text_embeds, time_ids) = (f("text_embeds"), f("time_ids"));
        let want = f("out");
        let got = unet
            .forward(
                &UnetInput {
                    batch: 2,
                    height: h,
                    width: w,
                    sample: halod::diffusion::unet::Sample::Host(&sample),
                    timestep: f("timestep")[0],
                    context: &context,
                    context_tokens: 77,
                    text_embeds: &text_embeds,
                    time_ids: &time_ids,
                },
                owner,
            )
            .unwrap();
        let d = rel(&got, &want);
        eprintln!("{name}: UNet output within {d:e} of diffusers'");
        assert!(
            d < 1e-3,
            "{name}: the UNet's output differs by {d:e} of its scale"
        );
    }
}

#[test]
fn the_vae_decodes_to_diffusers_images() {
    use halod::diffusion::png::to_rgb8;
    let Some(dev) = common::device() else { return };
    let refs = std::fs::read(dir().join("tiny-sdxl-refs.safetensors")).unwrap();
    let st = SafeTensors::parse(&refs).unwrap();
    let owner = halo_kernels::OwnerId(43);
    let vae = load_vae(&dev, owner);
    assert_eq!(vae.scale(), 8);
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let (w, h) = size(&case);
        let steps = case["steps"].as_u64().unwrap();
        let latents = floats(&refs, &st, &format!("{name}.latents_step{steps}"));
        let got = vae.decode(&latents, 1, h / 8, w / 8, owner).unwrap();
        let want = floats(&refs, &st, &format!("{name}.image"));
        let d = rel(&got, &want);
        eprintln!("{name}: VAE output within {d:e} of diffusers'");
        assert!(d < 1e-3, "{name}: the decode differs by {d:e}");
        // And the pixels: within a mean absolute difference of 1 of diffusers' PNG.
        let mad = mean_abs_diff(&to_rgb8(&got, w, h), &png_pixels(&case));
        assert!(mad < 1.0, "{name}: mean absolute pixel difference {mad}");
    }
}

#[test]
fn the_whole_pipeline_makes_diffusers_images() {
    use halod::diffusion::png::to_rgb8;
    use halod::diffusion::sampler::{SamplerKind, Schedule};
    use halod::diffusion::sdxl::{SdxlPipeline, SdxlRequest};
    let Some(dev) = common::device() else { return };
    let owner = halo_kernels::OwnerId(44);
    let pipe =
        SdxlPipeline::load_folder(&dev, &pipeline(), halo_kernels::LoadStrategy::Auto, owner)
            .unwrap();
    // The estimate from the headers is what the device holds, to the byte.
    let estimate = SdxlPipeline::estimate_folder(&pipeline(), dev.weight_layout()).unwrap();
    assert_eq!(estimate, pipe.bytes());
    assert_eq!(dev.ledger().owner(owner), pipe.bytes());
    let refs = std::fs::read(dir().join("tiny-sdxl-refs.safetensors")).unwrap();
    let st = SafeTensors::parse(&refs).unwrap();
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let (w, h) = size(&case);
        let steps = case["steps"].as_u64().unwrap() as u32;
        let req = SdxlRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative: Some(case["negative"].as_str().unwrap().into()),
            width: w,
            height: h,
            steps,
            cfg: case["cfg"].as_f64().unwrap() as f32,
            sampler: SamplerKind::parse(case["sampler"].as_str().unwrap()).unwrap(),
            schedule: Schedule::parse(case["scheduler"].as_str().unwrap()).unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            batch: 1,
        };
        let mut seen = Vec::new();
        let images = pipe
            .generate(&req, owner, |i, n| seen.push((i, n)))
            .unwrap();
        assert_eq!(seen.last(), Some(&(steps as usize, steps as usize)));
        let want = floats(&refs, &st, &format!("{name}.image"));
        let d = rel(&images[0], &want);
        eprintln!("{name}: the image tensor is within {d:e} of diffusers'");
        assert!(d < 1e-3, "{name}: {d:e}");
        let mad = mean_abs_diff(&to_rgb8(&images[0], w, h), &png_pixels(&case));
        eprintln!("{name}: mean absolute pixel difference {mad:.4}");
        assert!(mad < 1.0, "{name}: mean absolute pixel difference {mad}");
    }
}

#[test]
fn tiled_decoding_follows_diffusers_and_stays_close_to_untiled() {
    use halod::diffusion::png::to_rgb8;
    let Some(dev) = common::device() else { return };
    let refs = std::fs::read(dir().join("tiny-sdxl-refs.safetensors")).unwrap();
    let st = SafeTensors::parse(&refs).unwrap();
    let owner = halo_kernels::OwnerId(45);
    let vae = load_vae(&dev, owner);
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let (w, h) = size(&case);
        let steps = case["steps"].as_u64().unwrap();
        let latents = floats(&refs, &st, &format!("{name}.latents_step{steps}"));
        let tiled = vae
            .decode_tiled(&latents, 1, h / 8, w / 8, 32, owner)
            .unwrap();
        let want = floats(&refs, &st, &format!("{name}.image_tiled32"));
        let d = rel(&tiled, &want);
        assert!(
            d < 1e-3,
            "{name}: the tiled decode differs from diffusers' by {d:e}"
        );
        // Against the untiled decode: the seams are blended, only the mid-block attention's
        // narrower view differs.
        let whole = floats(&refs, &st, &format!("{name}.image"));
        let (a, b) = (to_rgb8(&tiled, w, h), to_rgb8(&whole, w, h));
        let mad = mean_abs_diff(&a, &b);
        // Against what tiling cannot explain: the image beside itself mirrored.
        let mirrored: Vec<u8> = (0..h)
            .flat_map(|y| {
                (0..w)
                    .rev()
                    .flat_map(move |x| [0, 1, 2].map(|c| (y * w + x) * 3 + c))
            })
            .map(|i| b[i])
            .collect();
        let unrelated = mean_abs_diff(&mirrored, &b);
        eprintln!("{name}: tiled vs untiled, mean absolute pixel difference {mad:.3} (mirrored: {unrelated:.3})");
        assert!(
            mad < unrelated / 2.0,
            "{name}: tiled {mad}, mirrored {unrelated}"
        );
        // Wider tiles see more of the image; one tile covering it all is the untiled decode.
        for t in [48, 64] {
            let wide = vae
                .decode_tiled(&latents, 1, h / 8, w / 8, t, owner)
                .unwrap();
            let m = mean_abs_diff(&to_rgb8(&wide, w, h), &b);
            eprintln!("{name}: {t}-pixel tiles vs untiled: {m:.3}");
        }
        let whole_tile = vae
            .decode_tiled(&latents, 1, h / 8, w / 8, w.max(h), owner)
            .unwrap();
        assert!(
            rel(&whole_tile, &whole) < 1e-5,
            "{name}: one tile is the untiled decode"
        );
    }
    let e = vae
        .decode_tiled(&vec![0.0; 4 * 8 * 8], 1, 8, 8, 12, owner)
        .err()
        .unwrap();
    assert!(e.to_string().contains("multiple of 8"), "{e}");
}

/// A job's activation estimate, phase by phase, against the most the allocator's ledger
/// charged it: within 2% at the default 1024², and never below what it used.
#[test]
fn a_jobs_memory_estimate_is_what_it_holds() {
    use halod::diffusion::sampler::{SamplerKind, Schedule};
    use halod::diffusion::sdxl::{SdxlPipeline, SdxlRequest};
    let Some(dev) = common::device() else { return };
    let model = halo_kernels::OwnerId(46);
    let pipe =
        SdxlPipeline::load_folder(&dev, &pipeline(), halo_kernels::LoadStrategy::Auto, model)
            .unwrap();
    for (i, (w, h, batch, tile)) in [
        (1024, 1024, 1, None),
        (256, 384, 2, None),
        (512, 512, 1, Some(128)),
    ]
    .into_iter()
    .enumerate()
    {
        let req = SdxlRequest {
            prompt: "a lighthouse at dusk".into(),
            negative: None,
            width: w,
            height: h,
            steps: 1,
            cfg: 5.0,
            sampler: SamplerKind::Euler,
            schedule: Schedule::Normal,
            seed: 1,
            batch,
        };
        let plan = pipe.plan(&req, tile);
        let owner = halo_kernels::OwnerId(47 + i as u64);
        dev.watch_peak(owner);
        let mut job = pipe.start(&req, owner).unwrap();
        let encode = dev.take_peak(owner).unwrap();
        dev.watch_peak(owner);
        pipe.step(&mut job).unwrap();
        let denoise = dev.take_peak(owner).unwrap();
        dev.watch_peak(owner);
        pipe.decode_with(&job, tile).unwrap();
        let decode = dev.take_peak(owner).unwrap();
        drop(job);
        assert_eq!(dev.ledger().owner(owner), 0, "the job's buffers are gone");
        for (phase, est, got) in [
            ("encode", plan.encode, encode),
            ("denoise", plan.denoise, denoise),
            ("decode", plan.decode, decode),
        ] {
            eprintln!("{w}x{h} batch {batch} tile {tile:?}: {phase} estimated {est}, peak {got}");
            assert!(est >= got, "{w}x{h} {phase}: estimated {est} < peak {got}");
        }
        let (est, got) = (plan.bytes(), encode.max(denoise).max(decode));
        let off = (est as f64 - got as f64) / got as f64;
        eprintln!(
            "{w}x{h} batch {batch} tile {tile:?}: job estimated {est}, peak {got} ({:+.2}%)",
            off * 100.0
        );
        assert!(off <= 0.02, "{w}x{h}: estimate {est} vs peak {got}");
    }
}

fn single_file() -> PathBuf {
    dir().join("tiny-sdxl-single.safetensors")
}

/// The tiny pipeline as one original-layout file (gen_tiny_sdxl_single_file.py wrote it and
/// diffusers' from_single_file read it back into the folder's weights): halod, with the folder
/// describing it, makes the folder's image bit for bit, and holds what it estimated.
#[test]
fn a_single_file_checkpoint_makes_the_folders_image() {
    use halod::diffusion::sampler::{SamplerKind, Schedule};
    use halod::diffusion::sdxl::{SdxlPipeline, SdxlRequest};
    let Some(dev) = common::device() else { return };
    let (a, b) = (halo_kernels::OwnerId(61), halo_kernels::OwnerId(62));
    let strategy = halo_kernels::LoadStrategy::Copy;
    let folder = SdxlPipeline::load_folder(&dev, &pipeline(), strategy, a).unwrap();
    let file = SdxlPipeline::load(&dev, &single_file(), Some(&pipeline()), strategy, b).unwrap();
    let estimate =
        SdxlPipeline::estimate(&single_file(), Some(&pipeline()), dev.weight_layout()).unwrap();
    assert_eq!(estimate, file.bytes());
    assert_eq!(dev.ledger().owner(b), file.bytes());
    for (negative, sampler) in [
        (None, SamplerKind::Euler),
        (Some("blurry"), SamplerKind::EulerAncestral),
    ] {
        let req = SdxlRequest {
            prompt: "a lighthouse on a cliff at dawn".into(),
            negative: negative.map(String::from),
            width: 64,
            height: 48,
            steps: 3,
            cfg: 5.0,
            sampler,
            schedule: Schedule::Normal,
            seed: 7,
            batch: 1,
        };
        let want = folder.generate(&req, a, |_, _| {}).unwrap();
        let got = file.generate(&req, b, |_, _| {}).unwrap();
        assert_eq!(got.len(), 1);
        let same = got[0]
            .iter()
            .zip(&want[0])
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{negative:?}: the single file's image differs from the folder's"
        );
    }
}

/// Without a folder, the configuration comes from the tensors: everything shapes can tell
/// matches the folder's configs (heads and groups cannot be told, and take SDXL base's).
#[test]
fn a_single_files_shapes_give_its_configuration() {
    use halod::diffusion::single_file;
    let bytes = std::fs::read(single_file()).unwrap();
    let st = SafeTensors::parse(&bytes).unwrap();
    let ts = st.tensors();
    assert!(single_file::is_checkpoint(ts));
    let read = |p: &str| pipeline().join(p).join("config.json");
    let te2: ClipTextConfig = config::read(&read("text_encoder_2")).unwrap();
    let got = single_file::clip_g_config(ts).unwrap();
    let clip = |c: &ClipTextConfig| {
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.max_position_embeddings,
            c.hidden_act.clone(),
            c.projection_dim,
        )
    };
    assert_eq!(clip(&got), clip(&te2));
    let te1: ClipTextConfig = config::read(&read("text_encoder")).unwrap();
    let got = single_file::clip_l_config(ts).unwrap();
    assert_eq!(
        clip(&got),
        (
            clip(&te1).0,
            clip(&te1).1,
            clip(&te1).2,
            clip(&te1).3,
            77,
            "quick_gelu".into(),
            None
        )
    );
    let unet: UnetConfig = config::read(&read("unet")).unwrap();
    let got = single_file::unet_config(ts, te2.projection_dim.unwrap() as u64).unwrap();
    let u = |c: &UnetConfig| {
        (
            c.in_channels,
            c.out_channels,
            c.down_block_types.clone(),
            c.up_block_types.clone(),
            c.block_out_channels.clone(),
            c.layers_per_block.clone(),
            c.cross_attention_dim.clone(),
            c.use_linear_projection,
            c.addition_time_embed_dim,
            c.projection_class_embeddings_input_dim,
        )
    };
    assert_eq!(u(&got), u(&unet));
    // Transformer depths where there are transformers.
    let levels = unet.block_out_channels.len();
    let want = unet.transformer_layers_per_block.expand(levels).unwrap();
    let have = got.transformer_layers_per_block.expand(levels).unwrap();
    for (i, t) in unet.down_block_types.iter().enumerate() {
        if t.starts_with("CrossAttn") {
            assert_eq!(have[i], want[i], "level {i}");
        }
    }
    let vae: VaeConfig = config::read(&read("vae")).unwrap();
    let got = single_file::vae_config(ts).unwrap();
    let v = |c: &VaeConfig| {
        (
            c.out_channels,
            c.block_out_channels.clone(),
            c.layers_per_block,
            c.latent_channels,
            c.scaling_factor,
            c.use_post_quant_conv,
            c.mid_block_add_attention,
        )
    };
    assert_eq!(v(&got), v(&vae));
    // A diffusers file is not a checkpoint, and says so when loaded as one.
    let unet_file = pipeline().join("unet/diffusion_pytorch_model.safetensors");
    let e = halod::diffusion::sdxl::SdxlPipeline::estimate(
        &unet_file,
        None,
        halo_kernels::WeightLayout {
            max_segment: 1 << 27,
            align: 256,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not an SDXL checkpoint"), "{e}");
}

/// halod's built-in vocabulary (daemon/assets/clip) tokenizes as OpenAI's CLIP tokenizer does
/// (clip-anytorch's SimpleTokenizer on the same file, recorded by gen_tiny_sdxl_single_file.py).
#[test]
fn the_built_in_clip_vocabulary_tokenizes_as_clip() {
    let text = std::fs::read_to_string(dir().join("clip-vocab-refs.json")).unwrap();
    let refs: Vec<Value> = serde_json::from_str(&text).unwrap();
    let first = ClipTokenizer::openai("<|endoftext|>").unwrap();
    let second = ClipTokenizer::openai("!").unwrap();
    for r in &refs {
        let prompt = r["prompt"].as_str().unwrap();
        let want: Vec<u32> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let a = first.encode(prompt).unwrap();
        assert_eq!(&a[..want.len()], &want[..], "{prompt}");
        assert!(a[want.len()..].iter().all(|&id| id == 49407), "{prompt}");
        let b = second.encode(prompt).unwrap();
        assert_eq!(&b[..want.len()], &want[..], "{prompt}");
        assert!(
            b[want.len()..].iter().all(|&id| id == 0),
            "{prompt}: pads with \"!\""
        );
    }
}

/// A job cut as finely as it goes (a budget of 1 ns: one piece per chunk) through the text
/// encoders' layers, the UNet's blocks and the VAE's layers, the VAE's convolutions down to one
/// output row per chunk, with Euler ancestral (noise each
/// step) and DPM++ 2M (the previous prediction kept on the device): the same image, bit for
/// bit, as the job run whole.
#[test]
fn a_job_in_one_piece_chunks_makes_the_whole_jobs_image() {
    use halod::diffusion::sampler::{SamplerKind, Schedule};
    use halod::diffusion::sdxl::{SdxlPipeline, SdxlRequest};
    use std::time::Duration;
    let Some(dev) = common::device() else { return };
    let owner = halo_kernels::OwnerId(70);
    let pipe =
        SdxlPipeline::load_folder(&dev, &pipeline(), halo_kernels::LoadStrategy::Auto, owner)
            .unwrap();
    let tiny = Some(Duration::from_nanos(1));
    for (sampler, schedule, negative) in [
        (
            SamplerKind::EulerAncestral,
            Schedule::Normal,
            Some("blurry".to_string()),
        ),
        (SamplerKind::DpmPp2m, Schedule::Karras, None),
    ] {
        let req = SdxlRequest {
            prompt: "a lighthouse at dusk".into(),
            negative,
            width: 64,
            height: 64,
            steps: 3,
            cfg: 5.0,
            sampler,
            schedule,
            seed: 9,
            batch: 1,
        };
        let whole = pipe.generate(&req, owner, |_, _| {}).unwrap();
        let job_owner = halo_kernels::OwnerId(71);
        let mut te = pipe.begin_encode(&req).unwrap();
        let mut chunks = 0;
        let (cond, uncond) = loop {
            chunks += 1;
            if let (Some(done), _) = pipe.encode_for(&mut te, job_owner, tiny).unwrap() {
                break done;
            }
        };
        assert_eq!(uncond.is_some(), req.negative.is_some());
        let encode_chunks = chunks;
        let mut job = pipe.start_encoded(&req, cond, uncond, job_owner).unwrap();
        while !job.denoised() {
            pipe.advance_for(&mut job, tiny).unwrap();
            chunks += 1;
        }
        let denoise_chunks = chunks - encode_chunks;
        let mut d = pipe.begin_decode(&job, None).unwrap();
        let images = loop {
            chunks += 1;
            if let (Some(images), _) = pipe.decode_for(&mut d, 1, tiny).unwrap() {
                break images;
            }
        };
        let decode_chunks = chunks - encode_chunks - denoise_chunks;
        eprintln!(
            "{sampler:?}: {encode_chunks} encode chunks, {denoise_chunks} denoise chunks, \
             {decode_chunks} decode chunks"
        );
        // conv_out alone has `height` output rows: after a first eighth to measure it, they run
        // one row per chunk.
        assert!(decode_chunks > req.height, "{decode_chunks}");
        // Every encoder layer and every UNet piece was a chunk of its own: per prompt, the
        // first encoder's embeddings, layers to the penultimate and output; the second's
        // embeddings, every layer, and its pooled output.
        let layers = |part: &str| {
            let cfg: ClipTextConfig =
                config::read(&pipeline().join(part).join("config.json")).unwrap();
            cfg.num_hidden_layers as usize
        };
        let per_prompt = layers("text_encoder") + 1 + layers("text_encoder_2") + 2;
        let prompts = 1 + req.negative.is_some() as usize;
        assert_eq!(encode_chunks, prompts * per_prompt);
        assert!(
            denoise_chunks > 3 * pipe.chunks_per_step(),
            "{denoise_chunks}"
        );
        assert_eq!(images, whole, "{sampler:?}");
        drop((job, d));
        assert_eq!(
            dev.ledger().owner(job_owner),
            0,
            "the job's buffers are gone"
        );
    }
}
