//! Answering a question from an index (`lever rag ask`): retrieve the best passages, keep
//! those that fit the token budget, build the grounded prompt ([`crate::prompt`]), generate
//! through any [`Generator`] (the model in-process or a server), and read the citations.
//!
//! The budget is measured with a local model's tokenizer and chat template even when a server
//! generates: it stands in for the server's, which lever cannot see. The server renders the same
//! user turn with its own template.

use std::path::Path;

use lever_generate::{Finish, Flow, Generator, Output, Prompt, Request, Sampling};
use lever_model::{Message, Model};

use crate::prompt::{self, Passage};
use crate::{DenseIndex, Embed, Error, Index, Mode, Result, Retriever};

/// How to retrieve and generate.
#[derive(Debug, Clone)]
pub struct AnswerOptions<'a> {
    pub mode: Mode,
    /// Passages retrieved (those that do not fit the budget are dropped).
    pub k: usize,
    pub dense: DenseIndex,
    /// The most tokens the passages may take; less when the context has less room.
    pub context_tokens: Option<usize>,
    /// Source paths, in the prompt and the citations, are shown relative to this folder when
    /// they are inside it (the CLI passes the working directory).
    pub relative_to: Option<&'a Path>,
    pub max_tokens: usize,
    pub stop: &'a [String],
    pub sampling: Sampling,
}

/// What [`answer`] reports while it works.
#[derive(Debug)]
pub enum Step<'a> {
    /// The prompt is built: the passages' token budget, those dropped to fit it, and the
    /// prompt as the budget model's chat template renders it. `Flow::Stop` here generates
    /// nothing (finish `Cancelled`).
    Prompt {
        budget: usize,
        dropped: &'a [Passage],
        text: &'a str,
    },
    /// A piece of the answer, as it is generated; `Flow::Stop` ends the answer.
    Text(&'a str),
}

/// An answer with its sources.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    /// Numbers of the given passages the answer cites (1-based, in order of first citation).
    pub citations: Vec<usize>,
    /// Numbers the answer cites that no given passage has: made-up citations.
    pub unknown_citations: Vec<usize>,
    /// The passages in the prompt, numbered from 1 in this order.
    pub passages: Vec<Passage>,
    /// Retrieved passages that did not fit the budget.
    pub dropped: Vec<Passage>,
    /// The passages' token budget.
    pub budget: usize,
    pub finish_reason: Finish,
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
}

impl Answer {
    /// The source of passage `n` (1-based), as `path:start-end`.
    pub fn source(&self, n: usize) -> String {
        self.passages[n - 1].citation()
    }
}

/// Answer `question` from `index`: `embed` must be the index's embedder, `model` measures
/// the budget, `generator` writes the answer. Errors: an empty question, an index with no
/// passages, a question no passage matches.
pub fn answer(
    index: &Index,
    embed: &dyn Embed,
    model: &Model,
    generator: &mut dyn Generator,
    question: &str,
    opts: &AnswerOptions<'_>,
    on: &mut dyn FnMut(Step<'_>) -> Flow,
) -> Result<Answer> {
    if question.trim().is_empty() {
        return Err(Error::EmptyQuestion);
    }
    if index.stats()?.chunks == 0 {
        return Err(Error::EmptyIndex {
            path: index.dir().to_path_buf(),
        });
    }
    let found = passages(
        index,
        embed,
        question,
        opts.mode,
        opts.k,
        opts.dense,
        opts.relative_to,
    )?;
    if found.is_empty() {
        return Err(Error::NoMatch {
            path: index.dir().to_path_buf(),
            mode: opts.mode.name(),
        });
    }
    answer_from(
        model,
        generator,
        question,
        found.into_iter().map(|(_, p)| p).collect(),
        opts,
        on,
    )
}

/// [`answer`] from passages already retrieved (best first): all that fit the budget go in one
/// prompt. `opts.mode`, `k` and `dense` are not used.
pub fn answer_from(
    model: &Model,
    generator: &mut dyn Generator,
    question: &str,
    found: Vec<Passage>,
    opts: &AnswerOptions<'_>,
    on: &mut dyn FnMut(Step<'_>) -> Flow,
) -> Result<Answer> {
    let user_prompt = |user: &str| -> Result<String> {
        Ok(lever_generate::local::render_chat(
            model,
            &[Message::new("user", user)],
        )?)
    };
    // The budget: the model's context less the frame (instruction, question, template) and
    // the answer's room.
    let context = model.decoder.config().max_seq_len;
    let frame = model
        .tokenizer
        .encode(&user_prompt(&prompt::user_turn(question, &[]))?, true)?
        .len();
    let room = context.saturating_sub(frame + opts.max_tokens);
    let budget = opts.context_tokens.map_or(room, |c| c.min(room));
    let count = |s: &str| -> Result<usize> { Ok(model.tokenizer.encode(s, false)?.len()) };
    let g = prompt::grounded(question, found, budget, &count)?;
    let text = user_prompt(&g.user)?;
    let go = on(Step::Prompt {
        budget,
        dropped: &g.dropped,
        text: &text,
    });
    let out = if go == Flow::Stop {
        Output {
            valid: None,
            text: String::new(),
            finish_reason: Finish::Local(lever_generate::FinishReason::Cancelled),
            prompt_tokens: None,
            completion_tokens: None,
            timings: None,
            sampling: None,
        }
    } else {
        let messages = [Message::new("user", g.user.clone())];
        let req = Request {
            constraint: None,
            prompt: Prompt::Chat(&messages),
            max_tokens: opts.max_tokens,
            stop: opts.stop,
            sampling: opts.sampling.clone(),
        };
        generator.generate(&req, &mut |t| on(Step::Text(t)))?
    };
    let cited = prompt::cited(&out.text, g.used.len());
    Ok(Answer {
        text: out.text,
        citations: cited.given,
        unknown_citations: cited.unknown,
        passages: g.used,
        dropped: g.dropped,
        budget,
        finish_reason: out.finish_reason,
        prompt_tokens: out.prompt_tokens,
        completion_tokens: out.completion_tokens,
    })
}

/// The `k` best chunks of `index` for `query` as passages, with their chunk ids; paths shown
/// relative to `relative_to` when inside it.
pub fn passages(
    index: &Index,
    embed: &dyn Embed,
    query: &str,
    mode: Mode,
    k: usize,
    dense: DenseIndex,
    relative_to: Option<&Path>,
) -> Result<Vec<(i64, Passage)>> {
    let mut r = Retriever::new(index, dense);
    passages_with(&mut r, embed, query, mode, k, relative_to)
}

/// [`passages`] with a retriever kept across queries (its vectors and BM25 loaded once).
pub fn passages_with(
    retriever: &mut Retriever<'_>,
    embed: &dyn Embed,
    query: &str,
    mode: Mode,
    k: usize,
    relative_to: Option<&Path>,
) -> Result<Vec<(i64, Passage)>> {
    if query.trim().is_empty() {
        return Err(Error::EmptyQuestion);
    }
    let index = retriever.index();
    let hits = retriever.search(embed, query, mode, k)?;
    let mut out = Vec::with_capacity(hits.len());
    for h in hits {
        let id = h.id as i64;
        let c = index.chunk(id)?.ok_or_else(|| Error::File {
            path: index.dir().to_path_buf(),
            problem: format!("chunk {id} vanished"),
        })?;
        out.push((id, Passage::from_chunk(c, h.score, relative_to)));
    }
    Ok(out)
}
