#!/usr/bin/env python3
"""The squad-open task of examples/ladder: ../shared/data/squad-open/queries-train.jsonl split
by article (never by question, as its SOURCE.md asks), so that no paragraph is gold for
questions of two splits: articles whose index is 0 mod 5 are test, 1 mod 5 dev, the rest train.
Each split is a seeded sample (train 400, dev 100, test 200) with fields id, question, answer
(the first gold answer), answers (all of them) and gold (the paragraph ids).

    python3 examples/ladder/squad/make-data.py      # writes train/dev/test.jsonl beside it
"""
import json, os, random

here = os.path.dirname(os.path.abspath(__file__))
src = os.path.join(here, "../../../../shared/data/squad-open/queries-train.jsonl")
splits = {"train": [], "dev": [], "test": []}
for line in open(src, encoding="utf-8"):
    q = json.loads(line)
    article = int(q["gold_ids"][0][1:3])
    name = "test" if article % 5 == 0 else "dev" if article % 5 == 1 else "train"
    splits[name].append({"id": q["_id"], "question": q["text"], "answer": q["answers"][0],
                         "answers": q["answers"], "gold": q["gold_ids"]})
sizes = {"train": 400, "dev": 100, "test": 200}
for name, rows in splits.items():
    random.Random(f"squad-{name}").shuffle(rows)
    rows = rows[: sizes[name]]
    with open(os.path.join(here, f"{name}.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    arts = sorted({r["gold"][0][:3] for r in rows})
    print(f"{name}: {len(rows)} questions from {len(arts)} articles")
