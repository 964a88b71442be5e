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
}

pub type Result<T> = std::result::Result<T, Error>;
