//! Big text files read as a stream of UTF-8 pieces of about [`PIECE_BYTES`], each cut where a
//! tokenizer's pre-tokenizer splits anyway, so encoding the pieces one by one (in parallel)
//! gives the ids that encoding the whole file would, in bounded memory.
//!
//! Where a cut is safe: the pre-tokenizer regexes of byte-level BPE tokenizers (GPT-2's, and
//! llama3's, qwen2's and smollm's as llama.cpp names them, `llama-vocab.cpp`) never join the
//! characters on both sides of
//! - a newline between two characters that are not whitespace (`x\nY`: GPT-2 gives `x`, `\n`,
//!   `Y`; llama3 `x`, `\n`, `Y`, or `.\n`, `Y` after punctuation — the newline stays left), or
//! - a space between a character that is not whitespace and a letter (`x yz` → `x`, ` yz`).
//!
//! A run of whitespace is never cut (`\s+(?!\S)` splits it by what follows), nor `\r\n`. A
//! character vocabulary is indifferent to cuts. Bytes that are not UTF-8 are an error naming
//! the file and line.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The size pieces are cut at (the first safe cut at or after it). Hugging Face `tokenizers`
/// keeps about 50 bytes per byte of text while encoding (alignments, pre-token strings); 32 KB
/// pieces encoded faster than 256 KB or 1 MB ones on Tiny Shakespeare (about 1.9 against
/// 0.8–1.2 MB/s on one core of the 2-core test machine, noisy).
pub const PIECE_BYTES: usize = 32 * 1024;
/// A piece with no safe cut (one 16 MB line of symbols) is cut at a character boundary.
const MAX_PIECE_BYTES: usize = 16 * 1024 * 1024;
const READ_BYTES: usize = 64 * 1024;

/// A run of text from a file: valid UTF-8 that starts on `line` (1-based), `offset` bytes
/// into the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    pub line: usize,
    pub offset: u64,
}

/// The pieces of one text file, in order.
pub struct TextPieces<R> {
    path: PathBuf,
    reader: R,
    buf: Vec<u8>,
    line: usize,
    /// Bytes of the file before `buf`.
    offset: u64,
    eof: bool,
    target: usize,
    started: bool,
}

impl TextPieces<std::fs::File> {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        Ok(Self::new(path, file, PIECE_BYTES))
    }
}

impl<R: Read> TextPieces<R> {
    /// Pieces of about `target` bytes from `reader`; errors name `path`.
    pub fn new(path: &Path, reader: R, target: usize) -> Self {
        Self {
            path: path.into(),
            reader,
            buf: Vec::new(),
            line: 1,
            offset: 0,
            eof: false,
            target: target.max(1),
            started: false,
        }
    }

    /// Bytes of the file consumed so far (handed out as pieces).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn fill(&mut self, want: usize) -> Result<()> {
        while !self.eof && self.buf.len() < want {
            let at = self.buf.len();
            self.buf.resize(at + READ_BYTES, 0);
            let n = loop {
                match self.reader.read(&mut self.buf[at..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(Error::Io {
                            path: self.path.clone(),
                            source,
                        });
                    }
                }
            };
            self.buf.truncate(at + n);
            self.eof = n == 0;
        }
        if !self.started && self.buf.len() >= 3 || self.eof {
            if !self.started && self.buf.starts_with(b"\xEF\xBB\xBF") {
                // A UTF-8 byte-order mark (editors on Windows write one) is not text.
                self.buf.drain(..3);
                self.offset += 3;
            }
            self.started = true;
        }
        Ok(())
    }

    /// The valid UTF-8 at the start of `buf`, or the error naming the line of the bad byte.
    fn valid_len(&self) -> Result<usize> {
        match std::str::from_utf8(&self.buf) {
            Ok(_) => Ok(self.buf.len()),
            // An incomplete character at the end of what was read: the rest comes next.
            Err(e) if e.error_len().is_none() && !self.eof => Ok(e.valid_up_to()),
            Err(e) => {
                let at = e.valid_up_to();
                let before = &self.buf[..at];
                let line = self.line + before.iter().filter(|&&b| b == b'\n').count();
                let column = at
                    - before
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |p| p + 1);
                let problem = match (self.offset, self.buf.get(..2)) {
                    (0, Some([0xFF, 0xFE] | [0xFE, 0xFF])) => {
                        "the file is UTF-16 (save it as UTF-8)".to_string()
                    }
                    _ => format!(
                        "byte 0x{:02X} at column {} is not UTF-8",
                        self.buf[at],
                        column + 1
                    ),
                };
                Err(Error::Text {
                    path: self.path.clone(),
                    line,
                    problem,
                })
            }
        }
    }
}

impl<R: Read> Iterator for TextPieces<R> {
    type Item = Result<Piece>;

    fn next(&mut self) -> Option<Result<Piece>> {
        let mut want = self.target;
        loop {
            if let Err(e) = self.fill(want) {
                return Some(Err(e));
            }
            if self.buf.is_empty() {
                return None;
            }
            let valid = match self.valid_len() {
                Ok(n) => n,
                Err(e) => {
                    self.buf.clear();
                    self.eof = true;
                    return Some(Err(e));
                }
            };
            // `valid_len` checked these bytes.
            let text = std::str::from_utf8(&self.buf[..valid]).unwrap_or_default();
            let cut = if self.eof && valid == self.buf.len() {
                Some(valid)
            } else {
                safe_cut(text, self.target.min(valid))
                    .or_else(|| (valid >= MAX_PIECE_BYTES).then(|| char_cut(text, self.target)))
            };
            match cut {
                Some(cut) if cut > 0 => {
                    let text = text[..cut].to_string();
                    self.buf.drain(..cut);
                    let piece = Piece {
                        line: self.line,
                        offset: self.offset,
                        text,
                    };
                    self.line += piece.text.bytes().filter(|&b| b == b'\n').count();
                    self.offset += cut as u64;
                    return Some(Ok(piece));
                }
                // No safe cut yet: read more.
                _ => want = self.buf.len() + self.target,
            }
        }
    }
}

/// The first safe cut at or after `from` (see the module doc), or None.
pub fn safe_cut(text: &str, from: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let not_space = |c: Option<char>| c.is_some_and(|c| !c.is_whitespace());
    let mut at = from.min(bytes.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    let rest = &text[at..];
    for (i, b) in rest.bytes().enumerate() {
        let p = at + i;
        let cut = match b {
            // x\nY: cut after the newline.
            b'\n' => Some(p + 1).filter(|&q| {
                not_space(text[..p].chars().next_back()) && not_space(text[q..].chars().next())
            }),
            // x yz: cut before the space.
            b' ' => Some(p).filter(|&q| {
                not_space(text[..q].chars().next_back())
                    && text[q + 1..]
                        .chars()
                        .next()
                        .is_some_and(char::is_alphabetic)
            }),
            _ => None,
        };
        if let Some(q) = cut.filter(|&q| q > 0 && q < bytes.len()) {
            return Some(q);
        }
    }
    None
}

/// A character boundary at or after `from` (the last resort for text with no safe cut).
fn char_cut(text: &str, from: usize) -> usize {
    let mut at = from.min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pieces(text: &[u8], target: usize) -> Result<Vec<Piece>> {
        TextPieces::new(Path::new("t.txt"), text, target).collect()
    }

    #[test]
    fn pieces_join_back_to_the_text_and_cut_only_where_safe() {
        let text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  \
                    All:\r\nSpeak, speak. naïve café 12345 \u{a0}x\nEnd";
        for target in [1, 2, 5, 17, 64, 1000] {
            let ps = pieces(text.as_bytes(), target).unwrap();
            let joined: String = ps.iter().map(|p| p.text.as_str()).collect();
            assert_eq!(joined, text, "target {target}");
            let mut line = 1;
            for (i, p) in ps.iter().enumerate() {
                assert_eq!(p.line, line);
                line += p.text.matches('\n').count();
                if i + 1 < ps.len() {
                    let next = ps[i + 1].text.chars().next().unwrap();
                    let last = p.text.chars().next_back().unwrap();
                    // Every cut is after "\n" before a non-space, or before " " + letter.
                    assert!(
                        (last == '\n' && !next.is_whitespace())
                            || (next == ' ' && !last.is_whitespace()),
                        "cut {last:?}|{next:?} at target {target}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_bytes_name_their_line_and_column() {
        let e = pieces(b"ok line\nsecond \xFF line\n", 4).unwrap_err();
        assert_eq!(e.to_string(), "t.txt:2: byte 0xFF at column 8 is not UTF-8");
        let e = pieces(b"\xFF\xFEa\0", 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.txt:1: the file is UTF-16 (save it as UTF-8)"
        );
        // A character split across reads is fine; one cut off by the end of the file is not.
        let ok = pieces("é".repeat(70_000).as_bytes(), 3).unwrap();
        assert_eq!(ok.iter().map(|p| p.text.len()).sum::<usize>(), 140_000);
        let e = pieces(b"abc\xC3", 4).unwrap_err();
        assert_eq!(e.to_string(), "t.txt:1: byte 0xC3 at column 4 is not UTF-8");
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let ps = pieces(b"\xEF\xBB\xBFhello", 100).unwrap();
        let hello = Piece {
            text: "hello".into(),
            line: 1,
            offset: 3,
        };
        assert_eq!(ps, vec![hello]);
    }
}
