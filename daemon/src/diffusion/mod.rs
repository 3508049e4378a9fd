//! The diffusion engine's parts. Built so far: [`rng`], the starting noise that matches
//! PyTorch's CPU generator. The text encoders, UNet, VAE and samplers come next; until they
//! exist an image job answers UNIMPLEMENTED.

pub mod rng;
