//! `--rng torch-cpu`: TorchRng against torch's own CPU samples, bit for bit
//! (fixtures/diffusion/rng.json, made by fixtures/diffusion/gen_rng_refs.py).

use halod::diffusion::rng::TorchRng;
use serde_json::Value;

fn fnv1a64(data: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.iter().flat_map(|v| v.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn bits(v: &[f32]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits() as u64).collect()
}

fn want(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn randn_equals_torch_bit_for_bit() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/diffusion/rng.json"
    );
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for case in refs["cases"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let mut rng = TorchRng::new(seed);
        for (i, d) in case["draws"].as_array().unwrap().iter().enumerate() {
            let n = d["n"].as_u64().unwrap() as usize;
            let got = rng.randn(n);
            let at = format!("seed {seed}, draw {i} of {n} values");
            if let Some(b) = d.get("bits") {
                let (got, want) = (bits(&got), want(b));
                if let Some(k) = (0..n).find(|&k| got[k] != want[k]) {
                    panic!(
                        "{at}: value {k} is {} (bits {:08x}), torch gives {} (bits {:08x})",
                        f32::from_bits(got[k] as u32),
                        got[k],
                        f32::from_bits(want[k] as u32),
                        want[k]
                    );
                }
            } else {
                assert_eq!(bits(&got[..16]), want(&d["head"]), "{at}: first 16");
                assert_eq!(bits(&got[n - 16..]), want(&d["tail"]), "{at}: last 16");
                assert_eq!(fnv1a64(&got), d["fnv1a64"].as_str().unwrap(), "{at}: hash");
            }
            checked += n;
        }
    }
    assert!(checked > 300_000, "{checked} values");
}
