//! nDCG@10, recall@100 and MRR@10 against pytrec_eval / BEIR on seeded random runs with score
//! ties, graded and negative judgments and edge-case queries
//! (fixture: scripts/make-ir-metrics-fixtures.sh).

use lever_rag::metrics::{Qrels, Run, evaluate};
use serde_json::Value;

#[test]
fn metrics_match_pytrec_eval_and_beir() {
    let text = include_str!("fixtures/ir_metrics.json");
    let fixture: Value = serde_json::from_str(text).expect("fixture JSON");
    let qrels: Qrels = serde_json::from_value(fixture["qrels"].clone()).expect("qrels");
    let mut run = Run::new();
    for (q, hits) in fixture["run"].as_object().expect("run object") {
        let hits = hits
            .as_array()
            .expect("hits array")
            .iter()
            .map(|h| {
                (
                    h[0].as_str().expect("doc id").to_string(),
                    h[1].as_f64().expect("score"),
                )
            })
            .collect();
        run.insert(q.clone(), hits);
    }
    let ev = evaluate(&qrels, &run, true);
    let want = fixture["per_query"].as_object().expect("per_query");
    assert_eq!(ev.queries(), want.len());
    let mut max_diff = 0f64;
    for (q, w) in want {
        let got = ev
            .per_query
            .get(q)
            .unwrap_or_else(|| panic!("query {q} not evaluated"));
        for (name, g) in [
            ("ndcg_10", got.ndcg_10),
            ("recall_100", got.recall_100),
            ("mrr_10", got.mrr_10),
        ] {
            let w = w[name].as_f64().expect("number");
            let d = (g - w).abs();
            max_diff = max_diff.max(d);
            assert!(d < 1e-9, "{q} {name}: ours {g}, pytrec_eval/BEIR {w}");
        }
    }
    for (name, g) in [
        ("ndcg_10", ev.mean.ndcg_10),
        ("recall_100", ev.mean.recall_100),
        ("mrr_10", ev.mean.mrr_10),
    ] {
        let w = fixture["mean"][name].as_f64().expect("number");
        max_diff = max_diff.max((g - w).abs());
        assert!((g - w).abs() < 1e-9, "mean {name}: ours {g}, reference {w}");
    }
    println!(
        "{} queries; max |ours - pytrec_eval/BEIR| = {max_diff:e}",
        ev.queries()
    );
}
