//! lever-rag: rung 3. Documents are read and chunked (with their source path and line span for
//! citations), embedded, and kept in a directory index backed by SQLite; retrieval is exact or
//! HNSW dense search, BM25, or both fused by reciprocal rank; BEIR folders measure it.
//!
//! The embedder is behind the [`Embed`] trait so that the index logic can be tested on its own;
//! lever's BERT encoder (lever-model) implements it in the binary.

pub mod analyze;
pub mod beir;
pub mod bm25;
pub mod error;
pub mod exact;
pub mod fuse;
pub mod hnsw;
pub mod metrics;

pub use error::{Error, Result};

/// Turns texts into L2-normalized vectors. `id` names the model (and its settings) so that an
/// index refuses to mix vectors from different embedders.
pub trait Embed {
    fn id(&self) -> String;
    fn dim(&self) -> usize;
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;
}
