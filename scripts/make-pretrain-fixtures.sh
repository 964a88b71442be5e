#!/usr/bin/env bash
# Regenerates crates/lever/tests/fixtures/pretrain/ for crates/lever/tests/pretrain.rs:
#   transformers.json  the logits transformers computes for RUN/model of the tiny run the tests
#                      train (char tokenizer, first 100,000 bytes of tinyshakespeare), and the
#                      ids its tokenizer gives;
#   llama-cpp.json     llama-perplexity of RUN/model.gguf of the same run with a byte-level BPE
#                      tokenizer (`--gguf`), on the held-out tenth of that text.
# The lever commands are the tests' (tiny.toml is shared); training is seeded, so the tests
# retrain the same model.
#
#   PYTHON=path/to/venv/python scripts/make-pretrain-fixtures.sh    # needs torch, transformers
#
# llama.cpp comes from ../shared/tools/llama-cpp-reference.sh (built once, ~4 min on 2 cores).
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
PY=${PYTHON:-python3}
OUT="$ROOT/crates/lever/tests/fixtures/pretrain"
DATA="$ROOT/../shared/data/tinyshakespeare/input.txt"
cargo build --release -q -p lever --manifest-path "$ROOT/Cargo.toml"
LEVER="$ROOT/target/release/lever"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cd "$W"
head -c 100000 "$DATA" > corpus.txt
cp "$OUT/tiny.toml" tiny.toml

# transformers: the char-tokenizer run.
"$LEVER" tokenizer train corpus.txt --kind char --out tok
"$LEVER" data shard corpus.txt --tokenizer tok/tokenizer.json --val-fraction 0.1 --out shards
"$LEVER" pretrain --config tiny.toml --data shards --out run 2>/dev/null
"$PY" "$ROOT/scripts/pretrain_transformers.py" run/model $'ROMEO:\nBut soft, what light?\n' \
  > "$OUT/transformers.json"

# llama.cpp: the BPE run with --gguf.
BIN=$("$ROOT/../shared/tools/llama-cpp-reference.sh" | tail -n1)
"$LEVER" tokenizer train corpus.txt --kind bpe --vocab-size 300 --out bpe
"$LEVER" data shard corpus.txt --tokenizer bpe/tokenizer.json --val-fraction 0.1 --out bpe-shards
"$LEVER" pretrain --config tiny.toml --data bpe-shards --out bpe-run --gguf 2>/dev/null
tail -c 10000 corpus.txt > heldout.txt
"$BIN/llama-perplexity" -m bpe-run/model.gguf -f heldout.txt -c 32 -b 32 -t 2 > ppl.log 2>&1
"$PY" - "$OUT/llama-cpp.json" <<'PY'
import json, re, sys
log = open("ppl.log").read()
m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
if not m:
    sys.exit("no perplexity in ppl.log:\n" + log[-2000:])
json.dump({"text": "the last 10,000 bytes of corpus.txt", "ctx": 32, "ppl": float(m.group(1))},
          open(sys.argv[1], "w"), indent=1)
PY
echo "wrote $OUT/transformers.json and $OUT/llama-cpp.json"
