//! lever-generate: generation with a KV cache, sampling, stop rules, the streaming
//! detokenizer, perplexity and the speed measurements.

pub mod bench;
pub mod generate;
pub mod perplexity;
pub mod remote;
pub mod sampling;
pub mod stream;

pub use generate::{
    FinishReason, Flow, GenerateRequest, Generation, Session, check_context, generate,
};
pub use perplexity::{Perplexity, perplexity};
pub use sampling::{Sampler, SamplingParams};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] lever_model::Error),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{0}")]
    Invalid(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(lever_model::Error::Candle(e))
    }
}

pub type Result<T> = std::result::Result<T, Error>;
