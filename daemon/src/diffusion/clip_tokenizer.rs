//! CLIP's BPE tokenizer, as the SDXL (and Flux) text encoders expect their input: 77 ids, the
//! start token, at most 75 text tokens, the end token, then padding.
//!
//! The recipe is the one `transformers`' CLIP tokenizer runs (its tokenizer.json): Unicode NFC,
//! runs of whitespace to one space, lower case; split into the special tokens, contractions
//! (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`), letter runs, single digits and runs of other
//! symbols, dropping whitespace; bytes to printable characters (GPT-2's byte-level map); BPE
//! where each word's last symbol carries `</w>`. The vocabulary and merges come from a diffusers
//! `tokenizer/` folder (`vocab.json`, `merges.txt`) with its pad token from
//! `special_tokens_map.json`: `<|endoftext|>` for SDXL's first tokenizer, `!` for the second.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::{Lowercase, Sequence as NormSequence};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Ids per prompt, start and end tokens included.
pub const CONTEXT: usize = 77;
pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
const WORDS: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Debug)]
pub struct ClipTokenizerError(String);

impl fmt::Display for ClipTokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClipTokenizerError {}

fn err(m: impl Into<String>) -> ClipTokenizerError {
    ClipTokenizerError(m.into())
}

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("pad", &self.pad)
            .finish()
    }
}

impl ClipTokenizer {
    /// From a vocabulary, merges in priority order, and the pad token's text.
    pub fn new(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad: &str,
    ) -> Result<ClipTokenizer, ClipTokenizerError> {
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| err(format!("the vocabulary has no {t:?} token")))
        };
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(pad)?);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| err(format!("cannot build the BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let spaces = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| err(e.to_string()))?;
        inner.with_normalizer(Some(NormSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(spaces),
            NormalizerWrapper::Lowercase(Lowercase),
        ])));
        let words = Split::new(
            SplitPattern::Regex(WORDS.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| err(e.to_string()))?;
        inner.with_pre_tokenizer(Some(PreSequence::new(vec![
            PreTokenizerWrapper::Split(words),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])));
        inner.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
        Ok(ClipTokenizer {
            inner,
            bos,
            eos,
            pad,
        })
    }

    /// From a diffusers tokenizer folder: `vocab.json`, `merges.txt`, and the pad token from
    /// `special_tokens_map.json` (or `tokenizer_config.json`; `<|endoftext|>` when neither says).
    pub fn from_folder(dir: &Path) -> Result<ClipTokenizer, ClipTokenizerError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| err(format!("cannot read {}: {e}", dir.join(name).display())))
        };
        let vocab: HashMap<String, u32> = serde_json::from_str(&read("vocab.json")?)
            .map_err(|e| err(format!("{}: {e}", dir.join("vocab.json").display())))?;
        let merges = parse_merges(&read("merges.txt")?)
            .map_err(|e| err(format!("{}: {e}", dir.join("merges.txt").display())))?;
        let mut pad = EOS.to_string();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| err(format!("{}: {e}", dir.join(name).display())))?;
            // Either "pad_token": "!" or "pad_token": {"content": "!", ...}.
            let p = &v["pad_token"];
            if let Some(s) = p.as_str().or_else(|| p["content"].as_str()) {
                pad = s.to_string();
            }
        }
        ClipTokenizer::new(vocab, merges, &pad)
    }

    /// CLIP's own vocabulary, built into halod (`daemon/assets/clip`), with pad token `pad`:
    /// what a single-file checkpoint, which carries no tokenizer, is tokenized with.
    pub fn openai(pad: &str) -> Result<ClipTokenizer, ClipTokenizerError> {
        let (vocab, merges) = openai_vocab()?;
        ClipTokenizer::new(vocab, merges, pad)
    }

    /// The 77 ids for `text`: start, at most 75 tokens (longer text is cut), end, padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ClipTokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| err(format!("cannot tokenize: {e}")))?;
        let mut ids = Vec::with_capacity(CONTEXT);
        ids.push(self.bos);
        ids.extend(enc.get_ids().iter().take(CONTEXT - 2));
        ids.push(self.eos);
        ids.resize(CONTEXT, self.pad);
        Ok(ids)
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }
}

/// CLIP's BPE file as OpenAI ships it (gzip: a header line, then merges in priority order).
const OPENAI_BPE: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");
/// The merges CLIP's vocabulary uses (its tokenizer reads lines 1 to 49152 − 256 − 2 of the
/// file): with the 512 byte symbols and the two special tokens, 49408 ids.
const OPENAI_MERGES: usize = 49152 - 256 - 2;

/// GPT-2's printable stand-ins for the 256 byte values, in CLIP's vocabulary order: the
/// printable Latin-1 bytes as themselves first, then the rest mapped to U+0100 onwards.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut order: Vec<(u32, u32)> = (0..256u32)
        .filter(|&b| printable(b))
        .map(|b| (b, b))
        .collect();
    for (stand_in, b) in (256..).zip((0..256u32).filter(|&b| !printable(b))) {
        order.push((b, stand_in));
    }
    order
        .into_iter()
        .map(|(_, c)| char::from_u32(c).expect("below U+0200"))
        .collect()
}

/// The vocabulary and merges of [`OPENAI_BPE`], ids as CLIP assigns them.
type VocabAndMerges = (HashMap<String, u32>, Vec<(String, String)>);

fn openai_vocab() -> Result<VocabAndMerges, ClipTokenizerError> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(OPENAI_BPE)
        .read_to_string(&mut text)
        .map_err(|e| err(format!("the built-in CLIP vocabulary does not unpack: {e}")))?;
    let merges = parse_merges(
        &text
            .lines()
            .skip(1)
            .take(OPENAI_MERGES)
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .map_err(|e| err(format!("the built-in CLIP vocabulary: {e}")))?;
    if merges.len() != OPENAI_MERGES {
        return Err(err("the built-in CLIP vocabulary is short"));
    }
    let bytes = byte_symbols();
    let symbols = bytes
        .iter()
        .map(|c| c.to_string())
        .chain(bytes.iter().map(|c| format!("{c}</w>")))
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
        .chain([BOS.to_string(), EOS.to_string()]);
    let vocab = symbols.enumerate().map(|(i, s)| (s, i as u32)).collect();
    Ok((vocab, merges))
}

/// `merges.txt`: an optional `#version` line, then one `left right` pair per line.
fn parse_merges(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .enumerate()
        .filter(|(i, l)| !(l.is_empty() || (*i == 0 && l.starts_with("#version"))))
        .map(|(i, l)| {
            let mut parts = l.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(format!("line {} is not a pair of symbols: {l:?}", i + 1)),
            }
        })
        .collect()
}
