"""sentence-transformers' side of bench/embed-vs-sentence-transformers.sh: embeds the lines of
a file at a given batch size and thread count on the CPU and prints texts/s.

    python bench/embed_sentence_transformers.py MODEL_DIR TEXTS_FILE BATCH THREADS
"""

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

model_dir, texts_file, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
texts = open(texts_file, encoding="utf-8").read().split("\n")
if texts and texts[-1] == "":
    texts.pop()
model = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
model.encode(texts[:batch], batch_size=batch)  # warm-up (allocator, thread pool)
start = time.perf_counter()
model.encode(texts, batch_size=batch, normalize_embeddings=False)
secs = time.perf_counter() - start
print(f"sentence-transformers: {len(texts)} texts in {secs:.2f} s: {len(texts) / secs:.1f} texts/s")
