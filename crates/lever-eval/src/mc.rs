//! Multiple-choice evaluation by log-likelihood, as EleutherAI's lm-evaluation-harness does it
//! for `output_type: multiple_choice` tasks (ARC, PIQA, HellaSwag, MMLU, ...).
//!
//! For an item `{"query", "choices", "gold"}` each choice is scored as a continuation of the
//! query: its log-likelihood is the sum, over the choice's tokens, of the log-softmax of the
//! model's logits at the position before each token (`_loglikelihood_tokens` in
//! `lm_eval/models/huggingface.py`). Then (`ConfigurableTask.process_results` in
//! `lm_eval/api/task.py`):
//! - `acc`: the argmax of the log-likelihoods is `gold`;
//! - `acc_norm`: the argmax of log-likelihood / `len(choice)` is `gold`, where `len` is
//!   Python's string length: characters (Unicode code points), not tokens and not bytes;
//! - both are means over items, with the standard error of the mean (sample standard deviation
//!   / √n, `mean_stderr` in `lm_eval/api/metrics.py`).
//!
//! Tokenization follows `TemplateLM._encode_pair` (`lm_eval/api/model.py`): trailing whitespace
//! of the query moves to the front of the continuation; the context tokens are the encoding of
//! the (stripped) query, and the continuation tokens are those of the encoding of query +
//! continuation beyond the context's length. The model reads context tokens followed by
//! continuation tokens. An empty query becomes one prefix token (BOS, else EOS), as in
//! `TemplateLM.loglikelihood`. BOS is added only when the model's tokenizer adds one.
//!
//! Where lever departs: an item longer than the model's context is an error (lm-eval cuts it
//! from the left), and an empty choice is refused (lm-eval would divide by zero in acc_norm).
//!
//! Prefix reuse: the context tokens are the same for every choice of an item, so they are fed
//! once and the cache is cut back to them before each choice; across items, whatever prefix
//! the next query shares with the last (few-shot examples) is kept too.

use std::path::Path;

use candle_core::Tensor;
use lever_generate::Session;
use lever_model::Model;
use serde::Serialize;
use serde_json::Value;

use crate::{Error, Result};

/// One multiple-choice item.
#[derive(Debug, Clone, PartialEq)]
pub struct McItem {
    pub query: String,
    /// Continuations, scored after `query` exactly as written (a space between query and
    /// choice belongs at the end of the query or the start of the choice).
    pub choices: Vec<String>,
    pub gold: usize,
    /// Where the item came from, for errors: `FILE:LINE`, or `item N`.
    pub origin: String,
}

/// Read a JSONL file of `{"query": str, "choices": [str, ...], "gold": int}` lines (other
/// fields are ignored, blank lines skipped). Any bad line is an error naming `FILE:LINE`.
pub fn read_items(path: &Path) -> Result<Vec<McItem>> {
    let text = std::fs::read_to_string(path).map_err(|err| Error::Io {
        path: path.to_path_buf(),
        err,
    })?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let origin = format!("{}:{}", path.display(), i + 1);
        let item = parse_item(line, origin).map_err(|problem| Error::Line {
            path: path.to_path_buf(),
            line: i + 1,
            problem,
        })?;
        items.push(item);
    }
    if items.is_empty() {
        return Err(Error::File {
            path: path.to_path_buf(),
            problem: "no items (expected JSON lines {\"query\", \"choices\", \"gold\"})".into(),
        });
    }
    Ok(items)
}

fn parse_item(line: &str, origin: String) -> std::result::Result<McItem, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("expected a JSON object {\"query\", \"choices\", \"gold\"}")?;
    let field = |name: &str| obj.get(name).ok_or(format!("missing field `{name}`"));
    let query = field("query")?
        .as_str()
        .ok_or("`query` must be a string")?
        .to_string();
    let choices = field("choices")?
        .as_array()
        .ok_or("`choices` must be an array of strings")?
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let c = c
                .as_str()
                .ok_or(format!("`choices[{k}]` must be a string"))?;
            if c.is_empty() {
                return Err(format!("`choices[{k}]` is empty"));
            }
            Ok(c.to_string())
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    if choices.is_empty() {
        return Err("`choices` is empty".into());
    }
    let gold = field("gold")?;
    let gold =
        gold.as_u64()
            .ok_or(format!("`gold` must be a non-negative integer, got {gold}"))? as usize;
    if gold >= choices.len() {
        return Err(format!(
            "`gold` is {gold}, out of range for {} choices (0-based)",
            choices.len()
        ));
    }
    Ok(McItem {
        query,
        choices,
        gold,
        origin,
    })
}

/// lm-eval's `_encode_pair`: (context tokens, continuation tokens). BOS leads the context when
/// the model's tokenizer adds one; an empty context becomes the prefix token (BOS, else EOS).
pub fn encode_pair(
    model: &Model,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let tok = &model.tokenizer;
    if context.is_empty() {
        let prefix = tok.bos().or(tok.eos()).ok_or_else(|| Error::Item {
            origin: "(encode)".into(),
            problem: "an empty query needs a BOS or EOS token, and the tokenizer has neither"
                .into(),
        })?;
        let cont = tok
            .encode(continuation, true)
            .map_err(lever_generate::Error::from)?;
        return Ok((vec![prefix], cont));
    }
    let stripped = context.trim_end();
    let (context, continuation) = if stripped.len() < context.len() {
        (
            stripped,
            format!("{}{continuation}", &context[stripped.len()..]),
        )
    } else {
        (context, continuation.to_string())
    };
    let whole = tok
        .encode(&format!("{context}{continuation}"), true)
        .map_err(lever_generate::Error::from)?;
    let ctx = tok
        .encode(context, true)
        .map_err(lever_generate::Error::from)?;
    let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    Ok((ctx, cont))
}

/// One choice's score.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceScore {
    /// Sum of the continuation tokens' log-probabilities (nats).
    pub loglikelihood: f64,
    /// Every continuation token is the model's argmax at its position.
    pub is_greedy: bool,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemScore {
    pub choices: Vec<ChoiceScore>,
    pub gold: usize,
    /// argmax of log-likelihood.
    pub pred: usize,
    /// argmax of log-likelihood / characters of the choice.
    pub pred_norm: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct McOptions {
    /// Feed each item's context once and reuse its keys and values for every choice (and the
    /// prefix shared with the previous item). Off: every (context + choice) from scratch.
    pub prefix_reuse: bool,
}

impl Default for McOptions {
    fn default() -> Self {
        Self { prefix_reuse: true }
    }
}

/// Score every choice of one item. `session` carries the cache between items.
pub fn score_item(
    model: &Model,
    session: &mut Session,
    item: &McItem,
    opts: McOptions,
) -> Result<ItemScore> {
    let item_err = |problem: String| Error::Item {
        origin: item.origin.clone(),
        problem,
    };
    let ctx_max = model.decoder.config().max_seq_len;
    let mut pairs = Vec::with_capacity(item.choices.len());
    for (k, choice) in item.choices.iter().enumerate() {
        let (ctx, cont) = encode_pair(model, &item.query, choice)?;
        if cont.is_empty() {
            return Err(item_err(format!("choice {k} ({choice:?}) has no tokens")));
        }
        // The model reads context + continuation minus its last token.
        let reads = ctx.len() + cont.len() - 1;
        if reads > ctx_max {
            return Err(item_err(format!(
                "query + choice {k} is {reads} tokens; the model's context is {ctx_max}"
            )));
        }
        pairs.push((ctx, cont));
    }
    // The context tokens depend on the query only, so they are the same for every choice.
    let ctx = pairs.first().map(|(c, _)| c.clone()).unwrap_or_default();
    let dev = model.decoder.device();
    let first = if opts.prefix_reuse {
        // Logits after the context's last token predict every choice's first token;
        // `prefill` keeps whatever the cache already shares with `ctx` (the previous item).
        let first = session.prefill(model, &ctx)?; // (V,)
        Some(Tensor::new(first.as_slice(), dev)?.unsqueeze(0)?) // (1, V)
    } else {
        None
    };
    let mut choices = Vec::with_capacity(pairs.len());
    for (_, cont) in &pairs {
        let n = cont.len();
        let logits = match &first {
            Some(first) if n == 1 => first.clone(),
            Some(first) => {
                let rest = session.feed_tail(model, &cont[..n - 1], n - 1)?; // (n-1, V)
                session.truncate(ctx.len())?;
                Tensor::cat(&[first, &rest], 0)? // (n, V)
            }
            None => {
                session.reset();
                let mut input = ctx.clone();
                input.extend_from_slice(&cont[..n - 1]);
                session.feed_tail(model, &input, n)? // (n, V)
            }
        };
        choices.push(score_rows(&logits.to_vec2::<f32>()?, cont));
    }
    let pred = argmax(choices.iter().map(|c| c.loglikelihood));
    let pred_norm = argmax(
        choices
            .iter()
            .zip(&item.choices)
            .map(|(c, text)| c.loglikelihood / text.chars().count() as f64),
    );
    Ok(ItemScore {
        choices,
        gold: item.gold,
        pred,
        pred_norm,
    })
}

/// Sum of log-softmax at the targets, and whether each target is the row's argmax.
/// rows[i] are the logits that predict targets[i].
fn score_rows(rows: &[Vec<f32>], targets: &[u32]) -> ChoiceScore {
    let mut ll = 0f64;
    let mut greedy = true;
    for (row, &t) in rows.iter().zip(targets) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let target = row.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY) as f64;
        ll += target - max - sum.ln();
        // numpy/torch argmax: the first maximum.
        greedy &= argmax(row.iter().map(|&x| x as f64)) == t as usize;
    }
    ChoiceScore {
        loglikelihood: ll,
        is_greedy: greedy,
        tokens: targets.len(),
    }
}

/// Index of the first maximum (numpy's `argmax`).
pub(crate) fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, x) in xs.enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Accuracy over items, lm-eval's `acc` and `acc_norm` with standard errors.
#[derive(Debug, Clone, Serialize)]
pub struct McReport {
    pub acc: f64,
    /// Standard error of the mean (sample std / √n); null for one item.
    pub acc_stderr: Option<f64>,
    pub acc_norm: f64,
    pub acc_norm_stderr: Option<f64>,
    pub n: usize,
}

pub fn report(scores: &[ItemScore]) -> McReport {
    let acc: Vec<f64> = scores
        .iter()
        .map(|s| f64::from(u8::from(s.pred == s.gold)))
        .collect();
    let acc_norm: Vec<f64> = scores
        .iter()
        .map(|s| f64::from(u8::from(s.pred_norm == s.gold)))
        .collect();
    McReport {
        acc: mean(&acc),
        acc_stderr: mean_stderr(&acc),
        acc_norm: mean(&acc_norm),
        acc_norm_stderr: mean_stderr(&acc_norm),
        n: scores.len(),
    }
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Sample standard deviation (n - 1) over √n, as lm-eval's `mean_stderr`.
fn mean_stderr(xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let m = mean(xs);
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some((var / n as f64).sqrt())
}

/// Score all items; `progress(done, total)` after each.
pub fn evaluate(
    model: &Model,
    items: &[McItem],
    opts: McOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(McReport, Vec<ItemScore>)> {
    let mut session = Session::new(model);
    let mut scores = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        scores.push(score_item(model, &mut session, item, opts)?);
        progress(i + 1, items.len());
    }
    Ok((report(&scores), scores))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn item(pred: usize, pred_norm: usize, gold: usize) -> ItemScore {
        ItemScore {
            choices: Vec::new(),
            gold,
            pred,
            pred_norm,
        }
    }

    #[test]
    fn report_matches_lm_eval_mean_and_stderr() {
        // acc = [1, 0, 1, 1]: mean 0.75, sample std 0.5, stderr 0.25.
        let r = report(&[item(0, 1, 0), item(1, 1, 0), item(2, 2, 2), item(0, 0, 0)]);
        assert_eq!(r.n, 4);
        assert!((r.acc - 0.75).abs() < 1e-12);
        assert!((r.acc_stderr.unwrap() - 0.25).abs() < 1e-12);
        assert!((r.acc_norm - 0.5).abs() < 1e-12);
        // acc_norm = [0, 0, 1, 1]: sample std sqrt(1/3), stderr sqrt(1/12).
        assert!((r.acc_norm_stderr.unwrap() - (1.0f64 / 12.0).sqrt()).abs() < 1e-12);
        assert!(report(&[item(0, 0, 0)]).acc_stderr.is_none());
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax([1.0, 3.0, 3.0, 2.0].into_iter()), 1);
        assert_eq!(argmax([-5.0].into_iter()), 0);
    }

    #[test]
    fn score_rows_is_log_softmax_at_the_targets() {
        let rows = vec![vec![0.0f32, 1.0, 2.0], vec![3.0, 0.0, 0.0]];
        let s = score_rows(&rows, &[2, 1]);
        let lse0 = (1f64 + 1f64.exp() + 2f64.exp()).ln();
        let lse1 = (3f64.exp() + 2.0).ln();
        assert!((s.loglikelihood - (2.0 - lse0 + 0.0 - lse1)).abs() < 1e-9);
        assert!(!s.is_greedy);
        assert!(score_rows(&rows, &[2, 0]).is_greedy);
        assert_eq!(s.tokens, 2);
    }

    #[test]
    fn bad_lines_are_named() {
        let o = || "x:1".to_string();
        let err = |l: &str| parse_item(l, o()).unwrap_err();
        assert!(err("{").starts_with("not JSON"));
        assert_eq!(
            err(r#"{"choices": ["a"], "gold": 0}"#),
            "missing field `query`"
        );
        assert_eq!(
            err(r#"{"query": "q", "gold": 0}"#),
            "missing field `choices`"
        );
        assert_eq!(
            err(r#"{"query": "q", "choices": ["a"]}"#),
            "missing field `gold`"
        );
        assert_eq!(
            err(r#"{"query": "q", "choices": [], "gold": 0}"#),
            "`choices` is empty"
        );
        assert_eq!(
            err(r#"{"query": "q", "choices": ["a", "b"], "gold": 2}"#),
            "`gold` is 2, out of range for 2 choices (0-based)"
        );
        assert_eq!(
            err(r#"{"query": "q", "choices": ["a", ""], "gold": 0}"#),
            "`choices[1]` is empty"
        );
        assert!(err(r#"{"query": "q", "choices": ["a"], "gold": -1}"#).starts_with("`gold` must"));
        let ok = parse_item(
            r#"{"query": "q ", "choices": ["a", "b"], "gold": 1, "id": 7}"#,
            o(),
        );
        assert_eq!(ok.unwrap().gold, 1);
    }
}
