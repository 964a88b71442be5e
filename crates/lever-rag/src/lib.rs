//! lever-rag: rung 3. Documents are read and chunked (with their source path and line span for
//! citations), embedded, and kept in a directory index backed by SQLite; retrieval is exact or
//! HNSW dense search, BM25, or both fused by reciprocal rank; BEIR folders measure it.
//!
//! The embedder is behind the [`Embed`] trait so that the index logic can be tested on its own;
//! lever's BERT encoder (lever-model) implements it in the binary.
//!
//! Storage and ingest, in data-flow order:
//! - [`read`]: walk paths; stream .txt/.md/.html/.jsonl files line by line; count skips.
//! - [`chunk`]: token windows or heading/paragraph-aware chunks, each with its line span.
//! - [`ingest`]: [`Index::add`], incremental by content hash, one transaction per file,
//!   progress as [`Event`]s.
//! - [`store`]: the index directory (SQLite, WAL): schema, [`Index::remove`], stats,
//!   iteration, chunk lookup, exact dense search.
//! - [`testing`]: a deterministic hashed bag-of-words embedder for tests.
//!
//! Answering: [`answer()`] retrieves, fits the passages to the token budget, builds the
//! grounded prompt ([`prompt`]), generates through a `lever_generate::Generator` and reads the
//! citations: all passages in one prompt. [`latent`] treats the passage as a latent variable
//! instead, as the RAG paper does (RAG-Sequence, RAG-Token; the equations and their gradients
//! in [`marginal`]); [`qa`] measures either on open-domain questions (exact match, F1,
//! retrieval recall).
//!
//! ```
//! use lever_rag::{AddOptions, ChunkSettings, Index, testing::HashEmbed};
//! # fn main() -> lever_rag::Result<()> {
//! # let tmp = tempfile::tempdir().unwrap();
//! # let docs = tmp.path().join("docs");
//! # std::fs::create_dir(&docs).unwrap();
//! # std::fs::write(docs.join("a.md"), "# Title\nsome words\n\nother words\n").unwrap();
//! let embedder = HashEmbed::new(64); // the binary passes the BERT encoder
//! let dir = tmp.path().join("idx");
//! let mut index = Index::create(&dir, &embedder, &ChunkSettings::default())?;
//! let report = index.add(&[&docs], &embedder, &AddOptions::default(), &mut |_event| {})?;
//! assert_eq!((report.added, index.stats()?.chunks), (1, 1));
//!
//! let hits = index.search_text(&embedder, "some words", 3)?;
//! let best = index.chunk(hits[0].chunk_id)?.expect("hits name stored chunks");
//! assert_eq!((best.line_start, best.line_end, best.headings), (1, 4, vec!["Title".to_string()]));
//! # Ok(()) }
//! ```

pub mod analyze;
pub mod answer;
pub mod beir;
pub mod bm25;
pub mod chunk;
pub mod embedder;
pub mod error;
pub mod evaluate;
pub mod exact;
pub mod fuse;
pub mod hnsw;
pub mod ingest;
pub mod latent;
pub mod marginal;
pub mod metrics;
pub mod prompt;
pub mod qa;
pub mod read;
pub mod retrieve;
pub mod store;
pub mod testing;

use std::ops::Range;

pub use answer::{Answer, AnswerOptions, Step, answer};
pub use chunk::{Chunk, ChunkMode, ChunkSettings};
pub use error::{Error, Result};
pub use ingest::{AddOptions, AddReport, Event, FileOutcome, Progress};
// `store::Hit` (chunk ids as SQLite keeps them) and `exact::VectorMatrix` stay in their modules.
pub use retrieve::{DenseIndex, Mode, Retriever};
pub use store::{ChunkRecord, Index, OpenOptions, Stats};

/// Turns texts into L2-normalized vectors. `id` names the model (and its settings) so that an
/// index refuses to mix vectors from different embedders.
pub trait Embed {
    fn id(&self) -> String;
    fn dim(&self) -> usize;
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;

    /// Byte ranges, within `text`, of the tokens the model sees, without special tokens such as
    /// `[CLS]`/`[SEP]`. The chunker counts these to fill a chunk up to the model's limit without
    /// the encoder truncating it. The default counts whitespace-separated words, which
    /// undercounts word pieces (about 1.3 per English word for BERT's WordPiece), so an embedder
    /// that has a tokenizer should override it (e.g. from `tokenizers::Encoding::get_offsets`).
    fn token_spans(&self, text: &str) -> Result<Vec<Range<usize>>> {
        Ok(chunk::word_spans(text))
    }
}
