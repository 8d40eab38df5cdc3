"""Model, optimizer and RNG state as flat torch.distributed.checkpoint state dicts.

Keys (every value a tensor; DCP keeps them layout-independent through ``mesh.as_global``):

- ``model.{name}``: the parameter ``name`` (global layer ids) as its global tensor;
- ``optim.{master,exp_avg,exp_avg_sq}.{name}``: the fp32 master weight and Adam moments in
  *model space*, i.e. shaped and sharded like the parameter. Under ZeRO-1 each DP rank owns the
  flattened range ``[lo, hi)`` of a parameter; the whole TP-local tensor is the sum over DP of
  zero-filled tensors with each owned range written (the ranges partition the parameter, so the
  all-reduce is exact). On load each rank takes back its own range, whatever the saving layout;
- ``rng.rank{r}.*``: this rank's torch / CUDA / numpy / python generators and the model chunks'
  TP-aware tracker streams (restored only under the identical layout, see ``manager``).

The Adam step count (the same for every piece: skipped steps skip all of them) and the grad
scaler are small scalars kept in the checkpoint's ``meta.json`` instead.
"""
from __future__ import annotations

import random
from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from megatron_aquila.checkpoint.mesh import as_global, to_local
from megatron_aquila.optim.optimizer import STATE_FORMAT, MixedPrecisionOptimizer
from megatron_aquila.parallel.context import ParallelContext, group_size

OPTIMIZER_KEYS = ("master", "exp_avg", "exp_avg_sq")


def named_parameters(model_chunks: Iterable[nn.Module]) -> dict[str, nn.Parameter]:
    """Every parameter of this rank's chunks by global name (a name in two chunks is an error)."""
    params: dict[str, nn.Parameter] = {}
    for index, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            if name in params:
                raise ValueError(f"parameter {name} appears in two model chunks (second: chunk {index})")
            params[name] = param
    return params


# ---------------------------------------------------------------------------------- model
def model_state(model_chunks: Iterable[nn.Module], mesh: Optional[DeviceMesh], *, empty: bool = False
                ) -> dict[str, torch.Tensor]:
    """``model.{name}`` -> global view of each parameter (``empty``: fresh buffers to load into)."""
    return {f"model.{name}": as_global(torch.empty_like(p.detach()) if empty else p.detach(), p, mesh)
            for name, p in named_parameters(model_chunks).items()}


@torch.no_grad()
def apply_model_state(model_chunks: Iterable[nn.Module], loaded: dict[str, torch.Tensor]) -> None:
    """Copy loaded ``model.*`` values into the parameters."""
    for name, param in named_parameters(model_chunks).items():
        param.copy_(to_local(loaded[f"model.{name}"]))


# ---------------------------------------------------------------------------------- optimizer
def adam_step(optimizer: MixedPrecisionOptimizer, ctx: ParallelContext) -> int:
    """Number of Adam steps taken (MAX over the world: a rank may own no piece under ZeRO-1)."""
    steps = [float(s["step"]) for s in optimizer.adamw.state.values()] if optimizer.adamw is not None else []
    value = torch.tensor([max(steps, default=0.0)], dtype=torch.float64)
    if ctx.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


@torch.no_grad()
def optimizer_state(optimizer: MixedPrecisionOptimizer, model_chunks: list[nn.Module], ctx: ParallelContext,
                    mesh: Optional[DeviceMesh], with_moments: bool) -> dict[str, torch.Tensor]:
    """``optim.{key}.{name}`` -> model-space fp32 tensors (see the module docstring)."""
    params = named_parameters(model_chunks)
    keys = OPTIMIZER_KEYS if with_moments else OPTIMIZER_KEYS[:1]
    full = {(key, name): torch.zeros(p.shape, dtype=torch.float32, device=p.device)  # [TP-local shape]
            for name, p in params.items() for key in keys}
    for piece in optimizer.pieces:
        adam = optimizer.adamw.state.get(piece.master, {}) if optimizer.adamw is not None else {}
        sources = {"master": piece.master, "exp_avg": adam.get("exp_avg"), "exp_avg_sq": adam.get("exp_avg_sq")}
        for key in keys:
            if sources[key] is None:
                raise RuntimeError(f"Adam state {key} of {piece.name} is missing although {with_moments=}; "
                                   "the optimizer state is inconsistent across parameters")
            full[key, piece.name].view(-1)[piece.lo:piece.hi].copy_(sources[key].reshape(-1))
    if getattr(optimizer, "kind", "") == "distributed" and group_size(ctx.dp_group) > 1:
        for tensor in full.values():
            dist.all_reduce(tensor, group=ctx.dp_group)
    return {f"optim.{key}.{name}": as_global(tensor, params[name], mesh) for (key, name), tensor in full.items()}


def empty_optimizer_state(model_chunks: list[nn.Module], mesh: Optional[DeviceMesh], with_moments: bool
                          ) -> dict[str, torch.Tensor]:
    """Buffers to load ``optim.*`` into (fp32, shaped like each parameter's TP shard)."""
    keys = OPTIMIZER_KEYS if with_moments else OPTIMIZER_KEYS[:1]
    return {f"optim.{key}.{name}": as_global(torch.empty(p.shape, dtype=torch.float32, device=p.device), p, mesh)
            for name, p in named_parameters(model_chunks).items() for key in keys}


def apply_optimizer_state(optimizer: MixedPrecisionOptimizer, loaded: dict[str, torch.Tensor], step: int,
                          grad_scaler_state: Optional[dict]) -> None:
    """Give every optimizer piece its range of the loaded model-space tensors (any saving layout)."""
    params: list[dict] = [{} for _ in optimizer.grad_buffers]
    for piece in optimizer.pieces:
        entry = {"shape": tuple(piece.param.shape), "range": (piece.lo, piece.hi)}
        keys = OPTIMIZER_KEYS if step > 0 else OPTIMIZER_KEYS[:1]
        for key in keys:
            entry[key] = to_local(loaded[f"optim.{key}.{piece.name}"]).reshape(-1)[piece.lo:piece.hi].clone()
        if step > 0:
            entry["step"] = float(step)
        params[piece.chunk][piece.name] = entry
    optimizer.load_state_dict({"format": STATE_FORMAT, "kind": optimizer.kind, "dp_rank": optimizer.ctx.dp_rank,
                               "dp_size": optimizer.ctx.dp_size, "grad_scaler": grad_scaler_state,
                               "params": params})


@torch.no_grad()
def refresh_masters(optimizer: MixedPrecisionOptimizer) -> None:
    """Copy the (just loaded) model parameters into the fp32 masters (when the optimizer state is not loaded)."""
    for piece in optimizer.pieces:
        if piece.master is not piece.param:
            piece.master.copy_(piece.param.detach().reshape(-1)[piece.lo:piece.hi].view_as(piece.master))


# ---------------------------------------------------------------------------------- RNG
def rng_state(model_chunks: list[nn.Module], rank: int) -> dict[str, torch.Tensor]:
    """This rank's generators as tensors under ``rng.rank{rank}.*`` (no pickled objects)."""
    prefix = f"rng.rank{rank}."
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        prefix + "torch": torch.get_rng_state(),
        prefix + "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        prefix + "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        prefix + "python": torch.tensor([version, *internal], dtype=torch.int64),
        prefix + "python_gauss": torch.tensor([gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state[prefix + "cuda"] = torch.cuda.get_rng_state()
    for index, chunk in enumerate(model_chunks):
        for stream, value in chunk.rng.get_states().items():
            state[f"{prefix}chunk{index}.{stream}"] = value.cpu()
    return state


def apply_rng_state(model_chunks: list[nn.Module], loaded: dict[str, torch.Tensor], rank: int) -> None:
    prefix = f"rng.rank{rank}."
    torch.set_rng_state(loaded[prefix + "torch"])
    pos, has_gauss, cached = loaded[prefix + "numpy_extra"].tolist()
    np.random.set_state(("MT19937", loaded[prefix + "numpy_keys"].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), cached))
    python = loaded[prefix + "python"].tolist()
    has_gauss_next, gauss_next = loaded[prefix + "python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss_next if has_gauss_next else None))
    if prefix + "cuda" in loaded and torch.cuda.is_available():
        torch.cuda.set_rng_state(loaded[prefix + "cuda"])
    for index, chunk in enumerate(model_chunks):
        streams = {name[len(f"{prefix}chunk{index}."):]: value for name, value in loaded.items()
                   if name.startswith(f"{prefix}chunk{index}.")}
        chunk.rng.set_states({name: value.to(chunk.rng.states[name].device) for name, value in streams.items()})
