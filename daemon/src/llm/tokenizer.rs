//! Text to token ids and back, built from a GGUF's `tokenizer.*` metadata.
//!
//! Two vocabulary families are supported, the two llama.cpp calls BPE and SPM:
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE. The vocabulary is already in the byte-level
//!   unicode form, the merges come from `tokenizer.ggml.merges`, and the text is first split by the
//!   regexes llama.cpp uses for the model's `tokenizer.ggml.pre` family.
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE. There are no merges in the file, so
//!   they are derived from the scores the way SentencePiece converters do: every split of a piece
//!   into two pieces that are both in the vocabulary is a merge, ranked by the merged piece's score.
//!   Spaces become "▁" and characters outside the vocabulary fall back to `<0xNN>` byte tokens.
//!
//! The BPE itself runs in a `tokenizers::Tokenizer` built in memory. Special tokens are cut out of
//! the text before it is handed over, with llama.cpp's rules: control tokens (type 3) only when the
//! caller asks for special parsing, user-defined tokens (type 4) always, longer tokens first.
//!
//! Decoding is done here from each token's bytes, so a token that holds part of a UTF-8 sequence
//! can be streamed without corrupting it ([`StreamDecoder`]). Control tokens decode to nothing, as
//! in llama.cpp's default detokenizer.
//!
//! Nothing here panics on a malformed file: every problem is a [`TokenizerError`] naming the key.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::gguf::{Gguf, GgufError, Value};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// The SentencePiece space marker.
const SPACE_MARK: &str = "\u{2581}";

/// Texts of tokens that end a turn in the chat formats llama.cpp knows; a token with one of these
/// texts is an end-of-generation token whatever its type.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

// Pre-tokenizer regexes, per llama.cpp's handling of `tokenizer.ggml.pre`. Several are applied in
// turn: each one splits the pieces the previous one left, keeping the text between matches.
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What is wrong with a GGUF's tokenizer, or with a request to it.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerError {
    /// A required key is absent.
    MissingKey(String),
    /// A key is present but unusable.
    BadKey { key: String, message: String },
    /// `tokenizer.ggml.model` names a vocabulary family halo does not implement.
    UnsupportedModel(String),
    /// The tokenizer could not be assembled from otherwise well-formed metadata.
    Build(String),
    /// Encoding failed.
    Encode(String),
    /// A token id past the vocabulary.
    BadId { id: u32, vocab_size: usize },
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::MissingKey(k) => {
                write!(f, "tokenizer: required metadata key {k:?} is missing")
            }
            TokenizerError::BadKey { key, message } => write!(f, "tokenizer: {key:?}: {message}"),
            TokenizerError::UnsupportedModel(m) => write!(
                f,
                "tokenizer: tokenizer.ggml.model = {m:?} is not supported (halo reads \"gpt2\" and \"llama\")"
            ),
            TokenizerError::Build(m) => write!(f, "tokenizer: cannot build the tokenizer: {m}"),
            TokenizerError::Encode(m) => write!(f, "tokenizer: cannot encode: {m}"),
            TokenizerError::BadId { id, vocab_size } => write!(
                f,
                "tokenizer: token id {id} is outside the vocabulary of {vocab_size} tokens"
            ),
        }
    }
}

impl std::error::Error for TokenizerError {}

impl From<GgufError> for TokenizerError {
    fn from(e: GgufError) -> Self {
        match e {
            GgufError::MissingKey(k) => TokenizerError::MissingKey(k),
            GgufError::WrongType {
                key,
                expected,
                found,
            } => TokenizerError::BadKey {
                key,
                message: format!("is a {found}, expected {expected}"),
            },
            other => TokenizerError::Build(other.to_string()),
        }
    }
}

fn bad(key: &str, message: impl Into<String>) -> TokenizerError {
    TokenizerError::BadKey {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Which vocabulary family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Byte-level BPE (`gpt2`).
    ByteLevel,
    /// SentencePiece-style BPE (`llama`).
    SentencePiece,
}

/// A tokenizer read from a GGUF.
pub struct Tokenizer {
    kind: Kind,
    inner: tokenizers::Tokenizer,
    tokens: Vec<String>,
    types: Vec<i64>,
    /// Special tokens that can be written in text: (text, id), longest first.
    specials: Vec<(String, u32)>,
    /// The distinct byte lengths of `specials`, longest first.
    special_lens: Vec<usize>,
    special_by_text: HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: BTreeSet<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// For byte-level vocabularies: the byte each stand-in character means.
    char_to_byte: HashMap<char, u8>,
    /// The most bytes of input text one token can stand for (see [`Tokenizer::max_token_bytes`]).
    max_token_bytes: usize,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// The byte-level BPE alphabet: printable bytes stand for themselves, the others are moved to
/// U+0100 and up, in order, so that every byte has a visible character.
fn byte_level_alphabet() -> Vec<(u8, char)> {
    let mut out = Vec::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
        out.push((b, c));
    }
    out
}

/// An optional integer key as a token id inside the vocabulary.
fn token_id_key(g: &Gguf, key: &str, n: usize) -> Result<Option<u32>, TokenizerError> {
    let Some(v) = g.metadata.get(key) else {
        return Ok(None);
    };
    // llama.cpp writes -1 (as a signed or a wrapped unsigned value) for "none".
    match v {
        Value::I32(-1) | Value::I64(-1) | Value::U32(u32::MAX) => return Ok(None),
        Value::U64(x) if *x == u64::MAX => return Ok(None),
        _ => {}
    }
    let id = v
        .as_u64()
        .ok_or_else(|| bad(key, "is not a non-negative integer"))?;
    if id >= n as u64 {
        return Err(bad(
            key,
            format!("token id {id} is outside the vocabulary of {n} tokens"),
        ));
    }
    Ok(Some(id as u32))
}

fn bool_key(g: &Gguf, key: &str) -> Result<Option<bool>, TokenizerError> {
    match g.metadata.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad(key, "is not a bool")),
    }
}

/// A required array whose elements are all strings.
fn string_array(g: &Gguf, key: &str) -> Result<Vec<String>, TokenizerError> {
    let arr = g
        .get(key)?
        .as_array()
        .ok_or_else(|| bad(key, "is not an array"))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(key, format!("element {i} is not a string")))
        })
        .collect()
}

fn split_regex(re: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    Split::new(
        SplitPattern::Regex(re.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map(PreTokenizerWrapper::Split)
    .map_err(|e| TokenizerError::Build(format!("pre-tokenizer regex: {e}")))
}

/// The regexes llama.cpp splits text with before byte-level BPE, per `tokenizer.ggml.pre`, and
/// whether whole words found in the vocabulary skip the merges.
fn pre_tokenizer_regexes(pre: &str) -> (Vec<&'static str>, bool) {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "lfm2" => {
            (vec![LLAMA3_RE], true)
        }
        "chatglm-bpe" => (vec![LLAMA3_RE], false),
        "glm4" | "glm5" => (vec![LLAMA3_RE], true),
        "qwen2" | "deepseek-r1-qwen" => (vec![QWEN2_RE], false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2_RE], false)
        }
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" => (vec![GPT2_RE], false),
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_RE,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        other => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre; splitting text with the GPT-2 regex"
            );
            (vec![GPT2_RE], false)
        }
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by `g`'s `tokenizer.*` keys.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, TokenizerError> {
        const MODEL: &str = "tokenizer.ggml.model";
        const TOKENS: &str = "tokenizer.ggml.tokens";
        const TYPES: &str = "tokenizer.ggml.token_type";
        let model = g.str(MODEL)?;
        let kind = match model {
            "gpt2" => Kind::ByteLevel,
            "llama" => Kind::SentencePiece,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let tokens = string_array(g, TOKENS)?;
        let n = tokens.len();
        if n == 0 {
            return Err(bad(TOKENS, "is empty"));
        }
        if n > u32::MAX as usize {
            return Err(bad(TOKENS, "has too many tokens"));
        }
        let types: Vec<i64> = match g.metadata.get(TYPES) {
            None => vec![TYPE_NORMAL; n],
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| bad(TYPES, "is not an array"))?;
                if arr.len() != n {
                    return Err(bad(
                        TYPES,
                        format!("has {} entries for {n} tokens", arr.len()),
                    ));
                }
                arr.iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::I8(x) => Ok(*x as i64),
                        Value::I16(x) => Ok(*x as i64),
                        Value::I32(x) => Ok(*x as i64),
                        Value::I64(x) => Ok(*x),
                        other => other
                            .as_u64()
                            .map(|x| x as i64)
                            .ok_or_else(|| bad(TYPES, format!("element {i} is not an integer"))),
                    })
                    .collect::<Result<_, _>>()?
            }
        };

        // The vocabulary: a later duplicate text wins, as in llama.cpp.
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();

        let add_space_prefix =
            bool_key(g, "tokenizer.ggml.add_space_prefix")?.unwrap_or(kind == Kind::SentencePiece);
        let mut inner;
        let mut char_to_byte = HashMap::new();
        match kind {
            Kind::ByteLevel => {
                const MERGES: &str = "tokenizer.ggml.merges";
                let merges = string_array(g, MERGES)?
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| match m.split_once(' ') {
                        Some((a, b)) if !a.is_empty() && !b.is_empty() => {
                            Ok((a.to_string(), b.to_string()))
                        }
                        _ => Err(bad(MERGES, format!("merge {i} ({m:?}) is not \"a b\""))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let pre = match g.metadata.get("tokenizer.ggml.pre") {
                    None => "default",
                    Some(v) => v
                        .as_str()
                        .ok_or_else(|| bad("tokenizer.ggml.pre", "is not a string"))?,
                };
                let (regexes, ignore_merges) = pre_tokenizer_regexes(pre);
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(ignore_merges)
                    .build()
                    .map_err(|e| bad(MERGES, e.to_string()))?;
                let mut steps = regexes
                    .into_iter()
                    .map(split_regex)
                    .collect::<Result<Vec<_>, _>>()?;
                steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
                    false, false, false,
                )));
                inner = tokenizers::Tokenizer::new(bpe);
                inner.with_pre_tokenizer(Some(PreSequence::new(steps)));
                inner.with_decoder(Some(ByteLevel::new(false, false, false)));
                for (b, c) in byte_level_alphabet() {
                    char_to_byte.insert(c, b);
                }
            }
            Kind::SentencePiece => {
                const SCORES: &str = "tokenizer.ggml.scores";
                let arr = g
                    .get(SCORES)?
                    .as_array()
                    .ok_or_else(|| bad(SCORES, "is not an array"))?;
                if arr.len() != n {
                    return Err(bad(
                        SCORES,
                        format!("has {} entries for {n} tokens", arr.len()),
                    ));
                }
                let scores = arr
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_f64()
                            .ok_or_else(|| bad(SCORES, format!("element {i} is not a number")))
                    })
                    .collect::<Result<Vec<f64>, _>>()?;
                let merges = merges_from_scores(&tokens, &scores, &vocab);
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .build()
                    .map_err(|e| TokenizerError::Build(e.to_string()))?;
                inner = tokenizers::Tokenizer::new(bpe);
                let space = Replace::new(" ", SPACE_MARK)
                    .map_err(|e| TokenizerError::Build(e.to_string()))?;
                inner.with_normalizer(Some(space));
                let unspace = Replace::new(SPACE_MARK, " ")
                    .map_err(|e| TokenizerError::Build(e.to_string()))?;
                inner.with_decoder(Some(DecoderSequence::new(vec![
                    DecoderWrapper::Replace(unspace),
                    DecoderWrapper::ByteFallback(ByteFallback::new()),
                    DecoderWrapper::Fuse(Fuse::new()),
                ])));
            }
        }

        let bos = token_id_key(g, "tokenizer.ggml.bos_token_id", n)?;
        let eos = token_id_key(g, "tokenizer.ggml.eos_token_id", n)?;
        let eot = token_id_key(g, "tokenizer.ggml.eot_token_id", n)?;
        let eom = token_id_key(g, "tokenizer.ggml.eom_token_id", n)?;
        // llama.cpp's defaults when the file does not say: BOS for SentencePiece vocabularies and
        // for the Llama-3 family of byte-level ones.
        let pre = g
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let default_bos = kind == Kind::SentencePiece
            || matches!(
                pre,
                "llama3"
                    | "llama-v3"
                    | "llama-bpe"
                    | "falcon3"
                    | "falcon-h1"
                    | "pixtral"
                    | "lfm2"
                    | "tekken"
            );
        let add_bos = bool_key(g, "tokenizer.ggml.add_bos_token")?.unwrap_or(default_bos);
        let add_eos = bool_key(g, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);

        let mut eog: BTreeSet<u32> = [eos, eot, eom].into_iter().flatten().collect();
        for (i, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&t.as_str()) {
                eog.insert(i as u32);
            }
        }

        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| {
                !t.is_empty() && matches!(**ty, TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN)
            })
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut special_lens: Vec<usize> = specials.iter().map(|s| s.0.len()).collect();
        special_lens.dedup();
        let mut special_by_text = HashMap::new();
        for (t, id) in &specials {
            special_by_text.entry(t.clone()).or_insert(*id);
        }

        // A token's stored text is never shorter than the input it matches: byte-level
        // vocabularies store one character per input byte, SentencePiece stores a space as the
        // 3-byte "▁", byte tokens are written "<0xAB>", special tokens as themselves. An unknown
        // character becomes one token of at most 4 bytes.
        let max_token_bytes = tokens.iter().map(String::len).max().unwrap_or(0).max(4);
        Ok(Tokenizer {
            max_token_bytes,
            kind,
            inner,
            tokens,
            types,
            specials,
            special_lens,
            special_by_text,
            bos,
            eos,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            char_to_byte,
        })
    }

    /// Token ids for `text`, as llama.cpp's `tokenize(text, add_special, parse_special)`:
    /// `add_special` adds BOS (and EOS) where the model asks for them; with `parse_special`,
    /// control tokens written in the text (e.g. "<|im_start|>") become those tokens.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        // SentencePiece vocabularies with a dummy prefix put a space before the text and after
        // every special token.
        let mut after_special = true;
        for piece in self.partition(text, parse_special) {
            match piece {
                Piece::Special(id) => {
                    out.push(id);
                    after_special = true;
                }
                Piece::Text(t) => {
                    let owned;
                    let t = if self.kind == Kind::SentencePiece
                        && self.add_space_prefix
                        && after_special
                    {
                        owned = format!(" {t}");
                        owned.as_str()
                    } else {
                        t
                    };
                    let enc = self
                        .inner
                        .encode_fast(t, false)
                        .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                    out.extend_from_slice(enc.get_ids());
                    after_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            if let Some(e) = self.eos {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Cuts `text` into plain text and special tokens. Longer special tokens are found first
    /// (everywhere in the text), then shorter ones in what is left, as llama.cpp does.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Piece<'t>> {
        let bytes = text.as_bytes();
        // Every place a special token occurs: (length, token order, start).
        let mut found: Vec<(usize, u32, usize)> = Vec::new();
        if !self.specials.is_empty() {
            for start in 0..bytes.len() {
                if !text.is_char_boundary(start) {
                    continue;
                }
                for &len in &self.special_lens {
                    let Some(cand) = text.get(start..start + len) else {
                        continue;
                    };
                    if let Some(&id) = self.special_by_text.get(cand) {
                        let ty = self.types[id as usize];
                        if parse_special || ty == TYPE_USER_DEFINED {
                            found.push((len, id, start));
                        }
                    }
                }
            }
        }
        found.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut claimed = vec![false; bytes.len()];
        let mut taken: Vec<(usize, usize, u32)> = Vec::new();
        for (len, id, start) in found {
            if claimed[start..start + len].iter().any(|c| *c) {
                continue;
            }
            claimed[start..start + len]
                .iter_mut()
                .for_each(|c| *c = true);
            taken.push((start, len, id));
        }
        taken.sort_unstable();
        let mut out = Vec::new();
        let mut at = 0;
        for (start, len, id) in taken {
            if start > at {
                out.push(Piece::Text(&text[at..start]));
            }
            out.push(Piece::Special(id));
            at = start + len;
        }
        if at < text.len() {
            out.push(Piece::Text(&text[at..]));
        }
        out
    }

    /// The bytes token `id` stands for when detokenized (empty for control tokens).
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>, TokenizerError> {
        let text = self.tokens.get(id as usize).ok_or(TokenizerError::BadId {
            id,
            vocab_size: self.tokens.len(),
        })?;
        let ty = self.types[id as usize];
        // As llama.cpp's default detokenizer: control, unknown and unused tokens give nothing,
        // user-defined ones their text as written.
        Ok(match (self.kind, ty) {
            (_, TYPE_USER_DEFINED) => text.as_bytes().to_vec(),
            (_, TYPE_BYTE) => match parse_byte_token(text) {
                Some(b) => vec![b],
                None => Vec::new(),
            },
            (Kind::ByteLevel, TYPE_NORMAL) => {
                let mut out = Vec::with_capacity(text.len());
                for c in text.chars() {
                    match self.char_to_byte.get(&c) {
                        Some(b) => out.push(*b),
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                out
            }
            (Kind::SentencePiece, TYPE_NORMAL) => text.replace(SPACE_MARK, " ").into_bytes(),
            _ => Vec::new(),
        })
    }

    /// The text of `ids` (control tokens omitted; invalid UTF-8 replaced with U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.token_bytes(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether generating `id` ends the turn: EOS, EOT, EOM, or a known end-of-turn token.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// All end-of-generation tokens.
    pub fn eog_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// An upper bound on the bytes of input text one token covers, so a text longer than
    /// `n * max_token_bytes()` is sure to need more than `n` tokens: a request that can never fit
    /// a context is refused before tokenizing it.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token's text as stored in the vocabulary (byte-level or "▁" form).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of the special token written `text`, if there is one.
    pub fn special_token(&self, text: &str) -> Option<u32> {
        self.special_by_text.get(text).copied()
    }

    /// The in-memory `tokenizers` tokenizer doing the BPE (special tokens are not registered in it).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

enum Piece<'t> {
    Text(&'t str),
    Special(u32),
}

/// "<0x41>" → 0x41.
fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Merges for a SentencePiece vocabulary: every split of a piece into two pieces that are both in
/// the vocabulary, best (highest-scoring) merged piece first.
fn merges_from_scores(tokens: &[String], scores: &[f64], vocab: &Vocab) -> Vec<(String, String)> {
    let mut ranked: Vec<(f64, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // Only the id the vocabulary maps this text to can be a merge target.
        if vocab.get(piece) != Some(&(id as u32)) {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(cut);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                ranked.push((scores[id], id as u32, ia, ib));
            }
        }
    }
    ranked.sort_by(|x, y| {
        y.0.total_cmp(&x.0)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
            .then(x.3.cmp(&y.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, a, b)| (tokens[a as usize].clone(), tokens[b as usize].clone()))
        .collect()
}

/// Turns token ids into text one at a time, holding back bytes until they form whole UTF-8
/// characters, so concatenating every `push` and the `finish` gives [`Tokenizer::decode`].
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder {
            tok,
            pending: Vec::new(),
        }
    }

    /// The text completed by token `id` (possibly empty). Ids outside the vocabulary add nothing.
    pub fn push(&mut self, id: u32) -> String {
        if let Ok(b) = self.tok.token_bytes(id) {
            self.pending.extend(b);
        }
        self.take_complete()
    }

    /// Whatever is still held back (an unfinished character becomes U+FFFD).
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..good]));
                    match e.error_len() {
                        // An incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        // Bytes that can never be valid: replace them as `decode` would.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::write::{file, string};

    fn str_array(items: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&8u32.to_le_bytes());
        v.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for s in items {
            string(&mut v, s);
        }
        v
    }

    fn i32_array(items: &[i32]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&5u32.to_le_bytes());
        v.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for x in items {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn f32_array(items: &[f32]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&6u32.to_le_bytes());
        v.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for x in items {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn s(x: &str) -> Vec<u8> {
        let mut v = Vec::new();
        string(&mut v, x);
        v
    }

    /// A tiny byte-level BPE vocabulary: every byte, "Ġ" words and two special tokens.
    fn bpe_kv(skip: &str) -> Vec<(&'static str, u32, Vec<u8>)> {
        let alphabet = byte_level_alphabet();
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
        tokens.extend(alphabet.iter().map(|(_, c)| c.to_string()));
        tokens.extend(["he", "ll", "hell", "hello", "Ġh", "Ġw"].map(String::from));
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut types = vec![1i32; tokens.len()];
        types[0] = 3;
        types[1] = 3;
        let kv = vec![
            ("tokenizer.ggml.model", 8, s("gpt2")),
            ("tokenizer.ggml.pre", 8, s("smollm")),
            ("tokenizer.ggml.tokens", 9, str_array(&refs)),
            ("tokenizer.ggml.token_type", 9, i32_array(&types)),
            (
                "tokenizer.ggml.merges",
                9,
                str_array(&["h e", "l l", "he ll", "hell o", "Ġ h", "Ġ w"]),
            ),
            (
                "tokenizer.ggml.eos_token_id",
                4,
                0u32.to_le_bytes().to_vec(),
            ),
        ];
        kv.into_iter().filter(|(k, _, _)| *k != skip).collect()
    }

    fn parse(kv: &[(&str, u32, Vec<u8>)]) -> Gguf {
        Gguf::parse(&file(kv, &[])).unwrap()
    }

    #[test]
    fn byte_level_bpe_encodes_and_decodes() {
        let t = Tokenizer::from_gguf(&parse(&bpe_kv(""))).unwrap();
        let hello = t.special_token("<|im_end|>").unwrap();
        assert_eq!(hello, 1);
        let ids = t.encode("hello<|im_end|>", true, true).unwrap();
        let texts: Vec<&str> = ids.iter().map(|i| t.token_text(*i).unwrap()).collect();
        assert_eq!(texts, ["hello", "<|im_end|>"]);
        // Without special parsing the control token is spelled out in bytes.
        let ids = t.encode("hello<|im_end|>", false, false).unwrap();
        assert!(!ids.contains(&1));
        assert_eq!(t.decode(&ids).unwrap(), "hello<|im_end|>");
        assert!(t.is_eog(0) && t.is_eog(1) && !t.is_eog(5));
        assert_eq!(t.eos(), Some(0));
        assert_eq!(t.bos(), None);
        let s = "héllo wörld 👋";
        let ids = t.encode(s, false, false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), s);
        let mut d = StreamDecoder::new(&t);
        let mut streamed = String::new();
        for id in &ids {
            let part = d.push(*id);
            assert!(!part.contains('\u{FFFD}'), "{part:?}");
            streamed.push_str(&part);
        }
        streamed.push_str(&d.finish());
        assert_eq!(streamed, s);
        assert!(t.decode(&[u32::MAX]).is_err());
    }

    #[test]
    fn missing_tokens_is_an_error_naming_the_key() {
        let e = Tokenizer::from_gguf(&parse(&bpe_kv("tokenizer.ggml.tokens"))).unwrap_err();
        assert_eq!(
            e,
            TokenizerError::MissingKey("tokenizer.ggml.tokens".into())
        );
        assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
    }

    #[test]
    fn missing_merges_is_an_error_naming_the_key() {
        let e = Tokenizer::from_gguf(&parse(&bpe_kv("tokenizer.ggml.merges"))).unwrap_err();
        assert!(e.to_string().contains("tokenizer.ggml.merges"), "{e}");
        // A merge that is not "a b", and one naming an unknown token.
        for bad_merge in ["hello", "zz qq"] {
            let mut kv = bpe_kv("");
            for (k, _, v) in kv.iter_mut() {
                if *k == "tokenizer.ggml.merges" {
                    *v = str_array(&[bad_merge]);
                }
            }
            let e = Tokenizer::from_gguf(&parse(&kv)).unwrap_err();
            assert!(e.to_string().contains("tokenizer.ggml.merges"), "{e}");
        }
    }

    #[test]
    fn bad_token_type_length_is_an_error_naming_the_key() {
        let mut kv = bpe_kv("");
        for (k, _, v) in kv.iter_mut() {
            if *k == "tokenizer.ggml.token_type" {
                *v = i32_array(&[1, 1, 1]);
            }
        }
        let e = Tokenizer::from_gguf(&parse(&kv)).unwrap_err();
        assert!(
            matches!(&e, TokenizerError::BadKey { key, .. } if key == "tokenizer.ggml.token_type"),
            "{e}"
        );
    }

    #[test]
    fn other_malformed_keys_are_errors() {
        let mut kv = bpe_kv("");
        kv.push((
            "tokenizer.ggml.bos_token_id",
            4,
            99999u32.to_le_bytes().to_vec(),
        ));
        let e = Tokenizer::from_gguf(&parse(&kv)).unwrap_err();
        assert!(e.to_string().contains("bos_token_id"), "{e}");
        let mut kv = bpe_kv("tokenizer.ggml.model");
        kv.push(("tokenizer.ggml.model", 8, s("bert")));
        assert!(matches!(
            Tokenizer::from_gguf(&parse(&kv)),
            Err(TokenizerError::UnsupportedModel(_))
        ));
        let mut kv = bpe_kv("tokenizer.ggml.tokens");
        kv.push(("tokenizer.ggml.tokens", 4, 3u32.to_le_bytes().to_vec()));
        let e = Tokenizer::from_gguf(&parse(&kv)).unwrap_err();
        assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
    }

    fn spm_kv(skip: &str) -> Vec<(&'static str, u32, Vec<u8>)> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0f32, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (i, p) in [
            "▁", "h", "e", "l", "o", "he", "ll", "hell", "hello", "▁hello",
        ]
        .iter()
        .enumerate()
        {
            tokens.push(p.to_string());
            types.push(1);
            scores.push(-(i as f32));
        }
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let kv = vec![
            ("tokenizer.ggml.model", 8, s("llama")),
            ("tokenizer.ggml.tokens", 9, str_array(&refs)),
            ("tokenizer.ggml.token_type", 9, i32_array(&types)),
            ("tokenizer.ggml.scores", 9, f32_array(&scores)),
            (
                "tokenizer.ggml.bos_token_id",
                4,
                1u32.to_le_bytes().to_vec(),
            ),
            (
                "tokenizer.ggml.eos_token_id",
                4,
                2u32.to_le_bytes().to_vec(),
            ),
        ];
        kv.into_iter().filter(|(k, _, _)| *k != skip).collect()
    }

    #[test]
    fn sentencepiece_bpe_with_byte_fallback() {
        let t = Tokenizer::from_gguf(&parse(&spm_kv(""))).unwrap();
        // Default for a "llama" vocabulary: BOS added, a space put in front.
        let ids = t.encode("hello", true, false).unwrap();
        let texts: Vec<&str> = ids.iter().map(|i| t.token_text(*i).unwrap()).collect();
        assert_eq!(texts, ["<s>", "▁hello"]);
        // "x" is not in the vocabulary: it falls back to its byte.
        let ids = t.encode("hello x", false, false).unwrap();
        let texts: Vec<&str> = ids.iter().map(|i| t.token_text(*i).unwrap()).collect();
        assert_eq!(texts, ["▁hello", "▁", "<0x78>"]);
        assert_eq!(t.decode(&ids).unwrap(), " hello x");
        assert_eq!(t.encode("</s>", false, true).unwrap(), [2]);
        assert!(t.encode("</s>", false, false).unwrap().len() > 1);
    }

    #[test]
    fn sentencepiece_needs_scores() {
        let e = Tokenizer::from_gguf(&parse(&spm_kv("tokenizer.ggml.scores"))).unwrap_err();
        assert_eq!(
            e,
            TokenizerError::MissingKey("tokenizer.ggml.scores".into())
        );
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let t = Tokenizer::from_gguf(&parse(&spm_kv(""))).unwrap();
        // "é" is C3 A9: byte tokens 3 + 0xC3 and 3 + 0xA9.
        let mut d = StreamDecoder::new(&t);
        assert_eq!(d.push(3 + 0xC3), "");
        assert_eq!(d.push(3 + 0xA9), "é");
        // A lone continuation byte can never become valid.
        assert_eq!(d.push(3 + 0xA9), "\u{FFFD}");
        assert_eq!(d.push(3 + 0xE2), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
