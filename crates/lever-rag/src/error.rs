//! The one error type of lever-rag: each names the file, line, field or index at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {problem}")]
    Line {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("embedder: {0}")]
    Embed(String),
    #[error(transparent)]
    Model(#[from] lever_model::Error),

    // ---- the document index (store.rs, ingest.rs) ----
    /// Any SQLite failure not covered by a more specific variant below.
    #[error("{path}: database error: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The file exists but is not a lever index (garbage, another program's database, or a
    /// newer schema). Nothing was written to it.
    #[error("{path}: not a usable lever index: {problem} (the file was left untouched)")]
    NotAnIndex { path: PathBuf, problem: String },
    /// Another connection held the write lock longer than the busy timeout.
    #[error(
        "{path}: index is locked by another writer (waited {waited_ms} ms); try again when it has finished"
    )]
    Locked { path: PathBuf, waited_ms: u128 },
    /// The index was built with other vectors than the embedder offered now.
    #[error(
        "{path}: index was built with embedder `{index_embedder}` (dim {index_dim}); refusing embedder `{given_embedder}` (dim {given_dim}): their vectors are not comparable; use the same embedder or a new index"
    )]
    EmbedderMismatch {
        path: PathBuf,
        index_embedder: String,
        index_dim: usize,
        given_embedder: String,
        given_dim: usize,
    },
    /// Bad chunker settings (size zero, overlap not below size, ...).
    #[error("chunker settings: {0}")]
    Settings(String),

    // ---- retrieval (bm25.rs, hnsw.rs, exact.rs) ----
    #[error("{what}: expected dimension {expected}, got {got}")]
    Dim {
        what: String,
        expected: usize,
        got: usize,
    },
    #[error("invalid parameter {name} = {value}: {problem}")]
    Param {
        name: &'static str,
        value: String,
        problem: &'static str,
    },

    // ---- answering (answer.rs) ----
    #[error("the question is empty")]
    EmptyQuestion,
    #[error(
        "{}: the index holds no passages; add documents with `lever index add PATH… --index {}`",
        path.display(),
        path.display()
    )]
    EmptyIndex { path: PathBuf },
    #[error(
        "no passage of {} matches the question ({mode} search){}",
        path.display(),
        if *mode == "hybrid" { "" } else { "; try --mode hybrid" }
    )]
    NoMatch { path: PathBuf, mode: &'static str },
    /// More passages asked for than the index holds.
    #[error("-k {k}: the index {} holds only {chunks} passages", path.display())]
    TooFewPassages {
        path: PathBuf,
        k: usize,
        chunks: usize,
    },
    /// A decoder's own invariant broken (a bug, reported rather than a panic).
    #[error("decoding: {0}")]
    Decode(String),
    /// A query encoder whose vectors cannot be compared with the index's document vectors.
    #[error(
        "{path}: index was built with embedder `{}` (dim {}); refusing query encoder `{}` (dim {}): {}",
        pair.index_embedder, pair.index_dim, pair.query_encoder, pair.query_dim, pair.why
    )]
    QueryEncoderMismatch {
        path: PathBuf,
        pair: Box<EncoderPair>,
    },
    #[error(transparent)]
    Generate(#[from] lever_generate::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(lever_model::Error::Candle(e))
    }
}

/// The two encoders of a [`Error::QueryEncoderMismatch`] (boxed: the error stays small).
#[derive(Debug)]
pub struct EncoderPair {
    pub index_embedder: String,
    pub index_dim: usize,
    pub query_encoder: String,
    pub query_dim: usize,
    pub why: String,
}

pub type Result<T> = std::result::Result<T, Error>;
