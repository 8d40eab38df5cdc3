"""GPT pretraining samples over an IndexedDataset: document, sample and shuffle indices.

Same inputs and seed give the same sample stream as Megatron-LM core's GPTDataset
(docs/design.md section 5):

- ``num_epochs`` = smallest E with ``E * tokens_per_epoch >= num_samples * seq_length + 1``.
- document index: the split's document ids tiled E times (int32), shuffled with
  ``numpy.random.RandomState(seed)``; when the last epoch would supply fewer than 80% of an
  epoch's samples, the first E - 1 epochs and the last one are shuffled separately.
- sample index: built in C++ (``helpers.build_sample_index``).
- shuffle index: ``arange(num_samples)`` shuffled by the same RandomState; two ranges
  (``[0, samples of the first E - 1 epochs)`` and the rest) when the last epoch is separate.

Sample ``i`` is ``seq_length + 1`` tokens of the concatenated documents; tokens = text[:-1],
labels = text[1:]. A "document" here is one sequence of the indexed dataset (one JSON document
of the preprocessed corpus), which is also the unit the split string divides.

The three arrays are cached as ``.npy`` files named by the md5 of a JSON description of all the
parameters that define them; one rank (``is_builder``) writes them, every rank waits at
``barrier`` and memory-maps them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from megatron_aquila.data.helpers import build_sample_index
from megatron_aquila.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


@dataclass
class GPTDatasetConfig:
    """How samples are cut from the documents."""

    seq_length: int
    """Tokens per sample fed to the model (each sample reads seq_length + 1 tokens)."""
    seed: int = 1234
    """Seed of the numpy RandomState that shuffles documents and samples."""
    split: str = "969,30,1"
    """Train,valid,test weights over the documents, e.g. "949,50,1"; normalized; missing ones are 0."""
    cache_dir: Optional[str] = None
    """Directory of the cached index .npy files (shared by all ranks); None builds in memory."""
    eod_mask_loss: bool = False
    """Set the loss mask to 0 where the input token is the end-of-document token."""
    eod_token_id: Optional[int] = None
    """End-of-document token id; required when eod_mask_loss is set (Aquila2: 100007)."""
    add_extra_token_to_sequence: bool = True
    """Read seq_length + 1 tokens so tokens and labels both have seq_length (Megatron default)."""
    drop_last_partial_validation_sequence: bool = True
    """Drop the final short sample of the valid split (train always drops it)."""

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"data seq_length must be >= 1, got {self.seq_length}")
        if self.eod_mask_loss and self.eod_token_id is None:
            raise ValueError("data eod_mask_loss is set but eod_token_id is None; set eod_token_id (Aquila2: 100007)")
        parse_split(self.split)


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` -> normalized ``[0.949, 0.05, 0.001]`` (train, valid, test)."""
    parts = [part.strip() for part in split.replace("/", ",").split(",")]
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"split {split!r} must be up to 3 comma-separated numbers, e.g. '949,50,1'") from None
    if not 1 <= len(weights) <= 3 or any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split {split!r} must be 1 to 3 non-negative numbers with a positive sum, e.g. '949,50,1'")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_document_ranges(split: str, num_documents: int) -> list[Optional[tuple[int, int]]]:
    """Document id range ``[begin, end)`` of train, valid and test (None for a zero weight).

    Bounds are ``round(cumulative_fraction * num_documents)``, so the ranges are disjoint and
    together cover every document.
    """
    bounds = np.concatenate(([0.0], np.cumsum(parse_split(split))))
    ranges: list[Optional[tuple[int, int]]] = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        if end <= begin:
            ranges.append(None)
        else:
            ranges.append((int(round(begin * num_documents)), int(round(end * num_documents))))
    return ranges


class IndexCache:
    """Arrays stored as ``{cache_dir}/{md5}-{kind}-{name}.npy`` with a ``description.json`` beside them."""

    def __init__(self, cache_dir: str, kind: str, description: dict, names: tuple[str, ...]):
        self.cache_dir = cache_dir
        self.description = json.dumps(description, indent=2, sort_keys=True)
        self.hash = hashlib.md5(self.description.encode("utf-8")).hexdigest()
        self.kind = kind
        self.names = names

    def path(self, name: str) -> str:
        return os.path.join(self.cache_dir, f"{self.hash}-{self.kind}-{name}")

    def is_complete(self) -> bool:
        # The description is written last, so its presence means every array is complete.
        return os.path.isfile(self.path("description.json"))

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        for name in self.names:
            self._write(name + ".npy", lambda handle, array=arrays[name]: np.save(handle, array, allow_pickle=False))
        self._write("description.json", lambda handle: handle.write(self.description.encode("utf-8")))

    def _write(self, file_name: str, write: Callable) -> None:
        final = self.path(file_name)
        temporary = f"{final}.tmp{os.getpid()}"
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, final)

    def load(self) -> dict[str, np.ndarray]:
        return {name: np.load(self.path(name + ".npy"), mmap_mode="r", allow_pickle=False) for name in self.names}


class MapsCachedIndices:
    """Pickles without the index arrays held in ``self.cache``: a DataLoader worker memory-maps
    the cached files again instead of receiving copies of them."""

    cache: Optional[IndexCache]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.cache is not None:
            for name in self.cache.names:
                del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.cache is not None:
            self.__dict__.update(self.cache.load())


def build_or_load(
    cache: Optional[IndexCache],
    build: Callable[[], dict[str, np.ndarray]],
    is_builder: bool,
    barrier: Optional[Callable[[], None]],
) -> dict[str, np.ndarray]:
    """Build the arrays (no cache), or: the builder writes a missing cache, all meet at ``barrier``, all load."""
    if cache is None:
        return build()
    if is_builder and not cache.is_complete():
        cache.save(build())
    if barrier is not None:
        barrier()
    if not cache.is_complete():
        raise RuntimeError(
            f"cached {cache.kind} indices {cache.path('*')} are missing after the barrier: the builder rank "
            f"must write them to a cache_dir every rank can read (use shared storage, or pass is_builder=True "
            f"on one rank per file system)"
        )
    return cache.load()


def num_epochs_for(num_samples: int, seq_length: int, tokens_per_epoch: int, extra: int) -> int:
    """Smallest E >= 1 with E * tokens_per_epoch >= num_samples * seq_length + extra."""
    needed = num_samples * seq_length + extra
    return max(1, -(-needed // tokens_per_epoch))


class GPTDataset(MapsCachedIndices, torch.utils.data.Dataset):
    """Fixed-length samples from documents ``document_ids`` of ``indexed_dataset``.

    Args:
        indexed_dataset: the tokenized corpus.
        document_ids: this split's document (sequence) ids, e.g. ``arange(begin, end)``.
        num_samples: samples wanted; the dataset has at least that many. None means one epoch.
        split_name: "train", "valid" or "test" (valid may keep its last partial sample).
        config: sample shape, seed, cache directory.
        is_builder: this rank writes missing cache files (one rank per file system).
        barrier: called on every rank between building and loading the cache (e.g.
            ``lambda: torch.distributed.barrier(group)``); None for a single process.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        document_ids: np.ndarray,
        num_samples: Optional[int],
        split_name: str,
        config: GPTDatasetConfig,
        is_builder: bool = True,
        barrier: Optional[Callable[[], None]] = None,
    ):
        if split_name not in SPLIT_NAMES:
            raise ValueError(f"split_name must be one of {SPLIT_NAMES}, got {split_name!r}")
        self.dataset = indexed_dataset
        self.config = config
        self.split_name = split_name
        self.document_ids = np.asarray(document_ids, dtype=np.int32)
        if self.document_ids.ndim != 1 or self.document_ids.size == 0:
            raise ValueError(f"{split_name} split of {indexed_dataset.path_prefix} has no documents; "
                             f"change the split {config.split!r} or use a larger dataset")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or None (one epoch), got {num_samples}")
        self.num_samples = num_samples
        self.extra = int(config.add_extra_token_to_sequence)
        self.tokens_per_epoch = int(np.sum(indexed_dataset.sequence_lengths[self.document_ids], dtype=np.int64))
        if self.tokens_per_epoch < config.seq_length + self.extra:
            raise ValueError(
                f"{split_name} split of {indexed_dataset.path_prefix} has {self.tokens_per_epoch} tokens, fewer "
                f"than one sample of {config.seq_length + self.extra}; use more data or a shorter seq_length"
            )
        description = {
            "class": "GPTDataset",
            "path_prefix": indexed_dataset.path_prefix,
            "num_sequences": len(indexed_dataset),
            "split": split_name,
            "num_documents": int(self.document_ids.size),
            "document_ids_md5": hashlib.md5(self.document_ids.tobytes()).hexdigest(),
            "tokens_per_epoch": self.tokens_per_epoch,
            "num_samples": num_samples,
            "seq_length": config.seq_length,
            "seed": config.seed,
            "add_extra_token_to_sequence": config.add_extra_token_to_sequence,
            "drop_last_partial_sequence": self._drop_last_partial_sequence(),
        }
        names = ("document_index", "sample_index", "shuffle_index")
        cache = None if config.cache_dir is None else IndexCache(config.cache_dir, "GPTDataset", description, names)
        self.cache = cache
        arrays = build_or_load(cache, self._build_indices, is_builder, barrier)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _drop_last_partial_sequence(self) -> bool:
        return self.split_name != "valid" or self.config.drop_last_partial_validation_sequence

    def _build_indices(self) -> dict[str, np.ndarray]:
        seq_length, extra, tokens_per_epoch = self.config.seq_length, self.extra, self.tokens_per_epoch
        num_epochs = 1
        if self.num_samples is not None:
            num_epochs = num_epochs_for(self.num_samples, seq_length, tokens_per_epoch, extra)
        separate_final_epoch = False
        samples_before_final_epoch = 0
        if num_epochs > 1:
            samples_before_final_epoch = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
            samples_from_final_epoch = self.num_samples - samples_before_final_epoch
            samples_per_epoch = (tokens_per_epoch - extra) // seq_length
            assert 0 <= samples_from_final_epoch <= samples_per_epoch + 1, (
                f"final epoch supplies {samples_from_final_epoch} samples, outside [0, {samples_per_epoch + 1}]"
            )
            separate_final_epoch = samples_from_final_epoch < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)

        random_state = np.random.RandomState(self.config.seed)
        if separate_final_epoch:
            document_index = np.concatenate([
                shuffled_documents(self.document_ids, num_epochs - 1, random_state),
                shuffled_documents(self.document_ids, 1, random_state),
            ])
        else:
            document_index = shuffled_documents(self.document_ids, num_epochs, random_state)

        sample_index = build_sample_index(
            self.dataset.sequence_lengths, document_index, seq_length, num_epochs, tokens_per_epoch,
            self._drop_last_partial_sequence(), self.config.add_extra_token_to_sequence,
        )
        total = sample_index.shape[0] - 1
        first_range = samples_before_final_epoch if separate_final_epoch else total
        shuffle_index = shuffled_range(first_range, total, random_state)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_documents(self, idx: int) -> list[tuple[str, list[int]]]:
        """[(the indexed dataset's path prefix, ids of the documents sample ``idx`` reads)]: where a bad
        sample comes from (a skipped step names them, ``trainer.py``)."""
        position = int(self.shuffle_index[idx])
        begin_document, end_document = int(self.sample_index[position][0]), int(self.sample_index[position + 1][0])
        documents = [int(self.document_index[d]) for d in range(begin_document, end_document + 1)]
        return [(self.dataset.path_prefix, documents)]

    def sample_text(self, idx: int) -> tuple[np.ndarray, int]:
        """Tokens of sample ``idx`` (int64, ``seq_length + extra`` long) and how many are real (not padding)."""
        position = int(self.shuffle_index[idx])
        begin_document, begin_offset = (int(v) for v in self.sample_index[position])
        end_document, end_offset = (int(v) for v in self.sample_index[position + 1])
        parts = []
        for document in range(begin_document, end_document + 1):
            offset = begin_offset if document == begin_document else 0
            length = end_offset + self.extra - offset if document == end_document else None
            parts.append(self.dataset.get(int(self.document_index[document]), offset=offset, length=length))
        text = np.concatenate(parts).astype(np.int64)
        real_tokens = text.shape[0]
        wanted = self.config.seq_length + self.extra
        if real_tokens < wanted:  # the kept last partial sample of a valid split
            text = np.concatenate([text, np.zeros(wanted - real_tokens, dtype=np.int64)])
        return text, real_tokens

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a GPTDataset of {len(self)} samples")
        text, real_tokens = self.sample_text(int(idx) % len(self))
        text = torch.from_numpy(text)
        seq_length = self.config.seq_length
        if self.extra:
            tokens, labels = text[:-1].contiguous(), text[1:].contiguous()  # [s], [s]
            real_labels = real_tokens - 1
        else:
            tokens, labels = text, torch.roll(text, shifts=-1)
            labels[-1] = 0
            real_labels = real_tokens - 1  # the last token has no label
        loss_mask = torch.ones(seq_length, dtype=torch.float32)  # [s]
        loss_mask[real_labels:] = 0.0
        if self.config.eod_mask_loss:
            loss_mask[tokens == self.config.eod_token_id] = 0.0
        position_ids = torch.arange(seq_length, dtype=torch.int64)  # [s]
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def shuffled_documents(document_ids: np.ndarray, num_epochs: int, random_state: np.random.RandomState) -> np.ndarray:
    """``document_ids`` tiled ``num_epochs`` times as int32, shuffled in place by ``random_state``."""
    document_index = np.tile(document_ids, num_epochs).astype(np.int32)
    random_state.shuffle(document_index)
    return document_index


def shuffled_range(first_range: int, total: int, random_state: np.random.RandomState) -> np.ndarray:
    """``[0, first_range)`` shuffled, followed by ``[first_range, total)`` shuffled (Megatron's dtypes)."""
    dtype = np.int64 if total >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(first_range, dtype=dtype)
    random_state.shuffle(first)
    if first_range == total:
        return first
    last = np.arange(first_range, total, dtype=dtype)
    random_state.shuffle(last)
    return np.concatenate([first, last])


def build_gpt_datasets(
    indexed_dataset: IndexedDataset,
    num_samples_per_split: list[Optional[int]],
    config: GPTDatasetConfig,
    is_builder: bool = True,
    barrier: Optional[Callable[[], None]] = None,
) -> list[Optional[GPTDataset]]:
    """Train, valid and test GPTDatasets of one indexed dataset cut by ``config.split``.

    A split is None when it has no documents or 0 samples are asked of it; None samples means one epoch.
    """
    if len(num_samples_per_split) != 3:
        raise ValueError(f"num_samples_per_split needs 3 entries (train, valid, test), got {num_samples_per_split}")
    datasets: list[Optional[GPTDataset]] = []
    for name, bounds, num_samples in zip(SPLIT_NAMES, split_document_ranges(config.split, len(indexed_dataset)),
                                         num_samples_per_split):
        if bounds is None or bounds[1] <= bounds[0] or num_samples == 0:
            datasets.append(None)
            continue
        document_ids = np.arange(bounds[0], bounds[1], dtype=np.int32)
        datasets.append(GPTDataset(indexed_dataset, document_ids, num_samples, name, config, is_builder, barrier))
    return datasets
