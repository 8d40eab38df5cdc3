"""Find, check and load resumable distributed checkpoints (torch.distributed.checkpoint).

Layout and the order of a save: ``saver``. ``meta.json`` holds the non-tensor state:
TrainingState counters, lr scheduler, grad scaler, Adam step count, the saving layout and the
resolved config (YAML text). Nothing is pickled.

``checkpoint.load`` may name a directory holding ``latest`` (resume the newest), or one
``iter_*`` directory. A directory without ``latest`` (or one that does not exist yet) starts the
run from scratch, so a recipe can set ``load`` equal to ``save``. A partial checkpoint (a
``.tmp`` directory, no ``.metadata`` or ``meta.json``, a missing shard file, a tensor whose saved
chunks do not cover it) is a ``CheckpointError`` naming the path.

Every rank reads only its own pieces, straight into its parameters and optimizer state
(``state``); the chunks saved under any TP x PP x DP layout (ZeRO-1 or not) are read by overlap.
Rank 0 alone checks that the checkpoint is complete (one stat per shard file, not one per rank
and file: 262,144 at 512 ranks) and broadcasts its verdict, so every rank raises the same
``CheckpointError`` or none does; the other ranks read nothing until it arrives.

Formats: ``v2`` (this code) writes each rank's optimizer pieces as their own chunks; ``v1`` wrote
each optimizer tensor whole after a DP all-reduce. Both store the same keys and global shapes,
so both load; any other format is refused with its name.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from megatron_aquila.checkpoint import state as ckpt_state
from megatron_aquila.checkpoint.shards import BoxesLoadPlanner
from megatron_aquila.config import Config, ModelConfig
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.training_state import TrainerParts, TrainingState

logger = logging.getLogger("megatron_aquila")

META_FORMAT = "megatron_aquila.checkpoint.v2"
READABLE_FORMATS = (META_FORMAT, "megatron_aquila.checkpoint.v1")
META_FILE = "meta.json"
LATEST_FILE = "latest"
REPLACED_SUFFIX = ".replaced"   # a checkpoint being replaced by a new save of its iteration (saver)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the path and how to fix it."""


def layout_of(config: Config, ctx: ParallelContext) -> dict[str, int]:
    """The saving layout recorded in meta.json (RNG states are restored only under the same one)."""
    return {"tp": ctx.tp_size, "cp": ctx.cp_size, "pp": ctx.pp_size, "dp": ctx.dp_size,
            "vpp": config.parallel.virtual_pipeline_stages, "world": ctx.world_size}


# ---------------------------------------------------------------------------------- find
def missing_files(path: Path) -> list[str]:
    """The files a finished checkpoint directory has and ``path`` lacks (empty: it is complete)."""
    return [name for name in (".metadata", META_FILE) if not (path / name).is_file()]


def resolve_checkpoint(load: str | os.PathLike) -> Optional[Path]:
    """The complete checkpoint directory ``load`` designates, or None to start from scratch."""
    path = Path(load)
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"checkpoint {path} is an unfinished save (.tmp); load its parent directory "
                              "(which resumes the newest complete checkpoint) or a finished iter_* directory")
    if (path / LATEST_FILE).is_file():
        name = (path / LATEST_FILE).read_text().strip()
        path = path / name
        replaced = path.with_name(path.name + REPLACED_SUFFIX)
        if not path.is_dir() and replaced.is_dir() and not missing_files(replaced):
            logger.warning(f"{path} is missing: a save replacing it stopped midway; resuming the checkpoint "
                           f"it replaced, {replaced}")
            return replaced
        if not path.is_dir():
            raise CheckpointError(f"{path.parent / LATEST_FILE} names {name!r} but {path} does not exist; "
                                  "fix the latest file or load an existing iter_* directory")
    elif not path.name.startswith("iter_"):
        return None
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: missing {', '.join(missing)}; "
                              "load an earlier complete iter_* directory")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path / META_FILE}: {error}") from None
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path / META_FILE} has format {meta.get('format')!r}; this version reads "
                              f"{', '.join(READABLE_FORMATS)}: convert it with the version that wrote it (its "
                              "to-hf export, then from-hf) or load it with that version")
    return meta


def read_dcp_metadata(path: Path) -> Metadata:
    return dcp.FileSystemReader(str(path)).read_metadata()


def check_complete(path: Path, metadata: Metadata) -> None:
    """Every shard file the metadata names is present and long enough, and every tensor's chunks cover it.

    A checkpoint missing some ranks' shards (a lost ``__3_0.distcp``, a copy that skipped files)
    fails here with the file names instead of deep inside DCP or, worse, with garbage weights.
    """
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    absent = sorted(name for name, end in needed.items()
                    if not (path / name).is_file() or (path / name).stat().st_size < end)
    if absent:
        raise CheckpointError(f"checkpoint {path} is missing or has truncated shard file(s) {', '.join(absent[:4])}"
                              f"{' ...' if len(absent) > 4 else ''} ({len(absent)} of {len(needed)}): the shards of "
                              "some ranks are lost; restore them or load an earlier complete iter_* directory")
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            covered = sum(math.prod(chunk.sizes) for chunk in item.chunks)
            if covered != math.prod(item.size):
                raise CheckpointError(f"checkpoint {path}: {key} has chunks covering {covered} of its "
                                      f"{math.prod(item.size)} elements: some ranks' shards were not saved; load "
                                      "an earlier complete iter_* directory")


def checked_checkpoint(path: Path, ctx: ParallelContext) -> tuple[dict[str, Any], Metadata]:
    """``meta.json`` and the DCP metadata of ``path`` once rank 0 found it complete (collective over the world).

    Rank 0 reads both and runs ``check_complete``; its verdict (empty, or the error message) is
    broadcast over ``ctx.world_group``, and every rank raises the same CheckpointError or goes on
    (the others then read the two small files themselves). Any error of rank 0's reading becomes
    the verdict, so no rank waits for a broadcast that never comes.
    """
    if ctx.world_size == 1:
        return _read_complete(path)
    verdict, found = "", None
    if ctx.rank == 0:
        try:
            found = _read_complete(path)
        except CheckpointError as error:
            verdict = str(error)
        except Exception as error:   # an unreadable .metadata, a filesystem error: still one verdict for all
            verdict = f"cannot read checkpoint {path}: {type(error).__name__}: {error}"
    verdict = _broadcast_text(verdict, ctx)
    if verdict:
        raise CheckpointError(verdict)
    return found or (read_meta(path), read_dcp_metadata(path))


def _read_complete(path: Path) -> tuple[dict[str, Any], Metadata]:
    meta, metadata = read_meta(path), read_dcp_metadata(path)
    check_complete(path, metadata)
    return meta, metadata


def _broadcast_text(text: str, ctx: ParallelContext) -> str:
    """Rank 0's ``text`` on every rank: its UTF-8 length, then its bytes, broadcast over the world group."""
    encoded = text.encode()
    length = torch.tensor([len(encoded)], dtype=torch.int64, device=ctx.device)
    dist.broadcast(length, src=0, group=ctx.world_group)
    if length.item() == 0:
        return ""
    data = (torch.tensor(list(encoded), dtype=torch.uint8, device=ctx.device) if ctx.rank == 0 else
            torch.empty(int(length.item()), dtype=torch.uint8, device=ctx.device))
    dist.broadcast(data, src=0, group=ctx.world_group)
    return data.cpu().numpy().tobytes().decode()


def _check_keys(path: Path, wanted: dict[str, Any], metadata: Metadata) -> None:
    """Every wanted key exists in the checkpoint with the same global shape (clear error otherwise)."""
    saved = metadata.state_dict_metadata
    missing = sorted(key for key in wanted if key not in saved)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensor(s), e.g. {missing[:3]}; it was saved "
                              "from another model (compare num_layers / names) or without that state")
    for key, value in wanted.items():
        if tuple(saved[key].size) != tuple(value.size()):
            raise CheckpointError(f"checkpoint {path}: {key} has global shape {tuple(saved[key].size)}, this model "
                                  f"needs {tuple(value.size())}; model shapes (or the vocab padding: "
                                  "make_vocab_size_divisible_by x TP) must match")


def _dcp_load(path: Path, values: dict[str, Any], metadata: Metadata) -> None:
    _check_keys(path, values, metadata)
    dcp.load(values, checkpoint_id=str(path), planner=BoxesLoadPlanner(), no_dist=not dist.is_initialized())


MODEL_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "kv_heads", "ffn_size", "vocab_size", "head_dim")


def check_model_change(path: Path, meta: dict[str, Any], config: Config) -> list[str]:
    """Refuse a change of the model's shape; return the other model fields that changed (to log).

    Extending the context on resume (``seq_length``, ``rope_*``) is the usual reason to change
    the model section and is allowed; a different shape would not even match the saved tensors.
    """
    saved_section = (yaml.safe_load(meta.get("config_yaml") or "") or {}).get("model") or {}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved = ModelConfig(**{key: value for key, value in saved_section.items() if key in known})
    reshaped = [f"{name} {getattr(saved, name)} -> {getattr(config.model, name)}" for name in MODEL_SHAPE
                if getattr(saved, name) != getattr(config.model, name)]
    if reshaped:
        raise CheckpointError(f"checkpoint {path} holds a model of another shape ({'; '.join(reshaped)}); only "
                              "seq_length and the rope_* settings may change when resuming: set the model keys "
                              "back to the checkpoint's (its config is in meta.json)")
    current = dataclasses.asdict(config.model)
    return [f"{name} {value} -> {current[name]}" for name, value in dataclasses.asdict(saved).items()
            if name != "preset" and value != current[name]]


def will_resume(config: Config) -> bool:
    """Whether ``checkpoint.load`` names a checkpoint to resume (so random initialisation can be skipped)."""
    return config.checkpoint.load is not None and resolve_checkpoint(config.checkpoint.load) is not None


# ---------------------------------------------------------------------------------- load
def load_checkpoint(config: Config, ctx: ParallelContext, parts: TrainerParts) -> Optional[TrainingState]:
    """Restore model, optimizer, lr scheduler, RNG and counters from ``config.checkpoint.load``.

    Returns the restored TrainingState, or None when there is nothing to load (start from scratch).
    """
    c = config.checkpoint
    if c.load is None:
        return None
    path = resolve_checkpoint(c.load)
    if path is None:
        logger.info(f"no checkpoint to resume in {c.load} (no '{LATEST_FILE}' file): starting from scratch")
        return None
    meta, metadata = checked_checkpoint(path, ctx)
    changed = check_model_change(path, meta, config)
    if changed:
        logger.info(f"resuming {path} with a changed model section: {'; '.join(changed)}")
    chunks, optimizer = parts.model_chunks, parts.optimizer
    lora = config.finetune.lora is not None
    if lora and meta.get("base_weights") != c.init_weights:
        logger.warning(f"checkpoint {path} holds LoRA adapters trained on {meta.get('base_weights')}, this run's "
                       f"checkpoint.init_weights is {c.init_weights}: the adapters are applied to the latter")
    values: dict[str, Any] = ckpt_state.model_state(chunks, ctx, trainable_only=lora)
    load_optim = not c.no_load_optim
    if load_optim:
        if (meta["grad_scaler"] is None) != (optimizer.grad_scaler is None):
            raise CheckpointError(f"checkpoint {path} was saved {'with' if meta['grad_scaler'] else 'without'} an "
                                  "fp16 loss scaler and this run differs; resume with the same precision.dtype or "
                                  "set checkpoint.no_load_optim=true")
        step = meta["adam_step"]
        if step > 0:
            ckpt_state.allocate_adam_state(optimizer, step)
        values.update(ckpt_state.optimizer_state(optimizer, ctx, with_moments=step > 0))
    same_layout = {"cp": 1, **meta["layout"]} == layout_of(config, ctx)  # checkpoints before CP recorded none
    load_rng = not c.no_load_rng and same_layout
    if load_rng:
        values.update({key: torch.empty_like(v) for key, v in ckpt_state.rng_state(chunks, ctx.rank).items()})
    elif not c.no_load_rng:
        logger.warning(f"checkpoint layout {meta['layout']} differs from this run's {layout_of(config, ctx)}: "
                       f"RNG states not restored; generators keep their seeding from training.seed")
    _dcp_load(path, values, metadata)
    if load_optim:
        if optimizer.grad_scaler is not None:
            optimizer.grad_scaler.load_state_dict(meta["grad_scaler"])
        parts.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    else:
        ckpt_state.refresh_masters(optimizer)
    if load_rng:
        ckpt_state.apply_rng_state(chunks, values, ctx.rank)
    logger.info(f"loaded checkpoint {path} (iteration {meta['iteration']}, saved with layout {meta['layout']}"
                f"{'' if load_optim else ', optimizer state skipped'})")
    return TrainingState(iteration=meta["iteration"], consumed_train_samples=meta["consumed_train_samples"],
                         skipped_iterations=meta["skipped_iterations"],
                         skipped_in_a_row=meta.get("skipped_in_a_row", 0))   # absent before this counter existed


def load_checkpoint_into(model_chunks: Iterable[nn.Module], path: str | os.PathLike,
                         ctx: ParallelContext) -> dict[str, Any]:
    """Load only the model weights of a checkpoint into ``model_chunks`` (any layout, e.g. one TP1 process).

    ``path``: a save directory holding ``latest`` or one ``iter_*`` directory. Returns the
    checkpoint's ``meta.json`` (its ``config_yaml`` recreates the model config for HF export).
    When some parameters are frozen (LoRA applied to the chunks), only those, the base weights,
    are read; the adapters keep their initialisation.
    """
    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise CheckpointError(f"{path} holds no checkpoint: expected a '{LATEST_FILE}' file or an iter_* directory")
    meta, metadata = checked_checkpoint(resolved, ctx)
    values = ckpt_state.model_state(list(model_chunks), ctx)
    frozen = {key for key, param in ckpt_state.named_parameters(model_chunks).items() if not param.requires_grad}
    if frozen:
        values = {key: value for key, value in values.items() if key[len("model."):] in frozen}
    _dcp_load(resolved, values, metadata)
    return meta


class CheckpointModelTensors(Mapping[str, torch.Tensor]):
    """The full (TP1, padded-vocab) model weights of a checkpoint as a lazy read-only mapping.

    Names are parameter names (``layers.7.mlp.down.weight``); shapes come from the DCP metadata
    (``shape_of`` reads nothing); each item is read from the shards only when asked, whatever
    layout saved it, so a conversion can hold one layer at a time.
    """

    def __init__(self, path: Path):
        self.path = path
        saved = read_dcp_metadata(path).state_dict_metadata
        self._items = {key[len("model."):]: item for key, item in saved.items() if key.startswith("model.")}
        if not self._items:
            raise CheckpointError(f"checkpoint {path} holds no model.* tensors")

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._items[name].size)

    def __getitem__(self, name: str) -> torch.Tensor:
        item = self._items[name]
        value = {f"model.{name}": torch.empty(tuple(item.size), dtype=item.properties.dtype)}
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(value, checkpoint_id=str(self.path), no_dist=True)
        return value[f"model.{name}"]

    def __contains__(self, name: object) -> bool:   # Mapping's default would read the tensor
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def read_full_state(path: str | os.PathLike) -> tuple[CheckpointModelTensors, dict[str, Any]]:
    """The model weights of a checkpoint (lazily, see CheckpointModelTensors) and its meta.json."""
    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise CheckpointError(f"{path} holds no checkpoint: expected a '{LATEST_FILE}' file or an iter_* directory")
    return CheckpointModelTensors(resolved), read_meta(resolved)
