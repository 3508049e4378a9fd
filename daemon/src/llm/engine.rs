//! A loaded LLM ready to serve requests: weights on the device, tokenizer, chat template, and a
//! pool of sequences (a KV cache each), one per request that may run at once, and the scratch of a
//! step they share. The whole pool
//! is allocated at load time and charged to the model, so what `halo ps` shows is what the model
//! holds, and [`estimate`] (a pure function of the GGUF header and the config) predicts it.

use std::path::Path;
use std::sync::Mutex;

pub use halo_kernels::WeightLayout;
use halo_kernels::{charged_bytes, Device, LoadStrategy, OwnerId};

use super::chat::ChatTemplate;
use super::hparams::HParams;
use super::model::{
    scratch_buffers, scratch_rows, sequence_buffers, LlmError, LlmModel, Scratch, Sequence,
};
use super::tokenizer::Tokenizer;
use crate::config::KvCacheType;
use crate::gguf::{Gguf, GgufFile};
use crate::models::{Lease, Mapping};

/// Context used when the config gives none: the model's own, capped here.
pub const DEFAULT_CONTEXT: u64 = 4096;

/// How many tokens a sequence holds, from the config's `context` or the model's default.
pub fn context_for(hp: &HParams, configured: Option<u32>) -> u64 {
    match configured {
        Some(c) => c as u64,
        None => hp.context_train.clamp(1, DEFAULT_CONTEXT),
    }
}

/// Bytes the model will hold once loaded with `parallel` sequences of `context` tokens (KV cache
/// of type `kv`): the weights as the loader places them on a device with `layout` (whole
/// page-aligned segments, for copies as for imports), each sequence's KV cache and the one step
/// scratch shared by all of them, rounded as the allocator rounds them (a group's buffers share
/// one chunk of exactly their size).
pub fn estimate(
    g: &Gguf,
    context: Option<u32>,
    parallel: u64,
    kv: KvCacheType,
    layout: WeightLayout,
) -> Result<u64, LlmError> {
    let hp = HParams::from_gguf(g)?;
    let ranges: Vec<_> = g.tensors.iter().map(|t| g.range(t)).collect();
    let weights = layout.bytes(&ranges)?;
    let ctx = context_for(&hp, context);
    let charged = |bufs: Vec<(halo_kernels::MemoryKind, u64)>| {
        bufs.iter()
            .fold(0u64, |sum, (_, b)| sum.saturating_add(charged_bytes(*b)))
    };
    let parallel = parallel.max(1);
    let per_seq = charged(sequence_buffers(&hp, ctx, kv));
    let scratch = charged(scratch_buffers(&hp, scratch_rows(ctx, parallel), parallel));
    Ok(weights
        .saturating_add(per_seq.saturating_mul(parallel))
        .saturating_add(scratch))
}

/// Gemma's turn format, for Gemma GGUFs that carry no template of their own. A system message
/// becomes a user turn (Gemma has no system role).
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// A template halo knows for the architecture when the file has none.
fn builtin_template(g: &Gguf, tok: &Tokenizer) -> Result<Option<ChatTemplate>, LlmError> {
    if g.str("general.architecture").ok() != Some("gemma3") {
        return Ok(None);
    }
    let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
    ChatTemplate::new(GEMMA_TEMPLATE, &text(tok.bos()), &text(tok.eos()))
        .map(Some)
        .map_err(|e| LlmError::Unsupported(format!("built-in chat template: {e}")))
}

/// A model loaded for serving.
pub struct LlmEngine {
    pub model: LlmModel,
    pub tokenizer: Tokenizer,
    pub chat: Option<ChatTemplate>,
    pub context: u64,
    pub parallel: u64,
    free: Mutex<Vec<Sequence>>,
    /// The step scratch every sequence's steps share (the executor runs one step at a time).
    scratch: Mutex<Scratch>,
    /// The model file, kept mapped (and leased) while the GPU uses its pages as weights.
    mapping: Option<std::sync::Arc<Mapping>>,
    weights_note: Option<String>,
}

impl LlmEngine {
    /// Loads `path` onto `device` with `parallel` sequences of the configured context and KV
    /// cache type, all charged to `owner`.
    pub fn load(
        device: &Device,
        path: &Path,
        context: Option<u32>,
        parallel: u64,
        kv: KvCacheType,
        strategy: LoadStrategy,
        owner: OwnerId,
    ) -> Result<LlmEngine, LlmError> {
        // Weights used from the file's own pages need a lease on it, so that a writer cannot
        // change them under the GPU; without one, they are copied.
        let file = if strategy == LoadStrategy::Copy {
            GgufFile::open(path)
        } else {
            GgufFile::open_leased(path)
        }
        .map_err(|e| LlmError::Unsupported(e.to_string()))?;
        let (strategy, weights_note) = match file.map.lease() {
            Lease::Unavailable(why) => {
                tracing::warn!(file = %path.display(), reason = %why,
                    "no lease on the model file; copying its weights instead of importing them");
                (
                    LoadStrategy::Copy,
                    Some(format!(
                        "weights copied, not used in place: no lease on the file ({why})"
                    )),
                )
            }
            _ => (strategy, None),
        };
        let tokenizer = Tokenizer::from_gguf(&file.header)
            .map_err(|e| LlmError::Unsupported(format!("tokenizer: {e}")))?;
        let chat = ChatTemplate::from_gguf(&file.header, &tokenizer)
            .map_err(|e| LlmError::Unsupported(format!("chat template: {e}")))?;
        let chat = match chat {
            Some(c) => Some(c),
            None => builtin_template(&file.header, &tokenizer)?,
        };
        let model = LlmModel::load(device, &file, strategy, owner)?;
        if file.map.changing() {
            return Err(LlmError::Unsupported(format!(
                "{} was changed on disk while it loaded; load it again once it is written",
                path.display()
            )));
        }
        // The mapping stays only if the GPU uses its pages; then its lease guards them.
        let imported = model.weights().strategy == LoadStrategy::Import;
        let mapping = imported.then(|| file.map.clone());

        let ctx = context_for(&model.hp, context);
        let free = (0..parallel.max(1))
            .map(|_| model.new_sequence(ctx, kv, owner))
            .collect::<Result<Vec<_>, _>>()?;
        let parallel = parallel.max(1);
        let scratch = model.new_scratch(scratch_rows(ctx, parallel), parallel, owner)?;
        Ok(LlmEngine {
            model,
            tokenizer,
            chat,
            context: ctx,
            parallel,
            free: Mutex::new(free),
            scratch: Mutex::new(scratch),
            mapping,
            weights_note,
        })
    }

    /// Why this model must not be used any more, if its file is being changed: its weights are
    /// the file's pages, and a writer has started to open or truncate it.
    pub fn file_changed(&self) -> Option<String> {
        let m = self.mapping.as_ref().filter(|m| m.changing())?;
        Some(format!(
            "model file {} is being changed on disk; halod took the model out of service (the \
             next request loads the file again)",
            m.path().display()
        ))
    }

    /// How the weights reached the GPU when that is not the configured way (no lease, no import
    /// support), for `halo models`.
    pub fn weights_note(&self) -> Option<&str> {
        self.weights_note.as_deref()
    }

    /// Takes a free sequence (the scheduler never runs more jobs than there are sequences), the
    /// one whose cache holds the longest start of `prompt`, and keeps that much of its cache:
    /// returns it with the number of prompt tokens already in place (at most all but the last,
    /// whose logits the request needs).
    pub fn take_sequence_for(&self, prompt: &[u32]) -> Option<(Sequence, u64)> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let best = (0..free.len()).max_by_key(|&i| free[i].common_prefix(prompt))?;
        let mut s = free.swap_remove(best);
        let kept = s.keep_prefix(prompt);
        Some((s, kept))
    }

    /// The step scratch, for the executor's forward steps.
    pub fn scratch(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn return_sequence(&self, s: Sequence) {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::chat::Message;

    #[test]
    fn the_builtin_gemma_template_renders_gemma_turns() {
        let t = ChatTemplate::new(GEMMA_TEMPLATE, "<bos>", "<eos>").unwrap();
        let out = t
            .render(
                &[
                    Message::new("user", "Hi "),
                    Message::new("assistant", "Hello."),
                    Message::new("user", "Bye"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }
}
