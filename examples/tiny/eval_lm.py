"""What the tiny pretraining run learned: validation perplexity of the exported model next to a
unigram model of the same training tokens, then a sampled continuation with transformers.

    python examples/tiny/eval_lm.py runs/tiny/hf data/tiny/sample_text_document "The module provides"

Both perplexities are measured on the same tokens: the validation documents of ``--split`` (the
recipe's ``data.split``, or read from ``--recipe``; documents ``[begin, end)`` as the trainer
splits them), cut into windows of ``--seq-length`` tokens; every token after a window's first is
predicted once. The unigram model counts token frequencies over the training documents with
add-one smoothing over the whole vocabulary: a model that knows which tokens are common but
nothing about context. The continuations are sampled with ``model.generate(do_sample=True, temperature, top_p)`` from a fixed seed.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from megatron_aquila.data.gpt_dataset import split_document_ranges
from megatron_aquila.data.indexed_dataset import IndexedDataset
from megatron_aquila.data.tokenizer import build_tokenizer


def document_tokens(dataset: IndexedDataset, begin: int, end: int) -> np.ndarray:
    """The tokens of documents ``[begin, end)``, in order (a document may hold several sequences)."""
    first, last = int(dataset.document_indices[begin]), int(dataset.document_indices[end])
    return np.concatenate([dataset[i] for i in range(first, last)]).astype(np.int64)


def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0  # add-one
    return np.log(counts / counts.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="to-hf output with tokenizer files")
    parser.add_argument("data_prefix", help="the training data prefix (.bin/.idx), e.g. data/tiny/sample_text_document")
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--split", default="969,30,1", help="the recipe's data.split")
    parser.add_argument("--recipe", help="take --split from this YAML recipe's data.split")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=256, help="most validation windows to score")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens to sample")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=2, help="continuations to sample (seeds seed, seed+1, ...)")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()
    if args.recipe:
        import yaml

        with open(args.recipe, encoding="utf-8") as handle:
            args.split = str(((yaml.safe_load(handle) or {}).get("data") or {}).get("split", args.split))

    tokenizer = build_tokenizer("aquila-bbpe", args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    dataset = IndexedDataset(args.data_prefix)
    train_range, valid_range, _ = split_document_ranges(args.split, dataset.num_documents)
    if train_range is None or valid_range is None:
        parser.error(f"split {args.split!r} has no training or no validation documents")
    train_tokens = document_tokens(dataset, *train_range)
    valid_tokens = document_tokens(dataset, *valid_range)
    vocab_size = max(model.config.vocab_size, int(train_tokens.max()) + 1, int(valid_tokens.max()) + 1)
    log_probs = unigram_log_probs(train_tokens, vocab_size)

    windows = len(valid_tokens) // args.seq_length
    windows = min(windows, args.max_windows)
    if windows == 0:
        parser.error(f"fewer than {args.seq_length} validation tokens")
    batch = torch.from_numpy(valid_tokens[: windows * args.seq_length].reshape(windows, args.seq_length))
    model_nll, counted = 0.0, 0
    with torch.no_grad():
        for chunk in batch.split(32):
            logits = model(chunk).logits[:, :-1].float()
            targets = chunk[:, 1:]
            model_nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            counted += targets.numel()
    unigram_nll = -log_probs[batch[:, 1:].numpy()].sum()
    print(f"validation tokens: {counted} predicted ({windows} windows of {args.seq_length}, "
          f"documents {valid_range[0]}-{valid_range[1] - 1}); unigram counts from {len(train_tokens)} training tokens")
    print(f"validation perplexity: model {math.exp(model_nll / counted):.1f} | "
          f"unigram model of the training tokens (add-one) {math.exp(unigram_nll / counted):.1f}")

    prompt = torch.tensor([tokenizer.encode(args.prompt)])
    print(f"sampled continuations (temperature {args.temperature}, top-p {args.top_p}, "
          f"at most {args.tokens} tokens, stopping at </s>):")
    for seed in range(args.seed, args.seed + args.samples):
        torch.manual_seed(seed)
        with torch.no_grad():
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens,
                                    do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                    eos_token_id=tokenizer.eod, pad_token_id=tokenizer.pad)
        print(f"  seed {seed}: {args.prompt + tokenizer.decode(output[0, prompt.shape[1]:].tolist())!r}")


if __name__ == "__main__":
    main()
