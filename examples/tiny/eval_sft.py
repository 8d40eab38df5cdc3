"""Exact-match accuracy on held-out questions, with transformers (and peft for an adapter).

    python examples/tiny/eval_sft.py data/tiny/chat_heldout.jsonl --train data/tiny/chat.jsonl \\
        --model before=runs/tiny/hf --model merged=runs/tiny_sft/hf \\
        --model peft=runs/tiny/hf+runs/tiny_sft/adapter --same merged peft

Each ``--model LABEL=DIR`` is a Hugging Face directory (a to-hf export); ``LABEL=BASE+ADAPTER``
is the base model's directory with a to-peft adapter loaded onto it by ``peft``. Every held-out
question (``make_conversations.py --held-out``: one ``{"question", "answer"}`` per line) is asked
alone with the chat template the SFT data used (``render_prompt``, as ``chat.py`` does) and
answered greedily up to ``</s>``; an answer counts when it equals the expected one exactly (after
stripping surrounding spaces). With ``--train``, the script first checks that no held-out question
is a human turn of the training file. With ``--same A B``, it fails unless models A and B give the
same answer to every question (the merged export and the adapter must agree).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from megatron_aquila.data.chat_template import CHAT_TEMPLATES, encode_with_offsets, render_prompt
from megatron_aquila.data.tokenizer import build_tokenizer


def load_model(spec: str) -> torch.nn.Module:
    if "+" not in spec:
        return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).eval()
    from peft import PeftModel

    base, adapter = spec.split("+", 1)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


def training_questions(path: str) -> set[str]:
    questions = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            for turn in json.loads(line)["conversations"]:
                if turn["from"] == "human":
                    questions.add(turn["value"])
    return questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("held_out", help="JSONL of {question, answer} (make_conversations.py --held-out)")
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=DIR[+ADAPTER]")
    parser.add_argument("--train", help="the training JSONL: fail if a held-out question occurs in it")
    parser.add_argument("--same", nargs=2, metavar="LABEL", help="fail unless these two models answer alike")
    parser.add_argument("--template", choices=CHAT_TEMPLATES, default="aquila-v1")
    parser.add_argument("--tokens", type=int, default=16, help="most new tokens per answer")
    parser.add_argument("--show", type=int, default=3, help="print this many questions with each model's answers")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft/transformers
    models = dict(spec.split("=", 1) for spec in args.model)
    if args.same and not set(args.same) <= set(models):
        parser.error(f"--same {' '.join(args.same)}: not among the --model labels {', '.join(models)}")

    with open(args.held_out, encoding="utf-8") as handle:
        items = [json.loads(line) for line in handle if line.strip()]
    if args.train:
        leaked = [item["question"] for item in items if item["question"] in training_questions(args.train)]
        if leaked:
            sys.exit(f"{len(leaked)} held-out questions occur in {args.train}, e.g. {leaked[0]!r}")
        print(f"{len(items)} held-out questions, none of them in {args.train}")

    tokenizer = build_tokenizer("aquila-bbpe", next(iter(models.values())).split("+")[0])
    prompts = [torch.tensor([encode_with_offsets(render_prompt([("human", item["question"])], args.template),
                                                 tokenizer)[0]]) for item in items]
    answers: dict[str, list[str]] = {}
    for label, spec in models.items():
        model = load_model(spec)
        answers[label] = []
        with torch.no_grad():
            for ids in prompts:
                output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                        do_sample=False, eos_token_id=tokenizer.eod, pad_token_id=tokenizer.pad)
                text = tokenizer.decode(output[0, ids.shape[1]:].tolist())
                answers[label].append(text.split("</s>")[0].strip())
        right = sum(answer == item["answer"] for answer, item in zip(answers[label], items))
        print(f"accuracy {label:>8}: {right:3d}/{len(items)} = {100.0 * right / len(items):5.1f}%   ({spec})")
    for item, index in zip(items[: args.show], range(args.show)):
        print(f"  {item['question']!r} expects {item['answer']!r}: "
              + ", ".join(f"{label} {answers[label][index]!r}" for label in models))
    if args.same:
        first, second = (answers[label] for label in args.same)
        differing = sum(a != b for a, b in zip(first, second))
        if differing:
            sys.exit(f"{args.same[0]} and {args.same[1]} answer {differing} of {len(items)} questions differently")
        print(f"{args.same[0]} and {args.same[1]} give the same answer to all {len(items)} questions")


if __name__ == "__main__":
    main()
