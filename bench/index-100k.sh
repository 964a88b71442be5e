#!/usr/bin/env bash
# Document index: ingest docs/s with the real encoder, and search latency p50/p99 at 100k chunks
# (dense exact, dense HNSW, BM25, hybrid), plus the encoder's per-query time.
# See crates/lever-rag/examples/index_bench.rs for what each figure covers.
#
#   bench/index-100k.sh [DOCS=1000] [CHUNKS=100000] [QUERIES=200]
#
# Needs: the all-MiniLM-L6-v2 model (provisioned here if missing) and ../shared/data/scifact.
# The machine may be shared: read the load average printed first.
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
DOCS=${1:-1000}; CHUNKS=${2:-100000}; QUERIES=${3:-200}
HOME_DIR=${LEVER_HOME:-$HOME/.cache/lever}
MODEL=$HOME_DIR/models/all-minilm-l6-v2
[ -f "$MODEL/model.safetensors" ] || { cargo build --release -q -p lever && target/release/lever models pull all-minilm-l6-v2; }
cargo build --release -q -p lever-rag --example index_bench
echo "$(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
target/release/examples/index_bench "$ROOT/../shared/data/scifact" "$MODEL" \
  --docs "$DOCS" --chunks "$CHUNKS" --queries "$QUERIES"
