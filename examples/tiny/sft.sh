#!/usr/bin/env bash
# Fine-tune the tiny model into a chat model on CPU, after examples/tiny/run.sh, and measure it:
# generated conversations plus held-out questions of the same kind that never occur in them
# -> preprocess_data.py --sft (aquila-v1 template) -> LoRA SFT with TP2 on 2 gloo processes
# -> HF export with LoRA merged, and a PEFT adapter -> exact-match accuracy on the held-out
# questions with transformers: the base model before, the merged export and base + adapter (peft)
# after; the last two must give the same answers.
# Usage: [TASK=add|repeat|arithmetic] [QLORA=1] bash examples/tiny/sft.sh [section.key=value ...]
# TASK picks make_conversations.py --task (data/tiny/chat_$TASK*); the run is runs/tiny_sft, and
# running again resumes from its last checkpoint (remove runs/tiny_sft to train afresh).
# QLORA=1: Q-LoRA instead (needs bitsandbytes: pip install -e '.[qlora]'): the frozen base weights of the
# adapted layers are stored 4-bit (NF4, double-quantized), quantized while they stream in from a from-hf
# conversion of the base; the run is runs/tiny_sft_qlora; the exports pair the adapters with the
# original (unquantized) base, as published Q-LoRA adapters are.
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
RUN=runs/tiny_sft
QLORA_ARGS=()
if [ "${QLORA:-0}" = 1 ]; then  # Q-LoRA quantizes while streaming a from-hf directory (model/qlora.py)
  RUN=runs/tiny_sft_qlora
  [ -f runs/tiny/from_hf/full_state.safetensors.index.json ] || python tools/convert_checkpoint.py from-hf \
      --hf-dir runs/tiny/hf --output runs/tiny/from_hf
  QLORA_ARGS=("finetune.qlora={bits: 4, quant_type: nf4, double_quant: true, compute_dtype: fp32}"
              checkpoint.init_weights=runs/tiny/from_hf "checkpoint.save=$RUN/checkpoints"
              "checkpoint.load=$RUN/checkpoints" "logging.output_dir=$RUN")
fi
torchrun --standalone --nproc_per_node 2 -m megatron_aquila.train examples/tiny/tiny_sft_lora.yaml \
    "data.data_path=[$CHAT]" "${QLORA_ARGS[@]}" "$@"
rm -rf "$RUN/hf" "$RUN/adapter"
python tools/convert_checkpoint.py to-hf --checkpoint "$RUN/checkpoints" --merge-lora \
    --output "$RUN/hf" --tokenizer-dir data/tiny/tokenizer --dtype fp32
python tools/convert_checkpoint.py to-peft --checkpoint "$RUN/checkpoints" --output "$RUN/adapter" \
    --base-model runs/tiny/hf
python examples/tiny/eval_sft.py "${CHAT}_heldout.jsonl" --train "$CHAT.jsonl" --model before=runs/tiny/hf \
    --model merged="$RUN/hf" --model peft="runs/tiny/hf+$RUN/adapter" --same merged peft
