"""Reference embeddings for lever's sentence encoder (crates/lever-model/src/encoder.rs).

Runs sentence-transformers (PyTorch, CPU, f32) on a model folder, offline, and writes the texts,
their token ids (after sentence-transformers' truncation to max_seq_length), whether each was
truncated, and the L2-normalized embeddings rounded to 7 significant digits.

    python scripts/embed_fixtures.py MODEL_DIR SCIFACT_CORPUS OUT_JSON
"""

import gzip
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sentence_transformers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

model_dir, corpus, out = sys.argv[1:4]
torch.manual_seed(0)
torch.set_num_threads(2)

texts = [
    # short and plain
    "Hello, world!",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The cat sits outside",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Retrieval-augmented generation combines a retriever with a generator.",
    # empty-ish
    "",
    " ",
    "\n\t  \n",
    ".",
    "a",
    "[CLS]",
    "[SEP] [PAD] [MASK] [UNK]",
    # casing, accents, punctuation
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "Café, naïve, résumé, façade, jalapeño, Zürich, Ångström.",
    "Crème brûlée à la française — très délicieux!",
    "¿Dónde está la biblioteca? ¡Aquí!",
    "Straße, Mädchen, Größe, Übermut.",
    "Привет, как дела? Это тест на русском языке.",
    "Ελληνικά: η γρήγορη καφέ αλεπού.",
    "שלום עולם",
    "مرحبا بالعالم",
    "हिन्दी में एक वाक्य।",
    # CJK, emoji, symbols
    "我爱自然语言处理。",
    "東京は日本の首都です。ひらがなとカタカナ。",
    "한국어 문장입니다.",
    "I love pizza 🍕🍕 and coffee ☕! 😀👍🏽",
    "👨‍👩‍👧‍👦 family emoji with zero-width joiners",
    "∀x ∈ ℝ: x² ≥ 0, ∑ᵢ aᵢ = π ≈ 3.14159",
    "Zero\u200bwidth\u200bspace and soft\u00adhyphen and control\u0007char",
    # code
    "fn main() { println!(\"Hello, {}!\", name); }",
    "def f(x):\n    return [i ** 2 for i in range(x) if i % 2 == 0]",
    "SELECT id, title FROM documents WHERE score > 0.5 ORDER BY score DESC LIMIT 10;",
    "<div class=\"note\"><a href=\"https://example.com/a?b=c&d=e\">link</a></div>",
    "git commit -m 'fix: off-by-one in tokenizer' && cargo test --release",
    # numbers
    "3.14159265358979323846264338327950288419716939937510",
    "The meeting is on 2024-03-15 at 14:30 UTC, room 101B; call +1-555-0100.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "$1,234,567.89 is 12% more than last year's €1.1M.",
    # long words, repetition
    "Supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "x" * 150,
    "word " * 40,
    # beyond max_seq_length
    "the " * 400,
    " ".join(f"token{i}" for i in range(300)),
]

with gzip.open(corpus, "rt", encoding="utf-8") as f:
    docs = [json.loads(line) for _, line in zip(range(40), f)]
# SciFact abstracts (title + text, as BEIR joins them): long ones exercise truncation.
texts += [d["title"] + " " + d["text"] for d in docs[:14]]
texts += [d["title"] for d in docs[14:18]]
# A very long one: several abstracts concatenated.
texts.append(" ".join(d["text"] for d in docs[18:24]))

model = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
model.eval()
max_len = model.max_seq_length
tok = model.tokenizer

features = model.tokenize(texts)
ids = [
    row[: int(mask.sum())].tolist()
    for row, mask in zip(features["input_ids"], features["attention_mask"])
]
full = tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
truncated = [len(f) > max_len for f in full]

with torch.no_grad():
    emb = model.encode(texts, batch_size=16, convert_to_numpy=True, normalize_embeddings=False)


def r7(v):
    return float(f"{v:.7g}")


json.dump(
    {
        "generator": "scripts/make-embed-fixtures.sh",
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "model": os.path.basename(os.path.normpath(model_dir)),
        "max_seq_length": max_len,
        "dim": int(emb.shape[1]),
        "cases": [
            {
                "text": t,
                "ids": i,
                "truncated": tr,
                "full_len": len(f),
                "embedding": [r7(v) for v in e],
            }
            for t, i, tr, f, e in zip(texts, ids, truncated, full, emb)
        ],
    },
    open(out, "w", encoding="utf-8"),
    ensure_ascii=False,
)
print(f"{out}: {len(texts)} texts, {sum(truncated)} truncated, dim {emb.shape[1]}", file=sys.stderr)
