//! Multiple-choice scoring on the real default model (SmolLM2-135M-Instruct Q4_1) against
//! transformers (f32, the same GGUF dequantized) scoring the same 32 items by
//! lm-evaluation-harness's rules: `fixtures/mc_reference.json`, made by
//! `scripts/make-mc-fixtures.sh` from `fixtures/mc_items.jsonl`.
//!
//! Tolerances (measured 2026-11-28, see the printed maxima): lever runs the Q4_1 weights with
//! 8-bit activations and an f16 K/V cache as llama.cpp does, transformers the dequantized
//! weights in f32, so log-likelihoods differ by about 1% of their value. Measured over the 106
//! choices: max |Δ ll| per choice 1.035 (a 10-token choice at ll -101; bound 1.25), max per
//! token 0.32 (one-token choices at ll ≈ -8; bound 0.4); acc and acc_norm picks and is_greedy
//! agree on all 32 items (bound: at most 1 item's pick may differ).
//! Prefix reuse against scoring each (query + choice) from scratch: measured max 2e-3,
//! bound 1e-2 (the two paths batch the attention and matrix products differently).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use lever_eval::{McOptions, encode_pair, evaluate, read_items};
use lever_model::{Model, registry};
use serde_json::Value;

const LL_BOUND: f64 = 1.25;
const TOKEN_BOUND: f64 = 0.4;
const PICKS_MAY_DIFFER: usize = 1;
const REUSE_BOUND: f64 = 1e-2;

fn default_model() -> Model {
    let home = registry::lever_home();
    let source = lever_model::model::resolve(registry::DEFAULT_GENERATOR, &home, &mut |_| {})
        .expect("provision the default model (`lever models pull`)");
    Model::load(&source, &candle_core::Device::Cpu).expect("load the default model")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn loglikelihoods_acc_and_acc_norm_match_transformers() {
    let model = default_model();
    let items = read_items(&fixtures().join("mc_items.jsonl")).unwrap();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("mc_reference.json")).unwrap(),
    )
    .unwrap();
    let refs = reference["items"].as_array().unwrap();
    assert_eq!(items.len(), refs.len());
    assert_eq!(items.len(), 32);

    // Tokenization: lm-eval's _encode_pair split, id for id.
    for (item, r) in items.iter().zip(refs) {
        for (choice, rc) in item.choices.iter().zip(r["choices"].as_array().unwrap()) {
            let (ctx, cont) = encode_pair(&model, &item.query, choice).unwrap();
            assert_eq!(ctx, ids(&r["ctx_ids"]), "{}: context ids", item.origin);
            assert_eq!(
                cont,
                ids(&rc["cont_ids"]),
                "{}: {choice:?} ids",
                item.origin
            );
        }
    }

    let (report, scores) = evaluate(&model, &items, McOptions::default(), &mut |_, _| {}).unwrap();
    let (mut max_ll, mut max_tok, mut sum_tok, mut count) = (0f64, 0f64, 0f64, 0usize);
    let (mut acc_differ, mut norm_differ) = (0, 0);
    for ((item, s), r) in items.iter().zip(&scores).zip(refs) {
        for (c, rc) in s.choices.iter().zip(r["choices"].as_array().unwrap()) {
            let want = rc["loglikelihood"].as_f64().unwrap();
            let d = (c.loglikelihood - want).abs();
            max_ll = max_ll.max(d);
            max_tok = max_tok.max(d / c.tokens as f64);
            sum_tok += d / c.tokens as f64;
            count += 1;
        }
        if s.pred != r["pred"].as_u64().unwrap() as usize {
            acc_differ += 1;
            eprintln!(
                "{}: acc pick {} vs transformers {}",
                item.origin, s.pred, r["pred"]
            );
        }
        if s.pred_norm != r["pred_norm"].as_u64().unwrap() as usize {
            norm_differ += 1;
            eprintln!(
                "{}: acc_norm pick {} vs {}",
                item.origin, s.pred_norm, r["pred_norm"]
            );
        }
    }
    let greedy_differ = scores
        .iter()
        .zip(refs)
        .flat_map(|(s, r)| s.choices.iter().zip(r["choices"].as_array().unwrap()))
        .filter(|(c, rc)| c.is_greedy != rc["is_greedy"].as_bool().unwrap())
        .count();
    eprintln!(
        "max |Δ loglikelihood| {max_ll:.4} per choice, {max_tok:.4} per token (mean {:.4} per token over {count} choices); picks differing: acc {acc_differ}, acc_norm {norm_differ}, is_greedy {greedy_differ}; lever acc {} acc_norm {} vs transformers {} {}",
        sum_tok / count as f64,
        report.acc,
        report.acc_norm,
        reference["acc"],
        reference["acc_norm"]
    );
    assert!(max_ll < LL_BOUND, "per-choice difference {max_ll}");
    assert!(max_tok < TOKEN_BOUND, "per-token difference {max_tok}");
    assert!(acc_differ <= PICKS_MAY_DIFFER && norm_differ <= PICKS_MAY_DIFFER);
    assert_eq!(report.n, 32);
    let n = report.n as f64;
    let want_acc = reference["acc"].as_f64().unwrap();
    let want_norm = reference["acc_norm"].as_f64().unwrap();
    assert!((report.acc - want_acc).abs() <= PICKS_MAY_DIFFER as f64 / n + 1e-9);
    assert!((report.acc_norm - want_norm).abs() <= PICKS_MAY_DIFFER as f64 / n + 1e-9);
}

#[test]
fn prefix_reuse_equals_scoring_from_scratch() {
    let model = default_model();
    let items = read_items(&fixtures().join("mc_items.jsonl")).unwrap();
    let reuse = evaluate(
        &model,
        &items,
        McOptions { prefix_reuse: true },
        &mut |_, _| {},
    )
    .unwrap()
    .1;
    let scratch = evaluate(
        &model,
        &items,
        McOptions {
            prefix_reuse: false,
        },
        &mut |_, _| {},
    )
    .unwrap()
    .1;
    let mut max = 0f64;
    for (a, b) in reuse.iter().zip(&scratch) {
        for (x, y) in a.choices.iter().zip(&b.choices) {
            assert_eq!(x.tokens, y.tokens);
            max = max.max((x.loglikelihood - y.loglikelihood).abs());
        }
    }
    eprintln!("prefix reuse vs from scratch: max |Δ loglikelihood| {max:.2e}");
    assert!(max < REUSE_BOUND, "{max}");
    assert!(max > 0.0 || items.len() == reuse.len());
}
