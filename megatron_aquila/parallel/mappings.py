"""Autograd-aware collectives of tensor and sequence parallelism (Megatron-LM's "mappings").

Every function takes its process group explicitly and is the identity when the group has one
member (``group_size(group) == 1``, which includes ``group=None``). Notation: ``p`` ranks in the
group, rank ``r``; ``X = [X_1, ..., X_p]`` is ``X`` split into ``p`` equal contiguous chunks
along the named dimension; ``sum_r`` sums the per-rank tensors.

Collectives along dim 0 use ``all_gather_into_tensor`` / ``reduce_scatter`` on one flat tensor
(NCCL); on gloo, which may lack those, they use the list ``all_gather`` and an ``all_reduce``
followed by taking this rank's chunk.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_aquila.parallel.context import ProcessGroup, group_rank, group_size

_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _is_gloo(group: ProcessGroup) -> bool:
    return dist.get_backend(group) == "gloo"


def _check_divisible(x: torch.Tensor, dim: int, world: int, what: str) -> int:
    if x.shape[dim] % world != 0:
        raise ValueError(f"{what}: dim {dim} of shape {tuple(x.shape)} is not divisible by the group size "
                         f"{world}; make the sequence/hidden length a multiple of tensor_parallel")
    return x.shape[dim] // world


def _split(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    """This rank's chunk X_r of x along ``dim`` (a contiguous copy, so it owns its storage: a view, even a
    contiguous one along dim 0, would keep all of x alive while X_r is saved for backward)."""
    world = group_size(group)
    chunk = _check_divisible(x, dim, world, "split")
    return x.narrow(dim, group_rank(group) * chunk, chunk).clone(memory_format=torch.contiguous_format)


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """sum_r x_r, in place in ``x`` (which must be contiguous and owned by the caller)."""
    dist.all_reduce(x, group=group)
    return x


def _all_gather_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[X_1; ...; X_p] concatenated along dim 0."""
    world = group_size(group)
    x = x.contiguous()
    if _is_gloo(group):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Chunk r (along dim 0) of sum_r x_r, in a tensor that owns its storage ([s/p, ...], like NCCL's)."""
    world = group_size(group)
    chunk = _check_divisible(x, 0, world, "reduce-scatter")
    if _is_gloo(group):
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        # A copy: narrow(0) alone is a contiguous view that would keep the whole [s, ...] sum alive.
        return total.narrow(0, group_rank(group) * chunk, chunk).clone()
    out = x.new_empty((chunk,) + tuple(x.shape[1:]))
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


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


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


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


def scatter_to_sequence_parallel(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Forward: Y = X_r, chunk r of the replicated X along dim 0 (the sequence). Backward:
    dL/dX = [G_1; ...; G_p] (all-gather along dim 0)."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sequence-parallel exit of a row-parallel layer (replaces ``reduce_from_tp``).

    Forward: Y_r = chunk r of sum_q X_q along dim 0 (reduce-scatter). Backward:
    dL/dX_q = [G_1; ...; G_p] (all-gather along dim 0) for every q, since every X_q adds into
    every chunk with coefficient one.
    """
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)
