"""Packed supervised fine-tuning samples from conversation datasets (docs/design.md section 12).

Input: the two indexed datasets ``tools/preprocess_data.py --sft`` writes for an output prefix P,
``P_sft_tokens_document`` (token ids) and ``P_sft_loss_mask_document`` (uint8: 1 on the assistant's
tokens and their ``</s>``), one sequence per conversation, with identical lengths.

Packing. The conversations of a split are shuffled (numpy RandomState(seed + epoch), one
permutation per epoch, as many epochs as the run needs) and packed greedily in that order into
sequences of ``seq_length`` tokens: a conversation goes into the current sequence if it fits,
else it starts the next one; no conversation is split across sequences, and what is left of a
sequence is padding (token 0, loss mask 0). Within a conversation of n tokens t_0..t_{n-1} with
mask m: position i has input t_i, label t_{i+1} and loss mask m_{i+1} (the label is what carries
loss), and the last position has no label (mask 0). Position ids restart at 0 for each
conversation (and for the padding), which is also how the model finds the document boundaries
for its attention mask: a new document starts wherever the position id is 0.

Splits: the conversations are cut into contiguous train / valid / test ranges by ``data.split``
weights (as Megatron splits documents).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from megatron_aquila.data.indexed_dataset import IndexedDataset, IndexedDatasetError

logger = logging.getLogger("megatron_aquila")

SFT_TOKENS_SUFFIX = "_sft_tokens_document"
SFT_LOSS_MASK_SUFFIX = "_sft_loss_mask_document"
PAD_TOKEN_ID = 0  # Aquila's <|endoftext|>, its pad token


class SFTConversations:
    """The conversations of one or more preprocessed prefixes, addressed by one global index."""

    def __init__(self, prefixes: list[str], seq_length: int):
        self.tokens, self.masks = [], []
        for prefix in prefixes:
            tokens = IndexedDataset(prefix + SFT_TOKENS_SUFFIX)
            masks = IndexedDataset(prefix + SFT_LOSS_MASK_SUFFIX)
            if not np.array_equal(tokens.sequence_lengths, masks.sequence_lengths):
                raise IndexedDatasetError(
                    f"{prefix}{SFT_TOKENS_SUFFIX} and {prefix}{SFT_LOSS_MASK_SUFFIX} differ in sequence lengths "
                    f"({len(tokens)} vs {len(masks)} sequences): they come from different runs; preprocess again "
                    "with tools/preprocess_data.py --sft")
            longest = int(tokens.sequence_lengths.max()) if len(tokens) else 0
            if longest > seq_length:
                raise IndexedDatasetError(
                    f"{prefix}{SFT_TOKENS_SUFFIX} holds a conversation of {longest} tokens, longer than "
                    f"model.seq_length {seq_length}: preprocess with --seq-length {seq_length} (it truncates at a "
                    "turn boundary)")
            self.tokens.append(tokens)
            self.masks.append(masks)
        counts = [len(dataset) for dataset in self.tokens]
        self.starts = np.cumsum([0] + counts)  # global index of each prefix's first conversation
        self.lengths = np.concatenate([d.sequence_lengths.astype(np.int64) for d in self.tokens]) if counts else \
            np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [n], loss mask [n]) of conversation ``index``."""
        dataset = int(np.searchsorted(self.starts, index, side="right")) - 1
        local = index - int(self.starts[dataset])
        return self.tokens[dataset].get(local), self.masks[dataset].get(local)


def split_range(count: int, split: str, which: int) -> tuple[int, int]:
    """[start, end) of split ``which`` (0 train, 1 valid, 2 test) of ``count`` items by weights "a,b,c"."""
    weights = [float(w) for w in split.split(",")] + [0.0, 0.0]
    weights = weights[:3]
    total = sum(weights)
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + int(round(count * weight / total)))
    bounds[-1] = count
    return min(bounds[which], count), min(bounds[which + 1], count)


def pack_greedily(lengths: np.ndarray, seq_length: int) -> list[int]:
    """Start offsets (into ``lengths``) of each packed sequence, plus the end: consecutive items go
    into one sequence while their total fits ``seq_length`` (module docstring)."""
    bounds, used = [0], 0
    for index, length in enumerate(lengths.tolist()):
        if used + length > seq_length:
            bounds.append(index)
            used = 0
        used += length
    bounds.append(len(lengths))
    return bounds


class PackedSFTDataset(torch.utils.data.Dataset):
    """``num_samples`` packed sequences of the conversations [start, end) (module docstring); exactly
    the first epoch's sequences when ``num_samples`` is None."""

    def __init__(self, conversations: SFTConversations, start: int, end: int, seq_length: int,
                 num_samples: int | None, seed: int):
        if end <= start:
            raise ValueError(f"no conversations in this split (conversations [{start}, {end}) of "
                             f"{len(conversations)}): change data.split or add data")
        self.conversations, self.seq_length = conversations, seq_length
        order, packs = [], []
        self.packs_per_epoch: list[int] = []
        while not order or (num_samples is not None and len(packs) < num_samples):
            epoch, base = len(order), len(order) * (end - start)
            permutation = start + np.random.RandomState(seed + epoch).permutation(end - start)
            bounds = pack_greedily(conversations.lengths[permutation], seq_length)
            packs += [(base + a, base + b) for a, b in zip(bounds[:-1], bounds[1:])]
            self.packs_per_epoch.append(len(bounds) - 1)
            order.append(permutation)
        self.order = np.concatenate(order)
        self.packs = packs[:num_samples]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.seq_length
        tokens = np.full(s, PAD_TOKEN_ID, dtype=np.int64)
        labels = np.full(s, PAD_TOKEN_ID, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        at = 0
        first, last = self.packs[index]
        for conversation in self.order[first:last]:
            ids, mask = self.conversations.get(int(conversation))
            n = len(ids)
            tokens[at:at + n] = ids
            labels[at:at + n - 1] = ids[1:]
            loss_mask[at:at + n - 1] = mask[1:]
            position_ids[at:at + n] = np.arange(n)
            at += n
        position_ids[at:] = np.arange(s - at)  # the padding is a document of its own
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids)}


def build_sft_datasets(prefixes: list[str], seq_length: int, split: str, seed: int,
                       num_samples: tuple[int, int]) -> tuple[PackedSFTDataset, PackedSFTDataset | None]:
    """(train, valid or None) packed datasets of ``num_samples`` = (train, valid) sequences."""
    conversations = SFTConversations(prefixes, seq_length)
    start, end = split_range(len(conversations), split, 0)
    train = PackedSFTDataset(conversations, start, end, seq_length, num_samples[0], seed)
    tokens, first_epoch = int(conversations.lengths[start:end].sum()), train.packs_per_epoch[0]
    logger.info(f"SFT data: {end - start:,} train conversations, {tokens:,} tokens packed into {first_epoch:,} "
                f"sequences of {seq_length} per epoch ({tokens / (first_epoch * seq_length):.1%} of positions hold "
                f"tokens); {len(train):,} sequences = {len(train.packs_per_epoch)} epoch(s) for this run")
    valid = None
    if num_samples[1]:
        valid = PackedSFTDataset(conversations, *split_range(len(conversations), split, 1), seq_length,
                                 num_samples[1], seed + 1)
    return train, valid
