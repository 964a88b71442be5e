//! Readers: find the documents under the given paths and stream each one, line by line, into
//! the chunker.
//!
//! Formats are chosen by extension: `.txt`/`.text`, `.md`/`.markdown`, `.html`/`.htm`, and
//! `.jsonl` (one document per line: a string `text` field, an optional string `title`, an
//! optional `_id`, string or integer, kept as every chunk's document id). Anything
//! else, PDF included, is skipped with a [`Skip`] reason that the ingest report counts.
//!
//! Design choices:
//! - **Streaming.** A file is read one line at a time ([`Lines`]); the sha256 of the raw bytes
//!   is computed on the way. Memory stays bounded by the longest line (capped by
//!   `max_line_bytes`, a counted skip beyond it) plus one chunk, whatever the file size.
//! - **Line numbers are the source's.** HTML is converted to text one source line at a time by a
//!   small state machine that carries its state (inside a tag, a comment, a `<script>`) across
//!   lines, so output line N is the text of source line N and a chunk's span cites the HTML file.
//!   It drops tags, comments, `<script>` and `<style>` bodies, and decodes entities; it is not
//!   a full HTML5 parser (no implied tags, no `<pre>` whitespace rules).
//! - **Bad files are skipped, not fatal.** Binary content (a NUL byte in the first 8 KiB, as
//!   git and ripgrep decide), invalid UTF-8 (with the first bad line), empty files and unreadable
//!   files are counted skips; a malformed JSONL line is a warning naming `file:line` and the
//!   rest of the file is still indexed.
//! - **Walking** recurses into folders in name order, does not follow symbolic links to
//!   folders (no cycles), skips hidden entries (`.git`, `.venv`, ...) inside folders and the
//!   index's own folder; a hidden path named explicitly is read.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::chunk::{Chunk, ChunkSettings, Chunker, Tokenize, chunk_text};
use crate::{Error, Result};

/// Default cap on one line: a longer line is a counted skip (it would have to be held whole).
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Bytes inspected for a NUL to call a file binary.
const BINARY_PROBE: usize = 8 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Html,
    Jsonl,
}

impl Format {
    /// The format for `path`'s extension, or why it is skipped.
    pub fn of(path: &Path) -> std::result::Result<Format, Skip> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "txt" | "text" => Ok(Format::Text),
            "md" | "markdown" => Ok(Format::Markdown),
            "html" | "htm" => Ok(Format::Html),
            "jsonl" => Ok(Format::Jsonl),
            "pdf" => Err(Skip::Pdf),
            _ => Err(Skip::Unsupported { extension: ext }),
        }
    }
}

/// Why a file was not indexed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    Unsupported {
        extension: String,
    },
    Pdf,
    Binary,
    InvalidUtf8 {
        line: usize,
    },
    LineTooLong {
        line: usize,
        limit: usize,
    },
    Empty,
    Unreadable {
        message: String,
    },
    /// Hidden entries inside a walked folder, symbolic links to folders, sockets, ...
    NotWalked {
        why: &'static str,
    },
    /// The path is not valid UTF-8, so the index (which stores paths as text) cannot name it.
    NonUtf8Path,
}

impl Skip {
    /// A short stable name to count skips by.
    pub fn kind(&self) -> &'static str {
        match self {
            Skip::Unsupported { .. } => "unsupported",
            Skip::Pdf => "pdf",
            Skip::Binary => "binary",
            Skip::InvalidUtf8 { .. } => "invalid-utf8",
            Skip::LineTooLong { .. } => "line-too-long",
            Skip::Empty => "empty",
            Skip::Unreadable { .. } => "unreadable",
            Skip::NotWalked { .. } => "not-walked",
            Skip::NonUtf8Path => "non-utf8-path",
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Unsupported { extension } if extension.is_empty() => {
                write!(f, "unsupported file type (no extension)")
            }
            Skip::Unsupported { extension } => write!(f, "unsupported file type .{extension}"),
            Skip::Pdf => write!(f, "PDF is not supported; convert it to text first"),
            Skip::Binary => write!(f, "binary file (NUL byte in the first 8 KiB)"),
            Skip::InvalidUtf8 { line } => write!(f, "invalid UTF-8 on line {line}"),
            Skip::LineTooLong { line, limit } => {
                write!(f, "line {line} is longer than {limit} bytes")
            }
            Skip::Empty => write!(f, "empty (no text to index)"),
            Skip::Unreadable { message } => write!(f, "unreadable: {message}"),
            Skip::NotWalked { why } => write!(f, "not walked: {why}"),
            Skip::NonUtf8Path => write!(f, "path is not valid UTF-8"),
        }
    }
}

/// A non-fatal problem inside a file that is otherwise indexed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}

/// A file found by [`walk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Canonical (absolute, symlinks resolved) path: the source's identity in the index.
    pub path: PathBuf,
    pub format: Format,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch (0 if unknown).
    pub mtime_ns: i64,
}

#[derive(Debug, Default)]
pub struct Walked {
    pub files: Vec<FileEntry>,
    pub skipped: Vec<(PathBuf, Skip)>,
}

/// Finds the files under `paths` (files or folders). A path that does not exist is an error;
/// everything else that cannot be indexed is listed in `skipped`. `exclude` (the index's own
/// folder) is never entered.
pub fn walk<P: AsRef<Path>>(paths: &[P], exclude: Option<&Path>) -> Result<Walked> {
    let exclude = exclude.and_then(|e| e.canonicalize().ok());
    let mut seen = BTreeSet::new();
    let mut out = Walked::default();
    for p in paths {
        let p = p.as_ref();
        let canon = p.canonicalize().map_err(|source| Error::Io {
            path: p.to_owned(),
            source,
        })?;
        visit(&canon, true, exclude.as_deref(), &mut seen, &mut out);
    }
    Ok(out)
}

fn visit(
    path: &Path,
    named: bool,
    exclude: Option<&Path>,
    seen: &mut BTreeSet<PathBuf>,
    out: &mut Walked,
) {
    if exclude == Some(path) {
        return;
    }
    let hidden = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    if hidden && !named {
        out.skipped.push((
            path.to_owned(),
            Skip::NotWalked {
                why: "hidden entry",
            },
        ));
        return;
    }
    // Walked entries are not canonicalized one by one, so look at the link itself.
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => {
            let message = e.to_string();
            out.skipped
                .push((path.to_owned(), Skip::Unreadable { message }));
            return;
        }
    };
    if meta.file_type().is_symlink() {
        match (std::fs::metadata(path), path.canonicalize()) {
            (Ok(m), _) if m.is_dir() => {
                let why = "symbolic link to a folder";
                out.skipped.push((path.to_owned(), Skip::NotWalked { why }));
            }
            // A link to a file is indexed under its target's path, like a named path.
            (Ok(_), Ok(target)) => visit(&target, true, exclude, seen, out),
            (Err(e), _) | (_, Err(e)) => {
                let message = e.to_string();
                out.skipped
                    .push((path.to_owned(), Skip::Unreadable { message }));
            }
        }
        return;
    }
    if meta.is_dir() {
        let entries = match std::fs::read_dir(path) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect::<BTreeSet<_>>(),
            Err(e) => {
                let message = e.to_string();
                out.skipped
                    .push((path.to_owned(), Skip::Unreadable { message }));
                return;
            }
        };
        for e in entries {
            visit(&e, false, exclude, seen, out);
        }
        return;
    }
    if !seen.insert(path.to_owned()) {
        return;
    }
    match file_entry(path, &meta) {
        Ok(entry) => out.files.push(entry),
        Err(skip) => out.skipped.push((path.to_owned(), skip)),
    }
}

/// The entry for one file, or why it cannot be indexed; `path` should be canonical.
pub fn entry(path: &Path) -> std::result::Result<FileEntry, Skip> {
    let meta = std::fs::metadata(path).map_err(|e| Skip::Unreadable {
        message: e.to_string(),
    })?;
    file_entry(path, &meta)
}

fn file_entry(path: &Path, meta: &std::fs::Metadata) -> std::result::Result<FileEntry, Skip> {
    if !meta.is_file() {
        let why = "not a regular file";
        return Err(Skip::NotWalked { why });
    }
    if path.to_str().is_none() {
        return Err(Skip::NonUtf8Path);
    }
    let format = Format::of(path)?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    Ok(FileEntry {
        path: path.to_owned(),
        format,
        size: meta.len(),
        mtime_ns,
    })
}

/// Reads a file line by line with a reused buffer, hashing the raw bytes, and turns the first
/// problem (binary, invalid UTF-8, over-long line, I/O error) into a [`Skip`].
pub struct Lines {
    reader: BufReader<File>,
    buf: Vec<u8>,
    line_no: usize,
    max_line: usize,
    hasher: Sha256,
    bytes: u64,
    probed: bool,
}

impl Lines {
    pub fn open(path: &Path, max_line: usize) -> std::result::Result<Lines, Skip> {
        let file = File::open(path).map_err(|e| Skip::Unreadable {
            message: e.to_string(),
        })?;
        Ok(Lines {
            reader: BufReader::with_capacity(64 << 10, file),
            buf: Vec::new(),
            line_no: 0,
            max_line,
            hasher: Sha256::new(),
            bytes: 0,
            probed: false,
        })
    }

    /// The next line (1-based number, text without `\n` or `\r\n`), or `None` at the end.
    pub fn next_line(&mut self) -> std::result::Result<Option<(usize, &str)>, Skip> {
        let unreadable = |e: std::io::Error| Skip::Unreadable {
            message: e.to_string(),
        };
        if !self.probed {
            self.probed = true;
            let head = self.reader.fill_buf().map_err(unreadable)?;
            if head[..head.len().min(BINARY_PROBE)].contains(&0) {
                return Err(Skip::Binary);
            }
        }
        self.buf.clear();
        let limit = self.max_line as u64 + 1;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut self.buf)
            .map_err(unreadable)?;
        if n == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        self.hasher.update(&self.buf);
        self.bytes += n as u64;
        if self.buf.len() > self.max_line && self.buf.last() != Some(&b'\n') {
            return Err(Skip::LineTooLong {
                line: self.line_no,
                limit: self.max_line,
            });
        }
        let mut end = self.buf.len();
        if self.buf[..end].ends_with(b"\n") {
            end -= 1;
        }
        if self.buf[..end].ends_with(b"\r") {
            end -= 1;
        }
        let mut start = 0;
        if self.line_no == 1 && self.buf.starts_with(b"\xEF\xBB\xBF") {
            start = 3; // UTF-8 byte order mark
        }
        let start = start.min(end);
        match std::str::from_utf8(&self.buf[start..end]) {
            Ok(s) => Ok(Some((self.line_no, s))),
            Err(_) => Err(Skip::InvalidUtf8 { line: self.line_no }),
        }
    }

    /// Bytes consumed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Hex sha256 of the bytes consumed so far (the whole file once `next_line` returned None).
    pub fn sha256(&self) -> String {
        format!("{:x}", self.hasher.clone().finalize())
    }
}

/// What a full pass over a file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    pub sha256: String,
    pub bytes: u64,
}

/// Reads the whole file once, validating it (binary, UTF-8, line length) and hashing it, without
/// chunking: the cheap pass that decides whether a file changed since it was indexed.
pub fn scan(path: &Path, max_line: usize) -> std::result::Result<Scanned, Skip> {
    let mut lines = Lines::open(path, max_line)?;
    while lines.next_line()?.is_some() {}
    if lines.bytes() == 0 {
        return Err(Skip::Empty);
    }
    Ok(Scanned {
        sha256: lines.sha256(),
        bytes: lines.bytes(),
    })
}

/// What reading one file produced, besides the chunks handed to the sink.
#[derive(Debug)]
pub enum ReadOutcome {
    Read {
        scanned: Scanned,
        chunks: usize,
        warnings: Vec<Warning>,
    },
    Skipped(Skip),
}

/// Streams `path` through the chunker, handing each chunk to `sink` together with the bytes of
/// the file consumed so far (for progress). Errors from the sink (database, embedder) abort and
/// are returned; problems with the file itself come back as [`ReadOutcome::Skipped`]. A file
/// that yields no chunk is [`Skip::Empty`].
pub fn read_chunks(
    path: &Path,
    format: Format,
    settings: &ChunkSettings,
    tokenize: Tokenize<'_>,
    max_line: usize,
    sink: &mut dyn FnMut(Chunk, u64) -> Result<()>,
) -> Result<ReadOutcome> {
    let mut lines = match Lines::open(path, max_line) {
        Ok(l) => l,
        Err(skip) => return Ok(ReadOutcome::Skipped(skip)),
    };
    let mut chunker = Chunker::new(settings, format == Format::Markdown, tokenize)?;
    let mut html = HtmlText::default();
    let mut text = String::new();
    let mut out = Vec::new();
    let mut chunks = 0;
    let mut warnings = Vec::new();
    loop {
        let (line_no, line) = match lines.next_line() {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(skip) => return Ok(ReadOutcome::Skipped(skip)),
        };
        match format {
            Format::Text | Format::Markdown => chunker.push_line(line_no, line, &mut out)?,
            Format::Html => {
                text.clear();
                html.line(line, &mut text);
                chunker.push_line(line_no, &text, &mut out)?;
            }
            Format::Jsonl => match jsonl_record(line) {
                Ok(None) => {}
                Ok(Some(record)) => {
                    for mut c in chunk_text(&record.text, settings, false, tokenize)? {
                        // The record is the document: cite its line in the .jsonl file.
                        c.line_start = line_no;
                        c.line_end = line_no;
                        c.title = record.title.clone();
                        c.doc_id = record.id.clone();
                        out.push(c);
                    }
                }
                Err(message) => warnings.push(Warning {
                    path: path.to_owned(),
                    line: line_no,
                    message,
                }),
            },
        }
        let consumed = lines.bytes();
        for c in out.drain(..) {
            chunks += 1;
            sink(c, consumed)?;
        }
    }
    chunker.finish(&mut out);
    let consumed = lines.bytes();
    for c in out.drain(..) {
        chunks += 1;
        sink(c, consumed)?;
    }
    if chunks == 0 {
        return Ok(ReadOutcome::Skipped(Skip::Empty));
    }
    Ok(ReadOutcome::Read {
        scanned: Scanned {
            sha256: lines.sha256(),
            bytes: lines.bytes(),
        },
        chunks,
        warnings,
    })
}

/// One JSONL document: its `text`, `title` and `_id`.
struct Record {
    text: String,
    title: Option<String>,
    id: Option<String>,
}

/// Parses one JSONL line: `Ok(None)` for a blank line, the record, or why the line is not a
/// record.
fn jsonl_record(line: &str) -> std::result::Result<Option<Record>, String> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "expected a JSON object".to_owned())?;
    let text = match obj.get("text") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err("field `text` is not a string".into()),
        None => return Err("missing field `text`".into()),
    };
    let title = match obj.get("title") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("field `title` is not a string".into()),
    };
    // BEIR corpora name documents by `_id`; integers are common too.
    let id = match obj.get("_id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err("field `_id` is not a string or a number".into()),
    };
    Ok(Some(Record { text, title, id }))
}

/// Where the HTML converter is between calls: the state survives line ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum HtmlState {
    #[default]
    Text,
    /// Inside `<...>`; `quote` is the open attribute quote, if any.
    Tag {
        quote: Option<u8>,
    },
    Comment,
    /// Inside the body of `<script>` or `<style>`, until its closing tag.
    Raw(&'static str),
}

/// HTML → text, one source line at a time (see the module doc).
#[derive(Debug, Default)]
pub struct HtmlText {
    state: HtmlState,
    /// The start of the current tag (enough to read its name).
    tag: Vec<u8>,
}

/// Tags after which text continues as a new word rather than glued to the previous one.
const BLOCK_TAGS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "br",
    "dd",
    "div",
    "dl",
    "dt",
    "figcaption",
    "figure",
    "footer",
    "form",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "header",
    "hr",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "table",
    "td",
    "th",
    "title",
    "tr",
    "ul",
];

impl HtmlText {
    /// Appends the text of one source line to `out` (trailing whitespace trimmed).
    pub fn line(&mut self, input: &str, out: &mut String) {
        let start_len = out.len();
        let b = input.as_bytes();
        let mut i = 0;
        // Every index where the input is sliced is at an ASCII byte, so a char boundary.
        while i < b.len() {
            match self.state {
                HtmlState::Text => {
                    let j = b[i..]
                        .iter()
                        .position(|&c| c == b'<' || c == b'&')
                        .map_or(b.len(), |p| i + p);
                    out.push_str(&input[i..j]);
                    i = j;
                    if i == b.len() {
                        break;
                    }
                    if b[i] == b'&' {
                        match entity(&input[i..]) {
                            Some((c, used)) => {
                                out.push(c);
                                i += used;
                            }
                            None => {
                                out.push('&');
                                i += 1;
                            }
                        }
                    } else if b[i..].starts_with(b"<!--") {
                        self.state = HtmlState::Comment;
                        i += 4;
                    } else if b
                        .get(i + 1)
                        .is_some_and(|c| c.is_ascii_alphabetic() || b"/!?".contains(c))
                    {
                        self.state = HtmlState::Tag { quote: None };
                        self.tag.clear();
                        i += 1;
                    } else {
                        out.push('<');
                        i += 1;
                    }
                }
                HtmlState::Tag { quote } => {
                    let c = b[i];
                    i += 1;
                    match quote {
                        Some(q) if c == q => self.state = HtmlState::Tag { quote: None },
                        Some(_) => {}
                        // Quotes only open an attribute value (`a="x>y"`), so a stray
                        // apostrophe in a tag cannot swallow the rest of the document.
                        None if (c == b'"' || c == b'\'') && self.tag.last() == Some(&b'=') => {
                            self.state = HtmlState::Tag { quote: Some(c) }
                        }
                        None if c == b'>' => self.end_tag(out),
                        None => {
                            if self.tag.len() < 64 {
                                self.tag.push(c);
                            }
                        }
                    }
                }
                HtmlState::Comment => match find(&b[i..], b"-->") {
                    Some(p) => {
                        i += p + 3;
                        self.state = HtmlState::Text;
                    }
                    None => i = b.len(),
                },
                HtmlState::Raw(name) => {
                    let close = format!("</{name}");
                    match find_ignore_case(&b[i..], close.as_bytes()) {
                        Some(p) => {
                            // Parse the closing tag like any other so its `>` is consumed.
                            i += p + 1;
                            self.state = HtmlState::Tag { quote: None };
                            self.tag.clear();
                        }
                        None => i = b.len(),
                    }
                }
            }
        }
        let trimmed = out[start_len..].trim_end().len();
        out.truncate(start_len + trimmed);
    }

    fn end_tag(&mut self, out: &mut String) {
        self.state = HtmlState::Text;
        let tag = String::from_utf8_lossy(&self.tag).to_ascii_lowercase();
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if !closing && (name == "script" || name == "style") && !tag.ends_with('/') {
            self.state = HtmlState::Raw(if name == "script" { "script" } else { "style" });
            return;
        }
        if BLOCK_TAGS.contains(&name.as_str()) && !out.is_empty() && !out.ends_with(' ') {
            out.push(' ');
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn find_ignore_case(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

/// Decodes the entity at the start of `s` (`&amp;`, `&#233;`, `&#xE9;`): the character and the
/// bytes used, or None when it is not a known entity (then `&` is literal text).
fn entity(s: &str) -> Option<(char, usize)> {
    let end = s.as_bytes().iter().take(32).position(|&c| c == b';')?;
    let body = &s[1..end];
    let c = if let Some(num) = body.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse().ok()?,
        };
        char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
    } else {
        match body {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            // A non-breaking space becomes a plain one so that tokenizers split on it.
            "nbsp" => ' ',
            "ndash" => '–',
            "mdash" => '—',
            "hellip" => '…',
            "lsquo" => '‘',
            "rsquo" => '’',
            "ldquo" => '“',
            "rdquo" => '”',
            "laquo" => '«',
            "raquo" => '»',
            "copy" => '©',
            "reg" => '®',
            "trade" => '™',
            "deg" => '°',
            "euro" => '€',
            "pound" => '£',
            "times" => '×',
            "middot" => '·',
            "bull" => '•',
            _ => return None,
        }
    };
    Some((c, end + 1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkMode, word_spans};
    use std::ops::Range;

    fn words(t: &str) -> Result<Vec<Range<usize>>> {
        Ok(word_spans(t))
    }

    fn html_lines(src: &str) -> Vec<String> {
        let mut h = HtmlText::default();
        src.lines()
            .map(|l| {
                let mut s = String::new();
                h.line(l, &mut s);
                s
            })
            .collect()
    }

    #[test]
    fn html_keeps_one_output_line_per_source_line() {
        let src = "<html><head><title>T</title>\n<style>\nbody { x: 1 }\n</style></head>\n<body><p>Fish &amp; chips &lt;3 &#233;&#x41;</p>\n<!-- a\ncomment --><div>after<br>br</div>\n<script type=\"text/javascript\">if (a<b) {}\n</SCRIPT>tail <a href=\"x>y\">link</a>\n</body>";
        let got = html_lines(src);
        assert_eq!(
            got,
            [
                "T",
                "",
                "",
                "",
                "Fish & chips <3 éA",
                "",
                "after br",
                "",
                "tail link",
                ""
            ]
        );
        assert_eq!(got.len(), src.lines().count());
    }

    #[test]
    fn unknown_entities_and_bare_angles_stay_literal() {
        assert_eq!(html_lines("a & b &bogus; c < d"), ["a & b &bogus; c < d"]);
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn collect(path: &Path, format: Format, settings: &ChunkSettings) -> (ReadOutcome, Vec<Chunk>) {
        let mut chunks = Vec::new();
        let outcome = read_chunks(
            path,
            format,
            settings,
            &words,
            MAX_LINE_BYTES,
            &mut |c, _| {
                chunks.push(c);
                Ok(())
            },
        )
        .unwrap();
        (outcome, chunks)
    }

    #[test]
    fn jsonl_ids_are_kept_by_every_chunk_of_their_record() {
        let dir = tempfile::tempdir().unwrap();
        let long = (0..40)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let text = format!(
            "{{\"_id\": \"d07_012\", \"text\": \"{long}\"}}\n{{\"_id\": 42, \"text\": \"x\"}}\n{{\"text\": \"y\"}}\n{{\"_id\": [1], \"text\": \"z\"}}\n"
        );
        let p = write(dir.path(), "c.jsonl", text.as_bytes());
        let small = ChunkSettings {
            mode: ChunkMode::Tokens,
            size: 16,
            overlap: 4,
        };
        let (outcome, chunks) = collect(&p, Format::Jsonl, &small);
        let ids: Vec<Option<&str>> = chunks.iter().map(|c| c.doc_id.as_deref()).collect();
        // 40 words in windows of 16 advancing by 12: 3 chunks, all of d07_012.
        assert_eq!(
            ids,
            [
                Some("d07_012"),
                Some("d07_012"),
                Some("d07_012"),
                Some("42"),
                None
            ]
        );
        let ReadOutcome::Read { warnings, .. } = outcome else {
            panic!("not read: {outcome:?}")
        };
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0]
                .to_string()
                .ends_with("c.jsonl:4: field `_id` is not a string or a number"),
            "{}",
            warnings[0]
        );
    }

    #[test]
    fn jsonl_records_cite_their_line_and_bad_lines_are_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "d.jsonl",
            b"{\"text\": \"alpha beta\", \"title\": \"A\"}\n\n{\"text\": 3}\nnot json\n{\"text\": \"gamma\"}\n",
        );
        let (outcome, chunks) = collect(&p, Format::Jsonl, &ChunkSettings::default());
        let got: Vec<(&str, usize, Option<&str>)> = chunks
            .iter()
            .map(|c| (c.text.as_str(), c.line_start, c.title.as_deref()))
            .collect();
        assert_eq!(got, [("alpha beta", 1, Some("A")), ("gamma", 5, None)]);
        let ReadOutcome::Read { warnings, .. } = outcome else {
            panic!("not read: {outcome:?}")
        };
        let shown: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(shown.len(), 2);
        assert!(
            shown[0].ends_with("d.jsonl:3: field `text` is not a string"),
            "{shown:?}"
        );
        assert!(shown[1].contains("d.jsonl:4: invalid JSON"), "{shown:?}");
    }

    #[test]
    fn binary_invalid_utf8_and_empty_files_are_skips() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkSettings::default();
        let bin = write(dir.path(), "b.txt", b"abc\0def");
        let bad = write(dir.path(), "u.txt", b"fine\nstill fine\nbad \xff byte\n");
        let empty = write(dir.path(), "e.txt", b"");
        let blank = write(dir.path(), "w.md", b"\n  \n\t\n");
        assert!(matches!(
            collect(&bin, Format::Text, &s).0,
            ReadOutcome::Skipped(Skip::Binary)
        ));
        assert!(matches!(
            collect(&bad, Format::Text, &s).0,
            ReadOutcome::Skipped(Skip::InvalidUtf8 { line: 3 })
        ));
        assert!(matches!(
            collect(&empty, Format::Text, &s).0,
            ReadOutcome::Skipped(Skip::Empty)
        ));
        assert!(matches!(
            collect(&blank, Format::Markdown, &s).0,
            ReadOutcome::Skipped(Skip::Empty)
        ));
        assert_eq!(scan(&empty, MAX_LINE_BYTES), Err(Skip::Empty));
        assert_eq!(
            scan(&bad, MAX_LINE_BYTES),
            Err(Skip::InvalidUtf8 { line: 3 })
        );
    }

    #[test]
    fn over_long_lines_are_skips_and_crlf_bom_are_stripped() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "l.txt",
            b"\xEF\xBB\xBFone\r\ntwo\r\n0123456789\n",
        );
        assert_eq!(scan(&p, 9), Err(Skip::LineTooLong { line: 3, limit: 9 }));
        let mut lines = Lines::open(&p, 10).unwrap();
        assert_eq!(lines.next_line().unwrap(), Some((1, "one")));
        assert_eq!(lines.next_line().unwrap(), Some((2, "two")));
        assert_eq!(lines.next_line().unwrap(), Some((3, "0123456789")));
        assert_eq!(lines.next_line().unwrap(), None);
        // The hash covers the raw bytes, BOM and CRs included.
        assert_eq!(
            lines.sha256(),
            format!(
                "{:x}",
                Sha256::digest(b"\xEF\xBB\xBFone\r\ntwo\r\n0123456789\n")
            )
        );
    }

    #[test]
    fn walk_sorts_dedups_skips_hidden_unsupported_links_and_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sub/.git")).unwrap();
        std::fs::create_dir_all(d.join("idx")).unwrap();
        write(d, "b.md", b"x");
        write(d, "a.txt", b"x");
        write(d, "c.pdf", b"x");
        write(d, "noext", b"x");
        write(&d.join("sub"), "d.html", b"x");
        write(&d.join("sub/.git"), "e.txt", b"x");
        write(&d.join("idx"), "index.db", b"x");
        // A link to an indexed file is the same source; a link to a folder is not followed.
        std::os::unix::fs::symlink(d.join("b.md"), d.join("sub/link.md")).unwrap();
        std::os::unix::fs::symlink(d.join("sub"), d.join("zz")).unwrap();
        let w = walk(&[d.to_owned(), d.join("a.txt")], Some(&d.join("idx"))).unwrap();
        let root = d.canonicalize().unwrap();
        let files: Vec<_> = w
            .files
            .iter()
            .map(|f| f.path.strip_prefix(&root).unwrap())
            .collect();
        assert_eq!(
            files,
            [
                Path::new("a.txt"),
                Path::new("b.md"),
                Path::new("sub/d.html")
            ]
        );
        let skipped: Vec<(_, &str)> = w
            .skipped
            .iter()
            .map(|(p, s)| (p.strip_prefix(&root).unwrap(), s.kind()))
            .collect();
        assert_eq!(
            skipped,
            [
                (Path::new("c.pdf"), "pdf"),
                (Path::new("noext"), "unsupported"),
                (Path::new("sub/.git"), "not-walked"),
                (Path::new("zz"), "not-walked")
            ]
        );
        assert!(
            walk(&[d.join("missing")], None)
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }

    #[test]
    fn markdown_files_stream_through_the_structure_chunker() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "g.md",
            b"# Title\r\nsome text\r\n\r\n## Part\r\nmore\r\n",
        );
        let s = ChunkSettings {
            mode: ChunkMode::Structure,
            size: 100,
            overlap: 10,
        };
        let (_, chunks) = collect(&p, Format::Markdown, &s);
        let got: Vec<_> = chunks
            .iter()
            .map(|c| (c.line_start, c.line_end, c.headings.join("/")))
            .collect();
        assert_eq!(got, [(1, 2, "Title".into()), (4, 5, "Title/Part".into())]);
    }
}
