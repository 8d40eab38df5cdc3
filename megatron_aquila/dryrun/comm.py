"""Every collective and point-to-point op of a step, with its group and bytes.

``CollectiveLog`` is a ``TorchDispatchMode``: every ``torch.distributed`` call reaches the
dispatcher as a ``c10d`` op (``c10d.allreduce_``, ``c10d._allgather_base_``, ``c10d.send`` ...)
carrying its process group, on real tensors (gloo, NCCL) as on fake ones (the fake backend). Each
is recorded as (op, group name, bytes) and passed on. Bytes are the size of the largest buffer the
op works on, the convention of docs/design.md section 13: the tensor of an all-reduce, a
broadcast or a send/recv, the gathered output of an all-gather, the input of a reduce-scatter.
Group names come from the ``ParallelContext``: tp, cp, dp, dp_cp, pp, mp, world. With a
``MemoryTracker``, the buffers handed to an op are marked as communication.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_aquila.dryrun.memory import MemoryTracker
from megatron_aquila.parallel.context import ParallelContext

# c10d op -> the name the report uses
OP_NAMES = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "_allgather_base_": "all_gather",
    "allgather_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "broadcast_": "broadcast", "send": "send",
    "recv_": "recv", "recv_any_source_": "recv", "barrier": "barrier", "alltoall_base_": "all_to_all",
    "reduce_": "reduce", "gather_": "gather", "scatter_": "scatter",
}


def group_names(ctx: ParallelContext) -> dict[int, str]:
    """id(group) -> name, the more specific name first when two names hold one object."""
    groups = {"tp": ctx.tp_group, "cp": ctx.cp_group, "dp": ctx.dp_group, "dp_cp": ctx.dp_cp_group,
              "pp": ctx.pp_group, "mp": ctx.model_parallel_group, "world": ctx.world_group or dist.group.WORLD}
    names: dict[int, str] = {}
    for name, group in groups.items():
        if group is not None:
            names.setdefault(id(group), name)
    return names


def _nbytes(value: Any) -> int:
    tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _process_group(args: tuple) -> Optional[dist.ProcessGroup]:
    for arg in args:
        if isinstance(arg, torch.ScriptObject) and "ProcessGroup" in str(arg._type()):
            return dist.ProcessGroup.unbox(arg)
    return None


class CollectiveLog(TorchDispatchMode):
    """Records the c10d ops dispatched while active (module docstring)."""

    def __init__(self, ctx: ParallelContext, memory: Optional[MemoryTracker] = None):
        super().__init__()
        self.names = group_names(ctx)
        self.memory = memory
        self.calls: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (op, group) -> [count, bytes]

    def reset(self) -> None:
        self.calls.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func._opname in OP_NAMES:
            group = _process_group(args)
            name = self.names.get(id(group), "other") if group is not None else "world"
            entry = self.calls[(OP_NAMES[func._opname], name)]
            entry[0] += 1
            entry[1] += max((_nbytes(arg) for arg in args), default=0)
            if self.memory is not None:
                for tensor in tree_flatten(args)[0]:
                    if isinstance(tensor, torch.Tensor):
                        self.memory.promote(tensor, "communication")
        return func(*args, **(kwargs or {}))

    def per_iteration(self, iterations: int) -> dict[tuple[str, str], tuple[float, float]]:
        """(op, group) -> (calls, bytes) per iteration."""
        return {key: (count / iterations, nbytes / iterations) for key, (count, nbytes) in sorted(self.calls.items())}
