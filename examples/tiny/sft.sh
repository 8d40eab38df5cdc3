#!/usr/bin/env bash
# Fine-tune the tiny model into a chat model on CPU, after examples/tiny/run.sh, and measure it:
# generated conversations plus held-out questions of the same kind that never occur in them
# -> preprocess_data.py --sft (aquila-v1 template) -> LoRA SFT with TP2 on 2 gloo processes
# -> HF export with LoRA merged, and a PEFT adapter -> exact-match accuracy on the held-out
# questions with transformers: the base model before, the merged export and base + adapter (peft)
# after; the last two must give the same answers.
# Usage: [TASK=add|repeat|arithmetic] bash examples/tiny/sft.sh [section.key=value ...]
# TASK picks make_conversations.py --task (data/tiny/chat_$TASK*); the run is runs/tiny_sft, and
# running again resumes from its last checkpoint (remove runs/tiny_sft to train afresh).
set -euo pipefail
cd "$(dirname "$0")/../.."
TASK=${TASK:-add}
CHAT=data/tiny/chat_$TASK
[ -f runs/tiny/checkpoints/latest ] || { echo "run examples/tiny/run.sh first: it trains the base model" >&2; exit 1; }
[ -f runs/tiny/hf/config.json ] || python tools/convert_checkpoint.py to-hf --checkpoint runs/tiny/checkpoints \
    --output runs/tiny/hf --tokenizer-dir data/tiny/tokenizer --dtype fp32
[ -f "${CHAT}_heldout.jsonl" ] || python examples/tiny/make_conversations.py --task "$TASK" --count 3000 \
    --output "$CHAT.jsonl" --held-out "${CHAT}_heldout.jsonl" --held-out-count 20
[ -f "${CHAT}_sft_tokens_document.idx" ] || python tools/preprocess_data.py --sft --chat-template aquila-v1 \
    --seq-length 128 --input "$CHAT.jsonl" --output-prefix "$CHAT" \
    --tokenizer-type aquila-bbpe --tokenizer-path data/tiny/tokenizer
torchrun --standalone --nproc_per_node 2 -m megatron_aquila.train examples/tiny/tiny_sft_lora.yaml \
    "data.data_path=[$CHAT]" "$@"
rm -rf runs/tiny_sft/hf runs/tiny_sft/adapter
python tools/convert_checkpoint.py to-hf --checkpoint runs/tiny_sft/checkpoints --merge-lora \
    --output runs/tiny_sft/hf --tokenizer-dir data/tiny/tokenizer --dtype fp32
python tools/convert_checkpoint.py to-peft --checkpoint runs/tiny_sft/checkpoints --output runs/tiny_sft/adapter \
    --base-model runs/tiny/hf
python examples/tiny/eval_sft.py "${CHAT}_heldout.jsonl" --train "$CHAT.jsonl" --model before=runs/tiny/hf \
    --model merged=runs/tiny_sft/hf --model peft=runs/tiny/hf+runs/tiny_sft/adapter --same merged peft
