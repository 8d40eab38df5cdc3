"""Train a small Aquila-layout byte-level BPE on a JSONL corpus, deterministically.

    python tools/train_tiny_tokenizer.py --input data/sample.jsonl --output-dir data/tiny_tokenizer

Writes vocab.json (id 0 <|endoftext|>), merges.txt and special_tokens.txt (Aquila's 8 special
tokens, appended after the vocab), loadable with --tokenizer-type aquila-bbpe.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_aquila.data.tokenizer import AquilaBBPETokenizer, train_tiny_bbpe  # noqa: E402


def read_texts(path: Path, key: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise SystemExit(f"{path}:{line_number}: cannot read key {key!r}: {error}")
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL corpus")
    parser.add_argument("--json-key", default="text", help="field holding the text")
    parser.add_argument("--output-dir", required=True, help="directory to write the tokenizer files to")
    parser.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary, special tokens included")
    args = parser.parse_args(argv)
    texts = read_texts(Path(args.input), args.json_key)
    output = train_tiny_bbpe(texts, args.output_dir, args.vocab_size)
    tokenizer = AquilaBBPETokenizer(output)
    print(f"trained on {len(texts)} documents: vocab_size {tokenizer.vocab_size} "
          f"(bos {tokenizer.bos}, eod {tokenizer.eod}, pad {tokenizer.pad}) -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
