//! lever-data's integration tests, one module per file, built as one test binary: a release
//! test build links (thin LTO) each binary once, and that linking was most of CI's time when
//! every file was its own binary. `cargo test --release -p lever-data --test integration FILE::`
//! runs one file's tests.

mod real_data;
mod shards;
mod tokenizer_hf;
