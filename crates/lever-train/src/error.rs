//! The one error type of lever-train.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {problem}")]
    Config { what: String, problem: String },
    /// A run folder that cannot be used as asked (a run already there, no checkpoint, ...).
    #[error("{path}: {problem}")]
    Run { path: PathBuf, problem: String },
    /// A checkpoint folder that is torn or corrupt (checkpoint.rs).
    #[error("{path}: {problem}")]
    Checkpoint { path: PathBuf, problem: String },
    /// MPI ranks started with different settings (or holding different weights): every
    /// rank finds the same difference and returns this error.
    #[error("MPI ranks disagree on {what}: {problem}")]
    Disagree { what: String, problem: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] lever_model::Error),
    #[error(transparent)]
    Data(#[from] lever_data::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
