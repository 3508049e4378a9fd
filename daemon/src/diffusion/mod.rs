//! The diffusion engine's parts. Built so far: [`rng`], the starting noise that matches
//! PyTorch's CPU generator; [`clip_tokenizer`], the text encoders' tokenizer; [`config`], the
//! pipeline's shapes from a diffusers folder; [`sampler`], diffusers' schedulers; [`tensors`],
//! a safetensors file's tensors on the device; [`clip`], the CLIP text encoders; [`unet`],
//! SDXL's UNet; [`vae`], the VAE decoder; [`png`], the pixels and the file. The job that runs
//! them under the budget comes next; until it exists an image job answers UNIMPLEMENTED.

pub mod clip;
pub mod clip_tokenizer;
pub mod config;
mod graph;
pub mod job;
mod plan;
pub mod png;
pub mod preview;
pub mod rng;
pub mod sampler;
pub mod sdxl;
pub mod single_file;
pub mod tensors;
pub mod unet;
pub mod vae;
