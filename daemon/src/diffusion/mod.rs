//! The diffusion engine's parts: [`rng`], the starting noise that matches PyTorch's CPU
//! generator; [`clip_tokenizer`], the CLIP text encoders' tokenizer; [`t5_tokenizer`], T5's; [`config`], the pipeline's
//! shapes from a diffusers folder; [`single_file`], an original-layout checkpoint's names and
//! inferred shapes; [`sampler`], diffusers' schedulers; [`flow`], Flux's flow-matching sampler and latent packing; [`flux`], Flux's transformer; [`flux_file`], its BFL-layout file; [`flux_pipeline`], Flux text-to-image; [`tensors`], a safetensors file's
//! tensors on the device; [`clip`], the CLIP text encoders; [`t5`], Flux's T5 encoder; [`unet`], SDXL's UNet; [`vae`], the
//! VAE decoder; [`sdxl`], the pipeline; [`job`], an image job the executor runs in steps under
//! a memory plan (`plan`); [`png`] and [`preview`], the pixels and the files.

pub mod clip;
pub mod clip_tokenizer;
pub mod config;
pub mod flow;
pub mod flux;
pub mod flux_file;
pub mod flux_pipeline;
mod graph;
pub mod job;
pub mod pace;
mod plan;
pub mod png;
pub mod preview;
pub mod rng;
pub mod sampler;
pub mod sdxl;
pub mod single_file;
pub mod t5;
pub mod t5_tokenizer;
pub mod tensors;
pub mod unet;
pub mod vae;
