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
- ``save_full_state``: a directory of safetensors shards ``full_state-0000k-of-0000N.safetensors``
  and ``full_state.safetensors.index.json`` (Hugging Face's sharded layout), each shard carrying the
  model section of the config in its metadata. It streams: each shard is written as soon as it is
  full, so a writer fed one tensor at a time holds one shard (docs/design.md section 10).
- ``open_full_state`` reads such a directory, its index, or a single ``full_state.safetensors``
  (the earlier one-file format) lazily, tensor by tensor; ``load_full_state`` reads it all.
- ``write_safetensors_shards`` / ``open_safetensors``: the sharded writer and lazy reader, shared
  with the Hugging Face export and import (``tools/convert_checkpoint.py``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from megatron_aquila.checkpoint.hf_mapping import ConversionError, expected_full_shapes, full_vocab_rows, tensor_shapes
from megatron_aquila.checkpoint.state import named_parameters
from megatron_aquila.config import ModelConfig
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.layers import full_shape

FULL_STATE_FORMAT = "megatron_aquila.full_state.v1"
FULL_STATE_STEM = "full_state"  # full_state.safetensors, or full_state.safetensors.index.json + shards
DEFAULT_SHARD_BYTES = 5 * 10 ** 9


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
    local = {name: _gather_tp(param, ctx).cpu() for name, param in named_parameters(model_chunks).items()}
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
    model are an error too (a typo or another architecture), not silently ignored. When some
    parameters are frozen (LoRA applied), only those, the base weights, are read; a Q-LoRA 4-bit weight's
    meta stand-in quantizes its slice (its ``quantized_loader``, model/qlora.py) instead of copying it.
    """
    params = named_parameters(model_chunks)
    frozen = {name: param for name, param in params.items() if not param.requires_grad}
    params = frozen or params
    names = set(full)  # iterated, not probed with ``in``: a lazy mapping would read each tensor to answer
    if config is not None:
        padded = full_vocab_rows(tensor_shapes(full), config, "the full state dict")
        unknown = sorted(names - set(expected_full_shapes(config, padded)))
        if unknown:
            raise ConversionError(f"the full state dict has {len(unknown)} tensor(s) that are not parameters of "
                                  f"this model config: {', '.join(unknown[:8])}")
    missing = sorted(name for name in params if name not in names)
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
        loader = getattr(param, "quantized_loader", None)  # a Q-LoRA 4-bit weight's meta stand-in (model/qlora.py)
        if loader is not None:
            loader(tensor.to(ctx.device))
        else:
            param.copy_(tensor)


def write_safetensors_shards(tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, stem: str,
                             max_shard_bytes: int, metadata: Mapping[str, str]) -> None:
    """``{stem}-0000k-of-0000N.safetensors`` and ``{stem}.safetensors.index.json`` in ``directory``, streaming.

    Tensors are taken from ``tensors`` in order and a shard is written as soon as the next tensor
    would take it past ``max_shard_bytes`` (a tensor larger than that gets a shard of its own), so
    at most one shard plus one tensor is held here. Shards get their final names, which need the
    count N, once all are written; the index is written last, so a directory without one is
    unfinished. ``metadata`` goes into every shard.
    """
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0

    def unfinished(number: int) -> Path:
        return directory / f"{stem}-{number:05d}.safetensors.tmp"

    def flush() -> None:
        nonlocal pending, pending_bytes
        save_file(pending, str(unfinished(len(shards) + 1)), metadata=dict(metadata))
        shards.append(list(pending))
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor.detach().contiguous()
        pending_bytes += size
        total_bytes += size
    if pending or not shards:
        flush()
    weight_map: dict[str, str] = {}
    for number, names in enumerate(shards, start=1):
        filename = f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(unfinished(number), directory / filename)
        weight_map.update(dict.fromkeys(names, filename))
    index = directory / f"{stem}.safetensors.index.json"
    index.with_name(index.name + ".tmp").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2) + "\n")
    os.replace(index.with_name(index.name + ".tmp"), index)


def save_full_state(directory: str | os.PathLike,
                    tensors: Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]],
                    config: Optional[ModelConfig] = None, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a full state dict (a mapping, or (name, tensor) pairs read one at a time) as shards in ``directory``.

    The directory is created; one that already holds a full state is an error. Returns it.
    """
    directory = Path(directory)
    if (directory / f"{FULL_STATE_STEM}.safetensors.index.json").exists():
        raise ConversionError(f"{directory} already holds a full state; choose a new directory or remove it")
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "megatron_aquila": FULL_STATE_FORMAT}
    if config is not None:
        metadata["model_config"] = json.dumps(asdict(config))
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    write_safetensors_shards(pairs, directory, FULL_STATE_STEM, max_shard_bytes, metadata)
    return directory


Transform = Callable[[torch.Tensor], torch.Tensor]


class SafetensorsFiles(Mapping[str, torch.Tensor]):
    """Tensors spread over safetensors files as a read-only mapping that reads each tensor only when asked.

    Every read opens the tensor's file on its own: safetensors memory-maps the file and the tensor
    it returns keeps only its own pages mapped, so the caller holds exactly the tensors it keeps
    (a handle kept open would keep every page read so far mapped, up to the whole file).
    Shapes come from the file headers (``shape_of`` reads no data). ``transforms`` maps a name to
    a function applied to its tensor on read (e.g. re-padding the vocabulary rows).
    """

    def __init__(self, files: Iterable[Path], transforms: Optional[Mapping[str, Transform]] = None):
        from safetensors import safe_open

        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.metadata: dict[str, str] = {}  # of the first file (a sharded writer gives every shard the same)
        for path in files:
            if not path.is_file():
                raise ConversionError(f"weight file {path} does not exist (named by the index beside it?); "
                                      "the model directory is incomplete")
            with safe_open(str(path), framework="pt") as handle:
                if not self._file_of:
                    self.metadata = dict(handle.metadata() or {})
                for name in handle.keys():
                    if name in self._file_of:
                        raise ConversionError(f"tensor {name} is stored twice: in {self._file_of[name]} and {path}")
                    self._file_of[name] = path
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())
        self._transforms = dict(transforms or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        transform = self._transforms.get(name)
        return tensor if transform is None else transform(tensor)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def open_safetensors(path: Path, stem: str, transforms: Optional[Mapping[str, Transform]] = None) -> SafetensorsFiles:
    """Lazy tensors of one safetensors file, of an index (``{stem}.safetensors.index.json``) and the shards
    it names, or of a directory holding ``{stem}.safetensors`` or that index."""
    if path.is_dir():
        candidates = [path / f"{stem}.safetensors", path / f"{stem}.safetensors.index.json"]
        found = [candidate for candidate in candidates if candidate.is_file()]
        if not found:
            raise ConversionError(f"{path} holds neither {candidates[0].name} nor {candidates[1].name}; "
                                  "is the conversion that writes it finished?")
        path = found[0]
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    if not path.name.endswith(".json"):
        return SafetensorsFiles([path], transforms)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConversionError(f"{path} is not a safetensors index with a 'weight_map' ({error!r}); "
                              "the index file is corrupt") from None
    files = SafetensorsFiles([path.parent / name for name in dict.fromkeys(weight_map.values())], transforms)
    misplaced = [name for name, filename in weight_map.items()
                 if name not in files or files.file_of(name).name != filename]
    unlisted = [name for name in files if name not in weight_map]
    if misplaced or unlisted:
        raise ConversionError(f"{path} disagrees with the shard files: {len(misplaced)} tensor(s) not in the file "
                              f"the index names (e.g. {misplaced[:3]}), {len(unlisted)} in no index entry "
                              f"(e.g. {unlisted[:3]}); rewrite the index or re-run the conversion")
    return files


def open_full_state(path: str | os.PathLike, transforms: Optional[Mapping[str, Transform]] = None
                    ) -> tuple[SafetensorsFiles, Optional[ModelConfig]]:
    """A full state (directory, index or single file; module docstring), lazily, and the ModelConfig stored with it."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"full state {path} does not exist")
    full = open_safetensors(path, FULL_STATE_STEM, transforms)
    if full.metadata.get("megatron_aquila") != FULL_STATE_FORMAT:
        raise ConversionError(f"{path} is not a megatron_aquila full state (metadata 'megatron_aquila' = "
                              f"{full.metadata.get('megatron_aquila')!r}, expected {FULL_STATE_FORMAT!r}); "
                              "write it with save_full_state or convert_checkpoint.py from-hf")
    stored = full.metadata.get("model_config")
    return full, ModelConfig(**json.loads(stored)) if stored is not None else None


def load_full_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Optional[ModelConfig]]:
    """Every tensor of a full state (see open_full_state), in memory, and the ModelConfig stored with them."""
    full, config = open_full_state(path)
    return {name: full[name] for name in full}, config
