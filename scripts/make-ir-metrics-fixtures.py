"""Builds the IR-metrics reference fixture (see make-ir-metrics-fixtures.sh).

nDCG@10 and recall@100 come from pytrec_eval ("ndcg_cut.10", "recall.100"), exactly as BEIR's
EvaluateRetrieval.evaluate asks for them. MRR@10 follows BEIR's evaluate_custom(..., "mrr")
(beir/retrieval/custom_metrics.py): per query, the run sorted by score with Python's stable sort
(ties keep the run's order), the reciprocal rank of the first doc judged > 0 within the top 10,
summed and divided by the number of judged queries. Like BEIR (ignore_identical_ids=True), a doc
whose id equals the query id is dropped from the run first, and every judged query is evaluated
(BEIR's retrievers return an entry, possibly empty, for each query).
"""
import argparse
import json
import random

import pytrec_eval


def build(seed):
    rng = random.Random(seed)
    # Ids whose string order differs from numeric order, to test trec_eval's tie break
    # (score descending, then doc id descending by strcmp).
    docs = [str(i) for i in range(0, 60)] + ["d%d" % i for i in range(40)] + ["A", "b", "Z9"]
    qrels, run = {}, {}
    for qi in range(12):
        qid = "q%d" % qi
        judged = rng.sample(docs, rng.randint(1, 12))
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        n = rng.choice([3, 9, 10, 11, 25, 99, 100, 101, 130])
        pool = rng.sample(docs, min(n, len(docs)))
        # Favour judged docs so that metrics are not all zero; scores on a coarse grid -> ties.
        pool = list(dict.fromkeys(rng.sample(judged, len(judged) // 2 + 1) + pool))[:n]
        run[qid] = [(d, round(rng.choice([0.5, 1.0, 1.5, 2.0, 2.5]) * rng.randint(0, 6), 1))
                    for d in pool]
    # Edge cases.
    qrels["d3"] = {"d3": 2, "d4": 1, "7": 1}          # query id == a doc id: d3 is ignored
    run["d3"] = [("d3", 9.0), ("d4", 1.0), ("7", 1.0), ("8", 0.5)]
    qrels["empty_run"] = {"1": 1, "2": 3}               # judged, retrieves nothing
    run["empty_run"] = []
    qrels["missing_run"] = {"5": 1}                      # judged, absent from the run
    qrels["all_zero"] = {"1": 0, "2": 0}                 # judged, nothing relevant
    run["all_zero"] = [("1", 3.0), ("2", 2.0)]
    qrels["negative"] = {"x": 1, "y": -1}                # a negative grade gains nothing
    run["negative"] = [("y", 3.0), ("x", 1.0)]
    qrels["late"] = {"late": 0, "r": 1}                  # relevant doc only at rank 11
    run["late"] = [("n%d" % i, 20.0 - i) for i in range(10)] + [("r", 1.0)]
    run["unjudged"] = [("1", 1.0)]                       # not in qrels: not evaluated
    return qrels, run


def beir_mrr(qrels, run, k):
    per_query = {}
    for qid in qrels:
        hits = sorted(run.get(qid, []), key=lambda item: item[1], reverse=True)[:k]
        relevant = {d for d, s in qrels[qid].items() if s > 0}
        per_query[qid] = next((1.0 / (r + 1) for r, (d, _) in enumerate(hits) if d in relevant), 0.0)
    return per_query


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20260)
    args = ap.parse_args()
    qrels, run = build(args.seed)
    # BEIR: ignore_identical_ids, and an (empty) entry for every judged query.
    cleaned = {q: [(d, s) for d, s in run.get(q, []) if d != q] for q in qrels}
    trec_run = {q: {d: float(s) for d, s in hits} for q, hits in cleaned.items()}
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    scores = ev.evaluate(trec_run)
    mrr = beir_mrr(qrels, cleaned, 10)
    assert set(scores) == set(qrels), sorted(set(qrels) - set(scores))
    per_query = {q: {"ndcg_10": scores[q]["ndcg_cut_10"], "recall_100": scores[q]["recall_100"],
                     "mrr_10": mrr[q]} for q in sorted(qrels)}
    n = len(per_query)
    mean = {m: sum(v[m] for v in per_query.values()) / n for m in ("ndcg_10", "recall_100", "mrr_10")}
    fixture = {
        "about": "scripts/make-ir-metrics-fixtures.sh: pytrec_eval %s (ndcg_cut.10, recall.100) "
                 "and BEIR's MRR@10; seed %d" % (getattr(pytrec_eval, "__version__", "?"), args.seed),
        "qrels": qrels,
        "run": {q: [[d, s] for d, s in hits] for q, hits in run.items()},
        "per_query": per_query,
        "mean": mean,
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote %s: %d queries, mean %s" % (args.out, n, mean))


if __name__ == "__main__":
    main()
