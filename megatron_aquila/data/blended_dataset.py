"""Weighted blends of GPTDatasets (Megatron-LM's BlendedDataset semantics).

Blend sample ``k`` comes from dataset ``argmax_i (w_i * max(k, 1) - count_i)`` and is that
dataset's ``count_i``-th sample (C++ greedy, ``helpers.build_blending_indices``). To be sure a
dataset never runs out, dataset ``i`` of a blend asked for ``N`` samples is built with
``ceil(ceil(w_i * N) * 1.005)`` samples and the blend has ``sum_i ceil(w_i * N)`` samples (N up to
N + datasets - 1), exactly as megatron-core sizes them (tests/test_megatron_compat.py), so the
members' epochs and hence the sample stream are Megatron's. Without weights the datasets are blended in proportion to
their lengths, exhaustively (every sample once) when no size is asked.

The two index arrays are cached like GPTDataset's (md5 of a JSON description; one builder rank,
a barrier, every rank memory-maps them).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megatron_aquila.data.gpt_dataset import (
    SPLIT_NAMES,
    GPTDataset,
    GPTDatasetConfig,
    IndexCache,
    MapsCachedIndices,
    build_gpt_datasets,
    build_or_load,
)
from megatron_aquila.data.helpers import build_blending_indices, build_exhaustive_blending_indices
from megatron_aquila.data.indexed_dataset import IndexedDataset

SIZE_SURPLUS = 0.005
"""Extra fraction of samples built per blended dataset (Megatron-LM's 1.005 margin)."""


def parse_blend(blend: Sequence[str]) -> tuple[list[str], Optional[list[float]]]:
    """Megatron-style blend list -> (prefixes, normalized weights or None).

    ``["0.3", "prefixA", "0.7", "prefixB"]`` gives weights [0.3, 0.7]; ``["prefixA", "prefixB"]``
    (no numbers) gives equal treatment (weights None: blend by dataset length).
    """
    entries = [str(entry).strip() for entry in blend]
    if not entries or any(not entry for entry in entries):
        raise ValueError(f"data blend {list(blend)!r} must be a non-empty list of prefixes, "
                         f"or of alternating weight and prefix, e.g. ['0.3', 'pathA', '0.7', 'pathB']")
    numeric = [_as_number(entry) is not None for entry in entries]
    if not any(numeric):
        return entries, None
    if len(entries) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        bad = next((i for i in range(len(entries)) if numeric[i] != (i % 2 == 0)), len(entries) - 1)
        raise ValueError(
            f"data blend entry {bad} ({entries[bad]!r}) breaks the weight, prefix, weight, prefix ... pattern of "
            f"{entries!r} (an even number of entries); write e.g. ['0.3', 'pathA', '0.7', 'pathB'], or prefixes only"
        )
    weights = [_as_number(entry) for entry in entries[0::2]]
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ValueError(f"data blend weights {weights} must be finite and > 0; drop the entries you do not want")
    total = sum(weights)
    return entries[1::2], [w / total for w in weights]


def _as_number(entry: str) -> Optional[float]:
    try:
        return float(entry)
    except ValueError:
        return None


def surplus_sizes(weights: Sequence[float], size: int) -> list[int]:
    """Samples to build per dataset for a blend asked for ``size``: ``ceil(ceil(w_i * size) * 1.005)``."""
    return [int(math.ceil(math.ceil(weight * size) * (1 + SIZE_SURPLUS))) for weight in weights]


class BlendedDataset(MapsCachedIndices, torch.utils.data.Dataset):
    """Samples of ``datasets`` interleaved by ``weights``.

    Args:
        datasets: the blended datasets (GPTDatasets).
        weights: normalized weights; None blends in proportion to ``len(dataset)``.
        size: blend length; None (only without weights) uses every sample of every dataset once.
        cache_dir: where the indices are cached; None builds them in memory.
        is_builder, barrier: as for GPTDataset.
    """

    def __init__(
        self,
        datasets: Sequence[GPTDataset],
        weights: Optional[Sequence[float]],
        size: Optional[int],
        cache_dir: Optional[str] = None,
        is_builder: bool = True,
        barrier: Optional[Callable[[], None]] = None,
    ):
        self.datasets = list(datasets)
        lengths = [len(dataset) for dataset in self.datasets]
        if weights is None:
            weights = [length / sum(lengths) for length in lengths]
            size = None if size is None else min(size, sum(lengths))
            exhaustive = size is None
        else:
            if len(weights) != len(self.datasets):
                raise ValueError(f"{len(weights)} weights for {len(self.datasets)} datasets; give one weight each")
            if size is None:
                raise ValueError("a weighted blend needs a size (number of samples)")
            exhaustive = False
        self.weights = [float(w) for w in weights]
        self.size = size
        self.lengths = lengths
        self.exhaustive = exhaustive
        description = {
            "class": "BlendedDataset",
            "datasets": [_describe(dataset) for dataset in self.datasets],
            "weights": None if exhaustive else self.weights,
            "lengths": lengths,
            "size": size,
        }
        names = ("dataset_index", "dataset_sample_index")
        self.cache = None if cache_dir is None else IndexCache(cache_dir, "BlendedDataset", description, names)
        arrays = build_or_load(self.cache, self._build_indices, is_builder, barrier)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def _build_indices(self) -> dict[str, np.ndarray]:
        if self.exhaustive:
            dataset_index, dataset_sample_index = build_exhaustive_blending_indices(self.lengths)
        else:
            dataset_index, dataset_sample_index = build_blending_indices(self.weights, self.size)
        used = np.bincount(dataset_index, minlength=len(self.datasets))
        for i, (count, length) in enumerate(zip(used, self.lengths)):
            if count > length:
                raise ValueError(
                    f"the blend takes {count} samples of dataset {i} but it has only {length}; "
                    f"build it with at least ceil(ceil(weight * size) * {1 + SIZE_SURPLUS}) samples"
                )
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def __len__(self) -> int:
        return self.dataset_index.shape[0]

    def sample_documents(self, idx: int) -> list[tuple[str, list[int]]]:
        """The documents sample ``idx`` reads, from the dataset the blend drew it from (``GPTDataset``)."""
        return self.datasets[int(self.dataset_index[idx])].sample_documents(int(self.dataset_sample_index[idx]))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a BlendedDataset of {len(self)} samples")
        dataset = int(self.dataset_index[idx])
        return self.datasets[dataset][int(self.dataset_sample_index[idx])]


def _describe(dataset: GPTDataset) -> object:
    """A member's identity in the blend description: its cache key, or its defining fields."""
    if dataset.cache is not None:
        return dataset.cache.hash
    return {"path_prefix": dataset.dataset.path_prefix, "split": dataset.split_name, "length": len(dataset),
            "seed": dataset.config.seed}


def build_blended_gpt_datasets(
    blend: Sequence[str],
    num_samples_per_split: list[Optional[int]],
    config: GPTDatasetConfig,
    is_builder: bool = True,
    barrier: Optional[Callable[[], None]] = None,
) -> list[Optional[torch.utils.data.Dataset]]:
    """Train, valid and test datasets of a Megatron-style ``blend`` cut by ``config.split``.

    One prefix without weight gives plain GPTDatasets. Otherwise each prefix gives GPTDatasets of
    ``ceil(ceil(w_i * N) * 1.005)`` samples per split (one epoch when unweighted), blended into
    ``sum_i ceil(w_i * N)`` samples with ``N = num_samples_per_split[split]`` (megatron-core's sizing).
    """
    prefixes, weights = parse_blend(blend)
    if len(prefixes) == 1 and weights is None:
        return build_gpt_datasets(IndexedDataset(prefixes[0]), num_samples_per_split, config, is_builder, barrier)
    per_prefix = []
    for i, prefix in enumerate(prefixes):
        if weights is None:
            sizes = [None if n != 0 else 0 for n in num_samples_per_split]
        else:
            sizes = [None if n is None else (0 if n == 0 else surplus_sizes([weights[i]], n)[0])
                     for n in num_samples_per_split]
        per_prefix.append(build_gpt_datasets(IndexedDataset(prefix), sizes, config, is_builder, barrier))
    blended: list[Optional[torch.utils.data.Dataset]] = []
    for split_number, split_name in enumerate(SPLIT_NAMES):
        members = [datasets[split_number] for datasets in per_prefix]
        if all(member is None for member in members):
            blended.append(None)
            continue
        if any(member is None for member in members):
            missing = [prefix for prefix, member in zip(prefixes, members) if member is None]
            raise ValueError(f"the {split_name} split is empty for {missing}; change the split {config.split!r}")
        size = num_samples_per_split[split_number]
        if weights is not None and size is not None:
            size = sum(math.ceil(weight * size) for weight in weights)
        blended.append(BlendedDataset(members, weights, size, config.cache_dir, is_builder, barrier))
    return blended
