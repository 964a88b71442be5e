//! `lever data shard`: text files, folders and JSONL (`text` field) → llm.c token shards and a
//! manifest, as llm.c's `dev/data/fineweb.py` makes them: every document starts with the
//! end-of-text token, documents are encoded as plain text (`encode_ordinary`: a special token
//! written in a document is text, not a boundary), and a shard is full at `shard_tokens`
//! (documents run across shards).
//!
//! Streaming and parallel in bounded memory: inputs are read in pieces (`pieces.rs`, cut where
//! the tokenizer splits anyway), a batch of a few pieces per thread is encoded in parallel
//! (rayon, order kept) and written, then the next batch is read. The validation split is the
//! last `val_fraction` of the input bytes, cut as nanoGPT's `prepare.py` cuts its text
//! (`data[int(n*0.9):]`): exactly, inside a text file; at the document holding the cut, in
//! JSONL. The folder is written under a temporary name and renamed when complete.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::pieces::TextPieces;
use crate::shards::{
    Dtype, Manifest, ShardEntry, ShardWriter, Split, SplitTokens, TokenizerInfo, sha256_file,
};

/// Text bytes encoded per thread per batch (what is held in memory at once, with its ids).
const BATCH_BYTES_PER_THREAD: usize = 16 * crate::pieces::PIECE_BYTES;

#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// A tokenizer.json, or a folder holding one.
    pub tokenizer: PathBuf,
    /// The end-of-text special token.
    pub eot: String,
    pub val_fraction: f64,
    pub shard_tokens: u64,
}

/// Progress after each batch: input bytes done of the total, tokens written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardProgress {
    pub bytes: u64,
    pub total_bytes: u64,
    pub tokens: u64,
}

/// A file in a folder that was passed over, and why.
pub type Skipped = (PathBuf, String);

/// What was sharded: the manifest written, and files in folders that were passed over.
#[derive(Debug, Clone)]
pub struct Sharded {
    pub manifest: Manifest,
    pub skipped: Vec<Skipped>,
    /// Whether documents were encoded in pieces (the tokenizer allows it) or whole.
    pub piecewise: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Jsonl,
}

#[derive(Debug, Clone)]
struct Input {
    path: PathBuf,
    kind: Kind,
    size: u64,
}

/// One unit of encoding work: text, where it came from, whether a document starts with it.
struct Item {
    text: String,
    starts_doc: bool,
    split: Split,
    input: usize,
    line: usize,
}

/// Shard `inputs` into the folder `out` (written atomically; the caller checks it may be
/// replaced).
pub fn shard(
    inputs: &[PathBuf],
    out: &Path,
    opts: &ShardOptions,
    progress: &mut dyn FnMut(ShardProgress),
) -> Result<Sharded> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::Usage {
            what: "--val-fraction".into(),
            problem: format!("{} is not in [0, 1)", opts.val_fraction),
        });
    }
    if opts.shard_tokens == 0 || opts.shard_tokens > i32::MAX as u64 {
        return Err(Error::Usage {
            what: "--shard-tokens".into(),
            problem: format!(
                "{} is not in 1..=2^31-1 (llm.c's header)",
                opts.shard_tokens
            ),
        });
    }
    let (tokenizer, info) = load_tokenizer(&opts.tokenizer, &opts.eot)?;
    let (inputs_found, skipped) = collect_inputs(inputs)?;
    let total: u64 = inputs_found.iter().map(|i| i.size).sum();
    // nanoGPT: train = data[:int(n*0.9)]; the cast truncates as Python's int() does.
    let cut = ((total as f64) * (1.0 - opts.val_fraction)) as u64;
    let piecewise = piecewise_ok(&tokenizer);
    let dtype = Dtype::for_vocab(info.vocab_size);
    let mut manifest = Manifest {
        format: Manifest::FORMAT.into(),
        version: 1,
        tokenizer: info,
        dtype,
        tokens: SplitTokens::default(),
        documents: 0,
        val_fraction: opts.val_fraction,
        shard_tokens: opts.shard_tokens,
        shards: Vec::new(),
        inputs: inputs.iter().map(|p| p.display().to_string()).collect(),
    };
    lever_model::fsutil::write_atomic(out, |tmp| -> Result<()> {
        std::fs::create_dir_all(tmp).map_err(|source| Error::Io {
            path: out.into(),
            source,
        })?;
        let mut sinks = [
            Sink::new(tmp, Split::Train, dtype, opts.shard_tokens),
            Sink::new(tmp, Split::Val, dtype, opts.shard_tokens),
        ];
        let eot = manifest.tokenizer.eot_id;
        let batch_bytes = BATCH_BYTES_PER_THREAD * rayon::current_num_threads();
        let mut items = Items::new(&inputs_found, cut, piecewise);
        let mut tokens = 0u64;
        loop {
            let batch = items.next_batch(batch_bytes)?;
            if batch.is_empty() {
                break;
            }
            let encoded: Vec<Result<Vec<u32>>> = batch
                .par_iter()
                .map(|item| encode(&tokenizer, item, &inputs_found, &opts.tokenizer))
                .collect();
            for (item, ids) in batch.iter().zip(encoded) {
                let ids = ids?;
                let sink = &mut sinks[item.split as usize];
                if item.starts_doc {
                    manifest.documents += 1;
                    sink.push(&[eot])?;
                }
                sink.push(&ids)?;
                tokens += ids.len() as u64 + item.starts_doc as u64;
            }
            progress(ShardProgress {
                bytes: items.done_bytes(),
                total_bytes: total,
                tokens,
            });
        }
        if manifest.documents == 0 {
            let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::Usage {
                what: names.join(", "),
                problem: "no documents in these inputs".into(),
            });
        }
        for sink in sinks {
            let split = sink.split;
            let entries = sink.finish()?;
            let n: u64 = entries.iter().map(|e| e.tokens).sum();
            match split {
                Split::Train => manifest.tokens.train = n,
                Split::Val => manifest.tokens.val = n,
            }
            manifest.shards.extend(entries);
        }
        let json = serde_json::to_string_pretty(&manifest).unwrap_or_default();
        std::fs::write(tmp.join(Manifest::FILE), json + "\n").map_err(|source| Error::Io {
            path: out.join(Manifest::FILE),
            source,
        })
    })?;
    Ok(Sharded {
        manifest,
        skipped,
        piecewise,
    })
}

fn tokenizer_err(path: &Path, problem: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.into(),
        problem: problem.into(),
    }
}

/// Load `path` (a tokenizer.json or a folder holding one) for encoding documents as plain
/// text, and describe it for the manifest.
pub fn load_tokenizer(path: &Path, eot: &str) -> Result<(Tokenizer, TokenizerInfo)> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        return Err(tokenizer_err(&file, "no such tokenizer.json"));
    }
    let mut tokenizer = Tokenizer::from_file(&file)
        .map_err(|e| tokenizer_err(&file, format!("not a tokenizer.json: {e}")))?;
    let eot_id = tokenizer.token_to_id(eot).ok_or_else(|| {
        tokenizer_err(
            &file,
            format!(
                "has no end-of-text token `{eot}` (every document starts with it); train a \
                 tokenizer with it (`lever tokenizer train`), or name the one it has with --eot"
            ),
        )
    })?;
    // llm.c encodes documents with `encode_ordinary`: special tokens in the text are text.
    tokenizer.set_encode_special_tokens(true);
    let info = TokenizerInfo {
        path: file.display().to_string(),
        sha256: sha256_file(&file)?,
        vocab_size: tokenizer.get_vocab_size(true),
        eot: eot.into(),
        eot_id,
    };
    Ok((tokenizer, info))
}

/// Whether cutting a document where `pieces.rs` cuts leaves its ids unchanged: no normalizer,
/// and a pre-tokenizer made of byte-level (no prefix space), digit and regex splits — the
/// tokenizers of GPT-2, llama 3, Qwen2, SmolLM and lever's own. Otherwise each document is
/// encoded whole.
pub fn piecewise_ok(tokenizer: &Tokenizer) -> bool {
    fn ok(pre: &Value) -> bool {
        match pre.get("type").and_then(Value::as_str) {
            Some("ByteLevel") => pre.get("add_prefix_space") == Some(&Value::Bool(false)),
            Some("Split" | "Digits") => true,
            Some("Sequence") => pre
                .get("pretokenizers")
                .and_then(Value::as_array)
                .is_some_and(|v| !v.is_empty() && v.iter().all(ok)),
            _ => false,
        }
    }
    let normalizer = serde_json::to_value(tokenizer.get_normalizer()).unwrap_or(Value::Null);
    let pre = serde_json::to_value(tokenizer.get_pre_tokenizer()).unwrap_or(Value::Null);
    normalizer.is_null() && ok(&pre)
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn kind_of(p: &Path) -> Option<Kind> {
    let ext = p.extension()?.to_string_lossy().to_ascii_lowercase();
    match ext.as_str() {
        "jsonl" => Some(Kind::Jsonl),
        "txt" | "text" | "md" => Some(Kind::Text),
        _ => None,
    }
}

/// The files to read, in order: named files as given (`.jsonl` is JSONL, anything else text),
/// folders walked in name order for `.txt`, `.text`, `.md` and `.jsonl` files. Files in folders
/// that are empty or of another kind are skipped and listed; a named empty file is an error.
fn collect_inputs(inputs: &[PathBuf]) -> Result<(Vec<Input>, Vec<Skipped>)> {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for p in inputs {
        let meta = std::fs::metadata(p).map_err(|source| Error::Io {
            path: p.clone(),
            source,
        })?;
        if meta.is_dir() {
            walk(p, &mut found, &mut skipped)?;
        } else if meta.len() == 0 {
            return Err(Error::Dataset {
                path: p.clone(),
                problem: "empty file".into(),
            });
        } else {
            found.push(Input {
                path: p.clone(),
                kind: kind_of(p)
                    .filter(|k| *k == Kind::Jsonl)
                    .unwrap_or(Kind::Text),
                size: meta.len(),
            });
        }
    }
    if found.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::Usage {
            what: names.join(", "),
            problem: "no .txt, .md or .jsonl files with text in them".into(),
        });
    }
    Ok((found, skipped))
}

fn walk(dir: &Path, found: &mut Vec<Input>, skipped: &mut Vec<Skipped>) -> Result<()> {
    let io = |source| Error::Io {
        path: dir.into(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(io)?;
    entries.sort();
    for p in entries {
        if is_hidden(&p) {
            continue;
        }
        let meta = std::fs::metadata(&p).map_err(|source| Error::Io {
            path: p.clone(),
            source,
        })?;
        if meta.is_dir() {
            walk(&p, found, skipped)?;
        } else if let Some(kind) = kind_of(&p) {
            if meta.len() == 0 {
                skipped.push((p, "empty".into()));
            } else {
                found.push(Input {
                    path: p,
                    kind,
                    size: meta.len(),
                });
            }
        } else {
            skipped.push((p, "not .txt, .text, .md or .jsonl".into()));
        }
    }
    Ok(())
}

/// The work items of every input in order, with their split.
struct Items<'a> {
    inputs: &'a [Input],
    /// Global byte offset where validation starts.
    cut: u64,
    /// Bytes of the inputs before the current one.
    base: u64,
    next_input: usize,
    current: Option<Reader>,
    piecewise: bool,
}

enum Reader {
    Text(TextPieces<std::fs::File>, bool),
    Jsonl(std::io::BufReader<std::fs::File>, usize, u64),
}

impl<'a> Items<'a> {
    fn new(inputs: &'a [Input], cut: u64, piecewise: bool) -> Self {
        Self {
            inputs,
            cut,
            base: 0,
            next_input: 0,
            current: None,
            piecewise,
        }
    }

    fn done_bytes(&self) -> u64 {
        self.base
            + match &self.current {
                Some(Reader::Text(p, _)) => p.offset(),
                Some(Reader::Jsonl(_, _, offset)) => *offset,
                None => 0,
            }
    }

    /// Items of about `bytes` bytes of text in all (fewer at the end; none when done).
    fn next_batch(&mut self, bytes: usize) -> Result<Vec<Item>> {
        let mut batch = Vec::new();
        let mut size = 0;
        while size < bytes {
            let Some(items) = self.next_items()? else {
                break;
            };
            size += items.iter().map(|i| i.text.len()).sum::<usize>();
            batch.extend(items);
        }
        Ok(batch)
    }

    /// The next one or two items (two when the validation cut falls inside a piece).
    fn next_items(&mut self) -> Result<Option<Vec<Item>>> {
        loop {
            if self.current.is_none() {
                let Some(input) = self.inputs.get(self.next_input) else {
                    return Ok(None);
                };
                let file = std::fs::File::open(&input.path).map_err(|source| Error::Io {
                    path: input.path.clone(),
                    source,
                })?;
                self.current = Some(match input.kind {
                    Kind::Text => {
                        // Whole documents when the tokenizer cannot encode them in pieces.
                        let target = if self.piecewise {
                            crate::pieces::PIECE_BYTES
                        } else {
                            usize::MAX / 2
                        };
                        Reader::Text(TextPieces::new(&input.path, file, target), true)
                    }
                    Kind::Jsonl => Reader::Jsonl(std::io::BufReader::new(file), 0, 0),
                });
                self.next_input += 1;
            }
            let input = self.next_input - 1;
            let path = &self.inputs[input].path;
            let (base, cut) = (self.base, self.cut);
            let got = match self.current.as_mut() {
                Some(Reader::Text(pieces, first)) => match pieces.next() {
                    Some(piece) => {
                        let p = piece?;
                        let starts_doc = std::mem::replace(first, false);
                        Some(split_piece(
                            p.text,
                            starts_doc,
                            base + p.offset,
                            cut,
                            input,
                            p.line,
                        ))
                    }
                    None => None,
                },
                Some(Reader::Jsonl(reader, line, offset)) => {
                    next_jsonl(reader, path, line, offset)?.map(|(text, line, end)| {
                        let split = if base + end > cut {
                            Split::Val
                        } else {
                            Split::Train
                        };
                        vec![Item {
                            text,
                            starts_doc: true,
                            split,
                            input,
                            line,
                        }]
                    })
                }
                None => None,
            };
            match got {
                Some(items) => return Ok(Some(items)),
                None => {
                    self.base += self.inputs[input].size;
                    self.current = None;
                }
            }
        }
    }
}

/// A piece of a text file starting `start` bytes into the inputs, split at `cut`.
fn split_piece(
    text: String,
    starts_doc: bool,
    start: u64,
    cut: u64,
    input: usize,
    line: usize,
) -> Vec<Item> {
    let end = start + text.len() as u64;
    let item = |text: String, starts_doc, split, line| Item {
        text,
        starts_doc,
        split,
        input,
        line,
    };
    if end <= cut {
        return vec![item(text, starts_doc, Split::Train, line)];
    }
    if start >= cut {
        return vec![item(text, starts_doc, Split::Val, line)];
    }
    let mut at = (cut - start) as usize;
    while !text.is_char_boundary(at) {
        at += 1;
    }
    let val_line = line + text[..at].matches('\n').count();
    let val = text[at..].to_string();
    let mut train = text;
    train.truncate(at);
    vec![
        item(train, starts_doc, Split::Train, line),
        item(val, false, Split::Val, val_line),
    ]
}

/// The next document of a JSONL file: its `text`, line number, and the byte offset after it.
fn next_jsonl(
    reader: &mut std::io::BufReader<std::fs::File>,
    path: &Path,
    line: &mut usize,
    offset: &mut u64,
) -> Result<Option<(String, usize, u64)>> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| Error::Io {
                path: path.into(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        *line += 1;
        *offset += n as u64;
        let bytes = if *line == 1 {
            buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&buf)
        } else {
            &buf
        };
        let text = std::str::from_utf8(bytes).map_err(|e| Error::Text {
            path: path.into(),
            line: *line,
            problem: format!(
                "byte 0x{:02X} at column {} is not UTF-8",
                bytes[e.valid_up_to()],
                e.valid_up_to() + 1
            ),
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.into(),
            line: *line,
            message: e.to_string(),
        })?;
        let field = |problem: &str| Error::Field {
            path: path.into(),
            line: *line,
            field: "text".into(),
            problem: problem.into(),
        };
        return match value.get("text") {
            Some(Value::String(s)) => Ok(Some((s.clone(), *line, *offset))),
            Some(_) => Err(field("not a string")),
            None if value.is_object() => Err(field("missing")),
            None => Err(field("missing (the line is not a JSON object)")),
        };
    }
}

/// Encode one item; a character the vocabulary lacks is named with its line.
fn encode(
    tokenizer: &Tokenizer,
    item: &Item,
    inputs: &[Input],
    tok_path: &Path,
) -> Result<Vec<u32>> {
    match tokenizer.encode_fast(item.text.as_str(), false) {
        Ok(enc) => Ok(enc.get_ids().to_vec()),
        Err(e) => {
            let path = inputs[item.input].path.clone();
            let mut line = item.line;
            for c in item.text.chars() {
                let mut buf = [0u8; 4];
                if tokenizer
                    .encode_fast(&*c.encode_utf8(&mut buf), false)
                    .is_err()
                {
                    return Err(Error::Text {
                        path,
                        line,
                        problem: format!(
                            "character {c:?} (U+{:04X}) is not in the vocabulary of {}",
                            c as u32,
                            tok_path.display()
                        ),
                    });
                }
                line += (c == '\n') as usize;
            }
            Err(Error::Text {
                path,
                line: item.line,
                problem: format!("encoding with {}: {e}", tok_path.display()),
            })
        }
    }
}

/// The shards of one split: a new file every `shard_tokens` tokens.
struct Sink {
    dir: PathBuf,
    split: Split,
    dtype: Dtype,
    shard_tokens: u64,
    current: Option<ShardWriter>,
    entries: Vec<ShardEntry>,
}

impl Sink {
    fn new(dir: &Path, split: Split, dtype: Dtype, shard_tokens: u64) -> Self {
        Self {
            dir: dir.into(),
            split,
            dtype,
            shard_tokens,
            current: None,
            entries: Vec::new(),
        }
    }

    fn file_name(&self) -> String {
        format!("{}_{:06}.bin", self.split.name(), self.entries.len())
    }

    fn push(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            let writer = match &mut self.current {
                Some(w) => w,
                None => {
                    let path = self.dir.join(self.file_name());
                    self.current.insert(ShardWriter::create(&path, self.dtype)?)
                }
            };
            let room = (self.shard_tokens - writer.tokens()) as usize;
            let n = room.min(ids.len());
            writer.push(&ids[..n])?;
            ids = &ids[n..];
            if writer.tokens() == self.shard_tokens {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            let file = self.file_name();
            let tokens = w.finish()?;
            self.entries.push(ShardEntry {
                file,
                split: self.split,
                tokens,
            });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ShardEntry>> {
        self.close()?;
        Ok(self.entries)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::str::FromStr;

    use super::*;
    use crate::shards::ShardSet;
    use crate::tokenizer_train::{self, END_OF_TEXT, Kind, TrainOptions};

    /// A tokenizer trained on `text`, written to `dir/tok`.
    fn tokenizer(dir: &Path, kind: Kind, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let corpus = dir.join("corpus.txt");
        std::fs::write(&corpus, text).unwrap();
        let opts = TrainOptions {
            kind,
            vocab_size: (kind == Kind::Bpe).then_some(270),
            min_frequency: 0,
            special: vec![END_OF_TEXT.into()],
        };
        let t = tokenizer_train::train(&[corpus], &opts, &|_| {}).unwrap();
        t.write(&dir.join("tok")).unwrap();
        dir.join("tok/tokenizer.json")
    }

    #[test]
    fn pieces_are_used_only_where_they_cannot_change_the_ids() {
        let dir = tempfile::tempdir().unwrap();
        let bpe = tokenizer(dir.path(), Kind::Bpe, "one two three\nfour five\n");
        let (tok, _) = load_tokenizer(&bpe, END_OF_TEXT).unwrap();
        assert!(piecewise_ok(&tok));
        let json = std::fs::read_to_string(&bpe).unwrap();
        let mut v: Value = serde_json::from_str(&json).unwrap();
        v["pre_tokenizer"]["add_prefix_space"] = Value::Bool(true);
        let prefixed = Tokenizer::from_str(&v.to_string()).unwrap();
        assert!(!piecewise_ok(&prefixed));
        let mut v: Value = serde_json::from_str(&json).unwrap();
        v["normalizer"] = serde_json::json!({"type": "NFC"});
        assert!(!piecewise_ok(&Tokenizer::from_str(&v.to_string()).unwrap()));
        let mut v: Value = serde_json::from_str(&json).unwrap();
        v["pre_tokenizer"] = serde_json::json!({
            "type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true
        });
        assert!(!piecewise_ok(&Tokenizer::from_str(&v.to_string()).unwrap()));
        let chars = tokenizer(&dir.path().join("c"), Kind::Char, "abc\n");
        assert!(piecewise_ok(
            &load_tokenizer(&chars, END_OF_TEXT).unwrap().0
        ));
    }

    #[test]
    fn jsonl_validation_starts_at_the_document_holding_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path(), Kind::Char, "abcdefghij\n");
        // Ten lines of 13 bytes: `{"text":"a"}` + newline.
        let lines: String = "abcdefghij"
            .chars()
            .map(|c| format!("{{\"text\":\"{c}\"}}\n"))
            .collect();
        let data = dir.path().join("docs.jsonl");
        std::fs::write(&data, &lines).unwrap();
        let opts = ShardOptions {
            tokenizer: tok,
            eot: END_OF_TEXT.into(),
            val_fraction: 0.25,
            shard_tokens: 5,
        };
        let out = dir.path().join("shards");
        let done = shard(&[data], &out, &opts, &mut |_| {}).unwrap();
        // The cut is at byte int(130 * 0.75) = 97, inside line 8 (bytes 91..104): lines 8-10
        // are validation. Each document is [eot, letter]; the vocabulary is "\n" a..j eot.
        let m = &done.manifest;
        assert_eq!((m.documents, m.tokens.train, m.tokens.val), (10, 14, 6));
        let set = ShardSet::open(&out).unwrap();
        assert_eq!(set.read_all(Split::Val).unwrap(), [11, 8, 11, 9, 11, 10]);
        // Shards of 5 tokens: 14 → 5 + 5 + 4.
        let sizes: Vec<u64> = set.train.iter().map(|s| s.tokens).collect();
        assert_eq!(sizes, [5, 5, 4]);
        assert!(done.skipped.is_empty() && done.piecewise);
    }
}
