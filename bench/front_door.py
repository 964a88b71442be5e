"""Score `lever ask` on simple questions: share answered correctly, share that loop.

Usage: front_door.py LEVER QUESTIONS.jsonl OUT.jsonl [-- extra lever ask flags]
Each question is asked as a new user would ask it (`lever ask "Q" --json` plus the extra
flags); the answer is right when it matches the question's check (case-insensitive), and it
loops when it ran to --max-tokens repeating itself (a word 5-gram three or more times, or
the same line three or more times) and never stopped on its own.
"""
import json
import re
import subprocess
import sys
import time
from collections import Counter


def correct(item, text):
    t = text.lower()
    if "all" in item:
        return all(w in t for w in item["all"])
    if "min_of" in item:
        return sum(1 for w in item["any"] if w in t) >= item["min_of"]
    ok = any(re.search(p, t) for p in item["accept"])
    if ok and "max_words" in item:
        ok = len(t.split()) <= item["max_words"]
    return ok


def loops(text):
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i : i + 5]) for i in range(len(words) - 4))
    if grams and grams.most_common(1)[0][1] >= 3:
        return True
    lines = Counter(l.strip() for l in text.splitlines() if l.strip())
    return bool(lines) and lines.most_common(1)[0][1] >= 3


def main():
    lever, questions, out = sys.argv[1:4]
    extra = sys.argv[5:] if len(sys.argv) > 4 and sys.argv[4] == "--" else []
    items = [json.loads(l) for l in open(questions) if l.strip()]
    n_right = n_loop = n_len = 0
    start = time.time()
    with open(out, "w") as f:
        for item in items:
            r = subprocess.run(
                [lever, "ask", item["q"], "--json", *extra],
                capture_output=True, text=True, check=True,
            )
            a = json.loads(r.stdout)
            right = correct(item, a["text"])
            loop = a["finish_reason"] == "length" and loops(a["text"])
            n_right += right
            n_loop += loop
            n_len += a["finish_reason"] == "length"
            f.write(json.dumps({"q": item["q"], "answer": a["text"], "right": right,
                                "loops": loop, "finish_reason": a["finish_reason"],
                                "tokens": a["completion_tokens"]}) + "\n")
    n = len(items)
    print(json.dumps({"flags": " ".join(extra) or "(defaults)", "n": n,
                      "correct": round(n_right / n, 3), "loops": round(n_loop / n, 3),
                      "hit_max_tokens": round(n_len / n, 3),
                      "seconds": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
