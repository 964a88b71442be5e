//! Chunkers: cut a document, fed one line at a time, into the passages that get embedded.
//!
//! Two modes ([`ChunkMode`]):
//! - **Tokens**: fixed windows of `size` tokens, each starting `size - overlap` tokens after the
//!   previous one, so a sentence cut at one window's edge is whole in the next.
//! - **Structure**: paragraphs (runs of lines between blank lines) are the units; consecutive
//!   paragraphs are merged while they fit in `size` tokens; a paragraph alone longer than `size`
//!   is cut by token windows as above. In Markdown, an ATX heading (`#` … `######`) ends the
//!   current chunk and starts a new section; every chunk carries the heading path it sits under
//!   (`["Install", "From source"]`), and the heading line itself is the first unit of its
//!   section so its words are searchable. Lines inside fenced code blocks (```` ``` ```` or
//!   `~~~`) are never headings and blank lines there do not split paragraphs. Setext headings
//!   (a line underlined with `===`) are plain text here.
//!
//! "Tokens" are whatever the tokenizer callback ([`Tokenize`]) returns: the embedder's own
//! tokenizer when it implements [`crate::Embed::token_spans`], whitespace words otherwise
//! ([`word_spans`]). Lines are tokenized one at a time; for word-piece tokenizers that equals
//! tokenizing the whole text because no token spans a line break.
//!
//! Every chunk keeps the 1-based **line span** (first and last source line it draws text from)
//! so an answer can cite `path:12-30`. Chunk text is the source text with the original line
//! breaks, except that lines without tokens (blank lines) inside a token window are left out and
//! merged paragraphs are joined by one blank line.
//!
//! Memory is bounded by the chunk size, not the document: the chunker holds at most the lines of
//! the current chunk (plus, in structure mode, the current paragraph up to `size` tokens), so a
//! 100 MB file streams through it. A single line is held whole; the reader caps line length.

use std::collections::VecDeque;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Returns the byte ranges of the tokens of one line (no special tokens such as `[CLS]`).
pub type Tokenize<'t> = &'t dyn Fn(&str) -> Result<Vec<Range<usize>>>;

/// Byte ranges of the whitespace-separated words of `text`: the default tokenizer.
pub fn word_spans(text: &str) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                spans.push(s..i);
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        spans.push(s..text.len());
    }
    spans
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkMode {
    /// Fixed token windows with overlap.
    Tokens,
    /// Headings and paragraphs, merged up to the size, long paragraphs windowed.
    Structure,
}

/// How documents are cut. Stored in the index (a different setting means different chunks, so
/// an index keeps one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSettings {
    pub mode: ChunkMode,
    /// Maximum tokens per chunk.
    pub size: usize,
    /// Tokens shared by consecutive windows; below `size`.
    pub overlap: usize,
}

impl Default for ChunkSettings {
    /// 224 tokens leaves room for `[CLS]`/`[SEP]` under all-MiniLM-L6-v2's 256-token limit
    /// (sentence-transformers' `max_seq_length`), so nothing is truncated by the encoder when
    /// the embedder counts its own tokens.
    fn default() -> Self {
        ChunkSettings {
            mode: ChunkMode::Structure,
            size: 224,
            overlap: 32,
        }
    }
}

impl ChunkSettings {
    pub fn validate(&self) -> Result<()> {
        if self.size == 0 {
            return Err(Error::Settings("size must be at least 1 token".into()));
        }
        if self.overlap >= self.size {
            return Err(Error::Settings(format!(
                "overlap ({}) must be smaller than size ({})",
                self.overlap, self.size
            )));
        }
        Ok(())
    }
}

/// One passage, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Chunk {
    pub text: String,
    /// First source line (1-based) the text draws from.
    pub line_start: usize,
    /// Last source line (1-based, inclusive).
    pub line_end: usize,
    /// Markdown heading path above the chunk, outermost first.
    pub headings: Vec<String>,
    /// Document title (the `title` field of a JSONL record).
    pub title: Option<String>,
    /// The document's own id (the `_id` field of a JSONL record, as BEIR corpora have it);
    /// every chunk of the record keeps it, so that retrieval can be judged by document.
    pub doc_id: Option<String>,
}

/// A token inside the windower's buffer: its line number and byte range in that line.
#[derive(Clone, Copy, Debug)]
struct Tok {
    line: usize,
    start: usize,
    end: usize,
}

/// Cuts a stream of tokenized lines into windows of `size` tokens advancing by `size - overlap`.
#[derive(Debug)]
struct Windower {
    size: usize,
    overlap: usize,
    /// Lines that hold buffered tokens, in order: (line number, text).
    lines: VecDeque<(usize, String)>,
    toks: VecDeque<Tok>,
    /// How many tokens at the front of `toks` are already inside an emitted window.
    emitted: usize,
}

impl Windower {
    fn new(size: usize, overlap: usize) -> Self {
        Windower {
            size,
            overlap,
            lines: VecDeque::new(),
            toks: VecDeque::new(),
            emitted: 0,
        }
    }

    fn push(&mut self, line_no: usize, line: &str, spans: &[Range<usize>], out: &mut Vec<Chunk>) {
        if spans.is_empty() {
            return;
        }
        self.lines.push_back((line_no, line.to_owned()));
        for s in spans {
            self.toks.push_back(Tok {
                line: line_no,
                start: s.start,
                end: s.end,
            });
            if self.toks.len() == self.size {
                out.push(self.window());
                // The last `overlap` tokens start the next window.
                self.toks.drain(..self.size - self.overlap);
                self.emitted = self.overlap;
                if let Some(first) = self.toks.front().map(|t| t.line) {
                    while self.lines.front().is_some_and(|(n, _)| *n < first) {
                        self.lines.pop_front();
                    }
                }
            }
        }
    }

    /// Emits what is left unless every buffered token already sits in an emitted window.
    fn finish(&mut self, out: &mut Vec<Chunk>) {
        if self.toks.len() > self.emitted {
            out.push(self.window());
        }
        self.toks.clear();
        self.lines.clear();
        self.emitted = 0;
    }

    /// The chunk covering every buffered token.
    fn window(&self) -> Chunk {
        let (Some(first), Some(last)) = (self.toks.front(), self.toks.back()) else {
            return Chunk::default();
        };
        let mut text = String::new();
        for (n, line) in &self.lines {
            if *n < first.line || *n > last.line {
                continue;
            }
            let from = if *n == first.line { first.start } else { 0 };
            let to = if *n == last.line {
                last.end
            } else {
                line.len()
            };
            if !text.is_empty() {
                text.push('\n');
            }
            // Spans were checked against this line in `checked_spans`.
            text.push_str(line.get(from..to).unwrap_or_default());
        }
        Chunk {
            text,
            line_start: first.line,
            line_end: last.line,
            ..Chunk::default()
        }
    }
}

/// A paragraph being collected: its lines with their token spans.
#[derive(Debug, Default)]
struct Para {
    lines: Vec<(usize, String, Vec<Range<usize>>)>,
    tokens: usize,
}

/// Streaming chunker: feed lines with [`Chunker::push_line`], then call [`Chunker::finish`].
pub struct Chunker<'t> {
    settings: ChunkSettings,
    markdown: bool,
    tokenize: Tokenize<'t>,
    /// Token mode's windower.
    windows: Windower,
    // Structure mode state.
    headings: Vec<(usize, String)>,
    in_fence: bool,
    current: Vec<Para>,
    current_tokens: usize,
    para: Para,
    /// Set while the current paragraph is longer than `size` and is being windowed.
    long: Option<Windower>,
}

impl<'t> Chunker<'t> {
    /// `markdown` turns on heading and code-fence recognition (structure mode only).
    pub fn new(settings: &ChunkSettings, markdown: bool, tokenize: Tokenize<'t>) -> Result<Self> {
        settings.validate()?;
        Ok(Chunker {
            settings: settings.clone(),
            markdown,
            tokenize,
            windows: Windower::new(settings.size, settings.overlap),
            headings: Vec::new(),
            in_fence: false,
            current: Vec::new(),
            current_tokens: 0,
            para: Para::default(),
            long: None,
        })
    }

    /// Feeds line `line_no` (1-based, without its line break); finished chunks go to `out`.
    pub fn push_line(&mut self, line_no: usize, line: &str, out: &mut Vec<Chunk>) -> Result<()> {
        if self.settings.mode == ChunkMode::Tokens {
            let spans = self.checked_spans(line)?;
            self.windows.push(line_no, line, &spans, out);
            return Ok(());
        }
        let is_fence = self.markdown && {
            let t = line.trim_start();
            t.starts_with("```") || t.starts_with("~~~")
        };
        if self.markdown
            && !self.in_fence
            && let Some((level, title)) = heading(line)
        {
            self.end_paragraph(out);
            self.flush(out);
            self.headings.retain(|(l, _)| *l < level);
            self.headings.push((level, title));
            self.add_line(line_no, line, out)?;
            self.end_paragraph(out);
            return Ok(());
        }
        if is_fence {
            self.in_fence = !self.in_fence;
        }
        if line.trim().is_empty() && !self.in_fence {
            self.end_paragraph(out);
            return Ok(());
        }
        self.add_line(line_no, line, out)
    }

    /// Emits whatever is still buffered.
    pub fn finish(&mut self, out: &mut Vec<Chunk>) {
        if self.settings.mode == ChunkMode::Tokens {
            self.windows.finish(out);
            return;
        }
        self.end_paragraph(out);
        self.flush(out);
    }

    fn checked_spans(&self, line: &str) -> Result<Vec<Range<usize>>> {
        let spans = (self.tokenize)(line)?;
        // A tokenizer returning offsets that are out of range or inside a character would make
        // slicing panic later; refuse it here with the line in the message.
        if let Some(bad) = spans.iter().find(|s| line.get(s.start..s.end).is_none()) {
            return Err(Error::Embed(format!(
                "tokenizer returned byte span {}..{} that does not fit the line {line:?}",
                bad.start, bad.end
            )));
        }
        Ok(spans)
    }

    fn heading_path(&self) -> Vec<String> {
        self.headings.iter().map(|(_, t)| t.clone()).collect()
    }

    fn add_line(&mut self, line_no: usize, line: &str, out: &mut Vec<Chunk>) -> Result<()> {
        let spans = self.checked_spans(line)?;
        if let Some(w) = &mut self.long {
            let mut pieces = Vec::new();
            w.push(line_no, line, &spans, &mut pieces);
            self.emit_pieces(pieces, out);
            return Ok(());
        }
        self.para.tokens += spans.len();
        self.para.lines.push((line_no, line.to_owned(), spans));
        if self.para.tokens > self.settings.size {
            // This paragraph alone is too long: close the chunk before it, then window it.
            self.flush(out);
            let mut w = Windower::new(self.settings.size, self.settings.overlap);
            let mut pieces = Vec::new();
            for (n, text, spans) in std::mem::take(&mut self.para).lines {
                w.push(n, &text, &spans, &mut pieces);
            }
            self.long = Some(w);
            self.emit_pieces(pieces, out);
        }
        Ok(())
    }

    fn emit_pieces(&self, pieces: Vec<Chunk>, out: &mut Vec<Chunk>) {
        for mut p in pieces {
            p.headings = self.heading_path();
            out.push(p);
        }
    }

    fn end_paragraph(&mut self, out: &mut Vec<Chunk>) {
        if let Some(mut w) = self.long.take() {
            let mut pieces = Vec::new();
            w.finish(&mut pieces);
            self.emit_pieces(pieces, out);
            return;
        }
        let para = std::mem::take(&mut self.para);
        if para.tokens == 0 {
            return;
        }
        if self.current_tokens + para.tokens > self.settings.size {
            self.flush(out);
        }
        self.current_tokens += para.tokens;
        self.current.push(para);
    }

    /// Emits the merged paragraphs collected so far as one chunk.
    fn flush(&mut self, out: &mut Vec<Chunk>) {
        let paras = std::mem::take(&mut self.current);
        self.current_tokens = 0;
        let (Some(first), Some(last)) = (
            paras.first().and_then(|p| p.lines.first()),
            paras.last().and_then(|p| p.lines.last()),
        ) else {
            return;
        };
        let (line_start, line_end) = (first.0, last.0);
        let text = paras
            .iter()
            .map(|p| {
                p.lines
                    .iter()
                    .map(|(_, l, _)| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n\n");
        out.push(Chunk {
            text,
            line_start,
            line_end,
            headings: self.heading_path(),
            title: None,
            doc_id: None,
        });
    }
}

/// An ATX heading: up to three spaces, 1–6 `#`, then a space or the end of the line. Returns
/// the level and the title without the optional closing `#`s.
fn heading(line: &str) -> Option<(usize, String)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let level = rest.len() - rest.trim_start_matches('#').len();
    if !(1..=6).contains(&level) {
        return None;
    }
    let after = &rest[level..];
    if !(after.is_empty() || after.starts_with([' ', '\t'])) {
        return None;
    }
    let title = after.trim();
    // A closing run of `#` counts only after a space: `# C#` is the title "C#".
    let stripped = title.trim_end_matches('#');
    let title = if stripped.is_empty() || stripped.ends_with([' ', '\t']) {
        stripped.trim_end()
    } else {
        title
    };
    Some((level, title.to_owned()))
}

/// Chunks a whole text held in memory (lines numbered from 1). Convenience for short documents
/// (JSONL records) and tests; files go through [`Chunker`] line by line.
pub fn chunk_text(
    text: &str,
    settings: &ChunkSettings,
    markdown: bool,
    tokenize: Tokenize<'_>,
) -> Result<Vec<Chunk>> {
    let mut chunker = Chunker::new(settings, markdown, tokenize)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        chunker.push_line(i + 1, line, &mut out)?;
    }
    chunker.finish(&mut out);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn words(t: &str) -> Result<Vec<Range<usize>>> {
        Ok(word_spans(t))
    }

    fn spans(chunks: &[Chunk]) -> Vec<(usize, usize)> {
        chunks.iter().map(|c| (c.line_start, c.line_end)).collect()
    }

    fn tokens(size: usize, overlap: usize) -> ChunkSettings {
        ChunkSettings {
            mode: ChunkMode::Tokens,
            size,
            overlap,
        }
    }

    fn structure(size: usize, overlap: usize) -> ChunkSettings {
        ChunkSettings {
            mode: ChunkMode::Structure,
            size,
            overlap,
        }
    }

    #[test]
    fn word_spans_are_byte_ranges_of_words() {
        let t = "  héllo wörld\tx ";
        let s = word_spans(t);
        let got: Vec<&str> = s.iter().map(|r| &t[r.clone()]).collect();
        assert_eq!(got, ["héllo", "wörld", "x"]);
    }

    #[test]
    fn token_windows_overlap_and_keep_line_spans() {
        // 10 words on 4 lines; windows of 4 advancing by 3.
        let text = "a b c\nd e\n\nf g h\ni j";
        let chunks = chunk_text(text, &tokens(4, 1), false, &words).unwrap();
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["a b c\nd", "d e\nf g", "g h\ni j"]);
        assert_eq!(spans(&chunks), [(1, 2), (2, 4), (4, 5)]);
    }

    #[test]
    fn token_windows_do_not_repeat_a_tail_already_covered() {
        // 7 tokens, size 4, overlap 1: windows [0..4), [3..7) and nothing after.
        let chunks = chunk_text("1 2 3 4 5 6 7", &tokens(4, 1), false, &words).unwrap();
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["1 2 3 4", "4 5 6 7"]);
        assert_eq!(spans(&chunks), [(1, 1), (1, 1)]);
    }

    #[test]
    fn structure_merges_paragraphs_up_to_the_size() {
        let text = "one two\nthree\n\nfour five\n\nsix seven eight\n\n\nnine";
        // paragraphs: 3 tokens (1-2), 2 (4), 3 (6), 1 (9); size 5.
        let chunks = chunk_text(text, &structure(5, 1), false, &words).unwrap();
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            ["one two\nthree\n\nfour five", "six seven eight\n\nnine"]
        );
        assert_eq!(spans(&chunks), [(1, 4), (6, 9)]);
    }

    #[test]
    fn markdown_headings_start_chunks_and_carry_their_path() {
        let text = "intro words\n# Guide\nhello there\n## Install\nrun it\n\n# Other\nbye";
        let chunks = chunk_text(text, &structure(50, 5), true, &words).unwrap();
        let got: Vec<(usize, usize, Vec<String>)> = chunks
            .iter()
            .map(|c| (c.line_start, c.line_end, c.headings.clone()))
            .collect();
        let h = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            [
                (1, 1, h(&[])),
                (2, 3, h(&["Guide"])),
                (4, 5, h(&["Guide", "Install"])),
                (7, 8, h(&["Other"])),
            ]
        );
        assert_eq!(chunks[1].text, "# Guide\n\nhello there");
    }

    #[test]
    fn code_fences_hide_headings_and_blank_lines() {
        let text = "# A\n```sh\n# not a heading\n\necho hi\n```\nafter";
        let chunks = chunk_text(text, &structure(50, 5), true, &words).unwrap();
        assert_eq!(spans(&chunks), [(1, 7)]);
        assert_eq!(chunks[0].headings, ["A"]);
        assert!(chunks[0].text.contains("# not a heading\n\necho hi"));
    }

    #[test]
    fn a_paragraph_longer_than_the_size_is_windowed() {
        // short paragraph (2 tokens), then a 7-token paragraph over lines 3-5, then a short one.
        let text = "x y\n\na b c\nd e\nf g\n\nz";
        let chunks = chunk_text(text, &structure(4, 1), false, &words).unwrap();
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["x y", "a b c\nd", "d e\nf g", "z"]);
        assert_eq!(spans(&chunks), [(1, 1), (3, 4), (4, 5), (7, 7)]);
    }

    #[test]
    fn headings_parse_like_commonmark_atx() {
        assert_eq!(heading("## Two ##"), Some((2, "Two".into())));
        assert_eq!(heading("#"), Some((1, String::new())));
        assert_eq!(heading("# C#"), Some((1, "C#".into())));
        assert_eq!(heading("#hashtag"), None);
        assert_eq!(heading("####### seven"), None);
        assert_eq!(heading("    # indented code"), None);
    }

    #[test]
    fn bad_settings_and_bad_tokenizer_spans_are_errors() {
        assert!(matches!(
            chunk_text("a", &tokens(3, 3), false, &words),
            Err(Error::Settings(_))
        ));
        let bad = |_: &str| -> Result<Vec<Range<usize>>> { Ok(vec![0..1, 0..99]) };
        let err = chunk_text("abc", &tokens(3, 1), false, &bad).unwrap_err();
        assert!(err.to_string().contains("0..99"), "{err}");
    }
}
