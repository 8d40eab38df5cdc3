"""Tokenize a JSONL corpus into Megatron indexed datasets ({prefix}_{key}_document.bin/.idx).

    python tools/preprocess_data.py --input 'data/*.jsonl.gz' --output-prefix data/corpus \\
        --tokenizer-type aquila-bbpe --tokenizer-path ../shared/aquila_tokenizer \\
        --append-eod --workers 2

Bad lines fail the run with file:line and leave no output (or --on-error skip counts them);
outputs appear under their final names only when complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_aquila.data.indexed_dataset import IndexedDatasetError  # noqa: E402
from megatron_aquila.data.preprocess import (  # noqa: E402
    ON_ERROR_CHOICES,
    PreprocessConfig,
    PreprocessError,
    format_summary,
    preprocess,
)
from megatron_aquila.data.tokenizer import TOKENIZER_KINDS  # noqa: E402


def parse_args(argv: list[str] | None) -> PreprocessConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl / .jsonl.gz files or glob patterns")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize, one dataset each")
    parser.add_argument("--output-prefix", required=True, help="outputs are {prefix}_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_KINDS)
    parser.add_argument("--tokenizer-path", required=True,
                        help="aquila-bbpe: directory with vocab.json + merges.txt, or tokenizer.json; "
                             "sentencepiece: the .model file")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the eod token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--batch-size", type=int, default=256, help="documents per encode_batch call")
    parser.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="fail",
                        help="fail on the first bad line (default) or skip and count bad lines")
    parser.add_argument("--log-interval", type=int, default=10000, help="documents between throughput updates")
    args = parser.parse_args(argv)
    return PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_path=args.tokenizer_path,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        batch_size=args.batch_size,
        on_error=args.on_error,
        log_interval=args.log_interval,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        stats = preprocess(config)
    except (PreprocessError, IndexedDatasetError, FileNotFoundError) as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 1
    print(format_summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
