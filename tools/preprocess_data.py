"""Tokenize a JSONL corpus into Megatron indexed datasets ({prefix}_{key}_document.bin/.idx).

    python tools/preprocess_data.py --input 'data/*.jsonl.gz' --output-prefix data/corpus \\
        --tokenizer-type aquila-bbpe --tokenizer-path ../shared/aquila_tokenizer \\
        --append-eod --workers 2

With --sft, Aquila2 fine-tuning conversations (.jsonl or .json, optionally .gz) become
{prefix}_sft_tokens_document and {prefix}_sft_loss_mask_document, one document per conversation:

    python tools/preprocess_data.py --sft --chat-template aquila-v1 --seq-length 2048 \\
        --input data/chat.jsonl --output-prefix data/chat \\
        --tokenizer-type aquila-bbpe --tokenizer-path ../shared/aquila_tokenizer

Bad lines fail the run with file:line and leave no output (or --on-error skip counts them);
outputs appear under their final names only when complete.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_aquila.data.chat_template import CHAT_TEMPLATES  # noqa: E402
from megatron_aquila.data.indexed_dataset import IndexedDatasetError  # noqa: E402
from megatron_aquila.data.preprocess import (  # noqa: E402
    ON_ERROR_CHOICES,
    PreprocessConfig,
    PreprocessError,
    format_summary,
    preprocess,
)
from megatron_aquila.data.sft_preprocess import (  # noqa: E402
    SFTPreprocessConfig,
    format_sft_summary,
    preprocess_sft,
)
from megatron_aquila.data.tokenizer import TOKENIZER_KINDS  # noqa: E402

# Pretraining-only options and their defaults; None in argparse tells "not given" apart.
PRETRAINING_DEFAULTS = {"json_keys": ["text"], "append_eod": False, "batch_size": 256, "log_interval": 10000}


def parse_args(argv: list[str] | None) -> PreprocessConfig | SFTPreprocessConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl / .jsonl.gz files or glob patterns (--sft: also .json / .json.gz lists)")
    parser.add_argument("--json-keys", nargs="+", help="fields to tokenize, one dataset each (default: text)")
    parser.add_argument("--output-prefix", required=True, help="outputs are {prefix}_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_KINDS)
    parser.add_argument("--tokenizer-path", required=True,
                        help="aquila-bbpe: directory with vocab.json + merges.txt, or tokenizer.json; "
                             "sentencepiece: the .model file")
    parser.add_argument("--append-eod", action="store_const", const=True,
                        help="end every document with the eod token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--batch-size", type=int, help="documents per encode_batch call (default: 256)")
    parser.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="fail",
                        help="fail on the first bad line (default) or skip and count bad lines")
    parser.add_argument("--log-interval", type=int, help="documents between throughput updates (default: 10000)")
    parser.add_argument("--sft", action="store_true",
                        help="fine-tuning conversations -> {prefix}_sft_tokens_document and "
                             "{prefix}_sft_loss_mask_document")
    parser.add_argument("--chat-template", choices=CHAT_TEMPLATES,
                        help="--sft: aquila-v1 (AquilaChat2-7B) or aquila (the 16K chat models)")
    parser.add_argument("--seq-length", type=int,
                        help="--sft (required): longer conversations are truncated to this many tokens")
    args = parser.parse_args(argv)
    common = dict(inputs=args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
                  tokenizer_path=args.tokenizer_path, workers=args.workers, on_error=args.on_error)
    if args.sft:
        given = [name for name in PRETRAINING_DEFAULTS if getattr(args, name) is not None]
        if given:
            parser.error(f"--sft does not take {', '.join('--' + name.replace('_', '-') for name in given)}")
        if args.chat_template is None or args.seq_length is None:
            parser.error("--sft needs --chat-template and --seq-length")
        return SFTPreprocessConfig(**common, chat_template=args.chat_template, seq_length=args.seq_length)
    if args.chat_template is not None or args.seq_length is not None:
        parser.error("--chat-template and --seq-length apply only with --sft")
    for name, default in PRETRAINING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return PreprocessConfig(**common, json_keys=args.json_keys, append_eod=args.append_eod,
                            batch_size=args.batch_size, log_interval=args.log_interval)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    sft = isinstance(config, SFTPreprocessConfig)
    try:
        stats = preprocess_sft(config) if sft else preprocess(config)
    except (PreprocessError, IndexedDatasetError, FileNotFoundError) as error:
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 1
    print(format_sft_summary(stats) if sft else format_summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
