//! The model in this process as a [`Generator`]: the prompt rendered with the model's chat
//! template and tokenized here, then [`generate`](crate::generate) on one [`Session`] kept
//! across calls, so that a chat turn computes only its new tokens.

use std::sync::Arc;

use lever_model::{Message, Model};

use crate::constrain::{Constraint, Grammars, Guide};
use crate::generate::{GenerateRequest, Session, generate_guided};
use crate::generator::{
    Finish, Generator, Output, Prompt, Request, Source, Timings, Unset, UsedSampling,
};
use crate::{Error, Flow, Result};

pub struct Local {
    model: Arc<Model>,
    session: Session,
    /// The model's token trie for constrained decoding, built on the first constrained request.
    grammars: Option<Grammars>,
}

impl Local {
    pub fn new(model: Arc<Model>) -> Self {
        let session = Session::new(&model);
        Self {
            model,
            session,
            grammars: None,
        }
    }

    /// A guide for `c` on this model.
    fn guide(&mut self, c: &Constraint) -> Result<Guide> {
        if self.grammars.is_none() {
            let vocab = self.model.decoder.config().vocab_size;
            self.grammars = Some(Grammars::new(&self.model.tokenizer, vocab)?);
        }
        match &self.grammars {
            Some(g) => g.guide(c),
            None => Err(Error::Constraint("no token trie".into())),
        }
    }

    /// The model, for the work a text interface cannot do (scoring, batched steps).
    pub fn model(&self) -> &Model {
        &self.model
    }
}

/// `messages` rendered with `model`'s chat template, the assistant's turn opened: the text
/// the model continues. An error names the model when it has no template or the template
/// fails.
pub fn render_chat(model: &Model, messages: &[Message]) -> Result<String> {
    let path = || model.info.path.clone();
    let tmpl = model
        .chat_template
        .as_ref()
        .ok_or_else(|| Error::NoChatTemplate { model: path() })?;
    tmpl.render(messages, true)
        .map_err(|error| Error::Template {
            model: path(),
            error,
        })
}

/// The token ids `prompt` becomes in-process (BOS first where the model has one).
pub fn prompt_ids(model: &Model, prompt: &Prompt<'_>) -> Result<Vec<u32>> {
    let text = match prompt {
        Prompt::Chat(messages) => render_chat(model, messages)?,
        Prompt::Text(text) => (*text).to_string(),
    };
    Ok(model.tokenizer.encode(&text, true)?)
}

impl Generator for Local {
    fn source(&self) -> Source {
        Source::Model(self.model.info.path.clone())
    }

    fn can_chat(&self) -> bool {
        self.model.chat_template.is_some()
    }

    fn generate(
        &mut self,
        req: &Request<'_>,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<Output> {
        let mut guide = match req.constraint {
            Some(c) => Some(self.guide(c)?),
            None => None,
        };
        let model = &*self.model;
        let ids = prompt_ids(model, &req.prompt)?;
        let sampling = req.sampling.resolve(&model.info.generation);
        let r = GenerateRequest {
            max_new_tokens: req.max_tokens,
            stop: req.stop.to_vec(),
            sampling: sampling.clone(),
        };
        let g = generate_guided(model, &mut self.session, &ids, &r, guide.as_mut(), on_text)?;
        Ok(Output {
            valid: g.valid,
            text: g.text,
            finish_reason: Finish::Local(g.finish_reason),
            prompt_tokens: Some(g.prompt_tokens),
            completion_tokens: Some(g.completion_tokens),
            timings: Some(Timings {
                prompt_ms: g.prompt_ms,
                generation_ms: g.generation_ms,
                mask: guide.as_ref().map(|g| g.mask_stats()),
            }),
            sampling: Some(UsedSampling {
                params: sampling,
                defaults_from: match req.sampling.unset {
                    Unset::ModelDefaults => model.info.generation.source.clone(),
                    Unset::Off => None,
                },
            }),
        })
    }

    fn reset(&mut self) {
        self.session.reset();
    }
}
