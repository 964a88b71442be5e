#!/usr/bin/env python3
"""Score a model on held-out GSM8K questions through `lever ask` (greedy).

Format adherence: the answer ends its reasoning with a GSM8K final-answer line `#### N`.
Exact match: that N equals the reference's N (commas and a trailing `.0` ignored).
Prints one JSON object; per-question outputs go to --outputs.
Usage: score.py --lever BIN --data FILE [--adapter DIR] [--max-tokens 320] [--outputs FILE]
"""
import argparse
import json
import re
import subprocess
import sys

FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def final_number(text):
    m = FINAL.search(text)
    if not m:
        return None
    n = m.group(1).replace(",", "")
    return n[:-2] if n.endswith(".0") else n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lever", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--outputs")
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.data, encoding="utf-8") if l.strip()]
    formatted = correct = 0
    out = open(a.outputs, "w", encoding="utf-8") if a.outputs else None
    for i, r in enumerate(rows):
        cmd = [a.lever, "ask", "--json", "-n", str(a.max_tokens), r["question"]]
        if a.adapter:
            cmd += ["--adapter", a.adapter]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        text = json.loads(res.stdout.strip().splitlines()[-1])["text"]
        got, want = final_number(text), final_number(r["answer"])
        formatted += got is not None
        correct += got is not None and got == want
        if out:
            out.write(json.dumps({"question": r["question"], "output": text,
                                  "got": got, "want": want}) + "\n")
        print(f"\r{i + 1}/{len(rows)} format {formatted} correct {correct}",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    n = len(rows)
    print(json.dumps({"n": n, "format_adherence": formatted / n, "exact_match": correct / n,
                      "formatted": formatted, "correct": correct}))


if __name__ == "__main__":
    main()
