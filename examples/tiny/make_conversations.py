"""A small generated conversation set in the Aquila2 fine-tuning format, for the CPU SFT demo,
with held-out questions of the same kind that never occur in it.

    python examples/tiny/make_conversations.py --output data/tiny/chat.jsonl --count 3000 \\
        --held-out data/tiny/chat_heldout.jsonl --held-out-count 100

Tasks (``--task``), each a finite set of questions with one right answer:

* ``add`` (default): ``What is 3 plus 4?`` -> ``3 plus 4 is 7.`` with operands 0 to 9.
* ``repeat``: ``Repeat: 4 0 7 1`` -> ``4 0 7 1`` with 3 to 5 random digits.
* ``arithmetic``: plus, minus and times with operands 0 to 20 (the demo's first task, which the
  tiny model does not learn in minutes).

The held-out questions are drawn first (``--held-out-count`` distinct questions, from ``--seed``);
the training conversations (one to three exchanges each) are drawn from the remaining questions
only, so no held-out question appears anywhere in ``--output``. Both files are deterministic for a
seed. The held-out file holds one ``{"question": ..., "answer": ...}`` per line;
``examples/tiny/eval_sft.py`` reads it (and checks it against the training file again).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def _arithmetic(names: list[str], top: int) -> Callable[[random.Random], tuple[str, str]]:
    def draw(rng: random.Random) -> tuple[str, str]:
        a, b, name = rng.randint(0, top), rng.randint(0, top), rng.choice(names)
        return f"What is {a} {name} {b}?", f"{a} {name} {b} is {OPERATIONS[name](a, b)}."
    return draw


def _repeat(rng: random.Random) -> tuple[str, str]:
    digits = " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))
    return f"Repeat: {digits}", digits


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _arithmetic(["plus"], 9),
    "repeat": _repeat,
    "arithmetic": _arithmetic(sorted(OPERATIONS), 20),
}


def held_out_questions(task: str, count: int, rng: random.Random) -> dict[str, str]:
    """``count`` distinct questions (question -> answer) drawn from ``rng``."""
    draw, chosen, misses = TASKS[task], {}, 0
    while len(chosen) < count:
        question, answer = draw(rng)
        if question in chosen:
            misses += 1
            if misses > 10_000:
                raise ValueError(f"task {task!r} has fewer than {count} distinct questions")
        else:
            chosen[question], misses = answer, 0
    return chosen


def conversation(index: int, task: str, held_out: dict[str, str], rng: random.Random) -> dict:
    turns = []
    for _ in range(rng.randint(1, 3)):
        question, answer = TASKS[task](rng)
        while question in held_out:
            question, answer = TASKS[task](rng)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"tiny-{index}", "conversations": turns, "instruction": ""}


def _write_lines(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    temporary.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--task", choices=sorted(TASKS), default="add")
    parser.add_argument("--held-out", help="also write this many held-out questions here (JSONL)")
    parser.add_argument("--held-out-count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    held_out = held_out_questions(args.task, args.held_out_count, rng) if args.held_out else {}
    _write_lines(Path(args.output), (conversation(i, args.task, held_out, rng) for i in range(args.count)))
    print(f"wrote {args.count} {args.task} conversations to {args.output}")
    if args.held_out:
        _write_lines(Path(args.held_out), ({"question": q, "answer": a} for q, a in held_out.items()))
        print(f"wrote {len(held_out)} held-out questions, none of them in {args.output}, to {args.held_out}")


if __name__ == "__main__":
    main()
