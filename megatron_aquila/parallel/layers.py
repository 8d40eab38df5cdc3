"""Tensor-parallel linear and embedding layers (no biases; Aquila has none).

Every parameter carries two attributes that checkpointing, initialisation and grad clipping read:

- ``tensor_model_parallel``: True when the parameter is a shard of a larger logical tensor;
- ``partition_dim``: the dimension split contiguously over the TP group (-1 when replicated).

``full_shape(param, tp_size)`` gives the logical (TP1) shape. Weights are allocated
uninitialised: ``AquilaModel`` fills every parameter from its global name so that any TP/PP
layout starts from the same model (see ``model/aquila.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_aquila.parallel.context import ProcessGroup, group_rank, group_size
from megatron_aquila.parallel.mappings import (
    _all_gather_dim0,
    _reduce_scatter_dim0,
    copy_to_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence_parallel,
    start_all_gather_dim0,
    start_all_reduce,
    start_reduce_scatter_dim0,
)


def set_tensor_parallel_attributes(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    """Mark ``param`` as split over TP along ``partition_dim`` (-1: replicated over TP)."""
    param.tensor_model_parallel = partition_dim >= 0
    param.partition_dim = partition_dim
    return param


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    """The logical TP1 shape of a (possibly) sharded parameter."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def _divide(total: int, tp_size: int, what: str) -> int:
    if total % tp_size != 0:
        raise ValueError(f"{what} {total} is not divisible by tensor_parallel {tp_size}; "
                         f"choose a tensor_parallel that divides {total}")
    return total // tp_size


class _SequenceParallelColumnLinear(torch.autograd.Function):
    """Y = all_gather(X_shard) A_r^T, saving only the sequence shard (Megatron-LM's
    ``LinearWithGradAccumulationAndAsyncCommunication`` with sequence parallelism).

    Forward: X = [X_1; ...; X_p] = all_gather(X_shard) along dim 0, Y = X A_r^T.
    Backward: dA_r = dY^T all_gather(X_shard) (the input is gathered again instead of kept),
    dX_shard = reduce_scatter(dY A_r) along dim 0 (every rank's Y_r depends on the whole X).
    Saved for backward: X_shard [s/p, b, in], not the gathered [s, b, in], and only when A trains (a
    frozen A, as under LoRA, needs no dA and keeps no input).

    Blocking collectives, no overlap: the path of ``parallel.tp_comm_overlap=false``.
    ``_ColumnParallelLinearOverlapped`` computes the same GEMMs with the collectives overlapped.
    """

    @staticmethod
    def forward(ctx, x_shard: torch.Tensor, weight: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.save_for_backward(x_shard if weight.requires_grad else None, weight)
        return F.linear(_all_gather_dim0(x_shard, group), weight)  # [s, b, out/p]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad [s, b, out/p]
        x_shard, weight = ctx.saved_tensors
        grad_input = grad_weight = None
        if ctx.needs_input_grad[1]:
            x = _all_gather_dim0(x_shard, ctx.group)  # [s, b, in]
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))  # [out/p, in]
        if ctx.needs_input_grad[0]:
            grad_input = _reduce_scatter_dim0(grad.matmul(weight), ctx.group)  # [s/p, b, in]
        return grad_input, grad_weight, None


class _ColumnParallelLinearOverlapped(torch.autograd.Function):
    """Y = X A_r^T whose backward overlaps the grad-input collective with the weight-grad GEMM
    (Megatron-LM's ``LinearWithGradAccumulationAndAsyncCommunication``); ``parallel.tp_comm_overlap``.

    Forward, as the blocking path: without SP Y = X A_r^T (X [s, b, in] replicated over TP); under SP
    X = all_gather(X_shard) along dim 0 first (blocking: the GEMM needs all of X). Saved: X (X_shard
    under SP), only when A trains.

    Backward, G = dL/dY [s, b, out/p]; dX_r = G A_r is this rank's addend of dX = sum_r dX_r, and
    dA_r = G^T X. Schedule, in launch order:

    1. SP and A trains: launch all_gather(X_shard) -> X [s, b, in]  (async)
    2. dX_r = G A_r                        GEMM [s, b, out/p] x [out/p, in]   overlaps 1
    3. SP and A trains: wait for 1
    4. launch the reduction of dX_r        (async): all_reduce -> [s, b, in] in place, or under SP
       reduce_scatter along dim 0 -> [s/p, b, in]
    5. A trains: dA_r = G^T X             GEMM [out/p, s*b] x [s*b, in]      overlaps 4
    6. wait for 4; return dX (and dA_r, which autograd accumulates into A.grad as for any
       parameter, and the grad buffer's hook into main_grad)

    A frozen (LoRA base weight): no step 1, 3 or 5; the reduction is waited right after its launch,
    nothing overlaps. dX not needed (the input does not require grad): no step 2 or 4. The GEMMs and
    collectives are those of the blocking path (``F.linear`` + ``copy_to_tp``; ``_SequenceParallelColumnLinear``),
    so the grads are bit-identical to it; only when the collectives run differs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, group: ProcessGroup,
                sequence_parallel: bool) -> torch.Tensor:
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        total = _all_gather_dim0(x, group) if sequence_parallel else x  # [s, b, in]
        return F.linear(total, weight)  # [s, b, out/p]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad [s, b, out/p]
        x, weight = ctx.saved_tensors  # x [s, b, in] ([s/p, b, in] under SP) or None
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        gather = None
        if needs_weight and ctx.sequence_parallel:
            x, gather = start_all_gather_dim0(x, ctx.group)  # [s, b, in], valid after gather.wait()
        grad_2d = grad.reshape(-1, grad.shape[-1])  # [s*b, out/p]
        grad_input = reduction = grad_weight = None
        if needs_input:
            partial = grad_2d.mm(weight).view(grad.shape[:-1] + weight.shape[-1:])  # [s, b, in], dX_r
        if gather is not None:
            gather.wait()
        if needs_input:  # partial stays referenced here until the reduction is waited
            if ctx.sequence_parallel:
                grad_input, reduction = start_reduce_scatter_dim0(partial, ctx.group)  # [s/p, b, in]
            else:
                grad_input, reduction = partial, start_all_reduce(partial, ctx.group)  # [s, b, in], in place
        if needs_weight:
            grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))  # [out/p, in]
        if reduction is not None:
            reduction.wait()
        return grad_input, grad_weight, None, None


class ColumnParallelLinear(nn.Module):
    """Y = X A^T with A [out, in] split along its output dim: A = [A_1; ...; A_p].

    Rank r holds A_r [out/p, in] and computes Y_r = X A_r^T, the r-th column block of Y; the
    output stays split (the following RowParallelLinear consumes it). Input X enters through
    ``copy_to_tp`` (backward all-reduce), or under sequence parallelism as sequence shards
    through ``_SequenceParallelColumnLinear`` (forward all-gather, backward reduce-scatter), which
    saves the shard [s/p, b, in] for backward and all-gathers it again there.

    ``tp_comm_overlap`` (``parallel.tp_comm_overlap``, TP > 1): backward runs through
    ``_ColumnParallelLinearOverlapped`` instead, whose grad-input all-reduce (reduce-scatter under SP)
    runs while the weight-grad GEMM does; same GEMMs and collectives, bit-identical grads. Not under
    ``torch.compile`` (``model.compile``): dynamo refuses ``async_op=True`` collectives, so a compiled
    block traces the blocking path, whose collectives it turns into functional ones.

    ``stack > 1`` holds several same-shape matrices fused in one matmul (SwiGLU gate and up):
    the weight is then 3-D [stack, out/p, in] with partition_dim 1, i.e. each rank holds its
    contiguous slice of every stacked matrix, and the output is [..., stack * out/p] ordered
    matrix by matrix.

    Shapes: input [s, b, in] ([s/p, b, in] under SP) -> output [s, b, stack * out/p].
    """

    def __init__(self, in_features: int, out_features: int, tp_group: ProcessGroup, *, stack: int = 1,
                 sequence_parallel: bool = False, tp_comm_overlap: bool = True,
                 params_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.tp_comm_overlap = tp_comm_overlap and group_size(tp_group) > 1
        local_out = _divide(out_features, group_size(tp_group), "ColumnParallelLinear output size")
        if stack == 1:
            shape, partition_dim = (local_out, in_features), 0
        else:
            shape, partition_dim = (stack, local_out, in_features), 1
        self.weight = set_tensor_parallel_attributes(
            nn.Parameter(torch.empty(shape, dtype=params_dtype, device=device)), partition_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.flatten(0, -2) if self.weight.dim() == 3 else self.weight
        if self.tp_comm_overlap and not torch.compiler.is_compiling():  # x [s, b, in] ([s/p, b, in] under SP)
            return _ColumnParallelLinearOverlapped.apply(x, weight, self.tp_group,
                                                         self.sequence_parallel)  # [s, b, stack * out/p]
        if self.sequence_parallel:  # x [s/p, b, in]
            return _SequenceParallelColumnLinear.apply(x, weight, self.tp_group)  # [s, b, stack * out/p]
        return F.linear(copy_to_tp(x, self.tp_group), weight)  # [s, b, stack * out/p]


class RowParallelLinear(nn.Module):
    """Y = X A^T with A [out, in] split along its input dim: A = [A_1, ..., A_p], X = [X_1, ..., X_p].

    Rank r holds A_r [out, in/p] and the matching column block X_r of the input (the output
    of a ColumnParallelLinear), computes the partial product X_r A_r^T, and
    Y = sum_r X_r A_r^T is formed by ``reduce_from_tp`` (all-reduce), or under sequence
    parallelism by ``reduce_scatter_to_sequence_parallel`` which leaves each rank its sequence
    shard of Y.

    No communication overlap, hence no ``tp_comm_overlap`` switch (Megatron-LM's RowParallelLinear runs
    its linear function with ``allreduce_dgrad=False`` and no sequence-parallel collective for the same
    reason). Backward: G = dL/dY reaches every rank whole, without a collective
    (identity backward of the all-reduce), or under SP as all_gather(G_shard) along dim 0, and both
    GEMMs consume all of G (dX_r = G A_r, dA_r = G^T X_r): the gather must finish before either starts,
    and the layer launches no collective after them. Forward: the all-reduce (reduce-scatter) of the
    partial sum is the layer's output, needed at once by the residual add. Overlap here would need
    the GEMMs cut into chunks pipelined with the collective (Transformer Engine's userbuffers),
    which changes dA_r's summation order.

    Shapes: input [s, b, in/p] -> output [s, b, out] ([s/p, b, out] under SP).
    """

    def __init__(self, in_features: int, out_features: int, tp_group: ProcessGroup, *,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        local_in = _divide(in_features, group_size(tp_group), "RowParallelLinear input size")
        self.weight = set_tensor_parallel_attributes(
            nn.Parameter(torch.empty(out_features, local_in, dtype=params_dtype, device=device)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)  # [s, b, out], this rank's addend
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(partial, self.tp_group)  # [s/p, b, out]
        return reduce_from_tp(partial, self.tp_group)


class VocabParallelEmbedding(nn.Module):
    """Embedding table E [V, h] split along the vocabulary: rank r holds rows [r*V/p, (r+1)*V/p).

    Each rank looks up the ids that fall in its range and writes zeros for the others, so
    Y = sum_r Y_r is the full lookup (all-reduce), or under sequence parallelism each rank keeps
    its sequence shard of the sum (reduce-scatter along dim 0 of the output).

    Shapes: ids [s, b] int64 -> [s, b, h] ([s/p, b, h] under SP). ``num_embeddings`` is the
    padded vocabulary (a multiple of p).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group: ProcessGroup, *,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.tp_group = tp_group
        self.tp_size = group_size(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.num_embeddings = num_embeddings
        local = _divide(num_embeddings, self.tp_size, "VocabParallelEmbedding padded vocab")
        self.vocab_start = group_rank(tp_group) * local
        self.vocab_end = self.vocab_start + local
        self.weight = set_tensor_parallel_attributes(
            nn.Parameter(torch.empty(local, embedding_dim, dtype=params_dtype, device=device)), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)  # [s, b, h]
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill_(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)  # [s, b, h]
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(partial, self.tp_group)  # [s/p, b, h]
        return reduce_from_tp(partial, self.tp_group)
