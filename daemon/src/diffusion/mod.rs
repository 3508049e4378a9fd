//! The diffusion engine's parts. Built so far: [`rng`], the starting noise that matches
//! PyTorch's CPU generator; [`clip_tokenizer`], the text encoders' tokenizer; [`config`], the
//! pipeline's shapes from a diffusers folder; [`sampler`], diffusers' schedulers. The text encoders, UNet, VAE and samplers come
//! next; until they exist an image job answers UNIMPLEMENTED.

pub mod clip_tokenizer;
pub mod config;
pub mod rng;
pub mod sampler;
