//! lever-model's integration tests, one module per file, built as one test binary: a release
//! test build links (thin LTO) each binary once, and that linking was most of CI's time when
//! every file was its own binary. `cargo test --release -p lever-model --test integration FILE::`
//! runs one file's tests.

mod encoder;
mod encoder_train;
mod gguf_types;
mod hf_tiny;
mod lora_grad;
mod step_batch;
