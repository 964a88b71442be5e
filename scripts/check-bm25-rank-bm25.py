"""Cross-checks lever's BM25 scores with rank_bm25 (PyPI) given the same analyzer tokens.

    cargo run --release -p lever-rag --example scifact_bm25 -- --dump /tmp/tokens.json
    /root/.cache/lever-ref-venv/bin/pip install rank_bm25==0.2.2
    /root/.cache/lever-ref-venv/bin/python scripts/check-bm25-rank-bm25.py /tmp/tokens.json

rank_bm25's BM25Okapi is configured with Lucene's idf, ln(1 + (N - df + 0.5) / (df + 0.5)), and
its scores are divided by (k1 + 1), the constant factor Lucene 8+ dropped; the two formulas are
then the same, so our top-10 scores must match within 1e-4 (we score in f32).
"""
import json
import math
import sys

from rank_bm25 import BM25Okapi


class LuceneIdfBM25(BM25Okapi):
    def _calc_idf(self, nd):
        for word, freq in nd.items():
            self.idf[word] = math.log(1.0 + (self.corpus_size - freq + 0.5) / (freq + 0.5))


def main(path):
    dump = json.load(open(path))
    k1, b = dump["k1"], dump["b"]
    bm25 = LuceneIdfBM25(dump["corpus"], k1=k1, b=b)
    worst = 0.0
    for q in dump["queries"]:
        scores = bm25.get_scores(q["tokens"]) / (k1 + 1.0)
        ref_top = sorted(range(len(scores)), key=lambda i: -scores[i])[:10]
        ours = [doc for doc, _ in q["top"]]
        for doc, score in q["top"]:
            worst = max(worst, abs(scores[doc] - score))
        print("query %s: %d tokens, top-10 overlap %d/10, max |diff| so far %.2e"
              % (q["id"], len(q["tokens"]), len(set(ours) & set(ref_top)), worst))
    print("max |lever - rank_bm25| over top-10 scores of %d queries: %.3e" % (len(dump["queries"]), worst))
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main(sys.argv[1])
