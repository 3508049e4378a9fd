//! The LLM engine: model shape (hparams), weights on the device, the forward pass, tokenizer and
//! chat templates.

pub mod chat;
pub mod engine;
pub mod hparams;
pub mod model;
pub mod tokenizer;
