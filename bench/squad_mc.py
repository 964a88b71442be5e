"""Multiple-choice items from ../shared/data/squad-open (SQuAD v1.1 dev, CC BY-SA 4.0), for
log-likelihood scoring (`lever eval mc`, lm-eval's `multiple_choice`): each question's first gold
answer against the first answers of three other questions on the same article (distinct strings,
the next ones in file order), the gold placed by a seeded shuffle. Closed-book, PIQA-style
items: {"query": "Question: …\\nAnswer:", "choices": [" …", …], "gold": i}.

    python3 bench/squad_mc.py N OUT.jsonl
"""
import json
import random
import sys
from pathlib import Path

n, out = int(sys.argv[1]), sys.argv[2]
src = Path(__file__).resolve().parents[2] / "shared/data/squad-open/queries-train.jsonl"
rows = [json.loads(line) for line in src.open()]
by_article = {}
for r in rows:
    by_article.setdefault(r["gold_ids"][0].split("_")[0], []).append(r)
rng = random.Random(0)
items = []
# Every article in turn, so the items spread over the whole set.
for k in range(len(rows)):
    for article in sorted(by_article):
        qs = by_article[article]
        if k >= len(qs) or len(items) == n:
            continue
        q = qs[k]
        gold = q["answers"][0]
        others = []
        for o in qs[k + 1:] + qs[:k]:
            a = o["answers"][0]
            if a != gold and a not in others:
                others.append(a)
            if len(others) == 3:
                break
        if len(others) < 3:
            continue
        choices = others + [gold]
        rng.shuffle(choices)
        items.append({"query": f"Question: {q['text']}\nAnswer:",
                      "choices": [" " + c for c in choices], "gold": choices.index(gold)})
    if len(items) == n:
        break
with open(out, "w") as f:
    for it in items:
        f.write(json.dumps(it) + "\n")
print(f"{len(items)} items -> {out}", file=sys.stderr)
