"""Time the GPTDataset index builds on a synthetic corpus (no .bin needed, only document sizes).

    python benchmarks/bench_index_build.py [--tokens 1e9] [--seq-length 4096] [--epochs 1]

(with the package installed, `pip install -e .`, or `PYTHONPATH=.` from the repository root)

Document lengths are drawn from a fixed log-normal distribution (median ~600 tokens, long tail,
clipped to [1, 200000]); the indices are built the way GPTDataset builds them (same functions).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from megatron_aquila.data.gpt_dataset import num_epochs_for, shuffled_documents, shuffled_range
from megatron_aquila.data.helpers import build_sample_index


def synthetic_sizes(total_tokens: int, seed: int = 0) -> np.ndarray:
    """int32 document lengths summing to about ``total_tokens``."""
    rng = np.random.default_rng(seed)
    mean = float(np.exp(6.4 + 1.2 ** 2 / 2))  # mean of the log-normal below
    sizes = rng.lognormal(6.4, 1.2, size=int(total_tokens / mean * 1.05))
    sizes = np.clip(sizes, 1, 200_000).astype(np.int32)
    cut = int(np.searchsorted(np.cumsum(sizes, dtype=np.int64), total_tokens)) + 1
    return sizes[:cut]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--epochs", type=float, default=1.0, help="samples requested, in epochs")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    sizes = synthetic_sizes(int(args.tokens))
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    samples_per_epoch = (tokens_per_epoch - 1) // args.seq_length
    num_samples = max(1, int(args.epochs * samples_per_epoch))
    num_epochs = num_epochs_for(num_samples, args.seq_length, tokens_per_epoch, 1)
    print(f"corpus: {len(sizes):,} documents, {tokens_per_epoch:,} tokens (mean {sizes.mean():.0f}, "
          f"max {sizes.max():,}); seq_length {args.seq_length}; {num_samples:,} samples, {num_epochs} epoch(s)")

    random_state = np.random.RandomState(args.seed)
    document_ids = np.arange(len(sizes), dtype=np.int32)
    start = time.perf_counter()
    document_index = shuffled_documents(document_ids, num_epochs, random_state)
    document_seconds = time.perf_counter() - start

    start = time.perf_counter()
    sample_index = build_sample_index(sizes, document_index, args.seq_length, num_epochs, tokens_per_epoch)
    sample_seconds = time.perf_counter() - start

    total = sample_index.shape[0] - 1
    start = time.perf_counter()
    shuffle_index = shuffled_range(total, total, random_state)
    shuffle_seconds = time.perf_counter() - start

    print(f"document index: {document_seconds * 1e3:9.1f} ms  ({document_index.size:,} entries, {document_index.dtype})")
    print(f"sample index  : {sample_seconds * 1e3:9.1f} ms  ({sample_index.shape[0]:,} x 2, {sample_index.dtype}, C++)")
    print(f"shuffle index : {shuffle_seconds * 1e3:9.1f} ms  ({shuffle_index.size:,} entries, {shuffle_index.dtype})")


if __name__ == "__main__":
    main()
