"""DTensor views of tensor-parallel shards, so torch.distributed.checkpoint stores global tensors.

A parameter sharded over TP along ``partition_dim`` is the ``Shard(partition_dim)`` placement of
its full (TP1) tensor over the tensor-parallel device mesh; a TP-replicated one is
``Replicate()``. DCP then writes each global tensor once (DP replicas and TP replicas hold the
same chunk at the same offset and are deduplicated) and reads any slice back, so a checkpoint
saved under one TP x PP x DP layout loads into another. Pipeline stages need nothing special:
parameter names carry global layer ids.

The mesh is the one-dimensional ``"tp"`` mesh over this rank's existing TP group
(``DeviceMesh.from_group``), so no process group is created. Without torch.distributed (one
process, TP1) tensors are used as they are: they already are the global tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from megatron_aquila.parallel.context import ParallelContext, grid_rank


def tp_device_mesh(ctx: ParallelContext) -> Optional[DeviceMesh]:
    """The ``"tp"`` device mesh of this rank's TP group; None when torch.distributed is not initialised."""
    if not dist.is_initialized():
        return None
    if ctx.tp_group is None:
        raise ValueError(f"torch.distributed is initialised but the ParallelContext ({ctx.describe()}) has no TP "
                         "group; build it with ParallelContext.initialize")
    if ctx.tp_mesh is None:  # one mesh per process, released with the context's groups
        members = [grid_rank(t, ctx.dp_rank, ctx.pp_rank, ctx.tp_size, ctx.dp_size) for t in range(ctx.tp_size)]
        ctx.tp_mesh = DeviceMesh.from_group(ctx.tp_group, ctx.device.type, mesh=members, mesh_dim_names=("tp",))
    return ctx.tp_mesh


def as_global(local: torch.Tensor, like: torch.nn.Parameter, mesh: Optional[DeviceMesh]) -> torch.Tensor:
    """``local`` (shaped like this rank's shard of ``like``) as a DTensor over ``mesh`` (or itself when None)."""
    if mesh is None:
        return local
    sharded = bool(getattr(like, "tensor_model_parallel", False))
    placement = Shard(like.partition_dim) if sharded else Replicate()
    return DTensor.from_local(local, mesh, [placement], run_check=False)


def to_local(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor is returned as it is)."""
    return value.to_local() if isinstance(value, DTensor) else value
