"""Fixture for tests/cli.rs `gemma3_gguf_exports_to_a_hugging_face_folder`: what transformers
and its fast tokenizer make of the Hugging Face folder that `lever export -m gemma3-270m` writes
from the Q4_K_M GGUF (f32 weights, config.json, the SentencePiece vocabulary as tokenizer.json).

    target/release/lever export -m gemma3-270m --out /tmp/gemma-hf
    python scripts/gemma3_export_fixture.py /tmp/gemma-hf > crates/lever/tests/fixtures/gemma3-export.json

PyTorch and transformers 4.57.6 from PyPI (the reference venv of the README)."""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder)
texts = ["The capital of France is", "  two spaces\tand a tab\n\nnewlines",
         "日本語のテキスト 🦀 café", "def f(x):\n    return x ** 2"]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
prompt = "The capital of France is"
enc = tok(prompt, return_tensors="pt", return_token_type_ids=False)
with torch.no_grad():
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
json.dump({
    "transformers": transformers.__version__,
    "torch": torch.__version__,
    "tokenize": [{"text": t, "ids": tok(t)["input_ids"]} for t in texts],
    "prompt": prompt,
    "greedy_16": tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True),
}, sys.stdout, ensure_ascii=False, indent=1)
print()
