//! A cheap look at a job in progress: the latents mapped to RGB by a fixed linear map (no
//! weights, no VAE), one pixel per latent. For SDXL's four latent channels the map is the
//! approximation of SDXL's VAE that ComfyUI's previews use (published coefficients); other
//! channel counts get a grey from the first channel.

/// RGB = Σ_c latent[c] · FACTORS[c] + BIAS, for SDXL latents (as the sampler holds them).
const SDXL_FACTORS: [[f32; 3]; 4] = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
];
const SDXL_BIAS: [f32; 3] = [0.1084, -0.0175, -0.0011];

/// One image's latents (channels × height × width) as height × width × 3 bytes.
pub fn latent_rgb(latents: &[f32], channels: usize, height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    assert_eq!(latents.len(), channels * plane);
    let mut out = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        let mut rgb = [0f32; 3];
        if channels == 4 {
            rgb = SDXL_BIAS;
            for (c, f) in SDXL_FACTORS.iter().enumerate() {
                for k in 0..3 {
                    rgb[k] += latents[c * plane + i] * f[k];
                }
            }
        } else if channels > 0 {
            rgb = [latents[i] * 0.25; 3];
        }
        for v in rgb {
            out.push((((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_latents_show_the_bias_and_the_map_is_linear() {
        let px = latent_rgb(&[0.0; 4 * 6], 4, 2, 3);
        assert_eq!(px.len(), 18);
        // (0.1084 + 1) / 2 · 255 = 141.3 → 141; (−0.0175 + 1)/2 · 255 = 125.3; 127.4.
        assert_eq!(&px[..3], &[141, 125, 127]);
        // Channel 0 alone at +1 adds its row of factors.
        let mut l = vec![0.0; 4];
        l[0] = 1.0;
        let px = latent_rgb(&l, 4, 1, 1);
        let want =
            |k: usize| (((SDXL_BIAS[k] + SDXL_FACTORS[0][k] + 1.0) / 2.0) * 255.0).round() as u8;
        assert_eq!(px, [want(0), want(1), want(2)]);
    }
}
