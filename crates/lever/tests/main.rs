//! lever's integration tests, one module per file, built as one test binary: a release
//! test build links (thin LTO) each binary once, and that linking was most of CI's time when
//! every file was its own binary. `cargo test --release -p lever --test integration FILE::`
//! runs one file's tests.
//!
//! hostile.rs and pretrain_data.rs are binaries of their own: they read a child's peak RSS
//! from `wait4`, and Linux starts an exec'd child's `ru_maxrss` at its parent's peak (the
//! spawn shares the parent's memory until the exec), so in this binary, grown by the tests
//! that load models in-process, every child would read as ~2 GB.

mod common;

mod cli;
mod data_parallel;
mod eval_mc;
mod eval_task;
mod export;
mod finetune;
mod ladder;
mod plan;
mod pretrain;
mod rag;
mod rag_latent;
mod rag_train;
mod reference_llama_cpp;
mod report_browser;
mod safe_writes;
mod serve;
