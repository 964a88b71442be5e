//! lever-generate: generation with a KV cache, sampling, stop rules, the streaming
//! detokenizer, perplexity and the speed measurements; and the [`Generator`] interface that
//! the commands generate through, in this process ([`Local`]) or on an OpenAI-compatible
//! server ([`Remote`]).
//!
//! Parts:
//! - [`generate`]: the token loop over a [`Session`] (the KV cache and its tokens);
//! - [`sampling`], [`stream`]: choosing a token; UTF-8 and stop strings in streamed text;
//! - [`constrain`]: constrained decoding (JSON Schema, regex, Lark, choices) by llguidance;
//! - [`generator`]: the [`Generator`] trait, its [`Request`] and [`Output`];
//! - [`local`], [`remote`] (with [`sse`], the event-stream reader): its two sides;
//! - [`perplexity`], [`bench`]: measurements.

pub mod bench;
pub mod constrain;
pub mod generate;
pub mod generator;
pub mod local;
pub mod perplexity;
pub mod remote;
pub mod sampling;
pub mod sse;
pub mod stream;
pub mod tools;

pub use constrain::{Constraint, Grammars, Guide};
pub use generate::{
    FinishReason, Flow, GenerateRequest, Generation, Session, check_context, generate,
    generate_guided,
};
pub use generator::{
    Finish, Generator, Output, Prompt, Request, Sampling, Source, Timings, Unset, UsedSampling,
};
pub use local::Local;
pub use perplexity::{Perplexity, perplexity};
pub use remote::Remote;
pub use sampling::{Sampler, SamplingParams};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] lever_model::Error),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{0}")]
    Invalid(String),
    /// A constraint that cannot be compiled or followed (an unsupported schema keyword, a bad
    /// regular expression, a grammar that matches nothing).
    #[error("constraint: {0}")]
    Constraint(String),
    #[error("{}: the model has no chat template; use --raw to send the text as is", model.display())]
    NoChatTemplate { model: std::path::PathBuf },
    /// The model's chat template failed on these messages.
    #[error("{}: {error}", model.display())]
    Template {
        model: std::path::PathBuf,
        error: lever_model::Error,
    },
    /// An OpenAI-compatible server: a bad URL, a network or TLS failure, an error answer, or
    /// a stream that broke off. `url` is the endpoint.
    #[error("{url}: {message}")]
    Remote { url: String, message: String },
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
