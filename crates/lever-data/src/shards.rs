//! Token shards, as pretraining reads them.
//!
//! llm.c's format (`dev/data/data_common.py` `write_datafile`, read by `llmc/dataloader.h`):
//! a header of 256 little-endian int32 — magic, version, token count, the rest zero — then the
//! tokens: magic 20240520, version 1 with uint16 tokens (GPT-2-sized vocabularies), magic
//! 20240801, version 7 with uint32 tokens (llama-3-sized ones). nanoGPT's `train.bin` and
//! `val.bin` (`data/*/prepare.py`) are the uint16 tokens alone, no header.
//!
//! A folder `lever data shard` writes holds `train_NNNNNN.bin`, `val_NNNNNN.bin` and
//! `manifest.json`: the tokenizer (its sha256, so shards made with another tokenizer are
//! refused by name), the vocabulary size, the end-of-text id and every shard with its split and
//! token count. [`ShardSet::open`] reads such a folder, a folder of llm.c shards (split by
//! `val` in the file name), or nanoGPT's pair.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const HEADER_INTS: usize = 256;
pub const HEADER_BYTES: u64 = (HEADER_INTS * 4) as u64;
/// llm.c's GPT-2 shards: uint16 tokens.
pub const MAGIC_U16: i32 = 20240520;
pub const VERSION_U16: i32 = 1;
/// llm.c's llama-3 shards: uint32 tokens.
pub const MAGIC_U32: i32 = 20240801;
pub const VERSION_U32: i32 = 7;

fn shard_err(path: &Path, problem: impl Into<String>) -> Error {
    Error::Shard {
        path: path.into(),
        problem: problem.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.into(),
        source,
    }
}

/// How tokens are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    #[serde(rename = "uint16")]
    U16,
    #[serde(rename = "uint32")]
    U32,
}

impl Dtype {
    /// uint16 while every id fits (a vocabulary of at most 65,536), else uint32.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }

    fn magic_version(self) -> (i32, i32) {
        match self {
            Dtype::U16 => (MAGIC_U16, VERSION_U16),
            Dtype::U32 => (MAGIC_U32, VERSION_U32),
        }
    }

    fn decode(self, bytes: &[u8]) -> Vec<u32> {
        match self {
            Dtype::U16 => bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect(),
            Dtype::U32 => bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

/// Writes one llm.c shard: a zero header, the tokens, then the header with the count.
pub struct ShardWriter {
    path: PathBuf,
    file: BufWriter<File>,
    dtype: Dtype,
    tokens: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, dtype: Dtype) -> Result<Self> {
        let file = File::create(path).map_err(io_err(path))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&[0u8; HEADER_BYTES as usize])
            .map_err(io_err(path))?;
        Ok(Self {
            path: path.into(),
            file,
            dtype,
            tokens: 0,
        })
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Append `ids`; an id the shard's type cannot hold is an error.
    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        if self.tokens + ids.len() as u64 > i32::MAX as u64 {
            return Err(shard_err(
                &self.path,
                "more than 2^31-1 tokens in one shard",
            ));
        }
        let mut bytes = Vec::with_capacity(ids.len() * self.dtype.bytes() as usize);
        for &id in ids {
            match self.dtype {
                Dtype::U16 => {
                    let id = u16::try_from(id).map_err(|_| {
                        shard_err(&self.path, format!("token id {id} does not fit uint16"))
                    })?;
                    bytes.extend_from_slice(&id.to_le_bytes());
                }
                Dtype::U32 => bytes.extend_from_slice(&id.to_le_bytes()),
            }
        }
        self.file.write_all(&bytes).map_err(io_err(&self.path))?;
        self.tokens += ids.len() as u64;
        Ok(())
    }

    /// Write the header and flush; the token count.
    pub fn finish(self) -> Result<u64> {
        let path = self.path;
        let mut file = self.file.into_inner().map_err(|e| Error::Io {
            path: path.clone(),
            source: e.into_error(),
        })?;
        let (magic, version) = self.dtype.magic_version();
        let mut header = [0i32; HEADER_INTS];
        header[0] = magic;
        header[1] = version;
        header[2] = self.tokens as i32;
        let bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
        file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        file.write_all(&bytes).map_err(io_err(&path))?;
        file.flush().map_err(io_err(&path))?;
        Ok(self.tokens)
    }
}

/// Write `ids` as one llm.c shard at `path`.
pub fn write_shard(path: &Path, dtype: Dtype, ids: &[u32]) -> Result<()> {
    let mut w = ShardWriter::create(path, dtype)?;
    w.push(ids)?;
    w.finish().map(|_| ())
}

/// One file of tokens, read on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub path: PathBuf,
    pub dtype: Dtype,
    pub tokens: u64,
    /// Where the tokens start: after llm.c's header, or 0 for nanoGPT's files.
    data_offset: u64,
}

impl Shard {
    /// An llm.c shard: the header is checked against the file's size.
    pub fn open(path: &Path) -> Result<Shard> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let size = file.metadata().map_err(io_err(path))?.len();
        if size < HEADER_BYTES {
            return Err(shard_err(
                path,
                format!("{size} bytes, shorter than llm.c's {HEADER_BYTES}-byte header"),
            ));
        }
        let mut header = [0u8; 12];
        file.read_exact(&mut header).map_err(io_err(path))?;
        let int =
            |i: usize| i32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let dtype = match (int(0), int(4)) {
            (MAGIC_U16, VERSION_U16) => Dtype::U16,
            (MAGIC_U32, VERSION_U32) => Dtype::U32,
            (magic, version) => {
                return Err(shard_err(
                    path,
                    format!(
                        "not an llm.c shard: magic {magic} version {version} (expected \
                         {MAGIC_U16} v{VERSION_U16} or {MAGIC_U32} v{VERSION_U32})"
                    ),
                ));
            }
        };
        let count = int(8);
        let expected = u64::try_from(count)
            .ok()
            .map(|n| HEADER_BYTES + n * dtype.bytes());
        if expected != Some(size) {
            return Err(shard_err(
                path,
                format!(
                    "the header says {count} tokens ({} bytes with the header) but the file has \
                     {size} bytes",
                    expected.map_or("?".into(), |e| e.to_string())
                ),
            ));
        }
        Ok(Shard {
            path: path.into(),
            dtype,
            tokens: count as u64,
            data_offset: HEADER_BYTES,
        })
    }

    /// nanoGPT's headerless uint16 file (`train.bin`, `val.bin`).
    pub fn open_headerless(path: &Path) -> Result<Shard> {
        let size = std::fs::metadata(path).map_err(io_err(path))?.len();
        if size % 2 != 0 {
            return Err(shard_err(
                path,
                format!("{size} bytes: not whole uint16 tokens"),
            ));
        }
        Ok(Shard {
            path: path.into(),
            dtype: Dtype::U16,
            tokens: size / 2,
            data_offset: 0,
        })
    }

    /// Tokens `start..start + n`.
    pub fn read(&self, start: u64, n: usize) -> Result<Vec<u32>> {
        if start + n as u64 > self.tokens {
            return Err(shard_err(
                &self.path,
                format!(
                    "tokens {start}..{} asked for, the shard holds {}",
                    start + n as u64,
                    self.tokens
                ),
            ));
        }
        let mut file = File::open(&self.path).map_err(io_err(&self.path))?;
        file.seek(SeekFrom::Start(
            self.data_offset + start * self.dtype.bytes(),
        ))
        .map_err(io_err(&self.path))?;
        let mut bytes = vec![0u8; n * self.dtype.bytes() as usize];
        file.read_exact(&mut bytes).map_err(io_err(&self.path))?;
        Ok(self.dtype.decode(&bytes))
    }

    /// Every token of the shard.
    pub fn read_all(&self) -> Result<Vec<u32>> {
        self.read(0, self.tokens as usize)
    }
}

/// The tokenizer a shard folder was made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// The tokenizer.json as it was named on the command line.
    pub path: String,
    /// sha256 of the tokenizer.json bytes.
    pub sha256: String,
    pub vocab_size: usize,
    /// The end-of-text token every document starts with, and its id.
    pub eot: String,
    pub eot_id: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub split: Split,
    pub tokens: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SplitTokens {
    pub train: u64,
    pub val: u64,
}

/// `manifest.json` of a shard folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// "lever-shards"
    pub format: String,
    pub version: u32,
    pub tokenizer: TokenizerInfo,
    pub dtype: Dtype,
    pub tokens: SplitTokens,
    pub documents: u64,
    pub val_fraction: f64,
    pub shard_tokens: u64,
    pub shards: Vec<ShardEntry>,
    /// The inputs as named on the command line.
    pub inputs: Vec<String>,
}

impl Manifest {
    pub const FILE: &'static str = "manifest.json";
    pub const FORMAT: &'static str = "lever-shards";

    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(Self::FILE);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| shard_err(&path, format!("not a lever shard manifest: {e}")))?;
        if m.format != Self::FORMAT || m.version != 1 {
            return Err(shard_err(
                &path,
                format!(
                    "format {:?} version {}, expected {:?} 1",
                    m.format,
                    m.version,
                    Self::FORMAT
                ),
            ));
        }
        Ok(m)
    }

    /// Refuse a tokenizer other than the one the shards were made with, by name and hash.
    pub fn check_tokenizer(&self, dir: &Path, tokenizer_json: &Path) -> Result<()> {
        let sha = sha256_file(tokenizer_json)?;
        if sha == self.tokenizer.sha256 {
            return Ok(());
        }
        Err(shard_err(
            dir,
            format!(
                "the shards were made with tokenizer {} (sha256 {}), not {} (sha256 {}); \
                 make them again with --tokenizer {}",
                self.tokenizer.path,
                &self.tokenizer.sha256[..12.min(self.tokenizer.sha256.len())],
                tokenizer_json.display(),
                &sha[..12],
                tokenizer_json.display()
            ),
        ))
    }
}

/// Hex sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Who wrote a shard folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `lever data shard` (with a manifest).
    Lever,
    /// llm.c's `dev/data/*.py`: headered `.bin` files, `val` in the validation files' names.
    LlmC,
    /// nanoGPT's `prepare.py`: headerless uint16 `train.bin` and `val.bin`.
    NanoGpt,
}

/// The shards of a folder, by split, in order.
#[derive(Debug, Clone)]
pub struct ShardSet {
    pub dir: PathBuf,
    pub source: Source,
    pub manifest: Option<Manifest>,
    pub train: Vec<Shard>,
    pub val: Vec<Shard>,
}

impl ShardSet {
    /// Open a folder of shards: lever's (manifest.json), llm.c's or nanoGPT's.
    pub fn open(dir: &Path) -> Result<ShardSet> {
        if !dir.is_dir() {
            return Err(shard_err(dir, "not a folder of token shards"));
        }
        if dir.join(Manifest::FILE).exists() {
            return Self::open_lever(dir);
        }
        let mut bins: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "bin"))
            .collect();
        bins.sort();
        if bins.is_empty() {
            return Err(shard_err(
                dir,
                "no token shards here (manifest.json, llm.c's .bin shards, or nanoGPT's \
                 train.bin and val.bin)",
            ));
        }
        let train_bin = dir.join("train.bin");
        if train_bin.is_file() && Shard::open(&train_bin).is_err() {
            let val_bin = dir.join("val.bin");
            let val = if val_bin.is_file() {
                vec![Shard::open_headerless(&val_bin)?]
            } else {
                Vec::new()
            };
            return Ok(ShardSet {
                dir: dir.into(),
                source: Source::NanoGpt,
                manifest: None,
                train: vec![Shard::open_headerless(&train_bin)?],
                val,
            });
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for p in bins {
            let shard = Shard::open(&p)?;
            let name = p.file_name().map(|n| n.to_string_lossy().to_lowercase());
            if name.is_some_and(|n| n.contains("val")) {
                val.push(shard);
            } else {
                train.push(shard);
            }
        }
        Ok(ShardSet {
            dir: dir.into(),
            source: Source::LlmC,
            manifest: None,
            train,
            val,
        })
    }

    fn open_lever(dir: &Path) -> Result<ShardSet> {
        let manifest = Manifest::read(dir)?;
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for e in &manifest.shards {
            let shard = Shard::open(&dir.join(&e.file))?;
            if shard.tokens != e.tokens || shard.dtype != manifest.dtype {
                return Err(shard_err(
                    &shard.path,
                    format!(
                        "{} {:?} tokens, the manifest says {} {:?}",
                        shard.tokens, shard.dtype, e.tokens, manifest.dtype
                    ),
                ));
            }
            match e.split {
                Split::Train => train.push(shard),
                Split::Val => val.push(shard),
            }
        }
        Ok(ShardSet {
            dir: dir.into(),
            source: Source::Lever,
            manifest: Some(manifest),
            train,
            val,
        })
    }

    pub fn shards(&self, split: Split) -> &[Shard] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Tokens in a split.
    pub fn tokens(&self, split: Split) -> u64 {
        self.shards(split).iter().map(|s| s.tokens).sum()
    }

    /// Every token of a split, shard after shard (for corpora that fit in memory).
    pub fn read_all(&self, split: Split) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(self.tokens(split) as usize);
        for s in self.shards(split) {
            out.extend(s.read_all()?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_shard_reads_back_in_both_token_types() {
        let dir = tempfile::tempdir().unwrap();
        for (dtype, ids) in [
            (Dtype::U16, vec![0u32, 1, 65535, 50256, 7]),
            (Dtype::U32, vec![0u32, 70000, 128_255, 3]),
        ] {
            let p = dir.path().join("s.bin");
            write_shard(&p, dtype, &ids).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(
                bytes.len() as u64,
                HEADER_BYTES + ids.len() as u64 * dtype.bytes()
            );
            let (magic, version) = dtype.magic_version();
            assert_eq!(&bytes[..4], &magic.to_le_bytes());
            assert_eq!(&bytes[4..8], &version.to_le_bytes());
            assert_eq!(&bytes[8..12], &(ids.len() as i32).to_le_bytes());
            let s = Shard::open(&p).unwrap();
            assert_eq!((s.dtype, s.tokens), (dtype, ids.len() as u64));
            assert_eq!(s.read_all().unwrap(), ids);
            assert_eq!(s.read(1, 2).unwrap(), ids[1..3]);
            assert!(s.read(3, 5).is_err());
        }
        let e = ShardWriter::create(&dir.path().join("x.bin"), Dtype::U16)
            .unwrap()
            .push(&[65536])
            .unwrap_err();
        assert!(
            e.to_string()
                .ends_with("token id 65536 does not fit uint16"),
            "{e}"
        );
    }

    #[test]
    fn a_truncated_or_foreign_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.bin");
        write_shard(&p, Dtype::U16, &[1, 2, 3]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        let e = Shard::open(&p).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "the header says 3 tokens (1030 bytes with the header) but the file has 1028 bytes"
            ),
            "{e}"
        );
        std::fs::write(&p, vec![7u8; 2048]).unwrap();
        let e = Shard::open(&p).unwrap_err().to_string();
        assert!(e.contains("not an llm.c shard: magic 117901063"), "{e}");
    }

    #[test]
    fn nanogpt_and_llmc_folders_open() {
        let dir = tempfile::tempdir().unwrap();
        let nano = dir.path().join("nano");
        std::fs::create_dir(&nano).unwrap();
        let le = |ids: &[u16]| {
            ids.iter()
                .flat_map(|i| i.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        std::fs::write(nano.join("train.bin"), le(&[18, 47, 56, 57])).unwrap();
        std::fs::write(nano.join("val.bin"), le(&[12, 0])).unwrap();
        let set = ShardSet::open(&nano).unwrap();
        assert_eq!(set.source, Source::NanoGpt);
        assert_eq!(set.read_all(Split::Train).unwrap(), [18, 47, 56, 57]);
        assert_eq!(set.read_all(Split::Val).unwrap(), [12, 0]);

        let llmc = dir.path().join("llmc");
        std::fs::create_dir(&llmc).unwrap();
        write_shard(&llmc.join("tiny_shakespeare_val.bin"), Dtype::U16, &[5, 6]).unwrap();
        write_shard(
            &llmc.join("tiny_shakespeare_train.bin"),
            Dtype::U16,
            &[1, 2, 3],
        )
        .unwrap();
        let set = ShardSet::open(&llmc).unwrap();
        assert_eq!(set.source, Source::LlmC);
        assert_eq!((set.tokens(Split::Train), set.tokens(Split::Val)), (3, 2));
        assert_eq!(set.read_all(Split::Val).unwrap(), [5, 6]);

        let e = ShardSet::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no token shards here"), "{e}");
    }
}
