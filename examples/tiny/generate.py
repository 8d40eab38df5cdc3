"""Greedy generation with transformers from an exported Hugging Face directory of the tiny model.

    python examples/tiny/generate.py runs/tiny/hf "The module" --tokens 24
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from megatron_aquila.data.tokenizer import build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="directory written by tools/convert_checkpoint.py to-hf (with tokenizer files)")
    parser.add_argument("prompt")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens to generate")
    args = parser.parse_args()
    tokenizer = build_tokenizer("aquila-bbpe", args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, torch_dtype=torch.float32).eval()
    prompt = torch.tensor([tokenizer.encode(args.prompt)])
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=args.tokens, do_sample=False, pad_token_id=tokenizer.pad)
    print(f"{type(model).__name__} from {args.hf_dir}")
    print(f"prompt:     {args.prompt!r}")
    print(f"generation: {tokenizer.decode(output[0, prompt.shape[1]:].tolist())!r}")


if __name__ == "__main__":
    main()
