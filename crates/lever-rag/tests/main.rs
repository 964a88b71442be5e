//! lever-rag's integration tests, one module per file, built as one test binary: a release
//! test build links (thin LTO) each binary once, and that linking was most of CI's time when
//! every file was its own binary. `cargo test --release -p lever-rag --test integration FILE::`
//! runs one file's tests.

mod common;

mod hnsw_recall;
mod index;
mod ir_metrics_fixture;
mod latent_retrieval;
mod rag_marginal;
mod retrieve;
mod safety;
mod scifact_bm25;
