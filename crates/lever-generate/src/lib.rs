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
    /// Logits that are NaN or infinite: the weights hold NaN/inf (or overflow), and every
    /// answer or score computed from them would be silently meaningless.
    #[error(
        "{}: logits after token {position} are {what} (the model's weights hold NaN or infinity?)",
        model.display()
    )]
    NonFinite {
        model: std::path::PathBuf,
        position: usize,
        what: &'static str,
    },
}

/// An error if `logits` (one row) hold NaN or an infinity; `position` is the index in the
/// sequence of the token they follow. One pass over V floats: nothing beside a forward pass.
pub fn check_logits(model: &lever_model::Model, logits: &[f32], position: usize) -> Result<()> {
    match logits.iter().find(|x| !x.is_finite()) {
        None => Ok(()),
        Some(x) => Err(Error::NonFinite {
            model: model.info.path.clone(),
            position,
            what: if x.is_nan() { "NaN" } else { "infinite" },
        }),
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(lever_model::Error::Candle(e))
    }
}

pub type Result<T> = std::result::Result<T, Error>;
