"""Ask one question with the AquilaChat2 template and print the answer, with transformers.

    python examples/tiny/chat.py runs/tiny_sft/hf "What is 3 plus 4?" [--adapter runs/tiny_sft/adapter --base runs/tiny/hf]

With ``--adapter`` the model is ``--base`` with the PEFT adapter loaded by ``peft``; without it,
the merged export. Greedy decoding stops at ``</s>``.
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from megatron_aquila.data.chat_template import CHAT_TEMPLATES, encode_with_offsets, render_prompt
from megatron_aquila.data.tokenizer import build_tokenizer


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.adapter is None:
        return AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    return PeftModel.from_pretrained(base, args.adapter).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="to-hf output with tokenizer files (the merged model, or the tokenizer only)")
    parser.add_argument("question")
    parser.add_argument("--template", choices=CHAT_TEMPLATES, default="aquila-v1")
    parser.add_argument("--adapter", help="a to-peft directory: load it onto --base with peft")
    parser.add_argument("--base", help="the base model's HF directory (with --adapter)")
    parser.add_argument("--tokens", type=int, default=32, help="most new tokens")
    args = parser.parse_args()
    if args.adapter is not None and args.base is None:
        parser.error("--adapter needs --base, the HF directory of the model the adapter was trained on")
    tokenizer = build_tokenizer("aquila-bbpe", args.hf_dir)
    model = load_model(args)
    prompt = render_prompt([("human", args.question)], args.template)
    ids = torch.tensor([encode_with_offsets(prompt, tokenizer)[0]])
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=args.tokens, do_sample=False, eos_token_id=tokenizer.eod,
                                pad_token_id=tokenizer.pad)
    answer = tokenizer.decode(output[0, ids.shape[1]:].tolist()).removesuffix("</s>")
    print(f"{'PEFT adapter ' + args.adapter if args.adapter else 'merged model ' + args.hf_dir}")
    print(f"human:     {args.question}")
    print(f"assistant: {answer.strip()}")


if __name__ == "__main__":
    main()
