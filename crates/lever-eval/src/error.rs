//! The one error type of lever-eval: each names the file and line, or the item, at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// (The I/O error is in the message, not a `source`, so the one-line chain says it once.)
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A data line that is not a usable item (bad JSON, a missing or mistyped field, ...).
    #[error("{path}:{line}: {problem}")]
    Line {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    /// An item that parsed but cannot be scored (too long for the context, no tokens, ...).
    /// `origin` is `FILE:LINE` for items read from a file.
    #[error("{origin}: {problem}")]
    Item { origin: String, problem: String },
    #[error(transparent)]
    Generate(#[from] lever_generate::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Generate(lever_generate::Error::from(e))
    }
}

pub type Result<T> = std::result::Result<T, Error>;
