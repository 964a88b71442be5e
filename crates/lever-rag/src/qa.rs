//! Open-domain question answering, measured (`lever rag eval`): for each question, the
//! passages dense retrieval finds (recall of its gold documents at 1, 5 and 20), an answer in
//! one of four settings — closed-book, all passages in one prompt (`rag ask`), RAG-Sequence or
//! RAG-Token ([`crate::latent`]) — and its exact match and F1 against the gold answers with
//! SQuAD's normalization (lever-eval's metrics), the best over the answers, as SQuAD's
//! `evaluate-v1.1.py` scores. Citation marks (`[1]`) are removed from an answer first.
//!
//! Questions are JSONL, one per line: `{"_id", "text", "answers": [...], "gold_ids": [...]}`
//! (`gold_ids` may be empty or absent; such a question counts for EM/F1, not for recall), as
//! ../shared/data/squad-open has them. Recall@k is the share of the questions with gold ids
//! that have one among the `_id`s of the first k passages retrieved.

use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use lever_generate::{Flow, Generator, Prompt, Request, Sampling};
use lever_model::{Message, Model};
use serde::Serialize;

use crate::answer::{AnswerOptions, answer_from};
use crate::latent::{self, DecodeOptions};
use crate::marginal::Formulation;
use crate::{DenseIndex, Embed, Error, Mode, Result, Retriever};

/// The depths recall is reported at.
pub const RECALL_AT: [usize; 3] = [1, 5, 20];

/// One question with its gold answers and documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub id: String,
    pub text: String,
    pub answers: Vec<String>,
    pub gold_ids: Vec<String>,
}

/// Read a questions file; a line that is not such a question is an error naming it.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |problem: String| Error::Line {
            path: path.to_path_buf(),
            line: i + 1,
            problem,
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let strings = |field: &str, v: Option<&serde_json::Value>| -> Result<Vec<String>> {
            match v {
                None | Some(serde_json::Value::Null) => Ok(Vec::new()),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .map(|x| match x {
                        serde_json::Value::String(s) => Ok(s.clone()),
                        serde_json::Value::Number(n) => Ok(n.to_string()),
                        _ => Err(bad(format!("field `{field}` holds a non-string"))),
                    })
                    .collect(),
                Some(_) => Err(bad(format!("field `{field}` is not a list"))),
            }
        };
        let id = match v.get("_id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err(bad("field `_id` is missing or not a string".into())),
        };
        let text = match v.get("text").and_then(|t| t.as_str()) {
            Some(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => return Err(bad("field `text` (the question) is missing or empty".into())),
        };
        let answers = strings("answers", v.get("answers"))?;
        if answers.iter().all(|a| a.trim().is_empty()) {
            return Err(bad("field `answers` has no answer".into()));
        }
        let gold_ids = strings("gold_ids", v.get("gold_ids"))?;
        out.push(Question {
            id,
            text,
            answers,
            gold_ids,
        });
    }
    if out.is_empty() {
        return Err(Error::File {
            path: path.to_path_buf(),
            problem: "no questions".into(),
        });
    }
    Ok(out)
}

/// How a question is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// The generator alone, the question as the user's turn.
    Closed,
    /// `rag ask`: the passages that fit, in one prompt.
    Concat,
    /// The passage as a latent variable: RAG-Sequence or RAG-Token.
    Latent(Formulation),
}

impl Setting {
    pub fn name(self) -> &'static str {
        match self {
            Setting::Closed => "closed",
            Setting::Concat => "concat",
            Setting::Latent(f) => f.name(),
        }
    }
}

impl FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "closed" => Ok(Setting::Closed),
            "concat" => Ok(Setting::Concat),
            "seq" => Ok(Setting::Latent(Formulation::Sequence)),
            "token" => Ok(Setting::Latent(Formulation::Token)),
            _ => Err(format!(
                "`{s}` is not a formulation: closed, concat, seq or token"
            )),
        }
    }
}

/// How to answer and measure.
#[derive(Debug, Clone)]
pub struct QaOptions<'a> {
    pub setting: Setting,
    /// Passages the answer is generated from.
    pub k: usize,
    /// τ of p(z|x).
    pub temperature: f32,
    /// Beams (per passage for RAG-Sequence) of the latent settings; 1: greedy or sampled.
    pub beam: usize,
    pub seq_decoding: latent::SeqDecoding,
    pub max_tokens: usize,
    pub stop: &'a [String],
    pub sampling: Sampling,
    pub relative_to: Option<&'a Path>,
}

/// One question's result.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub id: String,
    pub question: String,
    pub prediction: String,
    /// 1 or 0.
    pub em: f64,
    pub f1: f64,
    /// The document ids of the passages retrieved, best first (up to 20).
    pub retrieved: Vec<Option<String>>,
    /// A gold id among the first 1, 5, 20 retrieved; None when the question has no gold ids.
    pub hits: Option<[bool; 3]>,
    /// p(z|x) of the k passages answered from (latent settings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub doc_probs: Option<Vec<f32>>,
    /// log p(y|x) of the prediction (latent settings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_likelihood: Option<f64>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub seconds: f64,
}

/// The best exact match and F1 of `prediction` over `answers` (SQuAD's normalization, after
/// removing citation marks).
pub fn score_answer(prediction: &str, answers: &[String]) -> (f64, f64) {
    let p = crate::prompt::strip_citations(prediction);
    let em = answers
        .iter()
        .map(|a| f64::from(u8::from(lever_eval::metrics::exact_match(&p, a))))
        .fold(0.0, f64::max);
    let f1 = answers
        .iter()
        .map(|a| lever_eval::metrics::token_f1(&p, a))
        .fold(0.0, f64::max);
    (em, f1)
}

/// Answer `q` and measure it. `query` embeds the question for `retriever` (the index's
/// encoder, or a query encoder it accepted); `generator` writes closed-book and concat
/// answers, `model` the latent ones and measures the concat budget.
pub fn run_question(
    model: &Model,
    generator: &mut dyn Generator,
    retriever: &mut Retriever<'_>,
    query: &dyn Embed,
    q: &Question,
    opts: &QaOptions<'_>,
) -> Result<Outcome> {
    let start = Instant::now();
    let depth = opts.k.max(RECALL_AT[2]);
    let chunks = retriever.index().stats()?.chunks as usize;
    let found = crate::answer::passages_with(
        retriever,
        query,
        &q.text,
        Mode::Dense,
        depth.min(chunks),
        opts.relative_to,
    )?;
    if found.is_empty() {
        return Err(Error::NoMatch {
            path: retriever.index().dir().to_path_buf(),
            mode: Mode::Dense.name(),
        });
    }
    let retrieved: Vec<Option<String>> = found
        .iter()
        .take(RECALL_AT[2])
        .map(|(_, p)| p.doc_id.clone())
        .collect();
    let hits = (!q.gold_ids.is_empty()).then(|| {
        RECALL_AT.map(|at| {
            retrieved
                .iter()
                .take(at)
                .flatten()
                .any(|id| q.gold_ids.contains(id))
        })
    });
    let used: Vec<_> = found.into_iter().take(opts.k).collect();
    let (mut doc_probs, mut log_likelihood) = (None, None);
    let (prediction, prompt_tokens, completion_tokens) = match opts.setting {
        Setting::Closed => {
            let messages = [Message::new("user", q.text.clone())];
            let out = generator.generate(
                &Request {
                    constraint: None,
                    prompt: Prompt::Chat(&messages),
                    max_tokens: opts.max_tokens,
                    stop: opts.stop,
                    sampling: opts.sampling.clone(),
                },
                &mut |_| Flow::Continue,
            )?;
            (
                out.text,
                out.prompt_tokens.unwrap_or(0),
                out.completion_tokens.unwrap_or(0),
            )
        }
        Setting::Concat => {
            let a = answer_from(
                model,
                generator,
                &q.text,
                used.into_iter().map(|(_, p)| p).collect(),
                &AnswerOptions {
                    mode: Mode::Dense,
                    k: opts.k,
                    dense: DenseIndex::Auto,
                    context_tokens: None,
                    relative_to: opts.relative_to,
                    max_tokens: opts.max_tokens,
                    stop: opts.stop,
                    sampling: opts.sampling.clone(),
                },
                &mut |_| Flow::Continue,
            )?;
            (
                a.text,
                a.prompt_tokens.unwrap_or(0),
                a.completion_tokens.unwrap_or(0),
            )
        }
        Setting::Latent(f) => {
            let scores: Vec<f32> = used.iter().map(|(_, p)| p.score).collect();
            let r = latent::Retrieved {
                doc_log_probs: crate::marginal::doc_log_probs(&scores, opts.temperature)?,
                passages: used,
            };
            let mut ctx = latent::contexts(model, &q.text, &r)?;
            let out = ctx.decode(
                f,
                &DecodeOptions {
                    beam: opts.beam,
                    max_tokens: opts.max_tokens,
                    stop: opts.stop,
                    sampling: opts.sampling.resolve(&model.info.generation),
                    seq_decoding: opts.seq_decoding,
                },
            )?;
            doc_probs = Some(r.doc_probs());
            log_likelihood = Some(out.log_likelihood);
            (out.text, ctx.prompt_tokens(), out.tokens.len())
        }
    };
    let (em, f1) = score_answer(&prediction, &q.answers);
    Ok(Outcome {
        id: q.id.clone(),
        question: q.text.clone(),
        prediction,
        em,
        f1,
        retrieved,
        hits,
        doc_probs,
        log_likelihood,
        prompt_tokens,
        completion_tokens,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A mean with its 95% bootstrap interval.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Estimate {
    pub mean: f64,
    pub ci95: Option<(f64, f64)>,
}

/// The figures of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub n: usize,
    pub em: Estimate,
    pub f1: Estimate,
    /// Questions with gold ids (recall's denominator).
    pub judged: usize,
    /// Recall at 1, 5 and 20; None without judged questions.
    pub recall: [Option<Estimate>; 3],
}

/// Bootstrap resamples for the intervals (seeded: the same outcomes give the same interval).
const BOOTSTRAP: usize = 2000;

pub fn summarize(outcomes: &[Outcome]) -> Summary {
    let estimate = |xs: &[f64]| {
        let (mean, ci95) = lever_eval::metrics::mean_ci(xs, BOOTSTRAP, 0);
        Estimate { mean, ci95 }
    };
    let em: Vec<f64> = outcomes.iter().map(|o| o.em).collect();
    let f1: Vec<f64> = outcomes.iter().map(|o| o.f1).collect();
    let judged: Vec<[bool; 3]> = outcomes.iter().filter_map(|o| o.hits).collect();
    let recall = [0, 1, 2].map(|d| {
        let xs: Vec<f64> = judged.iter().map(|h| f64::from(u8::from(h[d]))).collect();
        (!xs.is_empty()).then(|| estimate(&xs))
    });
    Summary {
        n: outcomes.len(),
        em: estimate(&em),
        f1: estimate(&f1),
        judged: judged.len(),
        recall,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_scored_as_squad_does_after_citations_are_removed() {
        let gold = vec!["Denver Broncos".to_string(), "the Broncos".to_string()];
        assert_eq!(score_answer("The Broncos [1].", &gold), (1.0, 1.0));
        let (em, f1) = score_answer("The Denver Broncos won [2]", &gold);
        // "denver broncos won" vs "denver broncos": p = 2/3, r = 1 -> 0.8.
        assert_eq!(em, 0.0);
        assert!((f1 - 0.8).abs() < 1e-12);
    }

    #[test]
    fn questions_are_read_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"_id\": \"a\", \"text\": \"Who?\", \"answers\": [\"Me\"], \"gold_ids\": [\"d1\"]}\n\n{\"_id\": 7, \"text\": \"When?\", \"answers\": [\"Now\"]}\n",
        )
        .unwrap();
        let qs = read_questions(&p).unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].gold_ids, vec!["d1"]);
        assert_eq!((qs[1].id.as_str(), qs[1].gold_ids.len()), ("7", 0));
        std::fs::write(
            &p,
            "{\"_id\": \"a\", \"text\": \"Who?\", \"answers\": []}\n",
        )
        .unwrap();
        let e = read_questions(&p).unwrap_err().to_string();
        assert!(
            e.ends_with("q.jsonl:1: field `answers` has no answer"),
            "{e}"
        );
        std::fs::write(&p, "{\"_id\": \"a\", \"question\": \"Who?\"}\n").unwrap();
        let e = read_questions(&p).unwrap_err().to_string();
        assert!(e.contains("field `text` (the question) is missing"), "{e}");
    }

    #[test]
    fn recall_counts_judged_questions_only() {
        let o = |hits: Option<[bool; 3]>, em: f64| Outcome {
            id: String::new(),
            question: String::new(),
            prediction: String::new(),
            em,
            f1: em,
            retrieved: vec![],
            hits,
            doc_probs: None,
            log_likelihood: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            seconds: 0.0,
        };
        let s = summarize(&[
            o(Some([true, true, true]), 1.0),
            o(Some([false, true, true]), 0.0),
            o(None, 0.0),
            o(Some([false, false, true]), 1.0),
        ]);
        assert_eq!((s.n, s.judged), (4, 3));
        assert!((s.em.mean - 0.5).abs() < 1e-12);
        let r: Vec<f64> = s.recall.iter().map(|r| r.unwrap().mean).collect();
        assert!((r[0] - 1.0 / 3.0).abs() < 1e-12 && (r[1] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r[2], 1.0);
        let (lo, hi) = s.em.ci95.unwrap();
        assert!(lo <= 0.5 && hi >= 0.5 && lo >= 0.0 && hi <= 1.0);
    }
}
