"""A small generated conversation set in the Aquila2 fine-tuning format, for the CPU SFT demo.

Arithmetic questions and answers (one to three exchanges each), deterministic for a seed:

    python examples/tiny/make_conversations.py --output data/tiny/chat.jsonl --count 3000
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def exchange(rng: random.Random) -> tuple[str, str]:
    a, b, name = rng.randint(0, 20), rng.randint(0, 20), rng.choice(sorted(OPERATIONS))
    return f"What is {a} {name} {b}?", f"{a} {name} {b} is {OPERATIONS[name](a, b)}."


def conversation(index: int, rng: random.Random) -> dict:
    turns = []
    for _ in range(rng.randint(1, 3)):
        question, answer = exchange(rng)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"tiny-{index}", "conversations": turns, "instruction": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(output.suffix + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        for index in range(args.count):
            handle.write(json.dumps(conversation(index, rng)) + "\n")
    temporary.replace(output)
    print(f"wrote {args.count} conversations to {output}")


if __name__ == "__main__":
    main()
