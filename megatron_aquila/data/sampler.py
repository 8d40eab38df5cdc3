"""Consumed-samples micro-batch sampler and collate function (Megatron's pretraining sampler).

The sample stream is ``consumed_samples, consumed_samples + 1, ..., total_samples - 1`` in
order (the dataset's shuffle index already randomizes it). It is cut into global steps of
``micro_batch_size * data_parallel_size`` indices; data-parallel rank ``r`` takes slice
``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of each step. Training resumes exactly by
restarting the sampler at the checkpoint's consumed-samples count.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


class MicroBatchSampler:
    """Batch sampler yielding this DP rank's micro-batches of dataset indices.

    Args:
        total_samples: length of the sample stream (usually ``len(dataset)``).
        consumed_samples: samples all DP ranks together already consumed (resume point); a
            multiple of ``micro_batch_size * data_parallel_size`` when resuming from a training run.
        micro_batch_size: samples per micro-batch on one rank.
        data_parallel_rank, data_parallel_size: this rank's place in the data-parallel group.
        drop_last: drop the final incomplete global step (otherwise each rank gets its slice of
            it, possibly short or empty).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ):
        if total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {total_samples}: the dataset is empty")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} must be in [0, total_samples={total_samples}); "
                f"the dataset is exhausted: build it with more samples (train_samples / train_iters)"
            )
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} must be in [0, data_parallel_size="
                             f"{data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last
        self.global_step_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full_steps, tail = divmod(remaining, self.global_step_size)
        begin = self.data_parallel_rank * self.micro_batch_size
        return full_steps + int(not self.drop_last and tail > begin)

    def __iter__(self) -> Iterator[list[int]]:
        begin = self.data_parallel_rank * self.micro_batch_size
        end = begin + self.micro_batch_size
        step_start = self.consumed_samples
        while step_start + self.global_step_size <= self.total_samples:
            yield list(range(step_start + begin, step_start + end))
            step_start += self.global_step_size
        if not self.drop_last:
            tail = list(range(step_start, self.total_samples))[begin:end]
            if tail:
                yield tail


def collate_samples(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample tensors (``tokens [s]`` ...) into a batch (``tokens [b, s]`` ...)."""
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    keys = samples[0].keys()
    for number, sample in enumerate(samples):
        if sample.keys() != keys:
            raise ValueError(f"sample {number} has keys {sorted(sample.keys())}, sample 0 has {sorted(keys)}")
    return {key: torch.stack([sample[key] for sample in samples]) for key in keys}
