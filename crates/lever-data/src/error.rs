//! The one error type of lever-data: each names the file and line (and field) at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not valid JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A line that is not text (bytes that are not UTF-8).
    #[error("{path}:{line}: {problem}")]
    Text {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{path}:{line}: field `{field}`: {problem}")]
    Field {
        path: PathBuf,
        line: usize,
        field: String,
        problem: String,
    },
    #[error("{path}: {problem}")]
    Dataset { path: PathBuf, problem: String },
    #[error("{what}: {problem}")]
    Usage { what: String, problem: String },
    /// A tokenizer.json that cannot be used (unreadable, or lacking a token asked for).
    #[error("{path}: {problem}")]
    Tokenizer { path: PathBuf, problem: String },
    /// A token shard or shard folder that cannot be read as one.
    #[error("{path}: {problem}")]
    Shard { path: PathBuf, problem: String },
    #[error(transparent)]
    Model(#[from] lever_model::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
