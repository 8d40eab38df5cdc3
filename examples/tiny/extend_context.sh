#!/usr/bin/env bash
# Context extension on CPU: the tiny model trained by examples/tiny/run.sh (128 tokens) continues at
# 1024 tokens with position interpolation, CP2 x TP2 on 4 gloo processes, then exports to Hugging
# Face (config.json carries rope_scaling) and generates with transformers.
# Usage: bash examples/tiny/extend_context.sh [section.key=value ...]   (after examples/tiny/run.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f runs/tiny/checkpoints/latest ] || { echo "run examples/tiny/run.sh first: it writes runs/tiny/checkpoints" >&2; exit 1; }
torchrun --standalone --nproc_per_node 4 -m megatron_aquila.train examples/tiny/tiny_long.yaml "$@"
rm -rf runs/tiny_long/hf
python tools/convert_checkpoint.py to-hf --checkpoint runs/tiny_long/checkpoints --output runs/tiny_long/hf \
    --tokenizer-dir data/tiny/tokenizer --dtype fp32
python examples/tiny/generate.py runs/tiny_long/hf "The module provides" --tokens 24
