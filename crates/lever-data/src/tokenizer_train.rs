//! Tokenizer training, as `lever tokenizer train` runs it.
//!
//! - Byte-level BPE (GPT-2's scheme, Sennrich et al. 2016 with Radford et al. 2019's byte
//!   alphabet) learned by the `tokenizers` crate's own `BpeTrainer`: the ByteLevel
//!   pre-tokenizer (GPT-2's regex, no prefix space, as tiktoken's `gpt2` encoding) and decoder,
//!   the 256 byte symbols always in the vocabulary, the special tokens first.
//! - A character vocabulary, as nanoGPT's `data/shakespeare_char/prepare.py` builds it: every
//!   distinct character of the corpus in code-point order (ids 0…n-1, the same ids nanoGPT
//!   gives), then the special tokens. A WordLevel model over a one-character split, so
//!   Hugging Face `tokenizers` loads it too; a character outside the vocabulary is an error
//!   when encoding, not an unknown token.
//!
//! The corpus is streamed in pieces (`pieces.rs`) and counted in parallel; training is
//! deterministic (the same corpus and options give the same `tokenizer.json`, byte for byte).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde_json::json;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    SplitDelimiterBehavior, Tokenizer, Trainer,
};

use crate::error::{Error, Result};
use crate::pieces::TextPieces;

/// The end-of-text token every document starts with (GPT-2's name for it).
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// The byte-level alphabet: every byte is a symbol, so any text can be encoded.
pub const BYTE_ALPHABET: usize = 256;
/// One character per pre-token. `[\s\S]` rather than `.`: Oniguruma (Python) and
/// fancy-regex (Rust) agree on it without flags.
const ONE_CHAR: &str = r"[\s\S]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bpe,
    Char,
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub kind: Kind,
    /// The vocabulary size, special tokens included. Required for BPE; for characters it is
    /// the corpus's (checked when given).
    pub vocab_size: Option<usize>,
    /// A pair is merged only when it occurs at least this often (BPE).
    pub min_frequency: u64,
    /// The special tokens; the first is the end-of-text token.
    pub special: Vec<String>,
}

impl TrainOptions {
    fn check(&self, files: &[PathBuf]) -> Result<()> {
        let usage = |what: &str, problem: String| Error::Usage {
            what: what.into(),
            problem,
        };
        if files.is_empty() {
            return Err(usage("FILE", "no corpus files given".into()));
        }
        if self.special.is_empty() {
            return Err(usage(
                "--special",
                "an end-of-text token is required".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for s in &self.special {
            if s.is_empty() || !seen.insert(s.as_str()) {
                return Err(usage(
                    "--special",
                    format!("special token {s:?} is empty or repeated"),
                ));
            }
        }
        match (self.kind, self.vocab_size) {
            (Kind::Bpe, None) => Err(usage("--vocab-size", "required for --kind bpe".into())),
            (Kind::Bpe, Some(n)) if n < BYTE_ALPHABET + self.special.len() => Err(usage(
                "--vocab-size",
                format!(
                    "{n} is smaller than the byte-level alphabet: {BYTE_ALPHABET} bytes + {} \
                     special token(s) = {}",
                    self.special.len(),
                    BYTE_ALPHABET + self.special.len()
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// What a long training reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainEvent {
    /// Corpus bytes read so far, of `total`.
    Read { bytes: u64, total: u64 },
    /// Reading is done; merges are being learned (BPE).
    Merging { words: usize },
}

/// A trained tokenizer: the files a tokenizer folder holds, and what went into them.
#[derive(Debug, Clone)]
pub struct Trained {
    /// `tokenizer.json` (Hugging Face's format).
    pub tokenizer_json: String,
    /// `tokenizer_config.json`: the end-of-text token as BOS and EOS, as GPT-2's.
    pub tokenizer_config_json: String,
    pub vocab_size: usize,
    /// Base symbols: 256 bytes (BPE) or the corpus's distinct characters.
    pub alphabet: usize,
    pub merges: usize,
    /// Corpus bytes read.
    pub bytes: u64,
    pub eot_id: u32,
}

impl Trained {
    /// Write `dir/tokenizer.json` and `dir/tokenizer_config.json`; the folder appears whole
    /// (lever_model::fsutil::write_atomic) or not at all.
    pub fn write(&self, dir: &Path) -> Result<()> {
        lever_model::fsutil::write_atomic(dir, |tmp| -> Result<()> {
            let io = |name: &str| {
                let path = dir.join(name);
                move |source| Error::Io { path, source }
            };
            std::fs::create_dir_all(tmp).map_err(io(""))?;
            std::fs::write(tmp.join("tokenizer.json"), &self.tokenizer_json)
                .map_err(io("tokenizer.json"))?;
            std::fs::write(
                tmp.join("tokenizer_config.json"),
                &self.tokenizer_config_json,
            )
            .map_err(io("tokenizer_config.json"))
        })
    }
}

/// Train a tokenizer on `files` (UTF-8 text). `progress` gets reading and merging events;
/// it may be called from several threads.
pub fn train(
    files: &[PathBuf],
    opts: &TrainOptions,
    progress: &(dyn Fn(TrainEvent) + Sync),
) -> Result<Trained> {
    opts.check(files)?;
    let mut total = 0;
    for f in files {
        let len = std::fs::metadata(f)
            .map_err(|source| Error::Io {
                path: f.clone(),
                source,
            })?
            .len();
        if len == 0 {
            return Err(dataset(f, "empty file: there is no text to train on"));
        }
        total += len;
    }
    let corpus = Corpus::new(files, total);
    let tokenizer = match opts.kind {
        Kind::Bpe => train_bpe(&corpus, opts, progress)?,
        Kind::Char => train_char(&corpus, opts, progress)?,
    };
    let eot = &opts.special[0];
    let eot_id = tokenizer
        .token_to_id(eot)
        .ok_or_else(|| dataset(&files[0], &format!("{eot} missing after training")))?;
    let vocab_size = tokenizer.get_vocab_size(true);
    let (alphabet, merges) = match opts.kind {
        Kind::Bpe => (
            BYTE_ALPHABET,
            vocab_size.saturating_sub(BYTE_ALPHABET + opts.special.len()),
        ),
        Kind::Char => (vocab_size.saturating_sub(opts.special.len()), 0),
    };
    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| dataset(&files[0], &format!("writing tokenizer.json: {e}")))?;
    let tokenizer_config_json = serde_json::to_string_pretty(&json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "clean_up_tokenization_spaces": false,
    }))
    .unwrap_or_default();
    Ok(Trained {
        tokenizer_json,
        tokenizer_config_json,
        vocab_size,
        alphabet,
        merges,
        bytes: corpus.read.load(Ordering::Relaxed),
        eot_id,
    })
}

fn dataset(path: &Path, problem: &str) -> Error {
    Error::Dataset {
        path: path.into(),
        problem: problem.into(),
    }
}

/// The corpus as one stream of text pieces, shared by the threads that count it. The first
/// error (a bad byte, a failed read) ends the stream and is kept.
struct Corpus<'a> {
    files: &'a [PathBuf],
    total: u64,
    read: AtomicU64,
    error: Mutex<Option<Error>>,
}

impl<'a> Corpus<'a> {
    fn new(files: &'a [PathBuf], total: u64) -> Self {
        Self {
            files,
            total,
            read: AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }

    /// The pieces of every file in order, reporting bytes read.
    fn pieces<'s>(
        &'s self,
        progress: &'s (dyn Fn(TrainEvent) + Sync),
    ) -> impl Iterator<Item = String> + Send + 's {
        let mut files = self.files.iter();
        let mut current: Option<TextPieces<std::fs::File>> = None;
        std::iter::from_fn(move || {
            loop {
                if current.is_none() {
                    let f = files.next()?;
                    match TextPieces::open(f) {
                        Ok(p) => current = Some(p),
                        Err(e) => return self.fail(e),
                    }
                }
                let pieces = current.as_mut()?;
                match pieces.next() {
                    Some(Ok(p)) => {
                        let len = p.text.len() as u64;
                        let n = self.read.fetch_add(len, Ordering::Relaxed);
                        progress(TrainEvent::Read {
                            bytes: n + len,
                            total: self.total,
                        });
                        return Some(p.text);
                    }
                    Some(Err(e)) => return self.fail(e),
                    None => current = None,
                }
            }
        })
    }

    fn fail(&self, e: Error) -> Option<String> {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
        None
    }

    /// The first error met while reading, or an error when no text at all was read.
    fn finish(&self) -> Result<()> {
        if let Some(e) = self.error.lock().ok().and_then(|mut e| e.take()) {
            return Err(e);
        }
        if self.read.load(Ordering::Relaxed) == 0 {
            let names: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
            return Err(dataset(
                &self.files[0],
                &format!("the corpus ({}) holds no text", names.join(", ")),
            ));
        }
        Ok(())
    }
}

fn hf_error(corpus: &Corpus, what: &str, e: impl std::fmt::Display) -> Error {
    dataset(&corpus.files[0], &format!("{what}: {e}"))
}

fn train_bpe(
    corpus: &Corpus,
    opts: &TrainOptions,
    progress: &(dyn Fn(TrainEvent) + Sync),
) -> Result<Tokenizer> {
    // GPT-2's pre-tokenization: its regex, then bytes as printable symbols; no prefix space.
    let byte_level = ByteLevel::new(false, true, true);
    let specials: Vec<AddedToken> = opts
        .special
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    let mut trainer = BpeTrainer::builder()
        .vocab_size(opts.vocab_size.unwrap_or(0))
        .min_frequency(opts.min_frequency)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    // Feed the trainer ourselves (what `Tokenizer::train` does), so that a bad byte stops
    // the run before the merges are learned.
    trainer
        .feed(corpus.pieces(progress), |text| {
            let mut pre = PreTokenizedString::from(text);
            byte_level.pre_tokenize(&mut pre)?;
            Ok(pre
                .get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(s, _, _)| s.to_owned())
                .collect())
        })
        .map_err(|e| hf_error(corpus, "counting words", e))?;
    corpus.finish()?;
    progress(TrainEvent::Merging {
        words: trainer.get_word_count(),
    });
    let mut model = BPE::default();
    let added = trainer
        .train(&mut model)
        .map_err(|e| hf_error(corpus, "learning merges", e))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(byte_level));
    tokenizer
        .add_special_tokens(added)
        .map_err(|e| hf_error(corpus, "adding the special tokens", e))?;
    Ok(tokenizer)
}

fn train_char(
    corpus: &Corpus,
    opts: &TrainOptions,
    progress: &(dyn Fn(TrainEvent) + Sync),
) -> Result<Tokenizer> {
    let chars: BTreeSet<char> = corpus
        .pieces(progress)
        .par_bridge()
        .map(|text| text.chars().collect::<BTreeSet<char>>())
        .reduce(BTreeSet::new, |mut a, b| {
            a.extend(b);
            a
        });
    corpus.finish()?;
    let n = chars.len() + opts.special.len();
    if let Some(asked) = opts.vocab_size.filter(|&v| v != n) {
        let which = if asked < n { "smaller" } else { "larger" };
        return Err(Error::Usage {
            what: "--vocab-size".into(),
            problem: format!(
                "{asked} is {which} than this corpus's character vocabulary: {} characters + \
                 {} special token(s) = {n} (leave --vocab-size out for --kind char)",
                chars.len(),
                opts.special.len()
            ),
        });
    }
    for s in &opts.special {
        if s.chars().count() == 1 && chars.contains(&s.chars().next().unwrap_or_default()) {
            return Err(Error::Usage {
                what: "--special".into(),
                problem: format!("{s:?} is a character of the corpus"),
            });
        }
    }
    // nanoGPT: `chars = sorted(list(set(data)))`, `stoi = {ch: i}`; the special tokens follow.
    let vocab: serde_json::Map<String, serde_json::Value> = chars
        .iter()
        .map(|c| c.to_string())
        .chain(opts.special.iter().cloned())
        .enumerate()
        .map(|(i, s)| (s, json!(i)))
        .collect();
    // No unknown token in the vocabulary: encoding a character it lacks fails.
    // (From text: WordLevel's deserializer borrows its strings.)
    let model: WordLevel = serde_json::from_str(
        &json!({"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}).to_string(),
    )
    .map_err(|e| hf_error(corpus, "building the vocabulary", e))?;
    let split = Split::new(
        SplitPattern::Regex(ONE_CHAR.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| hf_error(corpus, "building the pre-tokenizer", e))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_pre_tokenizer(Some(split))
        .with_decoder(Some(Fuse::new()));
    let specials: Vec<AddedToken> = opts
        .special
        .iter()
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| hf_error(corpus, "adding the special tokens", e))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::str::FromStr;

    use super::*;

    fn corpus(dir: &Path, name: &str, text: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn opts(kind: Kind, vocab_size: Option<usize>) -> TrainOptions {
        TrainOptions {
            kind,
            vocab_size,
            min_frequency: 0,
            special: vec![END_OF_TEXT.into()],
        }
    }

    #[test]
    fn a_char_vocabulary_is_nanogpts_then_the_specials() {
        let dir = tempfile::tempdir().unwrap();
        let f = corpus(dir.path(), "a.txt", "hello world\nhé!".as_bytes());
        let t = train(&[f], &opts(Kind::Char, None), &|_| {}).unwrap();
        let tok = Tokenizer::from_str(&t.tokenizer_json).unwrap();
        // sorted(set(data)) = "\n", " ", "!", "d", "e", "h", "l", "o", "r", "w", "é"
        assert_eq!(t.vocab_size, 12);
        assert_eq!((t.alphabet, t.eot_id), (11, 11));
        let ids = tok.encode("hé\nlo<|endoftext|>", false).unwrap();
        assert_eq!(ids.get_ids(), &[5, 10, 0, 6, 7, 11]);
        assert_eq!(tok.decode(&[5, 10, 0, 6, 7], false).unwrap(), "hé\nlo");
        assert!(tok.encode("z", false).is_err());
    }

    /// Regression: lever read every token of a non-byte-level vocabulary as SentencePiece's,
    /// so a character vocabulary's `▁` decoded as a space.
    #[test]
    fn lever_decodes_a_char_vocabulary_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let f = corpus(dir.path(), "a.txt", "a\u{2581}b <0x41>".as_bytes());
        let t = train(&[f], &opts(Kind::Char, None), &|_| {}).unwrap();
        t.write(&dir.path().join("tok")).unwrap();
        let tok = lever_model::Tokenizer::from_file(
            &dir.path().join("tok/tokenizer.json"),
            None,
            Some(END_OF_TEXT),
        )
        .unwrap();
        let text = "b\u{2581}a <0x41><|endoftext|>";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids.len(), 11);
        assert_eq!(tok.decode(&ids), text);
        assert_eq!(tok.eos(), Some(t.eot_id));
    }

    #[test]
    fn bpe_refuses_a_vocabulary_smaller_than_its_alphabet() {
        let dir = tempfile::tempdir().unwrap();
        let f = corpus(dir.path(), "a.txt", b"some text");
        let e = train(&[f], &opts(Kind::Bpe, Some(256)), &|_| {}).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--vocab-size: 256 is smaller than the byte-level alphabet: 256 bytes + 1 special \
             token(s) = 257"
        );
    }

    #[test]
    fn bad_corpora_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = corpus(dir.path(), "empty.txt", b"");
        let e = train(&[empty], &opts(Kind::Bpe, Some(300)), &|_| {}).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("empty.txt: empty file: there is no text to train on")
        );
        let bad = corpus(dir.path(), "bad.txt", b"fine\nfine\nnot \xC3\x28 fine\n");
        let e = train(&[bad], &opts(Kind::Char, None), &|_| {}).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("bad.txt:3: byte 0xC3 at column 5 is not UTF-8"),
            "{e}"
        );
        let bom = corpus(dir.path(), "bom.txt", b"\xEF\xBB\xBF");
        let e = train(&[bom], &opts(Kind::Bpe, Some(300)), &|_| {}).unwrap_err();
        assert!(e.to_string().contains("holds no text"), "{e}");
    }
}
