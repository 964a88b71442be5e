//! One interface for whatever turns a prompt into text: the model in this process
//! ([`Local`](crate::Local)) or an OpenAI-compatible server ([`Remote`](crate::Remote)).
//! `lever ask`, `chat`, `rag ask` and eval hold a `dyn Generator` and never ask which.
//!
//! A [`Request`] carries only what its caller set. What is left unset is the generator's to
//! choose — in-process the model's published settings, on a server the server's defaults
//! (nothing unset is sent) — or, for callers such as task files that name every setting they
//! mean, off on both sides ([`Unset::Off`]).
//!
//! Where the next rungs attach: per-token log-probabilities (RAG-Sequence and RAG-Token,
//! log-likelihood eval through a server) become a field of [`Output`]; a constraint (JSON
//! schema, regex, grammar, tools) becomes a field of [`Request`] that the in-process loop turns
//! into a token mask per step and the remote client sends as `response_format`/`tools`. Work
//! that needs the model itself — scoring continuations, one batched step over k contexts — uses
//! `lever_model::Model` with [`Session`](crate::Session); [`Local::model`](crate::Local::model)
//! hands it out.

use std::fmt;
use std::path::PathBuf;

use lever_model::{GenerationConfig, Message};
use serde::Serialize;

use crate::sampling::SamplingParams;
use crate::{Constraint, FinishReason, Flow, Result};

/// What to continue.
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// A conversation, to which the generator applies a chat template (the model's own
    /// in-process, the server's own remotely) and the assistant's turn opening.
    Chat(&'a [Message]),
    /// Text continued as it is, with no chat template (in-process after the model's BOS token,
    /// where it has one; remotely as a text completion).
    Text(&'a str),
}

/// Sampling settings as the caller gave them; `None` leaves a setting to the generator.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// How many recent tokens the repeat penalty looks at. In-process only: OpenAI-compatible
    /// servers take no such setting (they penalize the whole sequence).
    pub repeat_last_n: Option<usize>,
    pub seed: Option<u64>,
    /// What an unset setting means.
    pub unset: Unset,
}

/// What a setting a request leaves unset means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Unset {
    /// The generator's defaults: in-process the model's published settings
    /// ([`SamplingParams::for_model`]), what a user who names no flag gets; on a server its
    /// own (the setting is not sent).
    #[default]
    ModelDefaults,
    /// Off, as [`SamplingParams::greedy`] has it, on both sides (a server is sent the off
    /// values): for callers that name every setting they mean, such as eval task files, whose
    /// answers must not depend on where they are generated.
    Off,
}

impl Sampling {
    /// The settings in-process: those given, the rest from `published` or off.
    pub fn resolve(&self, published: &GenerationConfig) -> SamplingParams {
        let d = match self.unset {
            Unset::ModelDefaults => SamplingParams::for_model(published),
            Unset::Off => SamplingParams::greedy(),
        };
        SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(d.repeat_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(d.repeat_last_n),
            seed: self.seed.unwrap_or(d.seed),
        }
    }
}

/// One generation.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub prompt: Prompt<'a>,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Generation ends where one of these strings would begin; it is not returned.
    pub stop: &'a [String],
    pub sampling: Sampling,
    /// What the output must be (JSON Schema, regular expression, grammar, choice); `None`: free
    /// text.
    pub constraint: Option<&'a Constraint>,
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Finish {
    /// Decided in this process: the generation loop's reason, or the caller's `Flow::Stop`
    /// (`Cancelled`, on either side).
    Local(FinishReason),
    /// The server's `finish_reason` as it sent it (`stop`, `length`, ...); `None` when the
    /// stream ended without one.
    Server(Option<String>),
}

impl Finish {
    /// The caller stopped the generation.
    pub fn cancelled(&self) -> bool {
        *self == Finish::Local(FinishReason::Cancelled)
    }
}

/// Time spent in-process, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Timings {
    /// Computing the prompt (only the tokens the KV cache did not hold).
    pub prompt_ms: f64,
    /// Generating the answer.
    pub generation_ms: f64,
    /// With a constraint: time spent computing token masks (part of `generation_ms`), and
    /// how many were computed.
    pub mask: Option<(f64, usize)>,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Output {
    pub text: String,
    pub finish_reason: Finish,
    /// `None` where a server reported no usage.
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
    /// In-process only.
    pub timings: Option<Timings>,
    /// With a constraint, in-process: whether the text is complete under it (false when the
    /// token budget ran out first); `None` without one, or from a server.
    pub valid: Option<bool>,
    /// The settings the tokens were drawn with, in-process; `None` from a server, which fills
    /// in what was not sent with its own defaults.
    pub sampling: Option<UsedSampling>,
}

/// The sampling settings of an in-process generation.
#[derive(Debug, Clone, PartialEq)]
pub struct UsedSampling {
    pub params: SamplingParams,
    /// Where the settings the request left unset came from: the model's published settings'
    /// source (e.g. "generation_config.json"); `None` when they are lever's fallback or off.
    pub defaults_from: Option<String>,
}

/// What generates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A model file or folder, run in this process.
    Model(PathBuf),
    /// An OpenAI-compatible server, by its base URL (up to and including `/v1`).
    Server(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Model(p) => write!(f, "{}", p.display()),
            Source::Server(url) => f.write_str(url),
        }
    }
}

/// Turns requests into text, streaming it as it comes.
pub trait Generator {
    /// The model's path or the server's URL, for messages and reports.
    fn source(&self) -> Source;

    /// Whether [`Prompt::Chat`] can be answered: in-process only when the model has a chat
    /// template; a server applies its own.
    fn can_chat(&self) -> bool;

    /// Generate. `on_text` receives the text as it is produced (a possible start of a stop
    /// string is held back until it is known not to be one); returning `Flow::Stop` ends the
    /// generation, with finish `Cancelled`.
    fn generate(
        &mut self,
        req: &Request<'_>,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<Output>;

    /// Drop what is kept between calls. In-process, each call reuses the KV cache of the
    /// longest prefix it shares with what the previous calls computed (a chat turn computes
    /// only its new tokens); after a reset the next call computes its whole prompt.
    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_settings_come_from_the_model_or_are_off() {
        let published = GenerationConfig {
            temperature: Some(0.2),
            top_p: Some(0.9),
            repeat_penalty: Some(1.1),
            ..GenerationConfig::default()
        };
        let given = Sampling {
            temperature: Some(0.7),
            seed: Some(5),
            ..Sampling::default()
        };
        let p = given.resolve(&published);
        assert_eq!(
            (p.temperature, p.top_p, p.repeat_penalty, p.top_k, p.seed),
            (0.7, 0.9, 1.1, 0, 5)
        );
        let off = Sampling {
            unset: Unset::Off,
            ..given
        }
        .resolve(&published);
        assert_eq!(
            off,
            SamplingParams {
                temperature: 0.7,
                seed: 5,
                ..SamplingParams::greedy()
            }
        );
    }

    #[test]
    fn finish_reasons_serialize_as_each_side_names_them() {
        let json = |f: Finish| serde_json::to_string(&f).unwrap_or_default();
        assert_eq!(json(Finish::Local(FinishReason::Eog)), "\"eog\"");
        assert_eq!(json(Finish::Server(Some("length".into()))), "\"length\"");
        assert_eq!(json(Finish::Server(None)), "null");
        assert!(Finish::Local(FinishReason::Cancelled).cancelled());
        assert!(!Finish::Server(Some("cancelled".into())).cancelled());
    }
}
