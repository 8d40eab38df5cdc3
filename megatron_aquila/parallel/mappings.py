"""Autograd-aware collectives of tensor and sequence parallelism (Megatron-LM's "mappings").

Every function takes its process group explicitly and is the identity when the group has one
member (``group_size(group) == 1``, which includes ``group=None``). Notation: ``p`` ranks in the
group, rank ``r``; ``X = [X_1, ..., X_p]`` is ``X`` split into ``p`` equal contiguous chunks
along the named dimension; ``sum_r`` sums the per-rank tensors.

Collectives along dim 0 run on one flat tensor on every backend (NCCL and gloo alike):
``all_gather_single`` writes [X_1; ...; X_p] into one [p * s, ...] tensor, and
``reduce_scatter_single`` leaves rank r chunk r of sum_q X_q in a [s / p, ...] tensor.

``start_all_reduce``, ``start_all_gather_dim0`` and ``start_reduce_scatter_dim0`` launch the same
collectives with ``async_op=True`` and return the result tensor with its ``dist.Work``: the tensor
holds the result only after ``work.wait()``, and neither it nor the input may be touched before.
They serve the overlapped backward of the column-parallel layer (``layers.py``). The blocking
versions call c10d with ``async_op=False``, the form ``torch.compile`` traces (it refuses ``async_op=True``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_aquila.parallel.collectives import all_gather_single, reduce_scatter_single
from megatron_aquila.parallel.context import ProcessGroup, group_size


def _check_divisible(x: torch.Tensor, dim: int, world: int, what: str) -> int:
    if x.shape[dim] % world != 0:
        raise ValueError(f"{what}: dim {dim} of shape {tuple(x.shape)} is not divisible by the group size "
                         f"{world}; make the sequence/hidden length a multiple of tensor_parallel")
    return x.shape[dim] // world


def _gather_output(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return x.new_empty((group_size(group) * x.shape[0],) + tuple(x.shape[1:]))  # [p * s, ...]


def _scatter_output(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    chunk = _check_divisible(x, 0, group_size(group), "reduce-scatter")
    return x.new_empty((chunk,) + tuple(x.shape[1:]))  # [s/p, ...]


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """sum_r x_r, in place in ``x`` (which must be contiguous and owned by the caller)."""
    dist.all_reduce(x, group=group)
    return x


def _all_gather_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[X_1; ...; X_p] concatenated along dim 0: [s, ...] on each rank -> [p * s, ...]."""
    x = x.contiguous()
    out = _gather_output(x, group)  # [p * s, ...]
    all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Chunk r (along dim 0) of sum_q x_q: [s, ...] on each rank -> [s/p, ...], in a tensor that owns
    its storage."""
    out = _scatter_output(x, group)  # [s/p, ...]
    reduce_scatter_single(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


def start_all_reduce(x: torch.Tensor, group: ProcessGroup) -> dist.Work:
    """Launch ``_all_reduce``: sum_r x_r in place in ``x`` (contiguous, owned by the caller) after ``wait()``."""
    return dist.all_reduce(x, group=group, async_op=True)


def start_all_gather_dim0(x: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, dist.Work]:
    """Launch ``_all_gather_dim0``: [s, ...] on each rank -> [p * s, ...], valid after ``wait()``."""
    x = x.contiguous()
    out = _gather_output(x, group)  # [p * s, ...]
    return out, all_gather_single(out, x, group=group, async_op=True)


def start_reduce_scatter_dim0(x: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, dist.Work]:
    """Launch ``_reduce_scatter_dim0``: [s, ...] -> [s/p, ...] (owning its storage), valid after ``wait()``;
    ``x`` must be contiguous and not be written before."""
    out = _scatter_output(x, group)  # [s/p, ...]
    return out, reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group, async_op=True)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        # A fresh buffer: the incoming grad may be shared with other branches of the graph.
        return _all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        if x.is_leaf or not x.is_contiguous():  # a leaf must not be overwritten: reduce a copy
            x = x.clone(memory_format=torch.contiguous_format)
        else:
            ctx.mark_dirty(x)
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Enter a tensor-parallel region (Megatron's ``f``).

    Forward: Y = X on every rank. Backward: dL/dX = sum_r dL/dY_r (all-reduce), because each
    rank's column-parallel weights consumed the same X and contributed a partial gradient.
    """
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Leave a tensor-parallel region (Megatron's ``g``).

    Forward: Y = sum_r X_r (all-reduce; overwrites a contiguous non-leaf ``x``
    in place). Backward:
    dL/dX_r = dL/dY (identity), since Y depends on each X_r with coefficient one.
    """
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sequence-parallel exit of a row-parallel layer (replaces ``reduce_from_tp``).

    Forward: Y_r = chunk r of sum_q X_q along dim 0 (reduce-scatter). Backward:
    dL/dX_q = [G_1; ...; G_p] (all-gather along dim 0) for every q, since every X_q adds into
    every chunk with coefficient one.
    """
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)
