#!/usr/bin/env bash
# Fine-tune the tiny model into a chat model on CPU, after examples/tiny/run.sh:
# generated conversations -> preprocess_data.py --sft (aquila-v1 template) -> LoRA SFT with TP2 on
# 2 gloo processes -> HF export with LoRA merged, and a PEFT adapter -> one question with transformers,
# asked of the merged model and of the base model with the adapter loaded by peft.
# Usage: bash examples/tiny/sft.sh [section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f runs/tiny/checkpoints/latest ] || { echo "run examples/tiny/run.sh first: it trains the base model" >&2; exit 1; }
[ -f data/tiny/chat.jsonl ] || python examples/tiny/make_conversations.py --output data/tiny/chat.jsonl --count 3000
[ -f data/tiny/chat_sft_tokens_document.idx ] || python tools/preprocess_data.py --sft --chat-template aquila-v1 \
    --seq-length 128 --input data/tiny/chat.jsonl --output-prefix data/tiny/chat \
    --tokenizer-type aquila-bbpe --tokenizer-path data/tiny/tokenizer
torchrun --standalone --nproc_per_node 2 -m megatron_aquila.train examples/tiny/tiny_sft_lora.yaml "$@"
rm -rf runs/tiny_sft/hf runs/tiny_sft/adapter
python tools/convert_checkpoint.py to-hf --checkpoint runs/tiny_sft/checkpoints --merge-lora \
    --output runs/tiny_sft/hf --tokenizer-dir data/tiny/tokenizer --dtype fp32
python tools/convert_checkpoint.py to-peft --checkpoint runs/tiny_sft/checkpoints --output runs/tiny_sft/adapter \
    --base-model runs/tiny/hf
python examples/tiny/chat.py runs/tiny_sft/hf "What is 3 plus 4?"
python examples/tiny/chat.py runs/tiny_sft/hf "What is 3 plus 4?" --adapter runs/tiny_sft/adapter --base runs/tiny/hf
