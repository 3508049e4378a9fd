//! T5's SentencePiece (unigram) tokenizer, as Flux's T5 encoder expects its input: the prompt's
//! ids, at most `max − 1` of them, then `</s>`, then `<pad>` up to `max` (512 for Flux), as
//! diffusers' FluxPipeline asks transformers for (`padding="max_length"`, `truncation=True`).
//!
//! The unigram model comes from the folder's `tokenizer.json` (read by the `tokenizers` crate),
//! and the rest of the recipe is T5's own, as transformers' T5 tokenizer builds it whatever the
//! file says beside the model: the SentencePiece character map when the file has one (a
//! `Precompiled` normalizer, alone or in a sequence) and no other normalization; split on
//! whitespace (so runs of it, and any at either end, leave nothing), then ▁ before every word.
//! The end and pad tokens are appended here.

use std::fmt;
use std::path::{Path, PathBuf};

use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;

#[derive(Debug)]
pub struct T5TokenizerError(String);

impl fmt::Display for T5TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for T5TokenizerError {}

pub struct T5Tokenizer {
    tok: tokenizers::Tokenizer,
    eos: u32,
    pad: u32,
}

pub const EOS: &str = "</s>";
pub const PAD: &str = "<pad>";

impl T5Tokenizer {
    /// From a `tokenizer.json`, or a folder holding one (diffusers' `tokenizer_2/`).
    pub fn load(path: &Path) -> Result<T5Tokenizer, T5TokenizerError> {
        let file: PathBuf = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.into()
        };
        let tok = tokenizers::Tokenizer::from_file(&file).map_err(|e| {
            T5TokenizerError(format!(
                "{}: not a tokenizer.json the T5 tokenizer can read: {e}",
                file.display()
            ))
        })?;
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                T5TokenizerError(format!("{}: the vocabulary has no {t}", file.display()))
            })
        };
        let (eos, pad) = (id(EOS)?, id(PAD)?);
        let mut tok = tok;
        let charsmap = match tok.get_normalizer() {
            Some(NormalizerWrapper::Precompiled(p)) => Some(p.clone()),
            Some(NormalizerWrapper::Sequence(seq)) => seq.as_ref().iter().find_map(|n| match n {
                NormalizerWrapper::Precompiled(p) => Some(p.clone()),
                _ => None,
            }),
            _ => None,
        };
        tok.with_normalizer(charsmap.map(NormalizerWrapper::Precompiled));
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(vec![
            PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit),
            PreTokenizerWrapper::Metaspace(Metaspace::new('▁', PrependScheme::Always, true)),
        ]))));
        Ok(T5Tokenizer { tok, eos, pad })
    }

    /// `max` ids for `text` (see the module's doc).
    pub fn encode(&self, text: &str, max: usize) -> Result<Vec<u32>, T5TokenizerError> {
        if max == 0 {
            return Err(T5TokenizerError(
                "a T5 context needs at least one id".into(),
            ));
        }
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| T5TokenizerError(format!("tokenizing the prompt failed: {e}")))?;
        let mut ids: Vec<u32> = enc.get_ids().iter().copied().take(max - 1).collect();
        ids.push(self.eos);
        ids.resize(max, self.pad);
        Ok(ids)
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
}
