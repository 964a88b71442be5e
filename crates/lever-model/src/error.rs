//! The one error type of lever-model. Every variant names the file, field or tensor at fault,
//! so the CLI can print it as one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file or corrupt header ({detail})")]
    GgufHeader { path: PathBuf, detail: String },
    #[error(
        "{path}: truncated file: tensor `{tensor}` needs bytes up to {needed}, file has {actual}"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        actual: u64,
    },
    #[error("{path}: metadata `{key}`: {problem}")]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{path}: unsupported architecture `{arch}` (lever runs: {supported})")]
    UnsupportedArch {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    #[error("{path}: tensor `{tensor}`: {problem}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        problem: String,
    },
    #[error("{path}: field `{field}`: {problem}")]
    Config {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("{path}: tokenizer: {problem}")]
    Tokenizer { path: PathBuf, problem: String },
    #[error("{what}{}: {message}", location(*line, *col))]
    Template {
        /// "chat template" or "prompt template".
        what: &'static str,
        message: String,
        line: Option<usize>,
        col: Option<usize>,
    },
    #[error("model `{reference}`: {problem}")]
    ModelRef { reference: String, problem: String },
    #[error("provisioning `{name}`: {problem}")]
    Provision { name: String, problem: String },
    #[error("prompt is {tokens} tokens, {over} over the model's context of {context} tokens")]
    ContextOverflow {
        tokens: usize,
        context: usize,
        over: usize,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn location(line: Option<usize>, col: Option<usize>) -> String {
    match (line, col) {
        (Some(l), Some(c)) => format!(" (line {l}, column {c})"),
        (Some(l), None) => format!(" (line {l})"),
        _ => String::new(),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
