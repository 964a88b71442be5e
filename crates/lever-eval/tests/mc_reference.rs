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
//! Prefix reuse against scoring each (query + choice) from scratch: measured identical (max
//! |Δ| 0: lever's kernels compute each token's row alike however the tokens are batched);
//! bound 1e-4, for a query over 64 tokens, whose attention takes the f32-softmax path when fed
//! whole but the f16 one-query path for the choice tokens fed after it.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use lever_eval::{McOptions, encode_pair, evaluate, read_items};
use lever_model::{Model, registry};
use serde_json::Value;

const LL_BOUND: f64 = 1.25;
const TOKEN_BOUND: f64 = 0.4;
const PICKS_MAY_DIFFER: usize = 1;
const REUSE_BOUND: f64 = 1e-4;
const F32_BOUND: f64 = 1e-3;

fn default_model() -> Model {
    let home = registry::lever_home();
    let source = lever_model::model::resolve(registry::DEFAULT_GENERATOR, &home, &mut |_| {})
        .expect("provision the default model (`lever models pull`)");
    Model::load(&source, &candle_core::Device::Cpu).expect("load the default model")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("mc_reference.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// What lever's scores of the fixture items differ from transformers' by.
struct Gap {
    max_ll: f64,
    max_tok: f64,
    acc_differ: usize,
    norm_differ: usize,
    acc: f64,
    acc_norm: f64,
}

fn compare(model: &Model) -> Gap {
    let items = read_items(&fixtures().join("mc_items.jsonl")).unwrap();
    let reference = reference();
    let refs = reference["items"].as_array().unwrap();
    assert_eq!(items.len(), refs.len());
    assert_eq!(items.len(), 32);

    // Tokenization: lm-eval's _encode_pair split, id for id.
    for (item, r) in items.iter().zip(refs) {
        for (choice, rc) in item.choices.iter().zip(r["choices"].as_array().unwrap()) {
            let (ctx, cont) = encode_pair(model, &item.query, choice).unwrap();
            assert_eq!(ctx, ids(&r["ctx_ids"]), "{}: context ids", item.origin);
            assert_eq!(
                cont,
                ids(&rc["cont_ids"]),
                "{}: {choice:?} ids",
                item.origin
            );
        }
    }

    let (report, scores) = evaluate(model, &items, McOptions::default(), &mut |_, _| {}).unwrap();
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
        "max |Δ loglikelihood| {max_ll:.3e} per choice, {max_tok:.3e} per token (mean {:.3e} per token over {count} choices); picks differing: acc {acc_differ}, acc_norm {norm_differ}, is_greedy {greedy_differ}; lever acc {} acc_norm {} vs transformers {} {}",
        sum_tok / count as f64,
        report.acc,
        report.acc_norm,
        reference["acc"],
        reference["acc_norm"]
    );
    assert_eq!(report.n, 32);
    Gap {
        max_ll,
        max_tok,
        acc_differ,
        norm_differ,
        acc: report.acc,
        acc_norm: report.acc_norm,
    }
}

#[test]
fn loglikelihoods_acc_and_acc_norm_match_transformers() {
    let g = compare(&default_model());
    assert!(g.max_ll < LL_BOUND, "per-choice difference {}", g.max_ll);
    assert!(
        g.max_tok < TOKEN_BOUND,
        "per-token difference {}",
        g.max_tok
    );
    assert!(g.acc_differ <= PICKS_MAY_DIFFER && g.norm_differ <= PICKS_MAY_DIFFER);
    let reference = reference();
    let n = 32.0;
    let want_acc = reference["acc"].as_f64().unwrap();
    let want_norm = reference["acc_norm"].as_f64().unwrap();
    assert!((g.acc - want_acc).abs() <= PICKS_MAY_DIFFER as f64 / n + 1e-9);
    assert!((g.acc_norm - want_norm).abs() <= PICKS_MAY_DIFFER as f64 / n + 1e-9);
}

/// The scoring itself, without quantization: the same model exported to an f32 Hugging Face
/// folder (`lever export --out DIR`, dequantized as transformers dequantizes the GGUF) must
/// match transformers to float rounding. Needs the folder, so it is opt-in:
/// `LEVER_MC_F32_MODEL=DIR cargo test --release -p lever-eval --test integration mc_reference:: -- --ignored`.
/// Measured 2026-11-28: max |Δ ll| per choice 1.4e-4, per token 2.8e-5 (bound 1e-3 per choice);
/// acc, acc_norm and is_greedy agree everywhere. So the Q4_1 gap above is the quantized
/// arithmetic, not the scoring.
#[test]
#[ignore = "needs LEVER_MC_F32_MODEL, an f32 Hugging Face folder from `lever export`"]
fn f32_export_matches_transformers_to_rounding() {
    let dir = std::env::var("LEVER_MC_F32_MODEL").expect("LEVER_MC_F32_MODEL=DIR");
    let source = lever_model::model::ModelSource::HfFolder(PathBuf::from(dir));
    let model = Model::load(&source, &candle_core::Device::Cpu).unwrap();
    let g = compare(&model);
    assert!(g.max_ll < F32_BOUND, "per-choice difference {}", g.max_ll);
    assert_eq!((g.acc_differ, g.norm_differ), (0, 0));
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
}
