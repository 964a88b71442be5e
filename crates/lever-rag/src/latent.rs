//! RAG with the passage as a latent variable (Lewis et al. 2020, "Retrieval-Augmented
//! Generation for Knowledge-Intensive NLP Tasks", arXiv:2005.11401): the generator reads each
//! of the top-K passages on its own, and the answer's probability is marginalized over them
//! ([`crate::marginal`] holds the equations):
//!
//! - **RAG-Sequence**: p(y|x) = Σ_z p(z|x) Π_i p(y_i|x,z,y<i). Decoding as §2.5 describes it:
//!   a beam search per passage (greedy or sampled when the beam is 1), then either *thorough*
//!   decoding, where every hypothesis is scored under every passage (a forward pass for each
//!   passage that did not produce it), or *fast* decoding, where p(y|x,z) ≈ 0 for a
//!   hypothesis that passage z's beam did not produce. The hypothesis with the largest
//!   marginal wins (as Hugging Face's `RagSequenceForGeneration.generate` picks it).
//! - **RAG-Token**: p(y_i|x,y<i) = Σ_z p(z|x) p(y_i|x,z,y<i) at every step: the K contexts
//!   advance together through [`lever_model::Decoder::step_batch`] (the batched step `lever
//!   serve` uses), and greedy decoding, sampling or beam search run on that mixture.
//!
//! Each passage's prompt is `rag ask`'s grounded prompt with that passage alone, numbered
//! [1] ([`passage_prompt`]); `lever rag train` trains on the same prompts. The K prompts are
//! prefilled once, the prefix they share (template, instruction) only once, and the caches are
//! kept for scoring and decoding.
//!
//! Beam search follows Hugging Face's `BeamSearchScorer` in simplified form: the live beams
//! are ranked by their summed log-probability, a beam that emits an end-of-generation token
//! (among the first B candidates) is finished, the search stops once B beams are finished
//! (`early_stopping=True`), and finished hypotheses are ranked by log-probability divided by
//! their length (`length_penalty=1`).

use std::collections::HashMap;
use std::path::Path;

use lever_generate::{FinishReason, Sampler, SamplingParams};
use lever_model::{Cache, Logits, Message, Model};

use crate::marginal::{self, Formulation};
use crate::prompt::{self, Passage};
use crate::{Error, Index, Mode, Result, Retriever};

/// How RAG-Sequence scores the hypotheses of the passages' beams (§2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeqDecoding {
    /// Every hypothesis scored under every passage.
    #[default]
    Thorough,
    /// A hypothesis not produced by passage z's beam gets p(y|x,z) = 0.
    Fast,
}

impl SeqDecoding {
    pub fn name(self) -> &'static str {
        match self {
            SeqDecoding::Thorough => "thorough",
            SeqDecoding::Fast => "fast",
        }
    }
}

/// How to decode.
#[derive(Debug, Clone)]
pub struct DecodeOptions<'a> {
    /// Beams (per passage for RAG-Sequence); 1 is greedy, or sampling when the temperature
    /// of `sampling` is above 0.
    pub beam: usize,
    pub max_tokens: usize,
    /// A hypothesis ends at the first of these strings (the text is cut before it).
    pub stop: &'a [String],
    pub sampling: SamplingParams,
    pub seq_decoding: SeqDecoding,
}

/// The top-K passages of a question with their probabilities.
#[derive(Debug, Clone)]
pub struct Retrieved {
    /// Chunk ids and passages, best first.
    pub passages: Vec<(i64, Passage)>,
    /// log p(z|x), in the same order.
    pub doc_log_probs: Vec<f64>,
}

impl Retrieved {
    pub fn doc_probs(&self) -> Vec<f32> {
        self.doc_log_probs.iter().map(|l| l.exp() as f32).collect()
    }
}

/// The `k` best passages for `question` by dense search, with p(z|x) = softmax over them of
/// the encoder's inner products divided by `temperature`. `query` embeds the question: the
/// index's own encoder, or a query encoder the retriever accepted
/// ([`Retriever::accept_query_encoder`]). Errors: an empty question, `k` above the passages
/// the index holds, no passage found.
pub fn retrieve(
    retriever: &mut Retriever<'_>,
    query: &dyn crate::Embed,
    question: &str,
    k: usize,
    temperature: f32,
    relative_to: Option<&Path>,
) -> Result<Retrieved> {
    let passages =
        crate::answer::passages_with(retriever, query, question, Mode::Dense, k, relative_to)?;
    if passages.is_empty() {
        return Err(Error::NoMatch {
            path: retriever.index().dir().to_path_buf(),
            mode: Mode::Dense.name(),
        });
    }
    let scores: Vec<f32> = passages.iter().map(|(_, p)| p.score).collect();
    let doc_log_probs = marginal::doc_log_probs(&scores, temperature)?;
    Ok(Retrieved {
        passages,
        doc_log_probs,
    })
}

/// Check that `k` passages can be asked of `index` and that it holds any: the errors a
/// question with nothing to retrieve, or a `k` above the index's size, should get before any
/// work is done.
pub fn check_k(index: &Index, k: usize) -> Result<()> {
    let chunks = check_not_empty(index)?;
    if k > chunks {
        return Err(Error::TooFewPassages {
            path: index.dir().to_path_buf(),
            k,
            chunks,
        });
    }
    Ok(())
}

/// Refuses an index with no passages, by name; otherwise returns how many it holds.
pub fn check_not_empty(index: &Index) -> Result<usize> {
    let chunks = index.stats()?.chunks as usize;
    if chunks == 0 {
        return Err(Error::EmptyIndex {
            path: index.dir().to_path_buf(),
        });
    }
    Ok(chunks)
}

/// The token ids of the prompt that grounds `question` on `passage` alone: `rag ask`'s user
/// turn with the passage numbered [1], rendered with the model's chat template (assistant
/// turn opened), BOS first where the model adds one.
pub fn passage_prompt(model: &Model, question: &str, passage: &Passage) -> Result<Vec<u32>> {
    let user = prompt::user_turn(question, &[passage.block(1)]);
    let text = lever_generate::local::render_chat(model, &[Message::new("user", user)])?;
    Ok(model.tokenizer.encode(&text, true)?)
}

/// The tokens of `answer` as the assistant's turn after `user`, as the chat template closes
/// it (end-of-turn marker included): the span `lever finetune` and `lever rag train` train,
/// so that a score here is the negative of their loss.
pub fn answer_tokens(model: &Model, user: &str, answer: &str) -> Result<Vec<u32>> {
    let template = model.chat_template.as_ref().ok_or_else(|| {
        Error::Generate(lever_generate::Error::NoChatTemplate {
            model: model.info.path.clone(),
        })
    })?;
    let conv = lever_data::Example::Conversation(vec![
        Message::new("user", user),
        Message::new("assistant", answer),
    ]);
    let t = lever_data::sft::tokenize(&model.tokenizer, Some(template), &conv, 0).map_err(|e| {
        Error::File {
            path: model.info.path.clone(),
            problem: format!("the answer {answer:?} cannot be tokenized as a turn: {e}"),
        }
    })?;
    let ids: Vec<u32> = t
        .ids
        .iter()
        .zip(&t.trained)
        .filter(|(_, trained)| **trained)
        .map(|(id, _)| *id)
        .collect();
    if ids.is_empty() {
        return Err(Error::File {
            path: model.info.path.clone(),
            problem: format!("the answer {answer:?} has no tokens"),
        });
    }
    Ok(ids)
}

/// One hypothesis of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated tokens, the end-of-generation token included when it ended so.
    pub tokens: Vec<u32>,
    /// Σ of the log-probabilities of its tokens under the distribution it was decoded from
    /// (one passage's for RAG-Sequence's beams, the mixture's for RAG-Token).
    pub log_prob: f64,
    /// log p(y_i | x, z, y<i) of each token under each context z it was decoded with, (N, G)
    /// row-major: G = 1 for a passage's own beam, K for RAG-Token.
    pub context_log_probs: Vec<f64>,
    pub finish: FinishReason,
}

/// What a latent-passage decoder returns.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub text: String,
    pub tokens: Vec<u32>,
    /// log p(y|x) of the answer under the formulation (RAG-Sequence fast decoding: its
    /// approximation).
    pub log_likelihood: f64,
    /// p(z|x,y): how much each passage explains the answer (RAG-Sequence; for RAG-Token, the
    /// mean over the answer's tokens of p(z|x,y≤i)).
    pub posterior: Vec<f32>,
    pub finish: FinishReason,
    /// Distinct hypotheses considered (RAG-Sequence: the union of the passages' beams).
    pub hypotheses: usize,
    /// Passage-token forward rows computed while decoding, beside the prompts.
    pub decode_rows: usize,
}

/// The K prompts of one question, prefilled: both formulations decode and score from here.
pub struct Contexts<'m> {
    model: &'m Model,
    /// log p(z|x).
    pub doc_log_probs: Vec<f64>,
    prompts: Vec<Vec<u32>>,
    caches: Vec<Cache>,
    /// The logits after each prompt's last token, (V) each.
    first: Vec<Vec<f32>>,
}

impl<'m> Contexts<'m> {
    /// Prefill `prompts` (one per passage, `doc_log_probs` in the same order). The prefix
    /// all prompts share is computed once and its keys and values copied.
    pub fn new(model: &'m Model, prompts: Vec<Vec<u32>>, doc_log_probs: Vec<f64>) -> Result<Self> {
        if prompts.is_empty() || prompts.len() != doc_log_probs.len() {
            return Err(Error::Dim {
                what: "passage prompts".into(),
                expected: doc_log_probs.len(),
                got: prompts.len(),
            });
        }
        let ctx = model.decoder.config().max_seq_len;
        if let Some(p) = prompts.iter().find(|p| p.is_empty() || p.len() >= ctx) {
            return Err(Error::Generate(lever_generate::Error::Model(
                lever_model::Error::ContextOverflow {
                    tokens: p.len(),
                    context: ctx,
                    over: (p.len() + 1).saturating_sub(ctx),
                },
            )));
        }
        // The shared prefix, minus one token so that each prompt computes its last logits.
        let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
        let shared = (0..shortest)
            .take_while(|&i| prompts.iter().all(|p| p[i] == prompts[0][i]))
            .count()
            .min(shortest - 1);
        let mut base = model.decoder.new_cache();
        if shared > 0 {
            forward(model, &prompts[0][..shared], &mut base)?;
        }
        let mut caches = Vec::with_capacity(prompts.len());
        let mut first = Vec::with_capacity(prompts.len());
        for p in &prompts {
            let mut cache = base.clone();
            first.push(forward(model, &p[shared..], &mut cache)?);
            caches.push(cache);
        }
        Ok(Self {
            model,
            doc_log_probs,
            prompts,
            caches,
            first,
        })
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// Prompt tokens over all passages.
    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }

    /// log p(y_i | x, z, y<i) for every passage z and answer token i: (K, N) row-major.
    pub fn token_log_probs(&mut self, y: &[u32]) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(self.len() * y.len());
        for z in 0..self.len() {
            out.extend(self.passage_log_probs(z, y)?);
        }
        Ok(out)
    }

    /// log p(y_i | x, z, y<i) for passage `z`: the logits after the prompt predict y_0, one
    /// forward pass over y[..n-1] the rest; the cache is cut back to the prompt after.
    fn passage_log_probs(&mut self, z: usize, y: &[u32]) -> Result<Vec<f64>> {
        let n = y.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let model = self.model;
        let vocab = self.first[z].len();
        let ctx = model.decoder.config().max_seq_len;
        let len = self.prompts[z].len();
        if len + n - 1 > ctx {
            return Err(Error::Generate(lever_generate::Error::Model(
                lever_model::Error::ContextOverflow {
                    tokens: len + n - 1,
                    context: ctx,
                    over: len + n - 1 - ctx,
                },
            )));
        }
        let mut rows = self.first[z].clone();
        if n > 1 {
            let dev = model.decoder.device();
            let input = candle_core::Tensor::new(&y[..n - 1], dev)?.unsqueeze(0)?; // (1, n-1)
            let cache = &mut self.caches[z];
            let logits = model.decoder.forward(&input, cache, Logits::All); // (1, n-1, V)
            cache.truncate(len)?;
            let logits = logits?.squeeze(0)?.flatten_all()?.to_vec1::<f32>()?;
            rows.extend(logits);
        }
        check_finite(model, &rows, len)?;
        marginal::target_log_probs(&rows, vocab, y)
    }

    /// log p(y|x) of the answer tokens `y` under `f`.
    pub fn score(&mut self, f: Formulation, y: &[u32]) -> Result<f64> {
        let tokens = self.token_log_probs(y)?;
        marginal::log_likelihood(f, &self.doc_log_probs, &tokens)
    }

    /// Decode an answer under `f`.
    pub fn decode(&mut self, f: Formulation, opts: &DecodeOptions<'_>) -> Result<Decoded> {
        if opts.beam == 0 || opts.max_tokens == 0 {
            return Err(Error::Param {
                name: if opts.beam == 0 { "beam" } else { "max_tokens" },
                value: "0".into(),
                problem: "must be at least 1",
            });
        }
        match f {
            Formulation::Sequence => self.decode_sequence(opts),
            Formulation::Token => self.decode_token(opts),
        }
    }

    /// RAG-Token: one search over the mixture, the K caches of a beam stepping together.
    fn decode_token(&mut self, opts: &DecodeOptions<'_>) -> Result<Decoded> {
        let doc = self.doc_log_probs.clone();
        let vocab = self.first[0].len();
        let mixture = |rows: &[f32]| marginal::token_mixture(&doc, rows, vocab);
        let start = Group {
            caches: self.caches.clone(),
            logits: self.first.concat(),
        };
        let search = beam_search(self.model, &self.prompts[0], start, &mixture, opts)?;
        let best = search
            .hypotheses
            .into_iter()
            .next()
            .ok_or_else(|| Error::Decode("the beam search ended with no hypothesis".into()))?;
        // Each token's log-probability under each passage, kept by the search: the
        // marginal (in f64) and the posterior over passages need no further forward pass.
        let (k, n) = (self.len(), best.tokens.len());
        let steps = &best.context_log_probs;
        let mut posterior = vec![0f32; k];
        let mut log_likelihood = 0.0;
        for i in 0..n {
            let joint: Vec<f64> = (0..k).map(|z| doc[z] + steps[i * k + z]).collect();
            let lse = marginal::log_sum_exp(joint.iter().copied());
            log_likelihood += lse;
            for (p, j) in posterior.iter_mut().zip(&joint) {
                *p += ((j - lse).exp() / n as f64) as f32;
            }
        }
        Ok(Decoded {
            text: hyp_text(self.model, &best.tokens, opts.stop).0,
            log_likelihood,
            posterior,
            finish: best.finish,
            hypotheses: 1,
            decode_rows: search.rows,
            tokens: best.tokens,
        })
    }

    /// RAG-Sequence: each passage's own search (all passages batched together when the beam
    /// is 1), then thorough or fast scoring of the union of their hypotheses.
    fn decode_sequence(&mut self, opts: &DecodeOptions<'_>) -> Result<Decoded> {
        let k = self.len();
        let log_softmax = |row: &[f32]| -> Result<Vec<f32>> {
            let lse = marginal::log_sum_exp(row.iter().map(|&x| x as f64));
            Ok(row.iter().map(|&x| (x as f64 - lse) as f32).collect())
        };
        // beams[z]: passage z's hypotheses.
        let mut rows = 0;
        let beams: Vec<Vec<Hypothesis>> = if opts.beam == 1 {
            let (hyps, r) =
                parallel_decode(self.model, &self.prompts, &self.caches, &self.first, opts)?;
            rows += r;
            hyps.into_iter().map(|h| vec![h]).collect()
        } else {
            let mut out = Vec::with_capacity(k);
            for z in 0..k {
                let start = Group {
                    caches: vec![self.caches[z].clone()],
                    logits: self.first[z].clone(),
                };
                let s = beam_search(self.model, &self.prompts[z], start, &log_softmax, opts)?;
                rows += s.rows;
                out.push(s.hypotheses);
            }
            out
        };
        // The union of the hypotheses, in order of first appearance.
        let mut union: Vec<Hypothesis> = Vec::new();
        let mut seen: HashMap<Vec<u32>, usize> = HashMap::new();
        // known[(h, z)]: log p(y_h | x, z) from passage z's own beam.
        let mut known: HashMap<(usize, usize), f64> = HashMap::new();
        for (z, hyps) in beams.iter().enumerate() {
            for h in hyps {
                let at = *seen.entry(h.tokens.clone()).or_insert_with(|| {
                    union.push(h.clone());
                    union.len() - 1
                });
                known.insert((at, z), h.context_log_probs.iter().sum());
            }
        }
        let doc = self.doc_log_probs.clone();
        let mut best: Option<(f64, usize, Vec<f64>)> = None;
        for (h, hyp) in union.iter().enumerate() {
            // log p(z|x) + log p(y|x,z) for each passage; −∞ where fast decoding assumes 0.
            let mut joint = vec![f64::NEG_INFINITY; k];
            for z in 0..k {
                let lp = match (known.get(&(h, z)), opts.seq_decoding) {
                    (Some(&lp), _) => Some(lp),
                    (None, SeqDecoding::Thorough) => {
                        let lps = self.passage_log_probs(z, &hyp.tokens)?;
                        rows += hyp.tokens.len();
                        Some(lps.iter().sum())
                    }
                    (None, SeqDecoding::Fast) => None,
                };
                if let Some(lp) = lp {
                    joint[z] = doc[z] + lp;
                }
            }
            let ll = marginal::log_sum_exp(joint.iter().copied());
            if best.as_ref().is_none_or(|(b, _, _)| ll > *b) {
                best = Some((ll, h, joint));
            }
        }
        let (ll, h, joint) =
            best.ok_or_else(|| Error::Decode("no passage produced a hypothesis".into()))?;
        let hyp = union.swap_remove(h);
        Ok(Decoded {
            text: hyp_text(self.model, &hyp.tokens, opts.stop).0,
            log_likelihood: ll,
            posterior: joint.iter().map(|j| (j - ll).exp() as f32).collect(),
            finish: hyp.finish,
            hypotheses: union.len() + 1,
            decode_rows: rows,
            tokens: hyp.tokens,
        })
    }
}

/// A hypothesis as text: its tokens without end-of-generation ones, cut before the first of
/// `stop`; says whether it was cut.
fn hyp_text(model: &Model, ids: &[u32], stop: &[String]) -> (String, bool) {
    let tok = &model.tokenizer;
    let kept: Vec<u32> = ids.iter().copied().filter(|&t| !tok.is_eog(t)).collect();
    let text = tok.decode(&kept);
    match stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        Some(at) => (text[..at].to_string(), true),
        None => (text, false),
    }
}

/// Feed `ids` into `cache`; the logits after the last, (V).
fn forward(model: &Model, ids: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
    let dev = model.decoder.device();
    let input = candle_core::Tensor::new(ids, dev)?.unsqueeze(0)?; // (1, T)
    let logits = model.decoder.forward(&input, cache, Logits::Last)?; // (1, V)
    let logits = logits.squeeze(0)?.to_vec1::<f32>()?;
    check_finite(model, &logits, cache.len())?;
    Ok(logits)
}

fn check_finite(model: &Model, logits: &[f32], position: usize) -> Result<()> {
    Ok(lever_generate::check_logits(model, logits, position)?)
}

/// The caches a beam advances together and their latest logits, (G, V) row-major: one cache
/// for a passage's own beam, K for RAG-Token.
struct Group {
    caches: Vec<Cache>,
    logits: Vec<f32>,
}

struct Beam {
    tokens: Vec<u32>,
    log_prob: f64,
    /// (N, G): see [`Hypothesis::context_log_probs`].
    context_log_probs: Vec<f64>,
    group: Group,
}

/// log softmax(row)[t] of each row of `logits` (G, V).
fn rows_at(logits: &[f32], vocab: usize, t: u32) -> Vec<f64> {
    logits
        .chunks_exact(vocab)
        .map(|row| row[t as usize] as f64 - marginal::row_log_sum_exp(row))
        .collect()
}

struct Search {
    /// Best first (by log-probability per token).
    hypotheses: Vec<Hypothesis>,
    /// Passage-token rows the steps computed.
    rows: usize,
}

/// Beam search (B = `opts.beam`) over the distribution `combine` makes of a group's logits
/// (log-probabilities, (V)); B = 1 picks with a [`Sampler`] (greedy at temperature 0). All
/// live beams' caches advance in one batched step. `history` is the prompt, for the repeat
/// penalty.
fn beam_search(
    model: &Model,
    history: &[u32],
    start: Group,
    combine: &dyn Fn(&[f32]) -> Result<Vec<f32>>,
    opts: &DecodeOptions<'_>,
) -> Result<Search> {
    let b = opts.beam;
    let ctx = model.decoder.config().max_seq_len;
    let tok = &model.tokenizer;
    let mut sampler = Sampler::new(opts.sampling.clone());
    let groups = start.caches.len();
    let mut alive = vec![Beam {
        tokens: Vec::new(),
        log_prob: 0.0,
        context_log_probs: Vec::new(),
        group: start,
    }];
    let mut finished: Vec<Hypothesis> = Vec::new();
    let mut rows = 0;
    while !alive.is_empty() && finished.len() < b {
        // Candidates (score, beam, token, token log-prob), best first.
        let mut cand: Vec<(f64, usize, u32, f64)> = Vec::new();
        for (i, beam) in alive.iter().enumerate() {
            let lp = combine(&beam.group.logits)?;
            let picks: Vec<u32> = if b == 1 {
                let mut seen = history.to_vec();
                seen.extend(&beam.tokens);
                vec![sampler.sample(&lp, &seen)]
            } else {
                top_n(&lp, 2 * b)
            };
            for t in picks {
                let l = lp[t as usize] as f64;
                cand.push((beam.log_prob + l, i, t, l));
            }
        }
        cand.sort_by(|x, y| y.0.total_cmp(&x.0));
        // The next beams: (parent, token); a finished candidate among the first B ends there.
        let mut next: Vec<(usize, u32, f64, Vec<f64>)> = Vec::new();
        for (rank, &(score, i, t, _)) in cand.iter().enumerate() {
            if next.len() == b {
                break;
            }
            let mut tokens = alive[i].tokens.clone();
            tokens.push(t);
            let logits = &alive[i].group.logits;
            let mut context_log_probs = alive[i].context_log_probs.clone();
            context_log_probs.extend(rows_at(logits, logits.len() / groups, t));
            let finish = if tok.is_eog(t) {
                Some(FinishReason::Eog)
            } else if hyp_text(model, &tokens, opts.stop).1 {
                Some(FinishReason::Stop)
            } else if tokens.len() == opts.max_tokens {
                Some(FinishReason::Length)
            } else if alive[i].group.caches[0].len() + 1 >= ctx {
                Some(FinishReason::Context)
            } else {
                None
            };
            match finish {
                Some(finish) if rank < b => finished.push(Hypothesis {
                    tokens,
                    log_prob: score,
                    context_log_probs,
                    finish,
                }),
                Some(_) => {}
                None => next.push((i, t, score, context_log_probs)),
            }
        }
        if finished.len() >= b || next.is_empty() {
            break;
        }
        // Each chosen parent's caches move to its first child and are copied for the others.
        let mut parents: Vec<Option<Beam>> = alive.into_iter().map(Some).collect();
        let mut uses = vec![0usize; parents.len()];
        for &(i, ..) in &next {
            uses[i] += 1;
        }
        let mut children = Vec::with_capacity(next.len());
        for (i, t, score, context_log_probs) in next {
            uses[i] -= 1;
            let (tokens, group) = if uses[i] == 0 {
                let p = parents[i]
                    .take()
                    .ok_or_else(|| Error::Decode("a beam was continued twice".into()))?;
                (p.tokens, p.group)
            } else {
                let p = parents[i]
                    .as_ref()
                    .ok_or_else(|| Error::Decode("a beam was continued twice".into()))?;
                (
                    p.tokens.clone(),
                    Group {
                        caches: p.group.caches.clone(),
                        logits: Vec::new(),
                    },
                )
            };
            let mut tokens = tokens;
            tokens.push(t);
            children.push(Beam {
                tokens,
                log_prob: score,
                context_log_probs,
                group,
            });
        }
        // One batched step: every cache of every beam, each fed its beam's new token.
        let ids: Vec<u32> = children
            .iter()
            .flat_map(|c| {
                let t = c.tokens[c.tokens.len() - 1];
                std::iter::repeat_n(t, c.group.caches.len())
            })
            .collect();
        let mut caches: Vec<&mut Cache> = children
            .iter_mut()
            .flat_map(|c| c.group.caches.iter_mut())
            .collect();
        let logits = model.decoder.step_batch(&ids, &mut caches)?; // (B·G, V)
        rows += ids.len();
        let vocab = logits.dim(1)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let at = children[0].group.caches[0].len().saturating_sub(1);
        check_finite(model, &logits, at)?;
        let mut at = 0;
        for c in children.iter_mut() {
            let g = c.group.caches.len();
            c.group.logits = logits[at * vocab..(at + g) * vocab].to_vec();
            at += g;
        }
        alive = children;
    }
    // Beams still alive when the search stopped (B finished elsewhere): kept as Length only
    // when nothing finished.
    if finished.is_empty() {
        finished.extend(alive.into_iter().map(|a| Hypothesis {
            tokens: a.tokens,
            log_prob: a.log_prob,
            context_log_probs: a.context_log_probs,
            finish: FinishReason::Length,
        }));
    }
    finished.sort_by(|x, y| per_token(y).total_cmp(&per_token(x)));
    finished.truncate(b);
    Ok(Search {
        hypotheses: finished,
        rows,
    })
}

fn per_token(h: &Hypothesis) -> f64 {
    h.log_prob / h.tokens.len().max(1) as f64
}

/// The `n` largest entries' indices, best first (ties: the lower index).
fn top_n(xs: &[f32], n: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..xs.len() as u32).collect();
    let n = n.min(idx.len());
    let by = |a: &u32, b: &u32| xs[*b as usize].total_cmp(&xs[*a as usize]).then(a.cmp(b));
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by);
    }
    idx.truncate(n);
    idx.sort_by(by);
    idx
}

/// RAG-Sequence with a beam of 1: each passage's greedy (or sampled) answer, all passages
/// stepping together in one batch until each has ended. Returns the hypotheses in passage
/// order and the rows computed.
fn parallel_decode(
    model: &Model,
    prompts: &[Vec<u32>],
    caches: &[Cache],
    first: &[Vec<f32>],
    opts: &DecodeOptions<'_>,
) -> Result<(Vec<Hypothesis>, usize)> {
    let k = caches.len();
    let ctx = model.decoder.config().max_seq_len;
    let tok = &model.tokenizer;
    let mut caches: Vec<Cache> = caches.to_vec();
    let mut logits: Vec<Vec<f32>> = first.to_vec();
    // Each passage its own sampler (seeded alike), so its answer is what it alone would give.
    let mut samplers: Vec<Sampler> = (0..k)
        .map(|_| Sampler::new(opts.sampling.clone()))
        .collect();
    let mut hyps: Vec<Hypothesis> = (0..k)
        .map(|_| Hypothesis {
            tokens: Vec::new(),
            log_prob: 0.0,
            context_log_probs: Vec::new(),
            finish: FinishReason::Length,
        })
        .collect();
    let mut live: Vec<usize> = (0..k).collect();
    let mut rows = 0;
    while !live.is_empty() {
        let mut still = Vec::with_capacity(live.len());
        for &z in &live {
            let row = &logits[z];
            let lse = marginal::row_log_sum_exp(row);
            let mut seen = prompts[z].clone();
            seen.extend(&hyps[z].tokens);
            let t = samplers[z].sample(row, &seen);
            let h = &mut hyps[z];
            h.tokens.push(t);
            let lp = row[t as usize] as f64 - lse;
            h.log_prob += lp;
            h.context_log_probs.push(lp);
            let finish = if tok.is_eog(t) {
                Some(FinishReason::Eog)
            } else if hyp_text(model, &h.tokens, opts.stop).1 {
                Some(FinishReason::Stop)
            } else if h.tokens.len() == opts.max_tokens {
                Some(FinishReason::Length)
            } else if caches[z].len() + 1 >= ctx {
                Some(FinishReason::Context)
            } else {
                None
            };
            match finish {
                Some(f) => h.finish = f,
                None => still.push(z),
            }
        }
        live = still;
        if live.is_empty() {
            break;
        }
        let ids: Vec<u32> = live
            .iter()
            .map(|&z| hyps[z].tokens[hyps[z].tokens.len() - 1])
            .collect();
        let mut refs: Vec<&mut Cache> = caches
            .iter_mut()
            .enumerate()
            .filter(|(z, _)| live.contains(z))
            .map(|(_, c)| c)
            .collect();
        let out = model.decoder.step_batch(&ids, &mut refs)?; // (live, V)
        rows += ids.len();
        let vocab = out.dim(1)?;
        let out = out.flatten_all()?.to_vec1::<f32>()?;
        check_finite(model, &out, caches[live[0]].len().saturating_sub(1))?;
        for (r, &z) in live.iter().enumerate() {
            logits[z] = out[r * vocab..(r + 1) * vocab].to_vec();
        }
    }
    Ok((hyps, rows))
}

/// The prompts of `retrieved`'s passages for `question`, prefilled.
pub fn contexts<'m>(
    model: &'m Model,
    question: &str,
    retrieved: &Retrieved,
) -> Result<Contexts<'m>> {
    let prompts = retrieved
        .passages
        .iter()
        .map(|(_, p)| passage_prompt(model, question, p))
        .collect::<Result<Vec<_>>>()?;
    Contexts::new(model, prompts, retrieved.doc_log_probs.clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use lever_generate::{GenerateRequest, Session};
    use lever_model::testing::TinyGguf;

    fn tiny() -> Model {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        TinyGguf::default().write(&path).unwrap();
        Model::load_gguf(&path, &candle_core::Device::Cpu).unwrap()
    }

    fn ids(model: &Model, text: &str) -> Vec<u32> {
        model.tokenizer.encode(text, false).unwrap()
    }

    /// Three short contexts that share a prefix, with p(z|x) from cosine-like scores.
    fn contexts(model: &Model) -> Contexts<'_> {
        let prompts = vec![
            ids(model, "question: who? passage: alpha beta"),
            ids(model, "question: who? passage: gamma"),
            ids(model, "question: who? passage: delta epsilon zeta"),
        ];
        let doc = marginal::doc_log_probs(&[0.71, 0.64, 0.52], 0.05).unwrap();
        Contexts::new(model, prompts, doc).unwrap()
    }

    fn opts(beam: usize, max_tokens: usize) -> DecodeOptions<'static> {
        DecodeOptions {
            beam,
            max_tokens,
            stop: &[],
            sampling: SamplingParams::greedy(),
            seq_decoding: SeqDecoding::Thorough,
        }
    }

    /// log p(y_i|x,z,y<i) from one forward pass over prompt + answer, no cache reuse.
    fn reference_log_probs(model: &Model, prompt: &[u32], y: &[u32]) -> Vec<f64> {
        let mut all = prompt.to_vec();
        all.extend(&y[..y.len() - 1]);
        let input = candle_core::Tensor::new(all.as_slice(), model.decoder.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut cache = model.decoder.new_cache();
        let logits = model
            .decoder
            .forward(&input, &mut cache, Logits::All)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .narrow(0, prompt.len() - 1, y.len())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let vocab = logits.len() / y.len();
        marginal::target_log_probs(&logits, vocab, y).unwrap()
    }

    #[test]
    fn scores_equal_the_marginals_of_plain_forward_passes() {
        let model = tiny();
        let mut c = contexts(&model);
        let y = ids(&model, "the answer");
        let ours = c.token_log_probs(&y).unwrap();
        let mut want = Vec::new();
        for p in c.prompts.clone() {
            want.extend(reference_log_probs(&model, &p, &y));
        }
        let max = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(max < 1e-4, "max |Δ| {max}");
        // Scoring twice gives the same: the caches are cut back to the prompts.
        assert_eq!(c.token_log_probs(&y).unwrap(), ours);
        for f in [Formulation::Sequence, Formulation::Token] {
            let s = c.score(f, &y).unwrap();
            let m = marginal::log_likelihood(f, &c.doc_log_probs, &want).unwrap();
            assert!((s - m).abs() < 1e-3, "{f:?}: {s} vs {m}");
        }
        // Token ≥ Sequence is not a law, but both are below the best single passage + 0.
        assert!(c.score(Formulation::Sequence, &y).unwrap() < 0.0);
    }

    #[test]
    fn one_passage_decodes_as_plain_greedy_generation() {
        let model = tiny();
        let prompt = ids(&model, "question: who? passage: alpha");
        let mut session = Session::new(&model);
        let plain = lever_generate::generate(
            &model,
            &mut session,
            &prompt,
            &GenerateRequest {
                max_new_tokens: 12,
                ..GenerateRequest::default()
            },
            &mut |_| lever_generate::Flow::Continue,
        )
        .unwrap();
        for f in [Formulation::Sequence, Formulation::Token] {
            let mut c = Contexts::new(&model, vec![prompt.clone()], vec![0.0]).unwrap();
            let d = c.decode(f, &opts(1, 12)).unwrap();
            let mut tokens = d.tokens.clone();
            tokens.retain(|&t| !model.tokenizer.is_eog(t));
            assert_eq!(tokens, plain.tokens, "{f:?}");
            assert_eq!(d.text, plain.text, "{f:?}");
            assert!((d.posterior[0] - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn rag_token_with_identical_passages_is_the_single_passage_answer() {
        let model = tiny();
        let prompt = ids(&model, "question: why? passage: omega");
        let mut one = Contexts::new(&model, vec![prompt.clone()], vec![0.0]).unwrap();
        let doc = marginal::doc_log_probs(&[0.3, 0.9, 0.5], 0.1).unwrap();
        let mut three = Contexts::new(&model, vec![prompt; 3], doc).unwrap();
        let a = one.decode(Formulation::Token, &opts(1, 10)).unwrap();
        let b = three.decode(Formulation::Token, &opts(1, 10)).unwrap();
        assert_eq!(a.tokens, b.tokens);
        assert!((a.log_likelihood - b.log_likelihood).abs() < 1e-4);
        // Three rows per step: the K contexts step as one batch.
        assert_eq!(b.decode_rows, 3 * a.decode_rows);
    }

    #[test]
    fn decoders_report_the_likelihood_that_scoring_gives() {
        let model = tiny();
        for (f, beam) in [
            (Formulation::Token, 1),
            (Formulation::Token, 2),
            (Formulation::Sequence, 1),
            (Formulation::Sequence, 3),
        ] {
            let mut c = contexts(&model);
            let d = c.decode(f, &opts(beam, 8)).unwrap();
            assert!(!d.tokens.is_empty());
            let s = c.score(f, &d.tokens).unwrap();
            assert!(
                (d.log_likelihood - s).abs() < 1e-3,
                "{f:?} beam {beam}: decoded {} scored {s}",
                d.log_likelihood
            );
            let total: f32 = d.posterior.iter().sum();
            assert!(
                (total - 1.0).abs() < 1e-4,
                "{f:?}: posterior sums to {total}"
            );
        }
    }

    #[test]
    fn fast_decoding_never_exceeds_thorough_for_its_answer() {
        let model = tiny();
        let mut c = contexts(&model);
        let fast = c
            .decode(
                Formulation::Sequence,
                &DecodeOptions {
                    seq_decoding: SeqDecoding::Fast,
                    ..opts(2, 6)
                },
            )
            .unwrap();
        let thorough = c.score(Formulation::Sequence, &fast.tokens).unwrap();
        assert!(fast.log_likelihood <= thorough + 1e-6);
        assert!(fast.hypotheses >= 1 && fast.hypotheses <= 6);
    }

    #[test]
    fn a_beam_keeps_distinct_hypotheses_best_per_token_first() {
        let model = tiny();
        let c = contexts(&model);
        let log_softmax = |row: &[f32]| -> Result<Vec<f32>> {
            let lse = marginal::log_sum_exp(row.iter().map(|&x| x as f64));
            Ok(row.iter().map(|&x| (x as f64 - lse) as f32).collect())
        };
        let start = Group {
            caches: vec![c.caches[0].clone()],
            logits: c.first[0].clone(),
        };
        let s = beam_search(&model, &c.prompts[0], start, &log_softmax, &opts(3, 5)).unwrap();
        assert_eq!(s.hypotheses.len(), 3);
        for w in s.hypotheses.windows(2) {
            assert_ne!(w[0].tokens, w[1].tokens);
            assert!(per_token(&w[0]) >= per_token(&w[1]));
        }
        for h in &s.hypotheses {
            let sum: f64 = h.context_log_probs.iter().sum();
            assert!((h.log_prob - sum).abs() < 1e-4, "{} vs {sum}", h.log_prob);
            assert_eq!(h.context_log_probs.len(), h.tokens.len());
        }
        // Three beams of one context: three rows a step after the first.
        assert!(s.rows <= 3 * 4);
    }

    #[test]
    fn stop_strings_end_a_hypothesis_and_are_cut_from_its_text() {
        let model = tiny();
        let mut c = contexts(&model);
        let free = c.decode(Formulation::Token, &opts(1, 10)).unwrap();
        let text = model.tokenizer.decode(&free.tokens);
        // Stop at the third character the free answer produces.
        let stop_at: String = text.chars().skip(2).take(1).collect();
        if stop_at.is_empty() {
            return;
        }
        let stop = vec![stop_at.clone()];
        let d = c
            .decode(
                Formulation::Token,
                &DecodeOptions {
                    stop: &stop,
                    ..opts(1, 10)
                },
            )
            .unwrap();
        assert_eq!(d.finish, FinishReason::Stop);
        assert!(!d.text.contains(&stop_at), "{:?} holds {stop_at:?}", d.text);
        assert!(d.tokens.len() <= free.tokens.len());
    }

    #[test]
    fn answer_tokens_are_the_assistant_turn_with_its_end_marker() {
        let model = tiny();
        let y = answer_tokens(&model, "hi", "ok").unwrap();
        let im_end = model.tokenizer.token_to_id("<|im_end|>").unwrap();
        assert_eq!(&y[..2], ids(&model, "ok").as_slice());
        assert_eq!(y[2], im_end);
    }
}
