#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one run, for a machine with an NVIDIA GPU:
#   1. `fedmicse bench --device cuda --config bert-base` with an empty kernel cache (cold
#      start to the first training step, then inference at batch 256 and miCSE/SimCSE steps
#      at batch 64, max length 32),
#   2. the same again with the cache the first run filled (warm start),
#   3. a cold start with CUBECL_AUTOTUNE_LEVEL=minimal (less tuning, faster first step),
#   4. the PyTorch reference on the same shapes (fp32, TF32, bf16), when torch is installed.
# Each fedmicse run also compares the GPU with the CPU reference path (embeddings, one miCSE
# step without dropout): the first rows of its table.
#
#   [PHASES="cold warm minimal pytorch"] bash bench/gpu.sh [BIN] [OUT_DIR] [TOKENIZER_DIR]
#
# BIN: a fedmicse built with `cargo build --release --features cuda` (default
# target/release/fedmicse). OUT_DIR (default $OUT, else bench-gpu) receives cold.json,
# warm.json, cold-minimal.json and log.txt. TOKENIZER_DIR: any BERT uncased tokenizer
# (tokenizer.json or vocab.txt; default models/all-MiniLM-L6-v2); bert-base weights are
# random, as timing needs shapes, not trained values. Each step has its own time limit so one hang cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/fedmicse}
OUT_DIR=${2:-${OUT:-bench-gpu}}
TOK=${3:-models/all-MiniLM-L6-v2}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"
exec > >(tee -a "$LOG") 2>&1

# Kernel caches live outside OUT_DIR: they hold thousands of small files.
CACHE=${FEDMICSE_KERNEL_CACHE:-/tmp/fedmicse-bench-kernels}
export RUST_LOG=${RUST_LOG:-info}
# Steps to run (each has its own time limit; pick fewer when device time is short).
PHASES=${PHASES:-"cold warm minimal pytorch"}

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
if missing=$(ldd "$BIN" 2>/dev/null | grep 'not found'); then
  echo "$BIN needs libraries this machine lacks (build with --no-default-features --features"
  echo "cuda to drop OpenBLAS, or carry them and set LD_LIBRARY_PATH):"; echo "$missing"; exit 1
fi
"$BIN" --version

bench() { # name, time limit (s), kernel cache folder
  echo "== fedmicse bench: $1"
  time FEDMICSE_KERNEL_CACHE=$3 timeout "$2" "$BIN" bench --device cuda --config bert-base \
    --tokenizer "$TOK" --batch-size 64 --inference-batch-size 256 --json "$OUT_DIR/$1.json"
  echo "== exit $? ($1); kernel cache $(du -sh "$3" 2>/dev/null | cut -f1)"
}
for phase in $PHASES; do
  case $phase in
    cold) rm -rf "$CACHE"; bench cold 240 "$CACHE" ;; # compile and autotune everything
    warm) bench warm 150 "$CACHE" ;;      # the cache `cold` filled
    # Empty cache, autotune at its lightest: the cold start a user can choose.
    minimal) rm -rf "$CACHE-minimal"
      CUBECL_AUTOTUNE_LEVEL=minimal bench cold-minimal 240 "$CACHE-minimal" ;;
    pytorch)
      if python3 -c 'import torch, transformers; assert torch.cuda.is_available()' 2>/dev/null; then
        MODEL=/tmp/fedmicse-bert-base
        [ -d "$MODEL" ] || timeout 60 "$BIN" init-model --preset bert-base --tokenizer "$TOK" --out "$MODEL"
        for p in fp32 tf32 bf16; do
          echo "== PyTorch reference, $p"
          timeout 120 python3 bench/pytorch_reference.py --device cuda --precision "$p" \
            --model "$MODEL" --batch-size 64 --inference-batch-size 256
        done
      else
        echo "== PyTorch with CUDA not installed here: reference rows skipped"
      fi ;;
    *) echo "unknown phase $phase (cold, warm, minimal, pytorch)"; exit 2 ;;
  esac
done
