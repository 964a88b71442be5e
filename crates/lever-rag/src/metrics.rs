//! Retrieval metrics computed exactly as BEIR reports them (Thakur et al., "BEIR: A
//! Heterogeneous Benchmark for Zero-shot Evaluation of Information Retrieval Models", 2021):
//!
//! - **nDCG@10** and **recall@100** as BEIR's `EvaluateRetrieval.evaluate` gets them from
//!   pytrec_eval (`ndcg_cut.10`, `recall.100`), i.e. trec_eval's C code:
//!   - the run is ranked by score descending, equal scores by doc id *descending* (byte order);
//!   - gain = the graded judgment (linear, not 2^rel − 1); judgments ≤ 0 gain nothing;
//!     discount log2(rank + 1); the ideal DCG ranks *all* judged docs by grade, cut at 10;
//!   - recall = relevant (grade ≥ 1) docs in the top 100 / all relevant; 0 if none is relevant.
//! - **MRR@10** as BEIR's `evaluate_custom(..., "mrr")`: the run sorted by score with a stable
//!   sort (equal scores keep the run's order), the reciprocal rank of the first doc judged > 0 in
//!   the top 10, else 0.
//!
//! Like BEIR, a doc whose id equals the query id is dropped from its run first
//! (`ignore_identical_ids=True`), and every judged query is evaluated: a judged query without a
//! run scores 0 (BEIR's retrievers return an entry for every query). Means are over the judged
//! queries. BEIR rounds its printed means to 5 decimals; these are not rounded.
//! tests/ir_metrics_fixture.rs checks all of it against pytrec_eval.

use std::collections::{BTreeMap, HashSet};

/// Judgments: query id → doc id → grade.
pub type Qrels = BTreeMap<String, BTreeMap<String, i32>>;

/// A run: query id → (doc id, score) in the retriever's order. A doc repeated within one
/// query's list counts at its first occurrence only.
pub type Run = BTreeMap<String, Vec<(String, f64)>>;

/// The three metrics BEIR's leaderboard reports, for one query or averaged.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Metrics {
    pub ndcg_10: f64,
    pub recall_100: f64,
    pub mrr_10: f64,
}

/// An evaluation: per judged query and the mean over them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    pub per_query: BTreeMap<String, Metrics>,
    pub mean: Metrics,
}

impl Evaluation {
    pub fn queries(&self) -> usize {
        self.per_query.len()
    }
}

/// Ranks a run as trec_eval does: score descending, then doc id descending.
pub fn trec_order(hits: &[(String, f64)]) -> Vec<(String, f64)> {
    let mut ranked = hits.to_vec();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    ranked
}

/// trec_eval's `ndcg_cut.k` for one query: `ranked` in trec order.
pub fn ndcg_at(judged: &BTreeMap<String, i32>, ranked: &[(String, f64)], k: usize) -> f64 {
    let gain = |rel: i32| f64::from(rel.max(0));
    let discount = |i: usize| ((i + 2) as f64).log2(); // rank i + 1
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, (doc, _))| gain(judged.get(doc).copied().unwrap_or(0)) / discount(i))
        .sum();
    let mut ideal: Vec<i32> = judged.values().copied().filter(|&r| r > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, &r)| gain(r) / discount(i))
        .sum();
    if idcg > 0.0 { dcg / idcg } else { 0.0 }
}

/// trec_eval's `recall.k` for one query: `ranked` in trec order.
pub fn recall_at(judged: &BTreeMap<String, i32>, ranked: &[(String, f64)], k: usize) -> f64 {
    let relevant = judged.values().filter(|&&r| r >= 1).count();
    if relevant == 0 {
        return 0.0;
    }
    let found = ranked
        .iter()
        .take(k)
        .filter(|(doc, _)| judged.get(doc).is_some_and(|&r| r >= 1))
        .count();
    found as f64 / relevant as f64
}

/// BEIR's MRR@k for one query: `hits` in the run's order, stably sorted by score here.
pub fn mrr_at(judged: &BTreeMap<String, i32>, hits: &[(String, f64)], k: usize) -> f64 {
    let mut sorted = hits.to_vec();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1)); // stable: ties keep the run's order
    sorted
        .iter()
        .take(k)
        .position(|(doc, _)| judged.get(doc).is_some_and(|&r| r > 0))
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

/// Evaluates `run` against `qrels` as BEIR does (see the module doc). With
/// `ignore_identical_ids`, a doc whose id equals its query's id is removed from the run.
pub fn evaluate(qrels: &Qrels, run: &Run, ignore_identical_ids: bool) -> Evaluation {
    let mut per_query = BTreeMap::new();
    for (qid, judged) in qrels {
        let mut seen = HashSet::new();
        let hits: Vec<(String, f64)> = run
            .get(qid)
            .map(|hits| {
                hits.iter()
                    .filter(|(doc, _)| !(ignore_identical_ids && doc == qid))
                    .filter(|(doc, _)| seen.insert(doc.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let ranked = trec_order(&hits);
        per_query.insert(
            qid.clone(),
            Metrics {
                ndcg_10: ndcg_at(judged, &ranked, 10),
                recall_100: recall_at(judged, &ranked, 100),
                mrr_10: mrr_at(judged, &hits, 10),
            },
        );
    }
    let n = per_query.len().max(1) as f64;
    let mut mean = Metrics::default();
    for m in per_query.values() {
        mean.ndcg_10 += m.ndcg_10;
        mean.recall_100 += m.recall_100;
        mean.mrr_10 += m.mrr_10;
    }
    mean.ndcg_10 /= n;
    mean.recall_100 /= n;
    mean.mrr_10 /= n;
    Evaluation { per_query, mean }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(pairs: &[(&str, i32)]) -> BTreeMap<String, i32> {
        pairs.iter().map(|(d, r)| (d.to_string(), *r)).collect()
    }

    fn hits(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(d, s)| (d.to_string(), *s)).collect()
    }

    #[test]
    fn hand_computed_query() {
        // z (unjudged) first; a and b tie, so trec_eval puts b (> a) before a.
        let j = judged(&[("a", 1), ("b", 2), ("c", 0)]);
        let run = hits(&[("a", 1.0), ("b", 1.0), ("z", 2.0)]);
        let ranked = trec_order(&run);
        assert_eq!(
            ranked.iter().map(|h| h.0.as_str()).collect::<Vec<_>>(),
            ["z", "b", "a"]
        );
        // DCG = 2/log2(3) + 1/log2(4); IDCG = 2 + 1/log2(3).
        let want = (2.0 / 3f64.log2() + 0.5) / (2.0 + 1.0 / 3f64.log2());
        assert!((ndcg_at(&j, &ranked, 10) - want).abs() < 1e-15);
        assert!((ndcg_at(&j, &ranked, 10) - 0.66967181649423).abs() < 1e-12); // pytrec_eval
        assert_eq!(recall_at(&j, &ranked, 100), 1.0);
        assert_eq!(recall_at(&j, &ranked, 2), 0.5);
        // MRR keeps run order among ties: z, a, b -> a at rank 2.
        assert_eq!(mrr_at(&j, &run, 10), 0.5);
        assert_eq!(mrr_at(&j, &run, 1), 0.0);
    }

    #[test]
    fn evaluate_covers_identical_ids_and_missing_runs() {
        let mut qrels = Qrels::new();
        qrels.insert("q".into(), judged(&[("q", 3), ("d", 1)]));
        qrels.insert("none".into(), judged(&[("d", 1)]));
        let mut run = Run::new();
        run.insert("q".into(), hits(&[("q", 5.0), ("d", 1.0)]));
        run.insert("unjudged".into(), hits(&[("d", 1.0)]));
        let ev = evaluate(&qrels, &run, true);
        assert_eq!(ev.queries(), 2);
        let q = ev.per_query["q"];
        assert_eq!(q.mrr_10, 1.0);
        assert_eq!(q.recall_100, 0.5);
        // The judgment of q itself still counts in the ideal DCG (BEIR drops it from the run only).
        assert!((q.ndcg_10 - 1.0 / (3.0 + 1.0 / 3f64.log2())).abs() < 1e-15);
        assert_eq!(ev.per_query["none"], Metrics::default());
        assert!((ev.mean.mrr_10 - 0.5).abs() < 1e-15);
        let kept = evaluate(&qrels, &run, false);
        assert_eq!(kept.per_query["q"].ndcg_10, 1.0);
    }
}
