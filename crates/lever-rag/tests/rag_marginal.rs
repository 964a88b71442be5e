//! RAG-Sequence and RAG-Token marginal log-likelihoods and their gradients with respect to the
//! document scores and the generator's logits, against PyTorch autograd on the paper's
//! equations (fixture: tests/fixtures/rag_marginal.py).
#![allow(clippy::unwrap_used)]

use lever_rag::marginal::{self, Formulation};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn marginal_likelihoods_and_gradients_match_pytorch() {
    let fixture: Value = serde_json::from_str(include_str!("fixtures/rag_marginal.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    let (mut max_ll, mut max_grad) = (0f64, 0f64);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let vocab = c["vocab"].as_u64().unwrap() as usize;
        let temperature = c["temperature"].as_f64().unwrap() as f32;
        let scores: Vec<f32> = floats(&c["scores"]).iter().map(|&x| x as f32).collect();
        let logits: Vec<f32> = floats(&c["logits"]).iter().map(|&x| x as f32).collect();
        let targets: Vec<u32> = c["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let k = scores.len();
        let repeated: Vec<u32> = (0..k).flat_map(|_| targets.iter().copied()).collect();
        let doc_logp = marginal::doc_log_probs(&scores, temperature).unwrap();
        let token_logp = marginal::target_log_probs(&logits, vocab, &repeated).unwrap();
        for (f, key) in [
            (Formulation::Sequence, "sequence"),
            (Formulation::Token, "token"),
        ] {
            let want = &c[key];
            let want_ll = want["log_likelihood"].as_f64().unwrap();
            let ll = marginal::log_likelihood(f, &doc_logp, &token_logp).unwrap();
            let g = marginal::gradients(f, &scores, temperature, &logits, vocab, &targets).unwrap();
            for got in [ll, g.log_likelihood] {
                let d = (got - want_ll).abs();
                max_ll = max_ll.max(d);
                assert!(d < 1e-5, "{name} {key}: ours {got}, torch {want_ll}");
            }
            for (what, ours, theirs) in [
                ("d_scores", &g.scores, floats(&want["d_scores"])),
                ("d_logits", &g.logits, floats(&want["d_logits"])),
            ] {
                assert_eq!(ours.len(), theirs.len(), "{name} {key} {what}");
                for (i, (&o, &t)) in ours.iter().zip(&theirs).enumerate() {
                    let d = (o as f64 - t).abs();
                    max_grad = max_grad.max(d);
                    assert!(d < 1e-5, "{name} {key} {what}[{i}]: ours {o}, torch {t}");
                }
            }
        }
        // One passage: both formulations are the plain answer likelihood.
        if k == 1 {
            let plain: f64 = token_logp.iter().sum();
            let seq = marginal::sequence_log_likelihood(&doc_logp, &token_logp).unwrap();
            assert!((seq - plain).abs() < 1e-9);
        }
    }
    eprintln!("max |Δ| log-likelihood {max_ll:.2e}, gradients {max_grad:.2e}");
}
