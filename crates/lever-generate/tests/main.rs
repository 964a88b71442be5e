//! lever-generate's integration tests, one module per file, built as one test binary: a release
//! test build links (thin LTO) each binary once, and that linking was most of CI's time when
//! every file was its own binary. `cargo test --release -p lever-generate --test integration FILE::`
//! runs one file's tests.

mod constrain;
mod remote_stream;
