//! Any byte string must parse to a GGUF header or an error, never a panic, a hang or an
//! allocation beyond the input's size; a parsed header's tensors must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = halod::gguf::Gguf::parse(data) {
        for t in &g.tensors {
            let r = g.range(t);
            assert!(r.end <= data.len() as u64);
        }
    }
});
