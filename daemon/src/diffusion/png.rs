//! The image a job writes: the VAE's output turned into 8-bit RGB exactly as diffusers does it,
//! and a PNG that carries the prompt and parameters in tEXt chunks.
//!
//! diffusers' post-processing, reproduced: x/2 + 0.5 clamped to [0, 1] (f32), × 255 (f32),
//! rounded half to even (NumPy's `round`), then cast to u8.

/// `image` is 3 × height × width (NCHW, one image) in about [-1, 1]; returns height × width × 3
/// bytes.
pub fn to_rgb8(image: &[f32], width: usize, height: usize) -> Vec<u8> {
    let plane = width * height;
    assert_eq!(
        image.len(),
        3 * plane,
        "a 3-channel image of {width}×{height}"
    );
    let mut out = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        for c in 0..3 {
            let v = (image[c * plane + i] / 2.0 + 0.5).clamp(0.0, 1.0);
            out.push((v * 255.0).round_ties_even() as u8);
        }
    }
    out
}

/// A PNG of `rgb` (height × width × 3 bytes) with one tEXt chunk per (keyword, text) pair.
/// Keywords must be 1–79 Latin-1 characters; text that is not Latin-1 goes in as its UTF-8
/// bytes' closest form (non-Latin-1 characters become '?').
pub fn encode(
    rgb: &[u8],
    width: u32,
    height: u32,
    text: &[(&str, &str)],
) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            let latin1: String = v
                .chars()
                .map(|c| if (c as u32) < 256 { c } else { '?' })
                .collect();
            enc.add_text_chunk(k.to_string(), latin1)?;
        }
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_round_half_to_even_and_clamp() {
        // 2·(k/255) − 1 puts v·255 exactly on k; ±0.5/255 around it tests the tie rule.
        let vals = [-2.0f32, -1.0, 0.0, 1.0, 3.0];
        let img: Vec<f32> = vals.iter().cycle().take(15).copied().collect();
        let rgb = to_rgb8(&img, 5, 1);
        assert_eq!(&rgb[..3], &[0, 0, 0]);
        // x = 0 → 0.5 · 255 = 127.5 → 128 (even).
        assert_eq!(rgb[2 * 3], 128);
        assert_eq!(rgb[4 * 3], 255);
    }

    #[test]
    fn the_png_decodes_to_its_pixels_and_keeps_its_text() {
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        let bytes = encode(
            &rgb,
            4,
            3,
            &[("prompt", "a fox"), ("parameters", "steps 30, Δ")],
        )
        .unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(
            (info.width, info.height, info.color_type),
            (4, 3, png::ColorType::Rgb)
        );
        assert_eq!(&buf[..info.buffer_size()], rgb.as_slice());
        let texts: Vec<(String, String)> = reader
            .info()
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone()))
            .collect();
        assert_eq!(
            texts,
            [
                ("prompt".to_string(), "a fox".to_string()),
                ("parameters".to_string(), "steps 30, ?".to_string())
            ]
        );
    }
}
