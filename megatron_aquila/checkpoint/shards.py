"""Rank-local pieces of global tensors as torch.distributed.checkpoint chunks (no gathering).

A checkpoint stores every tensor under its *global* (TP1) shape, so any layout can read it. A
rank holds only part of each global tensor:

- tensor parallelism: the TP-local tensor ``L`` of shape ``(d_0, ..., d_{n-1})`` is the slab
  ``[t * d_k, (t + 1) * d_k)`` along the partition dim ``k`` of the global tensor on TP rank ``t``
  (the TP1 tensor split into TP equal parts along ``k``); a replicated tensor is the whole of it;
- ZeRO-1: a DP rank owns the flat range ``[lo, hi)`` of ``L`` (row-major), a piece of a grad
  bucket shard that need not start or end on a row.

A flat range of a row-major tensor is a union of *boxes*, each contiguous in memory and each a
rectangular chunk of ``L``. With ``inner = d_1 * ... * d_{n-1}`` (the size of one row):
``[lo, hi)`` = (the tail of row ``lo // inner``, recursively) + (the whole rows in between) +
(the head of row ``(hi - 1) // inner``, recursively), so an n-D range is at most ``2n - 1``
boxes (3 for a matrix). Box ``b`` of ``L`` at local offsets ``o`` is the chunk at global offsets
``o + t * d_k e_k`` (``o`` on replicated tensors). DCP's metadata records each chunk's offsets
and sizes; a load reads the overlap of every saved chunk with every chunk it asks for, so the
pieces written under one layout load into the pieces of any other.

Nothing is copied: each box is a view of the rank's own tensor (a fp32 master, an Adam moment,
a parameter), so a save hands DCP exactly the bytes the rank owns and a load writes straight into
them. DP replicas (and TP replicas of replicated tensors) produce identical chunks, which DCP's
save planner keeps once.

``BoxesSavePlanner`` and ``BoxesLoadPlanner`` let DCP look these objects up (its default lookup only knows
torch tensors, DTensor and ShardedTensor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


@dataclass(frozen=True)
class Box:
    """A chunk of a row-major tensor that is contiguous in memory."""

    offsets: tuple[int, ...]   # where the chunk starts, per dim
    sizes: tuple[int, ...]     # its extent, per dim
    flat_start: int            # row-major index of its first element


def flat_range_boxes(shape: Sequence[int], lo: int, hi: int) -> list[Box]:
    """The boxes whose union is the flat range ``[lo, hi)`` of a row-major tensor of ``shape``."""
    total = math.prod(shape)
    if not 0 <= lo <= hi <= total:
        raise ValueError(f"flat range [{lo}, {hi}) is outside a tensor of shape {tuple(shape)} ({total} elements)")
    if lo == hi:
        return []
    if len(shape) <= 1:
        return [Box((lo,), (hi - lo,), lo)] if shape else [Box((), (), 0)]
    inner = math.prod(shape[1:])
    first_row, last_row = lo // inner, (hi - 1) // inner

    def within_row(row: int, start: int, end: int) -> list[Box]:
        return [Box((row, *b.offsets), (1, *b.sizes), row * inner + b.flat_start)
                for b in flat_range_boxes(shape[1:], start, end)]

    if first_row == last_row and not (lo % inner == 0 and hi % inner == 0):
        return within_row(first_row, lo - first_row * inner, hi - first_row * inner)
    boxes: list[Box] = []
    whole_from = first_row
    if lo % inner:
        boxes += within_row(first_row, lo % inner, inner)
        whole_from = first_row + 1
    whole_to = last_row + 1 if hi % inner == 0 else last_row
    if whole_to > whole_from:
        boxes.append(Box((whole_from,) + (0,) * (len(shape) - 1), (whole_to - whole_from, *shape[1:]),
                         whole_from * inner))
    if hi % inner:
        boxes += within_row(last_row, 0, hi - last_row * inner)
    return boxes


class ShardedBoxes:
    """This rank's chunks of one global tensor: each a view of a rank-local tensor.

    ``size()`` is the global size, which DCP compares with the checkpoint's on load.
    """

    def __init__(self, global_size: Sequence[int], chunks: list[tuple[tuple[int, ...], torch.Tensor]]):
        self.global_size = torch.Size(global_size)
        self.chunks = chunks   # (global offsets, tensor shaped like the chunk)
        for offsets, tensor in chunks:
            ends = [o + s for o, s in zip(offsets, tensor.shape)]
            if len(offsets) != len(self.global_size) or any(e > g for e, g in zip(ends, self.global_size)):
                raise ValueError(f"chunk at {offsets} of shape {tuple(tensor.shape)} is outside the global "
                                 f"size {tuple(self.global_size)}")

    def size(self) -> torch.Size:
        return self.global_size

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for _, tensor in self.chunks)

    def tensors(self) -> list[torch.Tensor]:
        return [tensor for _, tensor in self.chunks]

    def to_host(self, pin_memory: bool, reuse: "ShardedBoxes | None" = None) -> "ShardedBoxes":
        """A copy whose chunks are compact CPU tensors (the staging step of an async save).

        ``reuse``: an earlier copy of the same layout whose buffers are overwritten instead of
        allocating new ones (allocation, pinning and first-touch page faults cost more than the copy).
        """
        same = reuse is not None and reuse.global_size == self.global_size and [
            (o, t.shape, t.dtype) for o, t in reuse.chunks] == [(o, t.shape, t.dtype) for o, t in self.chunks]
        copies = []
        for index, (offsets, tensor) in enumerate(self.chunks):
            copy = reuse.chunks[index][1] if same else torch.empty(tensor.shape, dtype=tensor.dtype,
                                                                   pin_memory=pin_memory)
            copy.copy_(tensor, non_blocking=pin_memory)
            copies.append((offsets, copy))
        return ShardedBoxes(self.global_size, copies)

    # ---- the hooks DCP's planner helpers call (the protocol DTensor implements)
    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        items = []
        for offsets, tensor in self.chunks:
            properties = TensorProperties(dtype=tensor.dtype)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape)
            items.append(WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=chunk, properties=properties,
                                                               size=self.global_size)))
        return items

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape)
                for offsets, tensor in self.chunks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for offsets, tensor in self.chunks:
            if torch.Size(offsets) == index.offset:
                return tensor
        raise ValueError(f"{index.fqn}: this rank holds no chunk at offsets {tuple(index.offset or ())}")


def range_boxes(global_size: Sequence[int], local: torch.Tensor, lo: int, flat: torch.Tensor,
                shard_dim: int | None, shard_index: int) -> ShardedBoxes:
    """The chunks of ``flat`` (elements ``[lo, lo + flat.numel())`` of a tensor shaped like ``local``).

    ``shard_dim``: the dim along which ``local`` is shard ``shard_index`` of equal shards of the
    global tensor (None when ``local`` is the whole global tensor).
    """
    local_shape = tuple(local.shape)
    shift = [0] * len(local_shape)
    if shard_dim is not None:
        shift[shard_dim] = shard_index * local_shape[shard_dim]
    chunks = []
    for box in flat_range_boxes(local_shape, lo, lo + flat.numel()):
        start = box.flat_start - lo
        view = flat.reshape(-1)[start:start + math.prod(box.sizes)].view(box.sizes)   # no copy
        chunks.append((tuple(o + s for o, s in zip(box.offsets, shift)), view))
    return ShardedBoxes(global_size, chunks)


def _lookup(state_dict: dict[str, Any], index: MetadataIndex) -> Any:
    value = state_dict[index.fqn]
    return value.__get_tensor_shard__(index) if isinstance(value, ShardedBoxes) else None


class BoxesSavePlanner(DefaultSavePlanner):
    """DCP's default save planner that also resolves ``ShardedBoxes`` values."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        found = _lookup(self.state_dict, index)
        return found if found is not None else super().lookup_object(index)


class BoxesLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner that also resolves ``ShardedBoxes`` values (flat state dicts only).

    The default set-up replaces values of types it does not know (meta-tensor initialisation),
    so the boxes are set aside while it runs and put back after.
    """

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Any = None, is_coordinator: bool = False) -> None:
        boxes = {key: value for key, value in state_dict.items() if isinstance(value, ShardedBoxes)}
        super().set_up_planner({k: v for k, v in state_dict.items() if k not in boxes}, metadata, is_coordinator)
        self.state_dict.update(boxes)
        self.original_state_dict = state_dict

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        found = _lookup(self.state_dict, index)
        return found if found is not None else super().lookup_tensor(index)
