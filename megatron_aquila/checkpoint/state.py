"""Model, optimizer and RNG state as flat torch.distributed.checkpoint state dicts, by reference.

Keys (``checkpoint.shards`` turns each rank's pieces into chunks of the global tensors):

- ``model.{name}``: the parameter ``name`` (global layer ids) as its global (TP1) tensor; each
  rank offers its TP shard, a view of the parameter itself;
- ``optim.{master,exp_avg,exp_avg_sq}.{name}``: the fp32 master weight and Adam moments in
  *model space*, i.e. global tensors shaped like the parameter. Each rank offers exactly the
  elements it updates: the whole TP shard with the plain optimizer, its ZeRO-1 flat range
  ``[lo, hi)`` of the TP shard under the distributed optimizer. The chunks are views of the
  optimizer's own tensors: a save hands DCP no new memory and a load writes in place, so no rank
  ever holds more than its own shard (DCP itself copies one chunk at a time when it writes a view);
- ``rng.rank{r}.*``: this rank's torch / CUDA / numpy / python generators and the model chunks'
  TP-aware tracker streams (restored only under the identical layout, see ``manager``).

The Adam step count (the same for every piece: skipped steps skip all of them) and the grad
scaler are small scalars kept in the checkpoint's ``meta.json`` instead.
"""
from __future__ import annotations

import random
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron_aquila.checkpoint.shards import ShardedBoxes, range_boxes
from megatron_aquila.optim.optimizer import MixedPrecisionOptimizer
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.layers import full_shape

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


def _boxes(param: nn.Parameter, lo: int, values: torch.Tensor, ctx: ParallelContext) -> ShardedBoxes:
    """``values`` (elements ``[lo, lo + numel)`` of ``param``'s TP shard) as chunks of the global tensor."""
    sharded = bool(getattr(param, "tensor_model_parallel", False))
    return range_boxes(full_shape(param, ctx.tp_size), param, lo, values,
                       param.partition_dim if sharded else None, ctx.tp_rank)


# ---------------------------------------------------------------------------------- model
def model_state(model_chunks: Iterable[nn.Module], ctx: ParallelContext,
                trainable_only: bool = False) -> dict[str, ShardedBoxes]:
    """``model.{name}`` -> this rank's TP shard of each parameter (views: saves read, loads write in place).

    ``trainable_only``: only the parameters that train (LoRA's adapters); the frozen base weights of
    a LoRA run are not copied into its checkpoints, which name them instead (``base_weights`` in
    meta.json, the run's ``checkpoint.init_weights``).
    """
    return {f"model.{name}": _boxes(p, 0, p.detach(), ctx) for name, p in named_parameters(model_chunks).items()
            if p.requires_grad or not trainable_only}


# ---------------------------------------------------------------------------------- optimizer
def adam_step(optimizer: MixedPrecisionOptimizer, ctx: ParallelContext) -> int:
    """Number of Adam steps taken (MAX over the world: a rank may own no piece under ZeRO-1).

    The all-reduce runs on ``ctx.device``: NCCL has no backend for CPU tensors.
    """
    steps = [float(s["step"]) for s in optimizer.adamw.state.values()] if optimizer.adamw is not None else []
    value = torch.tensor([max(steps, default=0.0)], dtype=torch.float64, device=ctx.device)
    if ctx.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _adam_tensors(optimizer: MixedPrecisionOptimizer, master: torch.Tensor) -> dict[str, torch.Tensor]:
    return optimizer.adamw.state.get(master, {}) if optimizer.adamw is not None else {}


def optimizer_state(optimizer: MixedPrecisionOptimizer, ctx: ParallelContext, with_moments: bool
                    ) -> dict[str, ShardedBoxes]:
    """``optim.{key}.{name}`` -> this rank's pieces of the model-space fp32 tensors (module docstring)."""
    keys = OPTIMIZER_KEYS if with_moments else OPTIMIZER_KEYS[:1]
    state: dict[str, ShardedBoxes] = {}
    for piece in optimizer.pieces:
        sources = {"master": piece.master, **_adam_tensors(optimizer, piece.master)}
        for key in keys:
            if key not in sources:
                raise RuntimeError(f"Adam state {key} of {piece.name} is missing although {with_moments=}; "
                                   "the optimizer state is inconsistent across parameters")
            state[f"optim.{key}.{piece.name}"] = _boxes(piece.param, piece.lo, sources[key].detach(), ctx)
    return state


@torch.no_grad()
def allocate_adam_state(optimizer: MixedPrecisionOptimizer, step: int) -> None:
    """Give every piece zero Adam moments (to load into) and the step count ``step``.

    Only this rank's pieces are allocated: the moments a ZeRO-1 rank owns, nothing more. The step
    tensor follows torch.optim.AdamW's own placement (on the device for fused / capturable).
    """
    if optimizer.adamw is None:
        return
    for group in optimizer.adamw.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))
        for master in group["params"]:
            entry = optimizer.adamw.state[master]
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in entry:
                    entry[key] = torch.zeros_like(master, memory_format=torch.preserve_format)
            entry["step"] = torch.tensor(float(step), dtype=torch.float32,
                                         device=master.device if on_device else "cpu")


@torch.no_grad()
def refresh_masters(optimizer: MixedPrecisionOptimizer) -> None:
    """Copy the (just loaded) model parameters into the fp32 masters (when the optimizer state is not loaded)."""
    for piece in optimizer.pieces:
        if piece.master is not piece.param:
            piece.master.copy_(piece.param.detach().reshape(-1)[piece.lo:piece.hi].view_as(piece.master))


# ---------------------------------------------------------------------------------- what a rank writes
def _writer_of(names_and_sizes: list[tuple[str, int]], writers: int) -> dict[str, int]:
    """Each name's writer in ``range(writers)``: largest first to the least-loaded writer (ties: lowest
    index), a pure function of the list, so every replica computes the same assignment alone."""
    load = [0] * writers
    owner = {}
    for name, size in sorted(names_and_sizes, key=lambda item: (-item[1], item[0])):
        writer = min(range(writers), key=lambda index: (load[index], index))
        owner[name] = writer
        load[writer] += size
    return owner


def owned_save_state(model_chunks: list[nn.Module], optimizer: MixedPrecisionOptimizer, ctx: ParallelContext,
                     trainable_only: bool, with_moments: bool) -> dict[str, ShardedBoxes]:
    """The model and optimizer pieces of a checkpoint this rank writes: every chunk exactly once.

    ``model_state`` and ``optimizer_state`` hand the checkpoint library every piece a rank holds, and
    the DP x CP replicas (and the TP replicas of the RMSNorm weights) hold identical ones, which DCP
    would keep once after gathering every plan. Choosing the writer here instead means an async save
    stages in host memory only what the rank writes: a replicated tensor's writer among the
    ``dp_cp`` replicas is ``_writer_of`` (balanced by bytes), and only TP rank 0 writes a tensor
    replicated over TP. ZeRO-1 optimizer pieces are already this rank's alone. Loading still reads
    into every piece a rank holds (``model_state``/``optimizer_state``).
    """
    params = named_parameters(model_chunks)
    saved = {name: p for name, p in params.items() if p.requires_grad or not trainable_only}
    owner = _writer_of([(name, p.numel()) for name, p in saved.items()], ctx.dp_cp_size)

    def writes(name: str, replicated_over_dp: bool) -> bool:
        param = params[name]
        if not getattr(param, "tensor_model_parallel", False) and ctx.tp_rank != 0:
            return False
        return not replicated_over_dp or owner[name] == ctx.dp_cp_rank

    values = {key: value for key, value in model_state(model_chunks, ctx, trainable_only).items()
                              if writes(key[len("model."):], True)}
    sharded_optimizer = optimizer.kind == "distributed"
    for key, value in optimizer_state(optimizer, ctx, with_moments).items():
        name = key.split(".", 2)[2]  # optim.{master|exp_avg|exp_avg_sq}.{name}
        if writes(name, not sharded_optimizer):
            values[key] = value
    return values


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
