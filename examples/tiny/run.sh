#!/usr/bin/env bash
# The CPU demo, end to end: corpus -> tokenizer -> .bin/.idx -> TP2 x DP2 training on 4 processes
# -> Hugging Face export -> validation perplexity next to a unigram model of the training tokens, and
# sampled continuations, with transformers (examples/tiny/eval_lm.py).
# Usage: [RUN=tiny|tiny_tp2_pp2] bash examples/tiny/run.sh [section.key=value ...]
# RUN picks the recipe examples/tiny/$RUN.yaml (TP2 x DP2 by default, or TP2 x PP2) and the
# output directory runs/$RUN.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:-tiny}
mkdir -p data/tiny
[ -f data/tiny/sample.jsonl ] || python tools/make_sample_corpus.py --output data/tiny/sample.jsonl --target-mb 4
[ -f data/tiny/tokenizer/vocab.json ] || python tools/train_tiny_tokenizer.py \
    --input data/tiny/sample.jsonl --output-dir data/tiny/tokenizer --vocab-size 8192
[ -f data/tiny/sample_text_document.idx ] || python tools/preprocess_data.py \
    --input data/tiny/sample.jsonl --json-keys text --output-prefix data/tiny/sample \
    --tokenizer-type aquila-bbpe --tokenizer-path data/tiny/tokenizer --append-eod --workers 2
torchrun --standalone --nproc_per_node 4 -m megatron_aquila.train "examples/tiny/$RUN.yaml" "$@"
rm -rf "runs/$RUN/hf"
python tools/convert_checkpoint.py to-hf --checkpoint "runs/$RUN/checkpoints" --output "runs/$RUN/hf" \
    --tokenizer-dir data/tiny/tokenizer --dtype fp32
python examples/tiny/eval_lm.py "runs/$RUN/hf" data/tiny/sample_text_document "The module provides" \
    --recipe "examples/tiny/$RUN.yaml"
