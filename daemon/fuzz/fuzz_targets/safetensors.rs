//! Any byte string must parse to a safetensors header or an error, never a panic, a hang or an
//! allocation beyond the input's size; a parsed header's tensors must lie inside the input,
//! have exactly their shape's bytes, and not overlap. The single-file SDXL mapping and shape
//! inference run on every parsed header: errors, never panics, and every mapped tensor (a
//! rename, or a slice of a fused projection) lies inside its file tensor.
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
        use halod::diffusion::single_file as sf;
        let ts = st.tensors();
        for entries in [sf::unet_entries(ts), sf::vae_entries(ts), sf::clip_g_entries(ts)]
            .into_iter()
            .flatten()
        {
            for e in entries {
                let file = ts.iter().find(|t| {
                    t.range.start <= e.tensor.range.start && e.tensor.range.end <= t.range.end
                });
                assert!(file.is_some(), "{} lies outside its tensor", e.name);
                assert_eq!(e.tensor.bytes(), e.tensor.elements() * e.tensor.dtype.size());
            }
        }
        let _ = sf::clip_l_config(ts);
        let _ = sf::vae_config(ts);
        if let Ok(g) = sf::clip_g_config(ts) {
            let pooled = g.projection_dim.unwrap_or(g.hidden_size) as u64;
            if let Ok(u) = sf::unet_config(ts, pooled) {
                let _ = u.shape(std::path::Path::new("fuzz"));
            }
        }
    }
});
