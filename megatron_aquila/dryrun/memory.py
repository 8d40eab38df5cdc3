"""Peak live bytes of one rank, by category, from the tensors its ops create (real or fake).

A ``TorchDispatchMode`` sees the output of every aten op. Each new storage is counted once, at
its size rounded up to the CUDA caching allocator's 512-byte block, from its creation until
Python frees it (a weak reference's callback); views and in-place ops add nothing. Every storage
has one category, upgraded (never downgraded) as the code reveals what it is:

    parameters < gradients < optimizer       labelled by ``label`` after the build (and after the
                                             first step, for Adam's moments)
    temporaries < communication < activations   a storage is born a temporary; handed to a collective
                                             or a point-to-point op it becomes communication; saved
                                             for backward (``saved_tensors_hooks``) an activation

The peak is the largest total reached since ``reset_peak``, with its split by category at that
moment. The same tracker runs on the real training step (tests compare the two) and under
``FakeTensorMode`` in the dry run, where no byte is allocated.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from megatron_aquila.dryrun.syncs import call_site

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "communication", "temporaries")
# Persistent state is never relabelled by what the step does with it.
PERSISTENT = ("parameters", "gradients", "optimizer")
# A transient storage moves up this order, never down.
TRANSIENT_ORDER = ("temporaries", "communication", "activations")
ALLOCATION_BLOCK = 512  # bytes: the CUDA caching allocator rounds every block up to a multiple of this


def allocated_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator hands out for a request of ``nbytes``."""
    return math.ceil(nbytes / ALLOCATION_BLOCK) * ALLOCATION_BLOCK


@dataclass
class _Entry:
    nbytes: int
    category: str


@dataclass
class MemorySnapshot:
    """Live bytes per category (``CATEGORIES``) and their total."""

    by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    @property
    def total(self) -> int:
        return sum(self.by_category.values())

    def copy(self) -> "MemorySnapshot":
        return MemorySnapshot(dict(self.by_category))


class MemoryTracker(TorchDispatchMode):
    """Counts live storages by category; ``peak`` is the split at the largest total since ``reset_peak``."""

    def __init__(self) -> None:
        super().__init__()
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = MemorySnapshot()
        self.peak = MemorySnapshot()
        self.peak_site = ""   # where the peak was reached: the innermost megatron_aquila frame

    # ------------------------------------------------------------------ bookkeeping
    def _freed(self, entry: _Entry, _ref: weakref.ref) -> None:
        self.current.by_category[entry.category] -= entry.nbytes

    def _storage_entry(self, storage: torch.UntypedStorage, category: str) -> _Entry:
        entry = self._entries.get(storage)
        if entry is None:
            entry = _Entry(allocated_bytes(storage.nbytes()), category)
            self._entries[storage] = entry
            weakref.finalize(storage, self._freed, entry, None)
            self.current.by_category[category] += entry.nbytes
            self._update_peak()
        return entry

    def _update_peak(self) -> None:
        if self.current.total > self.peak.total:
            self.peak = self.current.copy()
            self.peak_site = call_site()

    def _relabel(self, entry: _Entry, category: str) -> None:
        if entry.category == category:
            return
        self.current.by_category[entry.category] -= entry.nbytes
        self.current.by_category[category] += entry.nbytes
        entry.category = category

    def label(self, tensors: Iterator[torch.Tensor] | list[torch.Tensor], category: str) -> None:
        """Mark the storages of ``tensors`` as persistent ``category`` (parameters, gradients, optimizer)."""
        assert category in PERSISTENT, f"label {category!r}: only {PERSISTENT} are set by hand"
        for tensor in tensors:
            if tensor.device.type != "meta":  # a meta tensor (a Q-LoRA weight's stand-in) holds no bytes
                self._relabel(self._storage_entry(tensor.untyped_storage(), category), category)
        self._update_peak()

    def promote(self, tensor: torch.Tensor, category: str) -> None:
        """A transient storage seen as ``category`` (communication, activations): move it up, never down."""
        if tensor.device.type == "meta":
            return
        entry = self._storage_entry(tensor.untyped_storage(), "temporaries")
        if entry.category in TRANSIENT_ORDER and TRANSIENT_ORDER.index(category) > TRANSIENT_ORDER.index(
                entry.category):
            self._relabel(entry, category)

    def reset_peak(self) -> None:
        self.peak = self.current.copy()
        self.peak_site = "the start of the measured iteration"

    # ------------------------------------------------------------------ hooks
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":  # meta: shapes, no bytes
                self._storage_entry(value.untyped_storage(), "temporaries")
        return out

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.promote(tensor, "activations")
        return tensor

    @contextlib.contextmanager
    def tracking(self) -> Iterator["MemoryTracker"]:
        """Enter the dispatch mode and the saved-tensor hooks that mark activations."""
        with self, torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self
