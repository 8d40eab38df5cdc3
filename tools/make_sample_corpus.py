"""Write a deterministic English JSONL sample corpus from the Python standard library (no network).

    python tools/make_sample_corpus.py --output data/sample.jsonl --target-mb 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_aquila.data.corpus import write_sample_corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write ({'text': ...} per line)")
    parser.add_argument("--target-mb", type=float, default=4.0, help="stop after this many MB (10^6 bytes)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if not output.parent.is_dir():
        parser.error(f"output directory {output.parent} does not exist; create it first")
    documents, written = write_sample_corpus(output, args.target_mb)
    print(f"wrote {documents} documents, {written / 1e6:.2f} MB to {output}")
    if written < args.target_mb * 1e6:
        print(f"note: the standard library ran out of text before {args.target_mb} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
