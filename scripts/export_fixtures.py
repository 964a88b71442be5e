#!/usr/bin/env python3
"""Reference fixture for `lever export` (see make-export-fixtures.sh).

Writes crates/lever/tests/fixtures/export.json:
  hf    `lever export --out DIR` (a Hugging Face folder): the sha256 of model.safetensors, and
        what transformers makes of the folder on a few prompts: token ids, the chat template
        rendering, the top-10 logits and the log-sum-exp at the last position, and the argmax
        at every position.
  gguf  `lever export --out FILE.gguf --type T` for f16, q8_0, q4_1: the sha256 and
        llama-perplexity's final PPL (tinyshakespeare, ctx 512, 4 chunks, 2 threads).

lever's writers are deterministic, so the sha256 pins the bytes the references scored; the Rust
test (crates/lever/tests/export.rs) re-exports, checks the sha256, and compares its own numbers.
Needs torch and transformers (run with the reference venv's python).
"""
import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

THREADS = "2"
PPL_CTX = 512
PPL_CHUNKS = 4
GGUF_TYPES = ("f16", "q8_0", "q4_1")
TOP_K = 10

# Each case is plain text, or chat messages rendered by the tokenizer's chat template with
# add_generation_prompt=True.
CASES = [
    {"name": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"name": "chat_system_multi_turn", "messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And grass?"},
    ]},
    {"name": "english", "text": "The quick brown fox jumps over the lazy dog. Once upon a time, in a small "
                                "village by the sea, there lived an old fisherman who"},
    {"name": "code", "text": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "},
    {"name": "numbers", "text": "In 2024, 42% of 1,500 users paid $9.99; 3.14159 * 12 = 37.69908, and "
                                "1234567890 + 987654321 ="},
    {"name": "unicode", "text": "Café naïve résumé — 東京は日本の首都です。 Привет, мир! 🚀✨ ∑∫√ and then"},
]


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n"
                         f"{p.stderr.decode('utf-8', 'replace')[-3000:]}")
    return p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_hf(folder):
    """transformers' model and tokenizer for the folder, refusing any missing/unexpected key."""
    handler = Collect()
    tlog = logging.getLogger("transformers")
    tlog.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(folder)
    tlog.removeHandler(handler)
    msgs = handler.messages + [str(w.message) for w in caught]
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"transformers loading info for {folder}: {bad}")
    for m in msgs:
        if re.search(r"missing|unexpected|not initialized|newly initialized|not used", m, re.I):
            raise SystemExit(f"transformers warned while loading {folder}: {m}")
    model.eval()
    return model, tok, msgs


def lever_ids(lever, model_args, text):
    out, _ = run([lever, "tokenize", *model_args, "--json", text])
    return json.loads(out)["ids"]


def make_hf(lever, model_args, tmp):
    folder = os.path.join(tmp, "hf")
    run([lever, "export", *model_args, "--out", folder])
    model, tok, msgs = load_hf(folder)
    cases = []
    for case in CASES:
        c = {"name": case["name"]}
        if "messages" in case:
            text = tok.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=True)
            templ_ids = tok.apply_chat_template(case["messages"], tokenize=True, add_generation_prompt=True)
            c["messages"] = case["messages"]
        else:
            text, templ_ids = case["text"], None
        ids = tok(text)["input_ids"]
        if templ_ids is not None and list(templ_ids) != ids:
            sys.stderr.write(f"  note: {case['name']}: apply_chat_template ids {templ_ids} != tokenizer ids {ids}\n")
        for label, args in (("lever (model)", model_args), ("lever (exported folder)", ["-m", folder])):
            got = lever_ids(lever, args, text)
            if got != ids:
                sys.stderr.write(f"  DIFFERENT IDS {case['name']}: {label} {got}\n    transformers {ids}\n")
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]  # (T, V)
        last = logits[-1]
        top = torch.topk(last, TOP_K)
        c.update({
            "text": text,
            "ids": ids,
            "top_ids": top.indices.tolist(),
            "top_logits": [round(float(v), 6) for v in top.values],
            "logsumexp": round(float(torch.logsumexp(last, 0)), 6),
            "argmax_ids": logits.argmax(-1).tolist(),
        })
        cases.append(c)
        sys.stderr.write(f"  {case['name']}: {len(ids)} tokens, top-1 {c['top_ids'][0]} ({c['top_logits'][0]})\n")
    return {
        "sha256": sha256(os.path.join(folder, "model.safetensors")),
        "load": "AutoModelForCausalLM.from_pretrained(dtype=float32, attn_implementation='eager'), "
                "AutoTokenizer; no missing/unexpected keys",
        "load_warnings": msgs,
        "cases": cases,
    }


def make_gguf(lever, model_args, tmp, bin_dir, data):
    results = []
    for ty in GGUF_TYPES:
        path = os.path.join(tmp, f"m.{ty}.gguf")
        run([lever, "export", *model_args, "--out", path, "--type", ty])
        out, err = run([os.path.join(bin_dir, "llama-perplexity"), "-m", path, "-f", data,
                        "-c", str(PPL_CTX), "--chunks", str(PPL_CHUNKS), "-t", THREADS])
        m = re.findall(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out + err)
        if not m:
            raise SystemExit(f"no PPL in llama-perplexity output for {ty}:\n{(out + err)[-2000:]}")
        r = {"type": ty, "sha256": sha256(path), "bytes": os.path.getsize(path),
             "llama_cpp_ppl": float(m[-1][0])}
        sys.stderr.write(f"  {ty}: {r['bytes']} bytes, llama-perplexity {r['llama_cpp_ppl']}\n")
        results.append(r)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lever", required=True, help="the lever binary")
    ap.add_argument("--model", default=None, help="-m for lever (default: lever's default model)")
    ap.add_argument("--bin", required=True, help="llama.cpp tools")
    ap.add_argument("--llama-version", required=True)
    ap.add_argument("--data", required=True, help="tinyshakespeare/input.txt")
    ap.add_argument("--out", required=True, help="export.json to write")
    ap.add_argument("--date", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(int(THREADS))
    model_args = ["-m", args.model] if args.model else []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit, _ = run(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    dirty, _ = run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "crates"])
    commit = commit.strip() + (" + uncommitted changes" if dirty.strip() else "")
    with tempfile.TemporaryDirectory(prefix="lever-export-fixtures-") as tmp:
        sys.stderr.write("hf export\n")
        hf = make_hf(args.lever, model_args, tmp)
        sys.stderr.write("gguf exports\n")
        gguf = make_gguf(args.lever, model_args, tmp, args.bin, args.data)
    model = args.model or "the default model (SmolLM2-135M-Instruct Q4_1 GGUF)"
    fixture = {
        "note": f"Made by scripts/make-export-fixtures.sh on {args.date} from {model}, lever at "
                f"{commit}: 'lever export --out DIR' loaded by "
                f"transformers {transformers.__version__} / torch {torch.__version__} on the CPU "
                f"(float32, eager attention, {THREADS} threads); 'lever export --out FILE.gguf --type T' "
                f"scored by 'llama-perplexity -f ../shared/data/tinyshakespeare/input.txt -c {PPL_CTX} "
                f"--chunks {PPL_CHUNKS} -t {THREADS}' (llama.cpp from llama-cpp-python "
                f"{args.llama_version}). The sha256 pins the bytes the references saw; lever's "
                "writers are deterministic.",
        "ctx": PPL_CTX,
        "chunks": PPL_CHUNKS,
        "hf": hf,
        "gguf": gguf,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    sys.stderr.write(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)\n")


if __name__ == "__main__":
    main()
