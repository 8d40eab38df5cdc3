"""The layout-independent *full state dict*: global parameter name -> full TP1 tensor.

Parameter names carry GLOBAL layer ids (``layers.7.mlp.down.weight``), so the same name means
the same tensor under every TP x PP (x virtual pipeline) layout; the vocabulary rows stay padded
as the source layout had them (``ModelConfig.padded_vocab_size(tp)``).

- ``gather_full_state_dict``: every tensor-parallel shard is all-gathered over the TP group and
  concatenated along its ``partition_dim``; then each tensor is broadcast over the pipeline group
  from the stage that owns it. Every rank of the pipeline x tensor grid ends with the whole model
  (memory: one full copy per rank; meant for conversion and tests, not for 34B training saves,
  which go through torch.distributed.checkpoint with the same names).
- ``load_full_state_dict``: each rank copies its slice ``narrow(partition_dim, tp_rank * local,
  local)`` of the tensors its chunks hold.
- ``save_full_state`` / ``load_full_state``: one safetensors file, with the model section of the
  config in its metadata; ``open_full_state`` reads it lazily, tensor by tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_aquila.checkpoint.hf_mapping import ConversionError, expected_full_shapes, full_vocab_rows
from megatron_aquila.config import ModelConfig
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.layers import full_shape

FULL_STATE_FORMAT = "megatron_aquila.full_state.v1"


def _chunk_parameters(model_chunks: Iterable[nn.Module]) -> dict[str, nn.Parameter]:
    """All parameters of this rank's chunks by global name; a name in two chunks is an error."""
    params: dict[str, nn.Parameter] = {}
    for index, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            if name in params:
                raise ValueError(f"parameter {name} appears in two model chunks (second: chunk {index}); "
                                 "chunks must hold disjoint global layer ids")
            params[name] = param
    return params


def _gather_tp(param: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Full tensor of a TP shard: all-gather the p shards, concatenate along partition_dim."""
    local = param.detach().contiguous()
    if not getattr(param, "tensor_model_parallel", False) or ctx.tp_size == 1:
        return local.clone()
    shards = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(shards, local, group=ctx.tp_group)
    return torch.cat(shards, dim=param.partition_dim)


@torch.no_grad()
def gather_full_state_dict(model_chunks: Iterable[nn.Module], ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """The full state dict of the model whose chunks this rank and its TP/PP peers hold (module docstring).

    Collective over the tensor- and pipeline-parallel groups: every rank of a pipeline must call it.
    Returned tensors are on the CPU, in the parameters' dtype.
    """
    local = {name: _gather_tp(param, ctx).cpu() for name, param in _chunk_parameters(model_chunks).items()}
    if ctx.pp_size == 1:
        return local
    catalogue = [(name, tuple(t.shape), t.dtype) for name, t in local.items()]
    catalogues: list = [None] * ctx.pp_size
    dist.all_gather_object(catalogues, catalogue, group=ctx.pp_group)
    full: dict[str, torch.Tensor] = {}
    for stage, entries in enumerate(catalogues):
        for name, shape, dtype in entries:
            if name in full:
                raise ValueError(f"parameter {name} is held by two pipeline stages (second: {stage})")
            tensor = local[name] if stage == ctx.pp_rank else torch.empty(shape, dtype=dtype)
            # Collectives run on the parameters' device (NCCL needs CUDA tensors); results go to CPU.
            on_device = tensor.to(ctx.device)
            dist.broadcast(on_device, src=ctx.pp_ranks[stage], group=ctx.pp_group)
            full[name] = on_device.cpu()
    return full


@torch.no_grad()
def load_full_state_dict(model_chunks: Iterable[nn.Module], full: Mapping[str, torch.Tensor],
                         ctx: ParallelContext, config: Optional[ModelConfig] = None) -> None:
    """Copy this rank's TP slice of every tensor its chunks hold from ``full``.

    Shapes must match the chunks' full shapes exactly (vocab padded for this TP size; re-pad with
    ``hf_mapping.resize_vocab``). With ``config``, names that belong to no parameter of that
    model are an error too (a typo or another architecture), not silently ignored.
    """
    params = _chunk_parameters(model_chunks)
    if config is not None:
        padded = full_vocab_rows(full, config, "the full state dict")
        unknown = sorted(set(full) - set(expected_full_shapes(config, padded)))
        if unknown:
            raise ConversionError(f"the full state dict has {len(unknown)} tensor(s) that are not parameters of "
                                  f"this model config: {', '.join(unknown[:8])}")
    missing = sorted(name for name in params if name not in full)
    if missing:
        raise ConversionError(f"the full state dict lacks {len(missing)} tensor(s) this rank needs: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    for name, param in params.items():
        expected = full_shape(param, ctx.tp_size)
        tensor = full[name]
        if tuple(tensor.shape) != expected:
            hint = (" (padded vocabulary differs: re-pad with hf_mapping.resize_vocab to "
                    f"{expected[0]} rows for tensor_parallel {ctx.tp_size})" if name in
                    ("embedding.weight", "output_layer.weight") else "")
            raise ConversionError(f"{name}: full state dict has shape {tuple(tensor.shape)}, the model expects "
                                  f"{expected}{hint}")
        if getattr(param, "tensor_model_parallel", False):
            local = param.shape[param.partition_dim]
            tensor = tensor.narrow(param.partition_dim, ctx.tp_rank * local, local)
        param.copy_(tensor)


def save_full_state(path: str | os.PathLike, full: Mapping[str, torch.Tensor],
                    config: Optional[ModelConfig] = None) -> None:
    """Write ``full`` as one safetensors file (temporary name, renamed when complete)."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {"format": "pt", "megatron_aquila": FULL_STATE_FORMAT}
    if config is not None:
        metadata["model_config"] = json.dumps(asdict(config))
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: t.detach().cpu().contiguous() for name, t in full.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class LazyFullState(Mapping[str, torch.Tensor]):
    """A ``save_full_state`` file as a read-only mapping that reads each tensor only when asked.

    safetensors memory-maps the file, so a rank that loads its pipeline stage's tensors one by one
    holds at most one full tensor at a time and never reads the other stages' bytes. ``transforms``
    maps a name to a function applied to its tensor on read (e.g. re-padding the vocabulary rows).
    """

    def __init__(self, path: Path, transforms: Optional[Mapping[str, Callable[[torch.Tensor], torch.Tensor]]] = None):
        from safetensors import safe_open

        self.path = path
        self._handle = safe_open(str(path), framework="pt")
        self._names = list(self._handle.keys())
        self._transforms = dict(transforms or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        tensor = self._handle.get_tensor(name)
        transform = self._transforms.get(name)
        return tensor if transform is None else transform(tensor)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_full_state(path: str | os.PathLike, transforms=None) -> tuple[LazyFullState, Optional[ModelConfig]]:
    """A ``save_full_state`` file, lazily (see LazyFullState), and the ModelConfig stored with it."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"full state file {path} does not exist")
    full = LazyFullState(path, transforms)
    metadata = full._handle.metadata() or {}
    if metadata.get("megatron_aquila") != FULL_STATE_FORMAT:
        raise ConversionError(f"{path} is not a megatron_aquila full state file (metadata "
                              f"'megatron_aquila' = {metadata.get('megatron_aquila')!r}, expected "
                              f"{FULL_STATE_FORMAT!r}); write it with save_full_state")
    config = ModelConfig(**json.loads(metadata["model_config"])) if "model_config" in metadata else None
    return full, config


def load_full_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Optional[ModelConfig]]:
    """Every tensor of a ``save_full_state`` file, in memory, and the ModelConfig stored with them."""
    full, config = open_full_state(path)
    return {name: full[name] for name in full}, config
