//! The marginal likelihoods of retrieval-augmented generation, as plain functions over the
//! generator's logits and the retriever's scores (Lewis et al. 2020, "Retrieval-Augmented
//! Generation for Knowledge-Intensive NLP Tasks", arXiv:2005.11401, §2.1–2.2):
//!
//! ```text
//!   p(z|x)            = softmax_z(s_z / τ)              over the K retrieved passages
//!   RAG-Sequence:  log p(y|x) = log Σ_z p(z|x) Π_i p(y_i | x, z, y<i)
//!   RAG-Token:     log p(y|x) = Σ_i log Σ_z p(z|x) p(y_i | x, z, y<i)
//! ```
//!
//! s_z is the inner product of the query's and the passage's vectors. The paper's DPR vectors
//! are unnormalized; a sentence encoder's are unit vectors whose cosines differ by little, so
//! at τ = 1 p(z|x) would be nearly uniform: [`DEFAULT_TEMPERATURE`] is 0.05, the scale 20 that
//! sentence-transformers trains such encoders with (`MultipleNegativesRankingLoss`), and the
//! one `lever rag train` uses.
//!
//! Every sum runs in log space (log-sum-exp) in f64. The gradients are those of log p(y|x)
//! (not of the loss −log p(y|x)) with respect to the scores s and the logits, so that training
//! code without automatic differentiation can use them:
//!
//! ```text
//!   w_z   = p(z | x, y)       = softmax_z(log p(z|x) + Σ_i log p(y_i|x,z,y<i))      (Sequence)
//!   w_z,i = p(z | x, y≤i)     = softmax_z(log p(z|x) + log p(y_i|x,z,y<i))          (Token)
//!   ∂/∂s_z          = (W_z − N_w · p(z|x)) / τ,   W_z = w_z (Seq., N_w = 1) or Σ_i w_z,i (Tok., N_w = N)
//!   ∂/∂logit_z,i,v  = ω_z,i · (1[v = y_i] − softmax(logits_z,i)_v),   ω_z,i = w_z or w_z,i
//! ```
//!
//! `tests/rag_marginal.rs` checks the values and both gradients against PyTorch autograd on
//! the paper's equations (fixture: `tests/fixtures/rag_marginal.py`).
//!
//! Layouts: K passages, N answer tokens, V vocabulary; `logits` is (K, N, V) row-major,
//! `token_log_probs` (K, N).

use crate::{Error, Result};
use lever_model::ops;

/// τ of p(z|x) = softmax(s / τ) when the user names none (see the module text).
pub const DEFAULT_TEMPERATURE: f32 = 0.05;

/// How the answer's probability is marginalized over the passages (§2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Formulation {
    /// One passage for the whole answer: Σ_z p(z|x) Π_i p(y_i|x,z,y<i).
    Sequence,
    /// A passage per token: Π_i Σ_z p(z|x) p(y_i|x,z,y<i).
    Token,
}

impl Formulation {
    pub fn name(self) -> &'static str {
        match self {
            Formulation::Sequence => "seq",
            Formulation::Token => "token",
        }
    }
}

impl std::str::FromStr for Formulation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "seq" | "sequence" => Ok(Formulation::Sequence),
            "token" => Ok(Formulation::Token),
            _ => Err(format!("`{s}`: expected seq or token")),
        }
    }
}

/// log Σ exp(x), −∞ for an empty or all −∞ input.
pub fn log_sum_exp(xs: impl IntoIterator<Item = f64> + Clone) -> f64 {
    let max = xs.clone().into_iter().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    max + xs.into_iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// log p(z|x) = log softmax(s / τ), (K,).
pub fn doc_log_probs(scores: &[f32], temperature: f32) -> Result<Vec<f64>> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::Param {
            name: "temperature",
            value: temperature.to_string(),
            problem: "must be a positive number",
        });
    }
    if scores.is_empty() || scores.iter().any(|s| !s.is_finite()) {
        return Err(Error::Decode(format!(
            "document scores must be finite and at least one, got {scores:?}"
        )));
    }
    let scaled: Vec<f64> = scores
        .iter()
        .map(|&s| s as f64 / temperature as f64)
        .collect();
    let norm = log_sum_exp(scaled.iter().copied());
    Ok(scaled.into_iter().map(|x| x - norm).collect())
}

/// log softmax(row)[target] for each row of `logits` (rows × V) and its target.
pub fn target_log_probs(logits: &[f32], vocab: usize, targets: &[u32]) -> Result<Vec<f64>> {
    check_rows(logits, vocab, targets)?;
    Ok(logits
        .chunks_exact(vocab)
        .zip(targets)
        .map(|(row, &t)| {
            let norm = log_sum_exp(row.iter().map(|&x| x as f64));
            row[t as usize] as f64 - norm
        })
        .collect())
}

fn check_rows(logits: &[f32], vocab: usize, targets: &[u32]) -> Result<()> {
    if vocab == 0 || logits.len() != vocab * targets.len() {
        return Err(Error::Dim {
            what: format!("logits for {} targets", targets.len()),
            expected: vocab * targets.len(),
            got: logits.len(),
        });
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Param {
            name: "target",
            value: t.to_string(),
            problem: "is not below the vocabulary size",
        });
    }
    Ok(())
}

/// (K, N) from `doc_logp` (K) and `token_logp` (K·N): checks the lengths and returns N.
fn answer_len(doc_logp: &[f64], token_logp: &[f64]) -> Result<usize> {
    let k = doc_logp.len();
    if k == 0 || token_logp.is_empty() || !token_logp.len().is_multiple_of(k) {
        return Err(Error::Dim {
            what: format!("token log-probabilities for {k} passages"),
            expected: k * token_logp.len().div_ceil(k.max(1)).max(1),
            got: token_logp.len(),
        });
    }
    Ok(token_logp.len() / k)
}

/// RAG-Sequence: log Σ_z p(z|x) Π_i p(y_i|x,z,y<i). `doc_logp`: log p(z|x), (K);
/// `token_logp`: log p(y_i|x,z,y<i), (K, N).
pub fn sequence_log_likelihood(doc_logp: &[f64], token_logp: &[f64]) -> Result<f64> {
    let n = answer_len(doc_logp, token_logp)?;
    Ok(log_sum_exp(
        doc_logp
            .iter()
            .zip(token_logp.chunks_exact(n))
            .map(|(pz, row)| pz + row.iter().sum::<f64>()),
    ))
}

/// RAG-Token: Σ_i log Σ_z p(z|x) p(y_i|x,z,y<i); the same inputs as
/// [`sequence_log_likelihood`].
pub fn token_log_likelihood(doc_logp: &[f64], token_logp: &[f64]) -> Result<f64> {
    let n = answer_len(doc_logp, token_logp)?;
    Ok((0..n)
        .map(|i| {
            log_sum_exp(
                doc_logp
                    .iter()
                    .enumerate()
                    .map(|(z, pz)| pz + token_logp[z * n + i]),
            )
        })
        .sum())
}

/// Either formulation's log p(y|x).
pub fn log_likelihood(f: Formulation, doc_logp: &[f64], token_logp: &[f64]) -> Result<f64> {
    match f {
        Formulation::Sequence => sequence_log_likelihood(doc_logp, token_logp),
        Formulation::Token => token_log_likelihood(doc_logp, token_logp),
    }
}

/// The marginal distribution of the next token under RAG-Token:
/// log Σ_z p(z|x) softmax(logits_z), one row of V for each passage's logits (K, V).
pub fn token_mixture(doc_logp: &[f64], logits: &[f32], vocab: usize) -> Result<Vec<f32>> {
    if vocab == 0 || logits.len() != doc_logp.len() * vocab || doc_logp.is_empty() {
        return Err(Error::Dim {
            what: format!("next-token logits for {} passages", doc_logp.len()),
            expected: doc_logp.len() * vocab,
            got: logits.len(),
        });
    }
    // log Σ_z p(z|x) softmax(l_z)_v = A + ln Σ_z w_z e_zv, with e_zv = exp(l_zv − max_z) (each
    // logit's exponential computed once, in f32 by lever's vectorized `exp`, where the row's
    // log-sum-exp also gets it), a_z = log p(z|x) − lse_z + max_z, A = max a_z and
    // w_z = exp(a_z − A) ≤ 1: one logarithm per vocabulary entry, where a log-sum-exp over z
    // at each entry takes K exponentials more. (Decoding runs this at every token over K × V
    // logits: with libm's scalar f64 exp it took over a tenth of RAG-Token's time per token at
    // K = 5, by perf.) `exp` clamps at e^-87: a logit more than 87 nats under its row's best
    // counts as that.
    let mut e = vec![0f32; logits.len()];
    let mut a = Vec::with_capacity(doc_logp.len());
    for ((pz, row), e) in doc_logp
        .iter()
        .zip(logits.chunks_exact(vocab))
        .zip(e.chunks_exact_mut(vocab))
    {
        // lse_z − max_z = ln Σ_v e_zv.
        a.push(exp_shifted(row, e).map_or(f64::NEG_INFINITY, |sum| pz - sum.ln()));
    }
    let top = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if top == f64::NEG_INFINITY {
        return Ok(vec![f32::NEG_INFINITY; vocab]);
    }
    let w: Vec<f32> = a.iter().map(|a| (a - top).exp() as f32).collect();
    let mut mix = vec![0f32; vocab];
    for (w, e) in w.iter().zip(e.chunks_exact(vocab)) {
        for (m, e) in mix.iter_mut().zip(e) {
            *m += w * e;
        }
    }
    Ok(mix
        .iter()
        .map(|&m| (top + (m as f64).ln()) as f32)
        .collect())
}

/// log Σ exp(row), from one f32 exponential per entry (lever's vectorized `exp`).
pub fn row_log_sum_exp(row: &[f32]) -> f64 {
    let max = row_max(row);
    if !max.is_finite() {
        return max as f64;
    }
    max as f64 + (ops::sum_exp(row, max) as f64).ln()
}

/// e = exp(row − max(row)) and Σ e; None (e untouched) when the row has no finite maximum.
fn exp_shifted(row: &[f32], e: &mut [f32]) -> Option<f64> {
    let max = row_max(row);
    if !max.is_finite() {
        return None;
    }
    e.copy_from_slice(row);
    Some(ops::exp_in_place(e, 1.0, max) as f64)
}

fn row_max(row: &[f32]) -> f32 {
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// log p(y|x) and its gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    pub log_likelihood: f64,
    /// ∂ log p(y|x) / ∂ s, (K).
    pub scores: Vec<f32>,
    /// ∂ log p(y|x) / ∂ logits, (K, N, V).
    pub logits: Vec<f32>,
}

/// log p(y|x) under `f` and its gradients with respect to the document scores `scores` (K)
/// and the generator's logits `logits` (K, N, V) at the positions that predict `targets` (N).
pub fn gradients(
    f: Formulation,
    scores: &[f32],
    temperature: f32,
    logits: &[f32],
    vocab: usize,
    targets: &[u32],
) -> Result<Gradients> {
    let (k, n) = (scores.len(), targets.len());
    let doc_logp = doc_log_probs(scores, temperature)?;
    if n == 0 || logits.len() != k * n * vocab {
        return Err(Error::Dim {
            what: format!("logits of {k} passages × {n} answer tokens"),
            expected: k * n * vocab,
            got: logits.len(),
        });
    }
    let repeated: Vec<u32> = (0..k).flat_map(|_| targets.iter().copied()).collect();
    let token_logp = target_log_probs(logits, vocab, &repeated)?; // (K, N)
    // ω (K, N): the posterior weight that passage z gets at token i.
    let mut weight = vec![0f64; k * n];
    let ll = match f {
        Formulation::Sequence => {
            let joint: Vec<f64> = (0..k)
                .map(|z| doc_logp[z] + token_logp[z * n..(z + 1) * n].iter().sum::<f64>())
                .collect();
            let ll = log_sum_exp(joint.iter().copied());
            for z in 0..k {
                let w = (joint[z] - ll).exp();
                weight[z * n..(z + 1) * n].fill(w);
            }
            ll
        }
        Formulation::Token => {
            let mut ll = 0.0;
            for i in 0..n {
                let joint: Vec<f64> = (0..k)
                    .map(|z| doc_logp[z] + token_logp[z * n + i])
                    .collect();
                let li = log_sum_exp(joint.iter().copied());
                for z in 0..k {
                    weight[z * n + i] = (joint[z] - li).exp();
                }
                ll += li;
            }
            ll
        }
    };
    // ∂/∂ log p(z|x) = Σ_i ω_z,i (Sequence: ω is the same at every i, counted once).
    let per_doc: Vec<f64> = (0..k)
        .map(|z| match f {
            Formulation::Sequence => weight[z * n],
            Formulation::Token => weight[z * n..(z + 1) * n].iter().sum(),
        })
        .collect();
    let total: f64 = per_doc.iter().sum();
    // Through the softmax of s / τ: ∂/∂s_j = (g_j − p_j Σ g) / τ.
    let d_scores = (0..k)
        .map(|z| ((per_doc[z] - doc_logp[z].exp() * total) / temperature as f64) as f32)
        .collect();
    let mut d_logits = vec![0f32; logits.len()];
    for (r, (row, out)) in logits
        .chunks_exact(vocab)
        .zip(d_logits.chunks_exact_mut(vocab))
        .enumerate()
    {
        let w = weight[r];
        let norm = log_sum_exp(row.iter().map(|&x| x as f64));
        for (o, &x) in out.iter_mut().zip(row) {
            *o = (-w * (x as f64 - norm).exp()) as f32;
        }
        out[repeated[r] as usize] += w as f32;
    }
    Ok(Gradients {
        log_likelihood: ll,
        scores: d_scores,
        logits: d_logits,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_passage_or_identical_passages_give_the_plain_likelihood() {
        let logits = [0.5f32, -1.0, 2.0, 0.1, 0.2, 0.3]; // (1, 2, 3)
        let targets = [2u32, 0];
        let plain: f64 = target_log_probs(&logits, 3, &targets).unwrap().iter().sum();
        for f in [Formulation::Sequence, Formulation::Token] {
            let one = gradients(f, &[0.3], 0.05, &logits, 3, &targets).unwrap();
            assert!((one.log_likelihood - plain).abs() < 1e-12, "{f:?}");
            assert_eq!(one.scores, vec![0.0]);
            let three: Vec<f32> = logits.iter().cycle().take(18).copied().collect();
            let same = gradients(f, &[0.3, -2.0, 1.0], 0.5, &three, 3, &targets).unwrap();
            assert!((same.log_likelihood - plain).abs() < 1e-12, "{f:?}");
            // Every passage explains the answer equally well: the scores get no gradient.
            assert!(
                same.scores.iter().all(|g| g.abs() < 1e-6),
                "{:?}",
                same.scores
            );
        }
    }

    #[test]
    fn the_token_mixture_is_a_distribution_that_mixes_each_passage() {
        let logits = [1.0f32, 0.0, -1.0, -3.0, 2.0, 0.5]; // (2, 3)
        let doc = doc_log_probs(&[0.9, 0.8], 0.1).unwrap();
        let mix = token_mixture(&doc, &logits, 3).unwrap();
        let total: f64 = mix.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let p = |z: usize, v: usize| {
            let row = &logits[z * 3..z * 3 + 3];
            let lse = log_sum_exp(row.iter().map(|&x| x as f64));
            (row[v] as f64 - lse).exp()
        };
        let want = doc[0].exp() * p(0, 1) + doc[1].exp() * p(1, 1);
        assert!(((mix[1] as f64).exp() - want).abs() < 1e-6);
    }

    /// The one-exponential form equals the log-sum-exp over passages at every entry (f64),
    /// on vocabulary-sized rows of spread-out logits and unequal passage weights.
    #[test]
    fn the_token_mixture_equals_a_log_sum_exp_over_passages() {
        let (k, vocab) = (5, 4096);
        let mut rng = lever_model::rng::SplitMix64(7);
        let logits: Vec<f32> = (0..k * vocab)
            .map(|i| 30.0 * rng.uniform() - 20.0 + (i % vocab == 3) as u8 as f32 * 25.0)
            .collect();
        let doc = doc_log_probs(&[0.9, 0.2, 0.5, -0.3, 0.7], 0.1).unwrap();
        let mix = token_mixture(&doc, &logits, vocab).unwrap();
        let lse: Vec<f64> = logits
            .chunks_exact(vocab)
            .map(|r| log_sum_exp(r.iter().map(|&x| x as f64)))
            .collect();
        for v in 0..vocab {
            let want = log_sum_exp((0..k).map(|z| doc[z] - lse[z] + logits[z * vocab + v] as f64));
            assert!(
                (mix[v] as f64 - want).abs() < 1e-5,
                "{v}: {} vs {want}",
                mix[v]
            );
        }
        for (z, row) in logits.chunks_exact(vocab).enumerate() {
            assert!((row_log_sum_exp(row) - lse[z]).abs() < 1e-5);
        }
    }

    #[test]
    fn bad_shapes_and_settings_are_errors() {
        assert!(doc_log_probs(&[1.0], 0.0).is_err());
        assert!(doc_log_probs(&[], 1.0).is_err());
        assert!(target_log_probs(&[0.0; 5], 3, &[0, 1]).is_err());
        assert!(target_log_probs(&[0.0; 6], 3, &[0, 3]).is_err());
        assert!(sequence_log_likelihood(&[0.0, 0.0], &[0.0; 3]).is_err());
        assert!(gradients(Formulation::Token, &[0.0], 1.0, &[0.0; 3], 3, &[]).is_err());
    }
}
