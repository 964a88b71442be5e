//! The generation loop: prefill the prompt (reusing whatever prefix the session's KV cache
//! already holds), then sample token by token until an end-of-generation token, a stop string,
//! the token limit, the context limit, or the caller says stop.

use std::time::Instant;

use candle_core::Tensor;
use lever_model::{Cache, Logits, Model};
use serde::Serialize;

use crate::constrain::Guide;
use crate::sampling::{Sampler, SamplingParams};
use crate::stream::{StopMatcher, Utf8Stream};
use crate::{Error, Result};

/// A sequence being generated: its tokens and the KV cache that matches them. Keeping it
/// between chat turns means each turn only computes the new tokens.
#[derive(Debug, Clone)]
pub struct Session {
    cache: Cache,
    ids: Vec<u32>,
}

impl Session {
    pub fn new(model: &Model) -> Self {
        Self {
            cache: model.decoder.new_cache(),
            ids: Vec::new(),
        }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.ids
    }

    pub fn reset(&mut self) {
        self.cache.clear();
        self.ids.clear();
    }

    /// Make the cache hold exactly `ids`, computing only what differs from what it holds;
    /// returns the logits after the last token (V,).
    pub fn prefill(&mut self, model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
        let mut common = self.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
        // Always recompute at least the last token to get its logits.
        if common == ids.len() {
            common = common.saturating_sub(1);
        }
        self.cache.truncate(common)?;
        self.ids.truncate(common);
        self.feed(model, &ids[common..])
    }

    /// Keep only the first `len` tokens (and their keys and values), to score another
    /// continuation of a shared prefix.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len)?;
        self.ids.truncate(len);
        Ok(())
    }

    /// Append `ids` and return the logits after each of the last `n` of them, (n, V), for
    /// scoring: only those `n` rows go through the output layer. `n` is at most `ids.len()`.
    pub fn feed_tail(&mut self, model: &Model, ids: &[u32], n: usize) -> Result<Tensor> {
        if n == 0 || n > ids.len() {
            return Err(Error::Invalid(format!(
                "feed_tail: {n} logit rows asked of {} tokens",
                ids.len()
            )));
        }
        let dev = model.decoder.device();
        let input = Tensor::new(ids, dev)?.unsqueeze(0)?; // (1, T)
        let hidden = model.decoder.hidden(&input, &mut self.cache)?; // (1, T, C)
        self.ids.extend_from_slice(ids);
        let tail = hidden.narrow(1, ids.len() - n, n)?; // (1, n, C)
        let logits = model.decoder.head(&tail)?.squeeze(0)?; // (n, V)
        // One sum finds a NaN or an infinity anywhere (finite logits are far from overflow).
        if !logits.sum_all()?.to_scalar::<f32>()?.is_finite() {
            let rows = logits.to_vec2::<f32>()?;
            let first = self.ids.len() - n;
            for (i, row) in rows.iter().enumerate() {
                crate::check_logits(model, row, first + i)?;
            }
        }
        Ok(logits)
    }

    /// Append `ids` and return the logits after the last (V,).
    pub fn feed(&mut self, model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
        let dev = model.decoder.device();
        let input = Tensor::new(ids, dev)?.unsqueeze(0)?; // (1, T)
        let logits = model
            .decoder
            .forward(&input, &mut self.cache, Logits::Last)?; // (1, V)
        self.ids.extend_from_slice(ids);
        let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
        crate::check_logits(model, &logits, self.ids.len() - 1)?;
        Ok(logits)
    }
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            stop: Vec::new(),
            sampling: SamplingParams::greedy(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model emitted an end-of-generation token.
    Eog,
    /// A stop string was produced.
    Stop,
    /// max_new_tokens reached.
    Length,
    /// The model's context is full.
    Context,
    /// The caller asked to stop (Ctrl-C, client gone).
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub prompt_ms: f64,
    pub generation_ms: f64,
    pub finish_reason: FinishReason,
    /// With a constraint: whether the text is complete under it (false when the token budget
    /// or the context ran out first); `None` without one.
    pub valid: Option<bool>,
}

/// What the caller wants after a piece of text was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Check that `prompt_len` tokens fit the model's context with room for one more.
pub fn check_context(model: &Model, prompt_len: usize) -> Result<()> {
    let ctx = model.decoder.config().max_seq_len;
    if prompt_len >= ctx {
        return Err(Error::Model(lever_model::Error::ContextOverflow {
            tokens: prompt_len,
            context: ctx,
            over: prompt_len + 1 - ctx,
        }));
    }
    Ok(())
}

/// Generate after `prompt` (token ids, BOS included if wanted). `on_text` receives text as it
/// becomes printable; returning `Flow::Stop` cancels.
pub fn generate(
    model: &Model,
    session: &mut Session,
    prompt: &[u32],
    req: &GenerateRequest,
    on_text: &mut dyn FnMut(&str) -> Flow,
) -> Result<Generation> {
    generate_guided(model, session, prompt, req, None, on_text)
}

/// [`generate`] under a constraint: `guide` masks the logits before every draw.
pub fn generate_guided(
    model: &Model,
    session: &mut Session,
    prompt: &[u32],
    req: &GenerateRequest,
    mut guide: Option<&mut Guide>,
    on_text: &mut dyn FnMut(&str) -> Flow,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    check_context(model, prompt.len())?;
    let ctx = model.decoder.config().max_seq_len;
    let tok = &model.tokenizer;
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut utf8 = Utf8Stream::default();
    let mut stops = StopMatcher::new(&req.stop);
    let mut text = String::new();
    let mut tokens = Vec::new();

    let t0 = Instant::now();
    let mut logits = session.prefill(model, prompt)?;
    let prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let mut finish = FinishReason::Length;
    let mut emit = |piece: &str, text: &mut String| -> Flow {
        if piece.is_empty() {
            return Flow::Continue;
        }
        text.push_str(piece);
        on_text(piece)
    };
    while tokens.len() < req.max_new_tokens {
        if let Some(g) = guide.as_deref_mut() {
            g.mask(&mut logits)?;
        }
        let next = sampler.sample(&logits, session.tokens());
        if let Some(g) = guide.as_deref_mut() {
            g.commit(next)?;
        }
        if tok.is_eog(next) {
            finish = FinishReason::Eog;
            break;
        }
        tokens.push(next);
        let piece = utf8.push(tok.token_bytes(next));
        let check = stops.push(&piece);
        if emit(&check.emit, &mut text) == Flow::Stop {
            finish = FinishReason::Cancelled;
            break;
        }
        if check.stopped {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() == req.max_new_tokens {
            break;
        }
        if session.tokens().len() + 1 >= ctx {
            finish = FinishReason::Context;
            break;
        }
        logits = session.feed(model, &[next])?;
    }
    if finish != FinishReason::Stop && finish != FinishReason::Cancelled {
        let tail = stops.push(&utf8.flush());
        let rest = format!(
            "{}{}",
            tail.emit,
            if tail.stopped {
                String::new()
            } else {
                stops.flush()
            }
        );
        emit(&rest, &mut text);
        if tail.stopped {
            finish = FinishReason::Stop;
        }
    }
    // The session holds prompt + all generated tokens except the last one (never fed).
    Ok(Generation {
        text,
        completion_tokens: tokens.len(),
        tokens,
        prompt_tokens: prompt.len(),
        prompt_ms,
        generation_ms: t1.elapsed().as_secs_f64() * 1e3,
        finish_reason: finish,
        valid: guide.map(|g| g.is_accepting()),
    })
}
