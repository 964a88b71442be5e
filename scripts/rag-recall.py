#!/usr/bin/env python3
"""Recall@1/5/20 of the gold passage for squad-open-style questions against a lever index,
with queries embedded by a sentence-transformers folder (the base encoder, or the
query-encoder/ that `lever rag train` writes). The document vectors are the index's own
(lever's `vectors` table, f32), read as they are: the index stays frozen, as in training.
A hit is a retrieved chunk whose `doc_id` (the JSONL record's `_id`) is among the gold_ids.

    python scripts/rag-recall.py --index DIR --questions Q.jsonl --encoder DIR [--json]
"""
import argparse, json, sqlite3, sys
import numpy as np
from sentence_transformers import SentenceTransformer

ap = argparse.ArgumentParser()
ap.add_argument("--index", required=True)
ap.add_argument("--questions", required=True)
ap.add_argument("--encoder", required=True)
ap.add_argument("--json", action="store_true")
a = ap.parse_args()

db = sqlite3.connect(f"file:{a.index}/index.db?mode=ro", uri=True)
rows = db.execute(
    "select v.chunk_id, v.vector, c.meta from vectors v join chunks c on c.id = v.chunk_id"
).fetchall()
docs = np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows])  # (N, C)
doc_ids = [json.loads(r[2]).get("doc_id") for r in rows]
qs = [json.loads(l) for l in open(a.questions, encoding="utf-8") if l.strip()]
m = SentenceTransformer(a.encoder, device="cpu")
q = m.encode([x["text"] for x in qs], batch_size=32)  # (Q, C)
top = np.argsort(-(q @ docs.T), axis=1, kind="stable")[:, :20]
out = {"n": len(qs), "encoder": a.encoder}
for k in (1, 5, 20):
    hits = sum(any(doc_ids[j] in x["gold_ids"] for j in t[:k]) for x, t in zip(qs, top))
    out[f"recall@{k}"] = hits / len(qs)
print(json.dumps(out) if a.json else out)
