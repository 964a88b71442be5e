//! Supervised fine-tuning examples as token ids with a loss mask. A conversation is rendered
//! with the model's own chat template, turn by turn: the text each assistant turn adds (its
//! content and end-of-turn marker) is trained, everything else (system, user, the template's
//! role headers) is context only. This is what transformers' `return_assistant_tokens_mask`
//! and TRL's `assistant_only_loss` compute, without needing `{% generation %}` markers in the
//! template: the rendering of turns 0..k with a generation prompt must be a prefix of the
//! rendering of turns 0..=k, which holds for ChatML, Llama-3 and most templates (and is
//! checked: a template that rewrites earlier turns is an error, never a silent wrong mask).

use lever_model::{ChatTemplate, Message, Tokenizer};

use crate::error::{Error, Result};
use crate::jsonl::{Dataset, Example};

/// One tokenized example: `trained[i]` says whether token i is a target of the loss
/// (predicted from the tokens before it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// The dataset line it came from.
    pub line: usize,
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

impl Tokenized {
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().filter(|t| **t).count()
    }
}

/// Tokenize one example. Conversations need the model's chat template.
pub fn tokenize(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    example: &Example,
    line: usize,
) -> Result<Tokenized> {
    let mut ids = Vec::new();
    let mut trained = Vec::new();
    let mut push = |part: Vec<u32>, train: bool| {
        trained.extend(std::iter::repeat_n(train, part.len()));
        ids.extend(part);
    };
    match example {
        Example::Text(text) => {
            push(tok.encode(text, true)?, true);
            if let Some(eos) = tok.eos() {
                push(vec![eos], true);
            }
        }
        Example::Conversation(messages) => {
            let template = template.ok_or_else(|| Error::Usage {
                what: format!("line {line}"),
                problem: "a conversation needs a chat template and the model has none".into(),
            })?;
            let mut done = String::new();
            for k in 0..messages.len() {
                if messages[k].role != "assistant" {
                    continue;
                }
                let before = template.render(&messages[..k], true)?;
                let after = template.render(&messages[..=k], false)?;
                let (Some(context), Some(answer)) = (
                    before.strip_prefix(done.as_str()),
                    after.strip_prefix(before.as_str()),
                ) else {
                    return Err(Error::Usage {
                        what: format!("line {line}"),
                        problem: format!(
                            "the chat template renders turn {k} in a way that changes the text before it, so the trained span cannot be marked"
                        ),
                    });
                };
                push(tok.encode(context, done.is_empty())?, false);
                push(tok.encode(answer, false)?, true);
                done = after;
            }
            let all = template.render(messages, false)?;
            match all.strip_prefix(done.as_str()) {
                Some(rest) if !rest.is_empty() => push(tok.encode(rest, done.is_empty())?, false),
                Some(_) => {}
                None => {
                    return Err(Error::Usage {
                        what: format!("line {line}"),
                        problem: "the chat template renders the whole conversation differently from its turns".into(),
                    });
                }
            }
        }
    }
    Ok(Tokenized { line, ids, trained })
}

/// What to do with an example longer than the maximum length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlong {
    /// Keep its first max-length tokens (counted and reported).
    Truncate,
    /// Leave it out (counted and reported).
    Skip,
    /// Stop with an error naming the line.
    Error,
}

/// A dataset ready for training: tokenized, length-checked and split.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub train: Vec<Tokenized>,
    pub validation: Vec<Tokenized>,
    /// Examples cut to the maximum length.
    pub truncated: usize,
    /// Examples left out for being too long.
    pub skipped_long: usize,
    /// Examples left out because no token of theirs is trained (no assistant turn, or every
    /// trained token beyond the cut).
    pub skipped_untrained: usize,
}

impl Prepared {
    /// Tokenize `data`, apply the length rule, shuffle with `seed` and hold out
    /// `validation_fraction` of the examples (at least one when there are two or more and the
    /// fraction is above zero).
    pub fn new(
        data: &Dataset,
        tok: &Tokenizer,
        template: Option<&ChatTemplate>,
        max_len: usize,
        overlong: Overlong,
        validation_fraction: f64,
        seed: u64,
    ) -> Result<Prepared> {
        if max_len < 2 {
            return Err(Error::Usage {
                what: "--seq-len".into(),
                problem: format!("{max_len} is too short (at least 2 tokens)"),
            });
        }
        if !(0.0..1.0).contains(&validation_fraction) {
            return Err(Error::Usage {
                what: "--val-fraction".into(),
                problem: format!("{validation_fraction} is not in [0, 1)"),
            });
        }
        let mut out = Prepared::default();
        let mut kept = Vec::with_capacity(data.examples.len());
        for (line, example) in &data.examples {
            let mut t = tokenize(tok, template, example, *line)?;
            if t.ids.len() > max_len {
                match overlong {
                    Overlong::Error => {
                        return Err(Error::Dataset {
                            path: data.path.clone(),
                            problem: format!(
                                "line {line}: the example is {} tokens, longer than --seq-len {max_len} (use --overlong skip or truncate, or a larger --seq-len)",
                                t.ids.len()
                            ),
                        });
                    }
                    Overlong::Skip => {
                        out.skipped_long += 1;
                        continue;
                    }
                    Overlong::Truncate => {
                        t.ids.truncate(max_len);
                        t.trained.truncate(max_len);
                        out.truncated += 1;
                    }
                }
            }
            // Token 0 is never a target (nothing predicts it).
            if t.trained.iter().skip(1).any(|x| *x) {
                kept.push(t);
            } else {
                out.skipped_untrained += 1;
            }
        }
        if kept.is_empty() {
            return Err(Error::Dataset {
                path: data.path.clone(),
                problem: format!(
                    "no example left to train on ({} too long, {} without trained tokens)",
                    out.skipped_long, out.skipped_untrained
                ),
            });
        }
        lever_model::rng::SplitMix64(seed).shuffle(&mut kept);
        let mut n_val = (kept.len() as f64 * validation_fraction).round() as usize;
        if validation_fraction > 0.0 && kept.len() >= 2 {
            n_val = n_val.clamp(1, kept.len() - 1);
        }
        out.validation = kept.split_off(kept.len() - n_val);
        out.train = kept;
        Ok(out)
    }
}

/// One line per token: position, `+` when trained, id, and the token's text.
pub fn show_mask(tok: &Tokenizer, t: &Tokenized) -> String {
    let mut out = String::new();
    for (i, (id, trained)) in t.ids.iter().zip(&t.trained).enumerate() {
        let mark = if *trained { '+' } else { '.' };
        let text = String::from_utf8_lossy(tok.token_bytes(*id)).into_owned();
        out.push_str(&format!("{i:>5} {mark} {id:>6} {text:?}\n"));
    }
    let n = t.trained_tokens();
    out.push_str(&format!(
        "line {}: {} tokens, {n} trained (+)\n",
        t.line,
        t.ids.len()
    ));
    out
}

/// The conversation text exactly as the model sees it, for display.
pub fn render(template: &ChatTemplate, messages: &[Message]) -> Result<String> {
    Ok(template.render(messages, false)?)
}
