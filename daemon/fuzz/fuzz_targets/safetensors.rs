//! Any byte string must parse to a safetensors header or an error, never a panic, a hang or an
//! allocation beyond the input's size; a parsed header's tensors must lie inside the input,
//! have exactly their shape's bytes, and not overlap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(st) = halod::safetensors::SafeTensors::parse(data) {
        let mut end = st.data_start;
        for t in st.tensors() {
            assert!(t.range.start >= st.data_start && t.range.end <= data.len() as u64);
            assert_eq!(t.bytes(), t.elements() * t.dtype.size());
            if t.bytes() > 0 {
                assert!(t.range.start >= end, "{} overlaps", t.name);
                end = t.range.end;
            }
            assert_eq!(st.get(&t.name).map(|g| &g.range), Some(&t.range));
            let _ = st.data(data, t);
        }
    }
});
