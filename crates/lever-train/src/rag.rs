//! Retrieval-augmented generation trained end to end: the query encoder of the retriever and
//! an adapter on the generator, from question–answer pairs alone (Lewis et al. 2020,
//! "Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks", arXiv:2005.11401).
//!
//! For a question x the trainable query encoder gives q(x); the top K passages z of a fixed
//! index (their vectors d(z) frozen: §2.4, "we keep the document encoder (and index) fixed,
//! only fine-tuning the query encoder") get
//!   p(z|x) = softmax_z(q(x)·d(z) / τ)                                       (§2.2)
//! and the generator reads each passage on its own, in the prompt `rag ask` builds. The loss
//! is the negative marginal log-likelihood of the gold answer y (§2.4), per formulation (§2.1):
//!   RAG-Sequence:  −log Σ_z p(z|x) Π_i p(y_i | x, z, y<i)
//!   RAG-Token:     −Σ_i log Σ_z p(z|x) p(y_i | x, z, y<i)
//! Both sums run in log space (log-sum-exp). The gradient reaches q(x) through p(z|x) and the
//! generator's adapter through p(y_i|…); top-K selection itself is not differentiated, as in
//! the paper. τ is ours: the paper's DPR vectors are unnormalized, while a sentence encoder's
//! are unit vectors whose inner products (cosines) differ by little, so p(z|x) would be
//! almost uniform at τ = 1; sentence-transformers trains such encoders with the scale 1/τ = 20
//! (`MultipleNegativesRankingLoss`), the default here.
//!
//! The checks: `tests/rag_marginal.rs` holds [`marginal_nll`]'s value and gradients with
//! respect to the document scores and the generator's logits to PyTorch autograd of the two
//! equations (fixture by scripts/make-rag-train-fixtures.py).
//!
//! Dimension legend: K passages per question, N answer tokens, V vocabulary, C encoder width,
//! T tokens of a prompt with its answer.

use candle_core::backprop::GradStore;
use candle_core::{D, Device, Tensor, Var};
use lever_data::{Example, Tokenized};
use lever_model::{ChatTemplate, Decoder, Encoder, Message, Tokenizer};

use crate::error::{Error, Result};
use crate::trainer::{MicroStep, accumulate};

/// How the answer's probability is marginalized over the passages (§2.1): lever-rag's, whose
/// `marginal` module holds the paper's equations this loss trains.
pub use lever_rag::marginal::Formulation;

/// log Σ exp over `dim`, the maximum held out of the graph (its gradient terms cancel).
fn log_sum_exp(x: &Tensor, dim: usize) -> Result<Tensor> {
    let m = x.max_keepdim(dim)?.detach();
    Ok((x.broadcast_sub(&m)?.exp()?.sum_keepdim(dim)?.log()? + m)?.squeeze(dim)?)
}

/// The negative marginal log-likelihood of one answer. `doc_scores`: (K,) the retrieval
/// logits q·d/τ; `token_logits`: (K, N, V) the generator's logits at the positions that
/// predict the answer's tokens `targets` (N), given each passage. Returns a scalar with the
/// graph of both inputs.
pub fn marginal_nll(
    doc_scores: &Tensor,
    token_logits: &Tensor,
    targets: &[u32],
    formulation: Formulation,
) -> Result<Tensor> {
    let (k, n, v) = token_logits.dims3()?;
    if doc_scores.dims() != [k] || targets.len() != n || n == 0 {
        return Err(Error::Config {
            what: "marginal likelihood".into(),
            problem: format!(
                "scores {:?}, logits {:?} and {} targets do not fit (K,), (K, N, V), N ≥ 1",
                doc_scores.dims(),
                token_logits.dims(),
                targets.len()
            ),
        });
    }
    let log_pz = candle_nn::ops::log_softmax(doc_scores, 0)?; // (K,)
    let repeated: Vec<u32> = (0..k).flat_map(|_| targets.iter().copied()).collect();
    let token_lp = crate::loss::cross_entropy(&token_logits.reshape((k * n, v))?, repeated)?
        .neg()?
        .reshape((k, n))?; // (K, N): log p(y_i | x, z, y<i)
    let nll = match formulation {
        Formulation::Sequence => {
            let joint = (log_pz + token_lp.sum(1)?)?; // (K,): log p(z|x) p(y|x,z)
            log_sum_exp(&joint, 0)?.neg()?
        }
        Formulation::Token => {
            let joint = token_lp.broadcast_add(&log_pz.unsqueeze(1)?)?; // (K, N)
            log_sum_exp(&joint, 0)?.sum_all()?.neg()? // Σ_i −log Σ_z
        }
    };
    Ok(nll)
}

/// The frozen document vectors of an index (row-major, `ids.len()` rows of `dim`).
#[derive(Debug, Clone)]
pub struct Documents {
    pub dim: usize,
    pub ids: Vec<u64>,
    pub data: Vec<f32>,
}

impl Documents {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows of the `k` largest inner products with `q`, best first (ties: lower row
    /// first), by an exact scan.
    pub fn top_k(&self, q: &[f32], k: usize) -> Vec<usize> {
        let mut scored: Vec<(f32, usize)> = (0..self.len())
            .map(|i| (self.row(i).iter().zip(q).map(|(a, b)| a * b).sum(), i))
            .collect();
        let k = k.min(scored.len());
        let by_score = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if k < scored.len() && k > 0 {
            scored.select_nth_unstable_by(k - 1, by_score);
        }
        scored.truncate(k);
        scored.sort_by(by_score);
        scored.into_iter().map(|(_, i)| i).collect()
    }
}

/// A training question and the answer whose likelihood is maximized.
#[derive(Debug, Clone, PartialEq)]
pub struct QaExample {
    pub question: String,
    pub answer: String,
}

/// Everything one question's loss needs: the two models, the index's vectors, and how a
/// passage becomes a prompt.
pub struct RagSetup<'a> {
    pub encoder: &'a Encoder,
    pub decoder: &'a Decoder,
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub docs: &'a Documents,
    /// The user turn that grounds a question on one passage (by document id), as `rag ask`
    /// builds it.
    pub ground: &'a dyn Fn(&str, u64) -> Result<String>,
    pub k: usize,
    pub temperature: f64,
    pub formulation: Formulation,
}

/// One question's loss and what went into it.
pub struct QuestionLoss {
    /// −log p(y|x) under the formulation: a scalar with the graph.
    pub nll: Tensor,
    /// The retrieved documents' ids, best first.
    pub retrieved: Vec<u64>,
    /// p(z|x) of each, in the same order.
    pub doc_probs: Vec<f32>,
    /// N, the answer's tokens (end-of-turn marker included).
    pub answer_tokens: usize,
    /// Tokens through the generator (K prompts with the answer) and the encoder.
    pub tokens: usize,
}

impl RagSetup<'_> {
    /// The question's prompt with its answer, grounded on document `id`.
    fn tokenized(&self, ex: &QaExample, id: u64) -> Result<Tokenized> {
        let user = (self.ground)(&ex.question, id)?;
        let conv = Example::Conversation(vec![
            Message::new("user", user),
            Message::new("assistant", ex.answer.clone()),
        ]);
        Ok(lever_data::sft::tokenize(
            self.tokenizer,
            Some(self.template),
            &conv,
            0,
        )?)
    }

    /// −log p(answer | question) for one question: retrieve, score, generate, marginalize.
    pub fn question_loss(&self, ex: &QaExample) -> Result<QuestionLoss> {
        let bad = |problem: String| Error::Config {
            what: format!("question {:?}", ex.question),
            problem,
        };
        let (q, _) = self.encoder.embed_tensor(&[ex.question.as_str()])?; // (1, C)
        let rows = self
            .docs
            .top_k(&q.detach().flatten_all()?.to_vec1::<f32>()?, self.k);
        if rows.len() < self.k {
            return Err(bad(format!(
                "{} passages retrieved, {} asked",
                rows.len(),
                self.k
            )));
        }
        let d: Vec<f32> = rows
            .iter()
            .flat_map(|&r| self.docs.row(r).iter().copied())
            .collect();
        let d = Tensor::from_vec(d, (self.k, self.docs.dim), &Device::Cpu)?; // (K, C)
        let scores = (q.matmul(&d.t()?)?.squeeze(0)? / self.temperature)?; // (K,)
        let retrieved: Vec<u64> = rows.iter().map(|&r| self.docs.ids[r]).collect();

        // The K prompts, each with the answer; the answer's tokens must be the same in all.
        let seqs: Vec<Tokenized> = retrieved
            .iter()
            .map(|&id| self.tokenized(ex, id))
            .collect::<Result<_>>()?;
        let answer = |t: &Tokenized| -> Vec<u32> {
            (1..t.ids.len())
                .filter(|&i| t.trained[i])
                .map(|i| t.ids[i])
                .collect()
        };
        let targets = answer(&seqs[0]);
        if targets.is_empty() {
            return Err(bad("the answer has no tokens to train".into()));
        }
        if let Some(j) = seqs.iter().position(|s| answer(s) != targets) {
            return Err(bad(format!(
                "the chat template tokenizes the answer differently after passage {}",
                retrieved[j]
            )));
        }
        let context = self.decoder.config().max_seq_len;
        let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        if t > context {
            return Err(bad(format!(
                "a prompt with its answer is {t} tokens, over the generator's context of {context}"
            )));
        }
        // Right-padded (K, T); the rows of the positions that predict the answer, passage by
        // passage.
        let (k, n) = (self.k, targets.len());
        let mut ids = vec![0u32; k * t];
        let mut picked = Vec::with_capacity(k * n);
        for (j, s) in seqs.iter().enumerate() {
            ids[j * t..j * t + s.ids.len()].copy_from_slice(&s.ids);
            picked.extend(
                (1..s.ids.len())
                    .filter(|&i| s.trained[i])
                    .map(|i| (j * t + i - 1) as u32),
            );
        }
        let dev = self.decoder.device();
        let ids = Tensor::from_vec(ids, (k, t), dev)?;
        let hidden = self.decoder.hidden(&ids, &mut self.decoder.new_cache())?; // (K, T, C')
        let c = hidden.dim(D::Minus1)?;
        let rows = Tensor::from_vec(picked, k * n, dev)?;
        let h = hidden.reshape((k * t, c))?.index_select(&rows, 0)?; // (K·N, C')
        let logits = self.decoder.head(&h)?; // (K·N, V)
        let v = logits.dim(1)?;
        let nll = marginal_nll(
            &scores,
            &logits.reshape((k, n, v))?,
            &targets,
            self.formulation,
        )?;
        let doc_probs = candle_nn::ops::softmax(&scores.detach(), 0)?.to_vec1::<f32>()?;
        let enc_tokens = self.encoder.tokenize(&[ex.question.as_str()])?[0].ids.len();
        Ok(QuestionLoss {
            nll,
            retrieved,
            doc_probs,
            answer_tokens: n,
            tokens: seqs.iter().map(|s| s.ids.len()).sum::<usize>() + enc_tokens,
        })
    }

    /// A micro-batch of questions for [`crate::Trainer::step_with`]: each question's loss
    /// and backward in turn (one question's graph alive at a time), the gradients of
    /// Σ nll / `divisor` summed over them for `vars`.
    pub fn micro_step(
        &self,
        examples: &[QaExample],
        idx: &[usize],
        divisor: usize,
        vars: &[Var],
    ) -> Result<MicroStep> {
        let mut total: Option<GradStore> = None;
        let (mut loss_sum, mut trained, mut tokens) = (0f64, 0usize, 0usize);
        for &i in idx {
            let l = self.question_loss(&examples[i])?;
            loss_sum += l.nll.to_scalar::<f32>()? as f64;
            trained += l.answer_tokens;
            tokens += l.tokens;
            let grads = self.decoder.backward(&(l.nll / divisor as f64)?)?;
            total = Some(accumulate(total, grads, vars)?);
        }
        let grads = match total {
            Some(g) => g,
            None => Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?.backward()?,
        };
        Ok(MicroStep {
            loss_sum,
            count: idx.len(),
            trained_tokens: trained,
            tokens,
            grads,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_best_first_and_exact() {
        let docs = Documents {
            dim: 2,
            ids: vec![10, 11, 12, 13],
            data: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8, 0.8, 0.6],
        };
        assert_eq!(docs.top_k(&[1.0, 0.0], 2), vec![0, 3]);
        assert_eq!(docs.top_k(&[0.0, 1.0], 3), vec![1, 2, 3]);
        assert_eq!(docs.top_k(&[0.0, 1.0], 9).len(), 4);
    }

    /// With one passage both formulations are the plain answer likelihood; with equal
    /// passages, too (the mixture of identical distributions).
    #[test]
    fn one_or_identical_passages_give_the_plain_likelihood() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[0.5f32, -1.0, 2.0], [0.1, 0.2, 0.3]]], &dev).unwrap(); // (1, 2, 3)
        let targets = [2u32, 0];
        let plain = crate::loss::cross_entropy(&logits.reshape((2, 3)).unwrap(), targets.to_vec())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        for f in [Formulation::Sequence, Formulation::Token] {
            let one = marginal_nll(&Tensor::new(&[0.3f32], &dev).unwrap(), &logits, &targets, f)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!((one - plain).abs() < 1e-5, "{f:?}: {one} vs {plain}");
            let three = Tensor::cat(&[&logits, &logits, &logits], 0).unwrap();
            let scores = Tensor::new(&[0.3f32, -2.0, 1.0], &dev).unwrap();
            let same = marginal_nll(&scores, &three, &targets, f)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!((same - plain).abs() < 1e-5, "{f:?}: {same} vs {plain}");
        }
    }
}
