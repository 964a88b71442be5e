//! Perplexity the way llama.cpp's `llama-perplexity` computes it
//! (`tools/perplexity/perplexity.cpp`, `perplexity()`): the text is tokenized whole, cut into
//! non-overlapping windows of `ctx` tokens, the first token of each window is replaced by BOS
//! when the model adds one, and only the second half of each window is scored (each scored
//! token then has at least ctx/2 tokens of context).

use candle_core::{D, Tensor};
use lever_model::{Logits, Model};
use serde::Serialize;

use crate::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    pub scored_tokens: usize,
    pub chunks: usize,
    pub ctx: usize,
}

/// `max_chunks`: None = as many whole windows as the text has.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    if ctx < 4 {
        return Err(Error::Invalid(format!(
            "ctx {ctx} is too small (at least 4)"
        )));
    }
    if ctx > model.decoder.config().max_seq_len {
        return Err(Error::Invalid(format!(
            "ctx {ctx} is larger than the model's context {}",
            model.decoder.config().max_seq_len
        )));
    }
    if tokens.len() < 2 * ctx {
        return Err(Error::Invalid(format!(
            "the text has {} tokens; perplexity with ctx {ctx} needs at least {} (2 x ctx)",
            tokens.len(),
            2 * ctx
        )));
    }
    let available = tokens.len() / ctx;
    let chunks = max_chunks.map_or(available, |m| m.min(available));
    let first = ctx / 2;
    let bos = model
        .tokenizer
        .add_bos()
        .then(|| model.tokenizer.bos())
        .flatten();
    let dev = model.decoder.device();
    let mut nll = 0f64;
    let mut count = 0usize;
    for c in 0..chunks {
        let start = c * ctx;
        let mut input = tokens[start..start + ctx].to_vec();
        if let Some(b) = bos {
            input[0] = b;
        }
        let mut cache = model.decoder.new_cache();
        let ids = Tensor::new(input.as_slice(), dev)?.unsqueeze(0)?; // (1, ctx)
        let logits = model.decoder.forward(&ids, &mut cache, Logits::All)?; // (1, ctx, V)
        let logits = logits.squeeze(0)?.narrow(0, first, ctx - 1 - first)?; // (n, V)
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let targets: Vec<u32> = tokens[start + first + 1..start + ctx].to_vec();
        let targets = Tensor::new(targets.as_slice(), dev)?.unsqueeze(1)?; // (n, 1)
        let picked = logp.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?;
        // A NaN or infinite logit makes its row's log-probabilities NaN or infinite: an
        // error naming where, never a NaN perplexity.
        if let Some(i) = picked.iter().position(|x| !x.is_finite()) {
            let row = logits.get(i)?.to_vec1::<f32>()?;
            crate::check_logits(model, &row, start + first + i)?;
            crate::check_logits(model, &[picked[i]], start + first + i)?;
        }
        nll -= picked.iter().map(|&x| x as f64).sum::<f64>();
        count += picked.len();
        progress(c + 1, chunks);
    }
    let mean = nll / count as f64;
    Ok(Perplexity {
        ppl: mean.exp(),
        nll: mean,
        scored_tokens: count,
        chunks,
        ctx,
    })
}
