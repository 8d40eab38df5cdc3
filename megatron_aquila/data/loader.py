"""Micro-batch streams for training and validation, from the recipe's data section.

Every rank of a data-parallel replica (its TP, CP and PP ranks) reads the same micro-batches from
the memory-mapped dataset; the sampler slices each global step by data-parallel rank, and a
context-parallel rank keeps its two chunks of every sample's tokens, labels, loss mask and
position ids (``parallel/context_parallel.py``). With packed SFT data (``data.sft``) each micro-batch
also carries ``documents``: the documents of its whole rows [b, S] (``find_documents``), found from
the position ids on the host before the CP split and the copy to the device, so per-document
attention learns them with no device read (``model/packed_attention.py``, "Host syncs"). The train
stream restarts exactly at a consumed-samples count. Validation reads the same first
``eval_iters`` global batches of the valid split at every evaluation, so values are comparable.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_aquila.config import Config
from megatron_aquila.data.blended_dataset import build_blended_gpt_datasets
from megatron_aquila.data.gpt_dataset import GPTDatasetConfig
from megatron_aquila.data.sft_dataset import build_sft_datasets
from megatron_aquila.data.sampler import MicroBatchSampler, collate_samples
from megatron_aquila.model.packed_attention import find_documents
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.context_parallel import split_batch
from megatron_aquila.parallel.pipeline.schedules import Microbatch

StreamFactory = Callable[[int], Iterator[Microbatch]]
SampleSources = Callable[[int], str]  # train-dataset sample index -> where its tokens come from


class MockGPTDataset(torch.utils.data.Dataset):
    """Synthetic samples, a pure function of (seed, index): for tests, benchmarks and planning runs.

    Each sample is an arithmetic progression modulo the vocabulary with a random start and a
    random stride in [1, 8], so a model can learn it and the loss visibly falls.
    """

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start, stride = torch.randint(0, self.vocab_size, (1,), generator=generator), torch.randint(1, 9, (1,), generator=generator)
        text = (start + stride * torch.arange(self.seq_length + 1)) % self.vocab_size
        return {
            "tokens": text[:-1], "labels": text[1:],
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
        }


def micro_batch_stream(dataset: torch.utils.data.Dataset, consumed: int, config: Config, ctx: ParallelContext,
                       num_workers: int) -> Iterator[Microbatch]:
    """This rank's micro-batches of ``dataset`` from global sample ``consumed`` on (module docstring)."""
    sampler = MicroBatchSampler(len(dataset), consumed, config.training.micro_batch_size, ctx.dp_rank, ctx.dp_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples,
                                         num_workers=num_workers, pin_memory=ctx.device.type == "cuda",
                                         persistent_workers=False)
    for batch in loader:
        documents = find_documents(batch["position_ids"]) if config.data.sft else None  # whole rows, on the host
        batch = split_batch(batch, ctx.cp_rank, ctx.cp_size)  # [b, S] -> [b, S / cp] each
        batch = {key: value.to(ctx.device, non_blocking=True) for key, value in batch.items()}
        yield batch if documents is None else {**batch, "documents": documents}


def sample_sources(dataset: torch.utils.data.Dataset) -> SampleSources:
    """Describe a train sample by its source documents (``prefix:doc,doc``) where the dataset knows them
    (indexed corpora and their blends), else by its index alone (mock data, packed SFT)."""
    def describe(index: int) -> str:
        if not hasattr(dataset, "sample_documents"):
            return f"sample {index}"
        sources = "; ".join(f"{prefix} documents {', '.join(map(str, documents))}"
                            for prefix, documents in dataset.sample_documents(index))
        return f"sample {index} ({sources})"
    return describe


def build_streams(config: Config, ctx: ParallelContext, train_samples: int
                  ) -> tuple[StreamFactory, Optional[StreamFactory], SampleSources]:
    """(train stream from a consumed count, valid stream or None, the train samples' sources) for this rank."""
    t = config.training
    valid_samples = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    if config.data.sft:
        train, valid = build_sft_datasets([str(entry) for entry in config.data.data_path], config.model.seq_length,
                                          config.data.split, t.seed, (train_samples, valid_samples))
    elif config.data.mock:
        vocab = config.model.vocab_size
        train = MockGPTDataset(train_samples, config.model.seq_length, vocab, t.seed)
        valid = MockGPTDataset(valid_samples, config.model.seq_length, vocab, t.seed + 1) if valid_samples else None
    else:
        prefixes = [entry for entry in config.data.data_path if isinstance(entry, str)]
        cache_dir = config.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
        dataset_config = GPTDatasetConfig(seq_length=config.model.seq_length, seed=t.seed, split=config.data.split,
                                          cache_dir=cache_dir)
        barrier = (lambda: dist.barrier()) if dist.is_initialized() else None
        train, valid, _ = build_blended_gpt_datasets(
            [str(entry) for entry in config.data.data_path], [train_samples, valid_samples or 0, 0],
            dataset_config, is_builder=ctx.rank == 0, barrier=barrier)
        if train is None:
            raise ValueError(f"the train split of {config.data.data_path} is empty (split {config.data.split!r})")
    workers = config.data.num_workers

    def train_stream(consumed: int) -> Iterator[Microbatch]:
        return micro_batch_stream(train, consumed, config, ctx, workers)

    def valid_stream(consumed: int) -> Iterator[Microbatch]:
        return micro_batch_stream(valid, consumed, config, ctx, 0)

    return train_stream, (valid_stream if valid is not None else None), sample_sources(train)
