"""Host syncs: every op whose result the host must wait for, counted with its call site.

On a GPU, ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()`` and ``nonzero`` (an output size
that depends on the values) stall the CPU until the device has run everything queued before them.
Under ``FakeTensorMode`` they have no value to give and raise. ``HostSyncCounter`` is a
``TorchDispatchMode`` that intercepts them: it records the first frame of this package's code
that asked (file:line and function), and passes a value through so the step goes on: 0 (the
optimizer sees no inf/nan and a zero norm, and steps), or for ``nonzero`` an empty result.
On real tensors it counts the same ops and lets them run.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,   # item(), float(), int(), bool(), tolist() per element
    torch.ops.aten.is_nonzero.default,            # bool(t)
    torch.ops.aten.equal.default,                 # torch.equal
    torch.ops.aten.nonzero.default,               # value-dependent output size
}
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


def call_site() -> str:
    """``path:line (function)`` of the innermost frame in megatron_aquila outside the dry-run package
    (a walk up the interpreter's frames: no source lines are read)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE_DIR) and not path.startswith(_OWN_DIR):
            return f"{os.path.relpath(path, os.path.dirname(_PACKAGE_DIR))}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "outside megatron_aquila"


class HostSyncCounter(TorchDispatchMode):
    """Counts host syncs by call site; under fake tensors answers them with 0 (module docstring)."""

    def __init__(self, fake: bool):
        super().__init__()
        self.fake = fake
        self.counts: Counter[str] = Counter()

    def reset(self) -> None:
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SYNC_OPS:
            return func(*args, **kwargs)
        self.counts[f"{func.__name__.split('.')[0]} at {call_site()}"] += 1
        if not self.fake:
            return func(*args, **kwargs)
        if func is torch.ops.aten.nonzero.default:
            return torch.empty((0, args[0].dim()), dtype=torch.long, device=args[0].device)
        if func is torch.ops.aten._local_scalar_dense.default:
            return _zero_of(args[0].dtype)
        return False

    def per_iteration(self, iterations: int) -> dict[str, float]:
        return {site: count / iterations for site, count in sorted(self.counts.items())}


def _zero_of(dtype: torch.dtype) -> Optional[object]:
    if dtype == torch.bool:
        return False
    return 0.0 if dtype.is_floating_point else 0
