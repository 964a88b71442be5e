//! RAG's marginal likelihoods against PyTorch autograd of the paper's equations (Lewis et
//! al. 2020, §2.1; fixture: scripts/make-rag-train-fixtures.py): for RAG-Sequence and
//! RAG-Token, the negative log-likelihood within 1e-5 (relative, for values above 1) and its
//! gradients with respect to the document scores and the generator's logits within 1e-5.
#![allow(clippy::unwrap_used)]

use candle_core::{Device, Tensor, Var};
use lever_train::rag::{Formulation, marginal_nll};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn marginal_likelihoods_and_gradients_match_pytorch() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rag_marginal.json"
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for (c, case) in cases.iter().enumerate() {
        let (k, n, v) = (
            case["k"].as_u64().unwrap() as usize,
            case["n"].as_u64().unwrap() as usize,
            case["v"].as_u64().unwrap() as usize,
        );
        let targets: Vec<u32> = case["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        for (form, f) in [
            ("seq", Formulation::Sequence),
            ("token", Formulation::Token),
        ] {
            let scores = Var::from_tensor(
                &Tensor::from_vec(floats(&case["scores"]), k, &Device::Cpu).unwrap(),
            )
            .unwrap();
            let logits = Var::from_tensor(
                &Tensor::from_vec(floats(&case["logits"]), (k, n, v), &Device::Cpu).unwrap(),
            )
            .unwrap();
            let nll = marginal_nll(scores.as_tensor(), logits.as_tensor(), &targets, f).unwrap();
            let got = nll.to_scalar::<f32>().unwrap();
            let want = case[form]["nll"].as_f64().unwrap() as f32;
            let d = (got - want).abs();
            println!("case {c} {form}: nll {got} vs {want} (diff {d:.2e})");
            assert!(
                d <= 1e-5 * want.abs().max(1.0),
                "case {c} {form}: nll {got} vs {want}"
            );
            let grads = nll.backward().unwrap();
            let gs = grads
                .get(scores.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let gl = grads
                .get(logits.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ds = max_diff(&gs, &floats(&case[form]["grad_scores"]));
            let dl = max_diff(&gl, &floats(&case[form]["grad_logits"]));
            println!("  max diff: d/dscores {ds:.2e}, d/dlogits {dl:.2e}");
            assert!(ds <= 1e-5, "case {c} {form}: score gradient off by {ds}");
            assert!(dl <= 1e-5, "case {c} {form}: logit gradient off by {dl}");
            // A gradient that is all zeros would pass a loose check: these are not.
            if k > 1 {
                assert!(gs.iter().any(|g| g.abs() > 1e-3), "case {c} {form}: {gs:?}");
            }
        }
    }
}

/// When one passage explains the first token and another the second, RAG-Token's likelihood
/// is the higher one (§2.1: it may draw a different passage for each token).
#[test]
fn rag_token_can_mix_passages_rag_sequence_cannot() {
    let dev = Device::Cpu;
    // Two passages, two answer tokens over a vocabulary of 10: passage 0 makes token 0 likely
    // at step 1 only, passage 1 token 1 at step 2 only; elsewhere every token is as likely.
    let mut v = vec![0f32; 2 * 2 * 10];
    v[0] = 9.0; // passage 0, step 1, token 0
    v[3 * 10 + 1] = 9.0; // passage 1, step 2, token 1
    let logits = Tensor::from_vec(v, (2, 2, 10), &dev).unwrap(); // (K, N, V)
    let scores = Tensor::new(&[0f32, 0.0], &dev).unwrap();
    let targets = [0u32, 1];
    let nll = |f| {
        marginal_nll(&scores, &logits, &targets, f)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (seq, token) = (nll(Formulation::Sequence), nll(Formulation::Token));
    assert!(token < seq - 0.5, "token {token} vs sequence {seq}");
}
