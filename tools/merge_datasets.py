"""Concatenate indexed datasets (same token dtype) into one, documents in argument order.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_aquila.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
)


def merge(input_prefixes: list[str], output_prefix: str) -> IndexedDataset:
    """Write ``output_prefix`` as the concatenation of ``input_prefixes``; checks dtypes first."""
    inputs = [IndexedDataset(prefix) for prefix in input_prefixes]
    dtypes = {str(dataset.dtype) for dataset in inputs}
    if len(dtypes) > 1:
        listing = ", ".join(f"{dataset.path_prefix} ({dataset.dtype})" for dataset in inputs)
        raise IndexedDatasetError(
            f"cannot merge datasets with different token dtypes: {listing}; "
            f"re-run preprocessing with the same tokenizer for all of them"
        )
    with IndexedDatasetBuilder(output_prefix, inputs[0].dtype) as builder:
        for prefix in input_prefixes:
            builder.add_index(prefix)
    return IndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes (without .bin/.idx)")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    args = parser.parse_args(argv)
    if args.output_prefix in args.input:
        parser.error(f"--output-prefix {args.output_prefix} is also an input; choose a new prefix")
    try:
        merged = merge(args.input, args.output_prefix)
    except IndexedDatasetError as error:
        print(f"merge_datasets.py: error: {error}", file=sys.stderr)
        return 1
    print(f"merged {len(args.input)} datasets: {merged.num_documents} documents, {len(merged)} sequences, "
          f"{int(merged.sequence_lengths.sum())} tokens -> {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
