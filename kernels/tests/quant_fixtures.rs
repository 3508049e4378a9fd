//! Checks the CPU dequantizer against fixtures produced by gguf-py, whose
//! dequantizers match ggml's reference bit for bit.
//!
//! The fixtures live in `kernels/fixtures/quant/`; see the README there and
//! `kernels/fixtures/gen_quant_fixtures.py` for how they are made.

use std::path::PathBuf;

use halo_kernels::quant::{dequantize, dot_row, matvec, WeightType};

/// Columns per row when the fixture data is viewed as a matrix. A multiple of
/// every block size, and a divisor of every fixture's element count.
const COLS: usize = 512;

fn fixture(name: &str, ext: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "fixtures", "quant"]
        .iter()
        .collect::<PathBuf>()
        .join(format!("{name}.{ext}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The raw block bytes and the expected values for one type.
fn load(ty: WeightType) -> (Vec<u8>, Vec<f32>) {
    let raw = fixture(ty.name(), "bin");
    let expected_bytes = fixture(ty.name(), "f32");
    assert_eq!(expected_bytes.len() % 4, 0, "{ty}: .f32 file length");
    let expected: Vec<f32> = expected_bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (raw, expected)
}

/// A fixed input vector with a mix of signs and magnitudes.
fn input(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

#[test]
fn dequantize_matches_gguf_bit_for_bit() {
    for ty in WeightType::ALL {
        let (raw, expected) = load(ty);
        assert_eq!(ty.row_bytes(expected.len()), Some(raw.len()), "{ty}: sizes");
        let mut got = vec![0.0f32; expected.len()];
        dequantize(ty, &raw, &mut got).unwrap();
        let mut mismatches = 0;
        for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
            let same = g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan());
            if !same {
                if mismatches < 5 {
                    eprintln!(
                        "{ty} element {i}: got {g:e} ({:#010x}), want {e:e} ({:#010x})",
                        g.to_bits(),
                        e.to_bits()
                    );
                }
                mismatches += 1;
            }
        }
        assert_eq!(mismatches, 0, "{ty}: {mismatches} elements differ");
    }
}

#[test]
fn dot_row_and_matvec_match_a_plain_dot() {
    for ty in WeightType::ALL {
        let (raw, expected) = load(ty);
        let rows = expected.len() / COLS;
        assert_eq!(
            rows * COLS,
            expected.len(),
            "{ty}: fixture is not whole rows"
        );
        let row_bytes = ty.row_bytes(COLS).unwrap();
        let x = input(COLS);

        let y = matvec(ty, &raw, rows, COLS, &x).unwrap();
        assert_eq!(y.len(), rows);

        for (r, (&yr, row)) in y.iter().zip(raw.chunks_exact(row_bytes)).enumerate() {
            let values = &expected[r * COLS..(r + 1) * COLS];
            let plain: f64 = values
                .iter()
                .zip(&x)
                .map(|(&w, &v)| f64::from(w) * f64::from(v))
                .sum();
            // Relative to the sum of magnitudes, so cancellation in the sum
            // does not make the bound meaninglessly tight.
            let scale: f64 = values
                .iter()
                .zip(&x)
                .map(|(&w, &v)| (f64::from(w) * f64::from(v)).abs())
                .sum();
            let tolerance = 1e-5 * scale.max(f64::MIN_POSITIVE);

            let dot = dot_row(ty, row, &x).unwrap();
            assert!(
                (f64::from(dot) - plain).abs() <= tolerance,
                "{ty} row {r}: dot_row {dot} vs plain {plain}"
            );
            assert!(
                (f64::from(yr) - plain).abs() <= tolerance,
                "{ty} row {r}: matvec {yr} vs plain {plain}"
            );
        }
    }
}
