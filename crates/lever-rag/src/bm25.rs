//! BM25 over an in-memory inverted index, scored as Lucene's `BM25Similarity` scores it
//! (Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009;
//! Lucene 8+ `BM25Similarity`):
//!
//! ```text
//! idf(t)      = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))
//! score(q, d) = Σ_{t ∈ q} qtf(t) · idf(t) · tf(t,d) / (tf(t,d) + k1 · (1 − b + b · |d| / avgdl))
//! ```
//!
//! N counts the documents with at least one term, avgdl is their mean length in terms (after
//! the analyzer), and a term repeated in the query counts once per repetition (Anserini's
//! bag-of-words query boosts each term by its count). Lucene dropped the constant (k1 + 1)
//! numerator factor in version 8; it does not change rankings. Defaults k1 = 0.9, b = 0.4 are
//! Anserini's BEIR settings. Lucene stores |d| in one byte (`SmallFloat.intToByte4`, 4
//! significant bits); we do the same by default ([`Bm25Params::lucene_norms`]) so that rankings
//! equal Lucene's: on SciFact (5,183 docs, 809 queries) every top-10 list is identical to
//! Lucene 8.7's and scores agree within 1e-5 (scripts/lucene-bm25-reference.sh).
//!
//! The index is incremental: [`Bm25::add`] (an existing id is replaced) and [`Bm25::remove`].
//! [`Bm25::save`] writes a compact binary file atomically, tagged with a caller's `generation`;
//! its container ([`write_index_file`], [`read_index_file`]) is shared with the HNSW index.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::analyze::Analyzer;
use crate::fuse::{Hit, TopK};
use crate::{Error, Result};

/// BM25's free parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bm25Params {
    /// Term-frequency saturation.
    pub k1: f32,
    /// Document-length normalization, 0 (none) to 1 (full).
    pub b: f32,
    /// Use |d| as Lucene stores it, rounded to 4 significant bits above 24 terms
    /// ([`lucene_length`]), instead of the exact length. On by default, so that scores and
    /// rankings equal Lucene's (and so Anserini's).
    pub lucene_norms: bool,
}

impl Default for Bm25Params {
    /// Anserini's BEIR regressions: k1 = 0.9, b = 0.4, Lucene's document lengths.
    fn default() -> Self {
        Bm25Params {
            k1: 0.9,
            b: 0.4,
            lucene_norms: true,
        }
    }
}

impl Bm25Params {
    fn check(&self) -> Result<()> {
        if !(self.k1.is_finite() && self.k1 >= 0.0) {
            return Err(Error::Param {
                name: "k1",
                value: self.k1.to_string(),
                problem: "must be finite and >= 0",
            });
        }
        if !(0.0..=1.0).contains(&self.b) {
            return Err(Error::Param {
                name: "b",
                value: self.b.to_string(),
                problem: "must be in [0, 1]",
            });
        }
        Ok(())
    }
}

/// One entry of a posting list: a document slot and the term's frequency in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Posting {
    slot: u32,
    tf: u32,
}

/// A live document: its id, its length in terms, and its terms (for removal).
#[derive(Debug, Clone)]
struct Doc {
    id: u64,
    len: u32,
    terms: Vec<Posting>, // here `slot` holds the term id
}

/// An inverted index with BM25 scoring.
#[derive(Debug, Clone)]
pub struct Bm25 {
    analyzer: Analyzer,
    params: Bm25Params,
    term_ids: HashMap<String, u32>,
    terms: Vec<String>,
    /// Per term, sorted by slot.
    postings: Vec<Vec<Posting>>,
    /// Per slot; `None` once removed. Slots only grow until [`Bm25::compact`].
    docs: Vec<Option<Doc>>,
    slot_of: HashMap<u64, u32>,
    /// Documents with at least one term, and their total length (Lucene's docCount and
    /// sumTotalTermFreq).
    n_scored: u64,
    total_len: u64,
}

impl Bm25 {
    /// An empty index.
    pub fn new(params: Bm25Params, analyzer: Analyzer) -> Result<Bm25> {
        params.check()?;
        Ok(Bm25 {
            analyzer,
            params,
            term_ids: HashMap::new(),
            terms: Vec::new(),
            postings: Vec::new(),
            docs: Vec::new(),
            slot_of: HashMap::new(),
            n_scored: 0,
            total_len: 0,
        })
    }

    /// An index of `docs` (id, text); a repeated id keeps its last text.
    pub fn build<'a>(
        docs: impl IntoIterator<Item = (u64, &'a str)>,
        params: Bm25Params,
        analyzer: Analyzer,
    ) -> Result<Bm25> {
        let mut index = Bm25::new(params, analyzer)?;
        for (id, text) in docs {
            index.add(id, text)?;
        }
        Ok(index)
    }

    pub fn params(&self) -> Bm25Params {
        self.params
    }

    pub fn analyzer(&self) -> Analyzer {
        self.analyzer
    }

    /// The number of documents indexed.
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.slot_of.contains_key(&id)
    }

    /// Indexes `text` under `id`, replacing what `id` held before.
    pub fn add(&mut self, id: u64, text: &str) -> Result<()> {
        let tokens = self.analyzer.analyze(text);
        self.add_terms(id, &tokens)
    }

    /// Indexes already-analyzed terms under `id`, replacing what `id` held before. Fails only
    /// past 2^32 − 1 documents, distinct terms or terms in one document (slots are u32).
    pub fn add_terms(&mut self, id: u64, tokens: &[String]) -> Result<()> {
        let too_many = |name, value: usize| Error::Param {
            name,
            value: value.to_string(),
            problem: "a BM25 index counts documents, terms and lengths in u32",
        };
        let len =
            u32::try_from(tokens.len()).map_err(|_| too_many("document length", tokens.len()))?;
        self.remove(id);
        if self.docs.len() >= u32::MAX as usize {
            self.compact();
            if self.docs.len() >= u32::MAX as usize {
                return Err(too_many("documents", self.docs.len()));
            }
        }
        if self.terms.len() + tokens.len() >= u32::MAX as usize {
            return Err(too_many("terms", self.terms.len()));
        }
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for token in tokens {
            let term = match self.term_ids.get(token.as_str()) {
                Some(&t) => t,
                None => {
                    let t = self.terms.len() as u32;
                    self.term_ids.insert(token.clone(), t);
                    self.terms.push(token.clone());
                    self.postings.push(Vec::new());
                    t
                }
            };
            *counts.entry(term).or_insert(0) += 1;
        }
        let slot = self.docs.len() as u32;
        let mut terms: Vec<Posting> = counts
            .into_iter()
            .map(|(term, tf)| Posting { slot: term, tf })
            .collect();
        terms.sort_by_key(|p| p.slot);
        for p in &terms {
            self.postings[p.slot as usize].push(Posting { slot, tf: p.tf });
        }
        if len > 0 {
            self.n_scored += 1;
            self.total_len += u64::from(len);
        }
        self.docs.push(Some(Doc { id, len, terms }));
        self.slot_of.insert(id, slot);
        Ok(())
    }

    /// Removes `id`; returns whether it was there.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(slot) = self.slot_of.remove(&id) else {
            return false;
        };
        let Some(doc) = self.docs[slot as usize].take() else {
            return false;
        };
        for p in &doc.terms {
            let list = &mut self.postings[p.slot as usize];
            if let Ok(i) = list.binary_search_by_key(&slot, |q| q.slot) {
                list.remove(i);
            }
        }
        if doc.len > 0 {
            self.n_scored -= 1;
            self.total_len -= u64::from(doc.len);
        }
        // Keep removed slots from outnumbering live ones.
        let dead = self.docs.len() - self.slot_of.len();
        if dead > 1024 && dead > self.slot_of.len() {
            self.compact();
        }
        true
    }

    /// Renumbers slots densely, dropping removed documents and unused terms.
    pub fn compact(&mut self) {
        let mut new_slot = vec![u32::MAX; self.docs.len()];
        let mut docs = Vec::with_capacity(self.slot_of.len());
        for (old, doc) in std::mem::take(&mut self.docs).into_iter().enumerate() {
            if let Some(doc) = doc {
                new_slot[old] = docs.len() as u32;
                docs.push(Some(doc));
            }
        }
        let mut new_term = vec![u32::MAX; self.terms.len()];
        let mut terms = Vec::new();
        let mut postings = Vec::new();
        for (t, list) in std::mem::take(&mut self.postings).into_iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            new_term[t] = terms.len() as u32;
            terms.push(std::mem::take(&mut self.terms[t]));
            postings.push(
                list.into_iter()
                    .map(|p| Posting {
                        slot: new_slot[p.slot as usize],
                        tf: p.tf,
                    })
                    .collect(),
            );
        }
        for doc in docs.iter_mut().flatten() {
            for p in &mut doc.terms {
                p.slot = new_term[p.slot as usize];
            }
        }
        self.slot_of = docs
            .iter()
            .enumerate()
            .filter_map(|(s, d)| d.as_ref().map(|d| (d.id, s as u32)))
            .collect();
        self.term_ids = terms
            .iter()
            .enumerate()
            .map(|(t, s)| (s.clone(), t as u32))
            .collect();
        self.terms = terms;
        self.postings = postings;
        self.docs = docs;
    }

    /// Lucene's idf of a term in `df` documents.
    fn idf(&self, df: usize) -> f32 {
        let n = self.n_scored as f32;
        let df = df as f32;
        (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
    }

    /// |d| as the score sees it.
    fn doc_len(&self, len: u32) -> f32 {
        if self.params.lucene_norms {
            lucene_length(len) as f32
        } else {
            len as f32
        }
    }

    fn avgdl(&self) -> f32 {
        if self.n_scored == 0 {
            1.0
        } else {
            self.total_len as f32 / self.n_scored as f32
        }
    }

    /// The query's distinct known terms with their counts, in first-seen order.
    fn query_terms(&self, tokens: &[String]) -> Vec<(u32, f32)> {
        let mut out: Vec<(u32, f32)> = Vec::new();
        for token in tokens {
            if let Some(&t) = self.term_ids.get(token.as_str()) {
                match out.iter_mut().find(|(u, _)| *u == t) {
                    Some((_, c)) => *c += 1.0,
                    None => out.push((t, 1.0)),
                }
            }
        }
        out
    }

    /// The top `k` documents for `query`, best first (equal scores: smaller id first).
    /// Documents sharing no term with the query are not returned.
    pub fn search(&self, query: &str, k: usize) -> Vec<Hit> {
        self.search_terms(&self.analyzer.analyze(query), k)
    }

    /// [`Bm25::search`] with already-analyzed query terms.
    pub fn search_terms(&self, tokens: &[String], k: usize) -> Vec<Hit> {
        let qterms = self.query_terms(tokens);
        if qterms.is_empty() || k == 0 {
            return Vec::new();
        }
        // Term-at-a-time accumulation over a dense score array.
        let mut acc = vec![0f32; self.docs.len()];
        let mut touched: Vec<u32> = Vec::new();
        let (k1, b, avgdl) = (self.params.k1, self.params.b, self.avgdl());
        for (t, qtf) in qterms {
            let list = &self.postings[t as usize];
            if list.is_empty() {
                continue;
            }
            let weight = qtf * self.idf(list.len());
            for p in list {
                let Some(doc) = &self.docs[p.slot as usize] else {
                    continue;
                };
                let tf = p.tf as f32;
                let norm = k1 * (1.0 - b + b * self.doc_len(doc.len) / avgdl);
                let slot = p.slot as usize;
                if acc[slot] == 0.0 {
                    touched.push(p.slot);
                }
                acc[slot] += weight * tf / (tf + norm);
            }
        }
        let mut top = TopK::new(k);
        for slot in touched {
            if let Some(doc) = &self.docs[slot as usize] {
                top.push(Hit {
                    id: doc.id,
                    score: acc[slot as usize],
                });
            }
        }
        top.into_sorted()
    }

    /// The BM25 score of one document for `query` (0 when it shares no term; `None` for an
    /// unknown id).
    pub fn score(&self, query: &str, id: u64) -> Option<f32> {
        let slot = *self.slot_of.get(&id)?;
        let doc = self.docs[slot as usize].as_ref()?;
        let (k1, b, avgdl) = (self.params.k1, self.params.b, self.avgdl());
        let mut score = 0f32;
        for (t, qtf) in self.query_terms(&self.analyzer.analyze(query)) {
            let Some(tf) = doc.terms.iter().find(|p| p.slot == t).map(|p| p.tf as f32) else {
                continue;
            };
            let df = self.postings[t as usize].len();
            score +=
                qtf * self.idf(df) * tf / (tf + k1 * (1.0 - b + b * self.doc_len(doc.len) / avgdl));
        }
        Some(score)
    }

    /// Writes the index to `path` atomically (temp file, fsync, rename), tagged with
    /// `generation` (the store's counter, read back by [`Bm25::load`] and [`read_generation`]).
    ///
    /// Payload: analyzer code u8, k1 f32, b f32, lucene_norms u8, doc count, then (id u64, length) per live
    /// document in slot order, term count, then per term its text and its postings as
    /// (slot delta, tf) varints.
    pub fn save(&self, path: &Path, generation: u64) -> Result<()> {
        let mut live_slot = vec![u32::MAX; self.docs.len()];
        let mut w = Enc::default();
        w.u8(self.analyzer.code());
        w.f32(self.params.k1);
        w.f32(self.params.b);
        w.u8(u8::from(self.params.lucene_norms));
        w.var(self.slot_of.len() as u64);
        let mut n = 0u32;
        for (slot, doc) in self.docs.iter().enumerate() {
            if let Some(doc) = doc {
                live_slot[slot] = n;
                n += 1;
                w.u64(doc.id);
                w.var(u64::from(doc.len));
            }
        }
        let used = self.postings.iter().filter(|l| !l.is_empty()).count();
        w.var(used as u64);
        for (term, list) in self.terms.iter().zip(&self.postings) {
            if list.is_empty() {
                continue;
            }
            w.bytes(term.as_bytes());
            w.var(list.len() as u64);
            let mut prev = 0u32;
            for p in list {
                let s = live_slot[p.slot as usize];
                w.var(u64::from(s - prev));
                w.var(u64::from(p.tf));
                prev = s;
            }
        }
        write_index_file(path, BM25_MAGIC, BM25_VERSION, generation, &w.buf)
    }

    /// The generation tag of a saved index, from its header alone (cheap staleness check).
    pub fn read_generation(path: &Path) -> Result<u64> {
        read_generation(path, BM25_MAGIC, BM25_VERSION)
    }

    /// Reads an index written by [`Bm25::save`]; returns it with its generation tag.
    pub fn load(path: &Path) -> Result<(Bm25, u64)> {
        let (generation, payload) = read_index_file(path, BM25_MAGIC, BM25_VERSION)?;
        let mut r = Dec::new(path, &payload);
        let code = r.u8("analyzer")?;
        let analyzer = Analyzer::from_code(code)
            .ok_or_else(|| r.corrupt(format!("unknown analyzer code {code}")))?;
        let k1 = r.f32("k1")?;
        let b = r.f32("b")?;
        let lucene_norms = match r.u8("lucene_norms")? {
            0 => false,
            1 => true,
            x => return Err(r.corrupt(format!("lucene_norms flag {x}"))),
        };
        let params = Bm25Params {
            k1,
            b,
            lucene_norms,
        };
        params.check().map_err(|e| r.corrupt(e.to_string()))?;
        let mut index = Bm25::new(params, analyzer)?;
        let n_docs = r.count("document count", 9)?;
        for slot in 0..n_docs {
            let id = r.u64("document id")?;
            let len = r.var_u32("document length")?;
            if index.slot_of.insert(id, slot as u32).is_some() {
                return Err(r.corrupt(format!("document id {id} appears twice")));
            }
            if len > 0 {
                index.n_scored += 1;
                index.total_len += u64::from(len);
            }
            index.docs.push(Some(Doc {
                id,
                len,
                terms: Vec::new(),
            }));
        }
        let n_terms = r.count("term count", 2)?;
        for t in 0..n_terms as u32 {
            let term = String::from_utf8(r.bytes("term")?.to_vec())
                .map_err(|_| r.corrupt("a term is not UTF-8".into()))?;
            let df = r.count("posting count", 2)?;
            let mut list = Vec::with_capacity(df);
            let mut slot = 0u64;
            for i in 0..df {
                let delta = r.var("posting slot")?;
                slot += delta;
                if (i > 0 && delta == 0) || slot >= n_docs as u64 {
                    return Err(r.corrupt(format!("posting slot {slot} out of order or range")));
                }
                let tf = r.var_u32("term frequency")?;
                list.push(Posting {
                    slot: slot as u32,
                    tf,
                });
                if let Some(doc) = index.docs[slot as usize].as_mut() {
                    doc.terms.push(Posting { slot: t, tf });
                }
            }
            if index.term_ids.insert(term.clone(), t).is_some() {
                return Err(r.corrupt(format!("term {term:?} appears twice")));
            }
            index.terms.push(term);
            index.postings.push(list);
        }
        r.finish()?;
        Ok((index, generation))
    }
}

/// A document length as Lucene's norms keep it: `SmallFloat.byte4ToInt(SmallFloat.intToByte4(len))`
/// (Lucene 7+, `org.apache.lucene.util.SmallFloat`). Lengths below 24 are exact; above, the
/// length minus 24 keeps its 4 most significant bits (rounded down), e.g. 200..=215 → 200.
pub fn lucene_length(len: u32) -> u32 {
    // 255 − longToInt4(i32::MAX) = 255 − 231 = 24 byte values encode small lengths directly.
    const FREE: u32 = 24;
    if len < FREE {
        return len;
    }
    let i = len - FREE;
    let bits = 32 - i.leading_zeros();
    if bits < 4 {
        return len; // "subnormal": exact
    }
    let shift = bits - 4;
    ((i >> shift) << shift) + FREE
}

// ---------------------------------------------------------------------------------------------
// The index file container, shared by BM25 and HNSW
// ---------------------------------------------------------------------------------------------

/// Magic bytes and format version of BM25 index files.
pub const BM25_MAGIC: [u8; 8] = *b"LVRBM25\0";
pub const BM25_VERSION: u32 = 1;

/// Header: magic (8 bytes), version u32, generation u64, payload length u64; then the payload;
/// then the SHA-256 of everything before it. All integers little-endian.
const HEADER_LEN: usize = 8 + 4 + 8 + 8;
const DIGEST_LEN: usize = 32;

/// Writes `payload` to `path` in the container format, atomically (`fsutil::write_atomic`):
/// a crash leaves the old file or the new one.
pub fn write_index_file(
    path: &Path,
    magic: [u8; 8],
    version: u32,
    generation: u64,
    payload: &[u8],
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let mut head = Vec::with_capacity(HEADER_LEN);
    head.extend_from_slice(&magic);
    head.extend_from_slice(&version.to_le_bytes());
    head.extend_from_slice(&generation.to_le_bytes());
    head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut hasher = Sha256::new();
    hasher.update(&head);
    hasher.update(payload);
    let digest = hasher.finalize();
    lever_model::fsutil::write_atomic(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(io(path))?;
        let mut out = std::io::BufWriter::new(file);
        out.write_all(&head).map_err(io(path))?;
        out.write_all(payload).map_err(io(path))?;
        out.write_all(&digest).map_err(io(path))?;
        out.flush().map_err(io(path))
    })
}

fn file_error(path: &Path, problem: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Checks the header of `bytes` (magic, version) and returns (generation, payload length).
fn parse_header(path: &Path, bytes: &[u8], magic: [u8; 8], version: u32) -> Result<(u64, u64)> {
    if bytes.len() < HEADER_LEN {
        return Err(file_error(
            path,
            format!("truncated: {} bytes, no complete header", bytes.len()),
        ));
    }
    if bytes[..8] != magic {
        return Err(file_error(
            path,
            format!(
                "not a {} file (magic {:?})",
                String::from_utf8_lossy(&magic[..7]),
                &bytes[..8]
            ),
        ));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
    let v = u32_at(8);
    if v != version {
        return Err(file_error(
            path,
            format!("format version {v}, this build reads {version}"),
        ));
    }
    Ok((u64_at(12), u64_at(20)))
}

/// Reads a container file: checks magic, version, length and checksum; returns (generation,
/// payload).
pub fn read_index_file(path: &Path, magic: [u8; 8], version: u32) -> Result<(u64, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (generation, len) = parse_header(path, &bytes, magic, version)?;
    let want = (HEADER_LEN + DIGEST_LEN) as u64 + len;
    if bytes.len() as u64 != want {
        return Err(file_error(
            path,
            format!(
                "truncated or padded: {} bytes, header says {want}",
                bytes.len()
            ),
        ));
    }
    let body = bytes.len() - DIGEST_LEN;
    let digest = Sha256::digest(&bytes[..body]);
    if digest[..] != bytes[body..] {
        return Err(file_error(path, "checksum mismatch: the file is corrupt"));
    }
    Ok((generation, bytes[HEADER_LEN..body].to_vec()))
}

/// The generation tag of a container file, reading only its header (no checksum check).
pub fn read_generation(path: &Path, magic: [u8; 8], version: u32) -> Result<u64> {
    use std::io::Read;
    let mut head = [0u8; HEADER_LEN];
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let n = file.read(&mut head).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_header(path, &head[..n], magic, version)?.0)
}

/// Little-endian payload encoder.
#[derive(Default)]
pub(crate) struct Enc {
    pub(crate) buf: Vec<u8>,
}

impl Enc {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn f32(&mut self, v: f32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// LEB128 unsigned varint.
    pub(crate) fn var(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.var(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
}

/// Payload decoder whose every error names the file, the field and the byte offset.
pub(crate) struct Dec<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub(crate) fn new(path: &'a Path, buf: &'a [u8]) -> Self {
        Dec { path, buf, pos: 0 }
    }

    pub(crate) fn corrupt(&self, problem: String) -> Error {
        file_error(
            self.path,
            format!("corrupt at payload byte {}: {problem}", self.pos),
        )
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.corrupt(format!("{what} runs past the end")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn f32(&mut self, what: &str) -> Result<f32> {
        Ok(f32::from_bits(self.u32(what)?))
    }
    pub(crate) fn var(&mut self, what: &str) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8(what)?;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.corrupt(format!("{what}: varint longer than 64 bits")))
    }
    pub(crate) fn var_u32(&mut self, what: &str) -> Result<u32> {
        let v = self.var(what)?;
        u32::try_from(v).map_err(|_| self.corrupt(format!("{what} {v} out of range")))
    }
    /// A count of items that take at least `min_bytes` each: checked against the bytes left
    /// so that a corrupt count cannot make us allocate without bound.
    pub(crate) fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize> {
        let v = self.var(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if v.saturating_mul(min_bytes as u64) > left {
            return Err(self.corrupt(format!("{what} {v} exceeds the bytes left ({left})")));
        }
        Ok(v as usize)
    }
    pub(crate) fn bytes(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.count(what, 1)?;
        self.take(n, what)
    }
    /// Fails unless every byte was read.
    pub(crate) fn finish(&self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(self.corrupt(format!("{} trailing bytes", self.buf.len() - self.pos)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<(u64, &'static str)> {
        vec![
            (1, "the quick brown fox jumps over the lazy dog"),
            (2, "a quick brown dog"),
            (3, "foxes and dogs are friends of foxes"),
            (4, "nothing relevant here at all"),
            (5, "lazy lazy lazy cats sleeping"),
        ]
    }

    fn index() -> Bm25 {
        Bm25::build(corpus(), Bm25Params::default(), Analyzer::default()).expect("valid params")
    }

    /// Lucene's formula, written out independently from the index code.
    fn lucene_score(q: &[&str], doc: &[&str], all: &[Vec<String>], k1: f32, b: f32) -> f32 {
        let n = all.len() as f32;
        let avgdl = all.iter().map(|d| d.len()).sum::<usize>() as f32 / n;
        q.iter()
            .map(|t| {
                let df = all.iter().filter(|d| d.iter().any(|x| x == t)).count() as f32;
                let tf = doc.iter().filter(|x| *x == t).count() as f32;
                let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
                idf * tf / (tf + k1 * (1.0 - b + b * doc.len() as f32 / avgdl))
            })
            .sum()
    }

    #[test]
    fn scores_equal_lucene_formula() {
        let idx = index();
        let a = Analyzer::default();
        let all: Vec<Vec<String>> = corpus().iter().map(|(_, t)| a.analyze(t)).collect();
        let hits = idx.search("lazy fox", 10);
        // Doc 1 has both terms, doc 5 "lazi" three times, doc 3 "fox" twice; 2 and 4 neither.
        assert_eq!(hits.len(), 3);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        for h in &hits {
            let doc: Vec<&str> = all[h.id as usize - 1].iter().map(String::as_str).collect();
            let want = lucene_score(&["lazi", "fox"], &doc, &all, 0.9, 0.4);
            assert!(
                (h.score - want).abs() < 1e-6,
                "doc {}: {} vs {want}",
                h.id,
                h.score
            );
            assert_eq!(idx.score("lazy fox", h.id), Some(h.score));
        }
        assert!(idx.search("the of", 10).is_empty(), "stopwords only");
        assert!(idx.search("unknownword", 10).is_empty());
        assert_eq!(idx.search("lazy fox", 2).len(), 2);
    }

    #[test]
    fn add_remove_equals_fresh_build() {
        let mut idx = index();
        assert!(idx.remove(3));
        assert!(!idx.remove(3));
        idx.add(2, "a slow brown dog").expect("add"); // replaces
        idx.add(6, "brown foxes").expect("add");
        let fresh = Bm25::build(
            [
                (1, corpus()[0].1),
                (2, "a slow brown dog"),
                (4, corpus()[3].1),
                (5, corpus()[4].1),
                (6, "brown foxes"),
            ],
            Bm25Params::default(),
            Analyzer::default(),
        )
        .expect("valid");
        for q in ["brown fox", "dog", "lazy slow"] {
            assert_eq!(idx.search(q, 10), fresh.search(q, 10), "query {q}");
        }
        assert_eq!(idx.len(), 5);
        idx.compact();
        assert_eq!(idx.search("brown fox", 10), fresh.search("brown fox", 10));
    }

    #[test]
    fn save_load_round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bm25.bin");
        let mut idx = index();
        idx.remove(2);
        idx.save(&path, 42).expect("save");
        assert!(!dir.path().join("bm25.bin.tmp").exists());
        assert_eq!(Bm25::read_generation(&path).expect("header"), 42);
        let (back, generation) = Bm25::load(&path).expect("load");
        assert_eq!(generation, 42);
        assert_eq!(back.len(), 4);
        for q in ["lazy fox", "brown dog", "friends"] {
            assert_eq!(back.search(q, 10), idx.search(q, 10));
        }
        let bytes = std::fs::read(&path).expect("read");
        // Truncated.
        std::fs::write(&path, &bytes[..bytes.len() - 5]).expect("write");
        let err = Bm25::load(&path).expect_err("truncated").to_string();
        assert!(
            err.contains("bm25.bin") && err.contains("truncated"),
            "{err}"
        );
        // A flipped byte.
        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 3] ^= 0x40;
        std::fs::write(&path, &flipped).expect("write");
        let err = Bm25::load(&path).expect_err("corrupt").to_string();
        assert!(err.contains("checksum"), "{err}");
        // Not an index at all.
        std::fs::write(&path, b"hello").expect("write");
        assert!(
            Bm25::load(&path)
                .expect_err("short")
                .to_string()
                .contains("header")
        );
        assert!(Bm25::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn lucene_lengths_match_smallfloat() {
        // Hand-worked SmallFloat values: 176 = 0b1011_0000 keeps 1011 << 4.
        let cases = [
            (0, 0),
            (23, 23),
            (24, 24),
            (31, 31),
            (32, 32),
            (39, 39),
            (40, 40),
            (41, 40),
            (200, 200),
            (215, 200),
            (216, 216),
            (1000, 984),
            (1_000_000, 983_064),
        ];
        for (len, want) in cases {
            assert_eq!(lucene_length(len), want, "length {len}");
        }
        let exact = index();
        let lucene = Bm25::build(
            corpus(),
            Bm25Params {
                lucene_norms: true,
                ..Bm25Params::default()
            },
            Analyzer::default(),
        )
        .expect("valid");
        // All these docs are shorter than 24 terms: identical scores.
        assert_eq!(exact.search("lazy fox", 10), lucene.search("lazy fox", 10));
    }

    #[test]
    fn rejects_bad_params() {
        assert!(
            Bm25::new(
                Bm25Params {
                    k1: -1.0,
                    ..Bm25Params::default()
                },
                Analyzer::default()
            )
            .is_err()
        );
        assert!(
            Bm25::new(
                Bm25Params {
                    b: 1.5,
                    ..Bm25Params::default()
                },
                Analyzer::default()
            )
            .is_err()
        );
    }
}
