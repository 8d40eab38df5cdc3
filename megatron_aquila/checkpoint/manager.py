"""Save, find and load resumable distributed checkpoints (torch.distributed.checkpoint).

Layout under ``checkpoint.save``::

    {save}/iter_0000200/          DCP shards (*.distcp) + .metadata, and meta.json
    {save}/latest                 text: the directory name of the newest complete checkpoint

A save writes ``iter_XXXXXXX.tmp/`` (DCP collectively, then rank 0 adds ``meta.json``); after a
barrier rank 0 renames it to ``iter_XXXXXXX/`` and replaces ``latest`` atomically (temporary file
+ ``os.replace``). A crash at any point leaves the previous checkpoint and ``latest`` intact.

``meta.json`` holds the non-tensor state: TrainingState counters, lr scheduler, grad scaler,
Adam step count, the saving layout and the resolved config (YAML text). Nothing is pickled.

``checkpoint.load`` may name a directory holding ``latest`` (resume the newest), or one
``iter_*`` directory. A directory without ``latest`` (or one that does not exist yet) starts the
run from scratch, so a recipe can set ``load`` equal to ``save``. A partial checkpoint (a
``.tmp`` directory, no ``.metadata`` or ``meta.json``) is a ``CheckpointError`` naming the path.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from megatron_aquila.checkpoint import state as ckpt_state
from megatron_aquila.checkpoint.mesh import tp_device_mesh
from megatron_aquila.parallel.context import ParallelContext

if TYPE_CHECKING:
    from megatron_aquila.config import Config
    from megatron_aquila.trainer import TrainerParts, TrainingState

logger = logging.getLogger("megatron_aquila")

META_FORMAT = "megatron_aquila.checkpoint.v1"
META_FILE = "meta.json"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the path and how to fix it."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _layout(config: "Config", ctx: ParallelContext) -> dict[str, int]:
    return {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size,
            "vpp": config.parallel.virtual_pipeline_stages, "world": ctx.world_size}


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------- save
def save_checkpoint(config: "Config", ctx: ParallelContext, parts: "TrainerParts", state: "TrainingState") -> Path:
    """Collectively save the full training state at ``state.iteration`` under ``config.checkpoint.save``."""
    root = Path(config.checkpoint.save)
    final = root / iteration_dir_name(state.iteration)
    staging = root / (final.name + ".tmp")
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():   # left by a crashed save of the same iteration
            shutil.rmtree(staging)
    _barrier()
    mesh = tp_device_mesh(ctx)
    optimizer = parts.optimizer
    step = ckpt_state.adam_step(optimizer, ctx)
    values: dict[str, torch.Tensor] = {}
    values.update(ckpt_state.model_state(parts.model_chunks, mesh))
    values.update(ckpt_state.optimizer_state(optimizer, parts.model_chunks, ctx, mesh, with_moments=step > 0))
    values.update(ckpt_state.rng_state(parts.model_chunks, ctx.rank))
    dcp.save(values, checkpoint_id=str(staging), no_dist=not dist.is_initialized())
    if ctx.rank == 0:
        meta = {
            "format": META_FORMAT, "iteration": state.iteration,
            "consumed_train_samples": state.consumed_train_samples, "skipped_iterations": state.skipped_iterations,
            "lr_scheduler": parts.lr_scheduler.state_dict(),
            "grad_scaler": None if optimizer.grad_scaler is None else optimizer.grad_scaler.state_dict(),
            "adam_step": step, "optimizer_kind": optimizer.kind, "layout": _layout(config, ctx),
            "config_yaml": config.to_yaml(),
        }
        _write_text_atomic(staging / META_FILE, json.dumps(meta, indent=1))
    _barrier()
    if ctx.rank == 0:
        if final.exists():     # re-saving an iteration (e.g. after resuming from it): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
        _write_text_atomic(root / LATEST_FILE, final.name + "\n")
    _barrier()
    logger.info(f"saved checkpoint {final} (iteration {state.iteration}, "
                f"{state.consumed_train_samples} consumed samples)")
    return final


# ---------------------------------------------------------------------------------- find
def resolve_checkpoint(load: str | os.PathLike) -> Optional[Path]:
    """The complete checkpoint directory ``load`` designates, or None to start from scratch."""
    path = Path(load)
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"checkpoint {path} is an unfinished save (.tmp); load its parent directory "
                              "(which resumes the newest complete checkpoint) or a finished iter_* directory")
    if (path / LATEST_FILE).is_file():
        name = (path / LATEST_FILE).read_text().strip()
        path = path / name
        if not path.is_dir():
            raise CheckpointError(f"{path.parent / LATEST_FILE} names {name!r} but {path} does not exist; "
                                  "fix the latest file or load an existing iter_* directory")
    elif not path.name.startswith("iter_"):
        return None
    missing = [name for name in (".metadata", META_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: missing {', '.join(missing)}; "
                              "load an earlier complete iter_* directory")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path / META_FILE}: {error}") from None
    if meta.get("format") != META_FORMAT:
        raise CheckpointError(f"{path / META_FILE} has format {meta.get('format')!r}, expected {META_FORMAT!r}")
    return meta


def _check_keys(path: Path, wanted: dict[str, torch.Tensor]) -> None:
    """Every wanted key exists in the checkpoint with the same global shape (clear error otherwise)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = sorted(key for key in wanted if key not in saved)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensor(s), e.g. {missing[:3]}; it was saved "
                              "from another model (compare num_layers / names) or without that state")
    for key, value in wanted.items():
        if tuple(saved[key].size) != tuple(value.shape):
            raise CheckpointError(f"checkpoint {path}: {key} has global shape {tuple(saved[key].size)}, this model "
                                  f"needs {tuple(value.shape)}; model shapes (or the vocab padding: "
                                  "make_vocab_size_divisible_by x TP) must match")


def _dcp_load(path: Path, values: dict[str, torch.Tensor]) -> None:
    _check_keys(path, values)
    dcp.load(values, checkpoint_id=str(path), no_dist=not dist.is_initialized())


# ---------------------------------------------------------------------------------- load
def load_checkpoint(config: "Config", ctx: ParallelContext, parts: "TrainerParts") -> Optional["TrainingState"]:
    """Restore model, optimizer, lr scheduler, RNG and counters from ``config.checkpoint.load``.

    Returns the restored TrainingState, or None when there is nothing to load (start from scratch).
    """
    from megatron_aquila.trainer import TrainingState

    c = config.checkpoint
    if c.load is None:
        return None
    path = resolve_checkpoint(c.load)
    if path is None:
        logger.info(f"no checkpoint to resume in {c.load} (no '{LATEST_FILE}' file): starting from scratch")
        return None
    meta = read_meta(path)
    mesh = tp_device_mesh(ctx)
    chunks = parts.model_chunks
    values = ckpt_state.model_state(chunks, mesh, empty=True)
    load_optim = not c.no_load_optim
    if load_optim:
        values.update(ckpt_state.empty_optimizer_state(chunks, mesh, with_moments=meta["adam_step"] > 0))
    same_layout = meta["layout"] == _layout(config, ctx)
    load_rng = not c.no_load_rng and same_layout
    if load_rng:
        values.update({key: torch.empty_like(v) for key, v in ckpt_state.rng_state(chunks, ctx.rank).items()})
    elif not c.no_load_rng:
        logger.warning(f"checkpoint layout {meta['layout']} differs from this run's {_layout(config, ctx)}: "
                       f"RNG states not restored; generators keep their seeding from training.seed")
    _dcp_load(path, values)
    ckpt_state.apply_model_state(chunks, values)
    if load_optim:
        ckpt_state.apply_optimizer_state(parts.optimizer, values, meta["adam_step"], meta["grad_scaler"])
        parts.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    else:
        ckpt_state.refresh_masters(parts.optimizer)
    if load_rng:
        ckpt_state.apply_rng_state(chunks, values, ctx.rank)
    logger.info(f"loaded checkpoint {path} (iteration {meta['iteration']}, saved with layout {meta['layout']}"
                f"{'' if load_optim else ', optimizer state skipped'})")
    return TrainingState(iteration=meta["iteration"], consumed_train_samples=meta["consumed_train_samples"],
                         skipped_iterations=meta["skipped_iterations"])


def load_checkpoint_into(model_chunks: Iterable[nn.Module], path: str | os.PathLike,
                         ctx: ParallelContext) -> dict[str, Any]:
    """Load only the model weights of a checkpoint into ``model_chunks`` (any layout, e.g. one TP1 process).

    ``path``: a save directory holding ``latest`` or one ``iter_*`` directory. Returns the
    checkpoint's ``meta.json`` (its ``config_yaml`` recreates the model config for HF export).
    """
    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise CheckpointError(f"{path} holds no checkpoint: expected a '{LATEST_FILE}' file or an iter_* directory")
    chunks = list(model_chunks)
    values = ckpt_state.model_state(chunks, tp_device_mesh(ctx), empty=True)
    _dcp_load(resolved, values)
    ckpt_state.apply_model_state(chunks, values)
    return read_meta(resolved)


class CheckpointModelTensors(Mapping[str, torch.Tensor]):
    """The full (TP1, padded-vocab) model weights of a checkpoint as a lazy read-only mapping.

    Names are parameter names (``layers.7.mlp.down.weight``); shapes come from the DCP metadata
    (``shape_of`` reads nothing); each item is read from the shards only when asked, whatever
    layout saved it, so a conversion can hold one layer at a time.
    """

    def __init__(self, path: Path):
        self.path = path
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
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
