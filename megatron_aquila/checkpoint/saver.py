"""Save checkpoints: synchronously or in the background, atomically, with retention.

Layout under ``checkpoint.save`` (see ``manager`` for reading it back)::

    {save}/iter_0000200/          DCP shards (*.distcp) + .metadata, and meta.json
    {save}/latest                 text: the directory name of the newest complete checkpoint

Order of a save, which keeps the previous checkpoint loadable if any step fails or the job dies:

1. every rank writes its own pieces (``state``: views, no gathering) into ``iter_XXXXXXX.tmp/``;
   DCP's coordinator writes ``.metadata`` only after every rank's write has succeeded;
2. rank 0 adds ``meta.json``, renames ``.tmp`` to ``iter_XXXXXXX/`` and fsyncs the directory;
3. rank 0 replaces ``latest`` (temporary file, fsync, ``os.replace``, fsync of the directory);
4. with ``checkpoint.keep_last = N``, rank 0 deletes the oldest complete checkpoints beyond the
   N newest, never the one ``latest`` names;
5. rank 0 deletes the ``iter_*.tmp`` directories that failed saves of earlier iterations left
   behind (never one of a later iteration, which may be another save still in flight).

A checkpoint of the same iteration already there (another attempt's, when a run restarts from an
earlier checkpoint into the same directory) is replaced: it is renamed to ``iter_XXXXXXX.replaced``
before step 2 and deleted only after step 3, so a crash in between leaves it for
``manager.resolve_checkpoint`` to fall back on; ``latest``'s target is never deleted before its
replacement is in place. (The trainer never re-saves the iteration it resumed from.)

``checkpoint.async_save``: the loop is blocked only while the state is copied to host memory
(pinned on GPU); a background thread runs steps 1-5 over a gloo process group of its own (DCP's
collectives must not interleave with the training loop's on the same communicator). The thread
binds itself to the rank's GPU first: DCP's file writer synchronises the current CUDA stream, which
on a thread that never called ``torch.cuda.set_device`` would open a context on GPU 0 from every
rank of the node. At most one
save is in flight: the next save, or the end of training, waits for it. The host copy is the
price: host memory holds one extra copy of this rank's model and optimizer shard, kept and reused
by the next save (the first save pays the allocation; later ones only copy).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megatron_aquila.checkpoint import state as ckpt_state
from megatron_aquila.checkpoint.manager import (LATEST_FILE, META_FILE, META_FORMAT, REPLACED_SUFFIX, CheckpointError,
                                                layout_of, missing_files)
from megatron_aquila.checkpoint.shards import BoxesSavePlanner, ShardedBoxes
from megatron_aquila.config import Config
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.training_state import TrainerParts, TrainingState

logger = logging.getLogger("megatron_aquila")

ITERATION_DIR = re.compile(r"^iter_(\d{7})$")
STAGING_DIR = re.compile(r"^iter_(\d{7})\.tmp$")


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _fsync_dir(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``: temporary file, fsync, rename, fsync of the directory."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(iteration, directory) of every finished checkpoint under ``root``, oldest first."""
    found = []
    for entry in root.iterdir() if root.is_dir() else ():
        match = ITERATION_DIR.match(entry.name)
        if match and not missing_files(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def apply_retention(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the ``keep_last`` newest, sparing ``latest``'s target."""
    if keep_last < 1:
        raise CheckpointError(f"checkpoint.keep_last {keep_last} must be >= 1 (deleting every checkpoint "
                              f"under {root} would leave nothing to resume)")
    latest_file = root / LATEST_FILE
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    checkpoints = complete_checkpoints(root)
    doomed = [path for _, path in checkpoints[:-keep_last] if path.name != latest]
    for path in doomed:
        shutil.rmtree(path)
    if doomed:
        _fsync_dir(root)
        logger.info(f"checkpoint.keep_last {keep_last}: deleted {', '.join(p.name for p in doomed)}")
    return doomed


def remove_stale_staging(root: Path, completed: int) -> list[Path]:
    """Delete the ``iter_*.tmp`` directories of iterations before ``completed`` (failed earlier saves).

    A ``.tmp`` of a later iteration is left alone: it may be a save still being written.
    """
    stale = sorted(entry for entry in root.iterdir()
                   if (match := STAGING_DIR.match(entry.name)) and int(match.group(1)) < completed)
    for path in stale:
        shutil.rmtree(path)
    if stale:
        _fsync_dir(root)
        logger.info(f"deleted {', '.join(p.name for p in stale)}: left by failed saves before iteration {completed}")
    return stale


def writer_executor(device: torch.device) -> ThreadPoolExecutor:
    """The background writer: one thread, bound to ``device`` when it is a GPU (module docstring)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer",
                              initializer=_bind_writer_thread, initargs=(device,))


def _bind_writer_thread(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _stage_to_host(values: dict[str, Any], pin_memory: bool, previous: dict[str, Any]) -> dict[str, Any]:
    """Copy every value to compact host tensors (the state keeps changing while the copy is written).

    ``previous``: the last save's staged copy; its buffers are reused where the layout is the same.
    """
    staged = {}
    for key, value in values.items():
        if isinstance(value, ShardedBoxes):
            staged[key] = value.to_host(pin_memory, previous.get(key))
        else:   # small per-rank tensors (RNG states)
            staged[key] = value.detach().cpu().clone()
    if pin_memory:
        torch.cuda.synchronize()   # the non-blocking device-to-host copies are complete
    return staged


class CheckpointSaver:
    """Saves a run's checkpoints under ``config.checkpoint.save`` (collective: every rank calls ``save``)."""

    def __init__(self, config: Config, ctx: ParallelContext):
        self.config, self.ctx = config, ctx
        self.root = Path(config.checkpoint.save) if config.checkpoint.save is not None else None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple[Future, Path]] = None
        self._group: Optional[dist.ProcessGroup] = None
        self._staged: dict[str, Any] = {}    # host buffers of the last async save, reused by the next

    # ------------------------------------------------------------------ public
    def save(self, parts: TrainerParts, state: TrainingState) -> Path:
        """Save the full training state at ``state.iteration`` (in the background with async_save)."""
        if self.root is None:
            raise CheckpointError("checkpoint.save is not set: nowhere to save; set checkpoint.save=DIR")
        self.wait()
        final = self.root / iteration_dir_name(state.iteration)
        staging = final.with_name(final.name + ".tmp")
        if self.ctx.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():   # left by a crashed save of the same iteration
                shutil.rmtree(staging)
        self._barrier()
        self._refuse_non_finite(parts, state)
        step = ckpt_state.adam_step(parts.optimizer, self.ctx)
        lora = self.config.finetune.lora is not None  # adapters only; the base weights are referred to
        values = ckpt_state.owned_save_state(parts.model_chunks, parts.optimizer, self.ctx, trainable_only=lora,
                                             with_moments=step > 0)  # each replicated piece from one rank
        values.update(ckpt_state.rng_state(parts.model_chunks, self.ctx.rank))
        meta = self._meta(parts, state, step) if self.ctx.rank == 0 else None
        if not self.config.checkpoint.async_save:
            self._write(values, staging, final, meta, group=None)
            self._barrier()
            logger.info(f"saved checkpoint {final} (iteration {state.iteration}, "
                        f"{state.consumed_train_samples} consumed samples)")
            return final
        staged = _stage_to_host(values, self.ctx.device.type == "cuda", self._staged)
        self._staged = staged
        group = self._checkpoint_group()
        if self._executor is None:
            self._executor = writer_executor(self.ctx.device)
        future = self._executor.submit(self._write, staged, staging, final, meta, group)
        self._pending = (future, final)
        logger.info(f"checkpoint {final} staged in host memory; writing in the background")
        return final

    def wait(self) -> None:
        """Block until the background save in flight (if any) is complete on every rank."""
        if self._pending is None:
            return
        future, final = self._pending
        self._pending = None
        future.result()   # re-raises a failed write here, in the training thread
        self._barrier()
        logger.info(f"saved checkpoint {final} (background write complete)")

    def close(self) -> None:
        """Finish any pending save and stop the writer thread."""
        self.wait()
        self._staged = {}
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ steps
    def _write(self, values: dict[str, Any], staging: Path, final: Path, meta: Optional[dict],
               group: Optional[dist.ProcessGroup]) -> None:
        """Steps 1-5 of the module docstring (rank 0 does 2-5 once every rank's shards are written)."""
        dcp.save(values, checkpoint_id=str(staging), planner=BoxesSavePlanner(), process_group=group,
                 no_dist=not dist.is_initialized())
        if meta is None:
            return
        write_text_atomic(staging / META_FILE, json.dumps(meta, indent=1))
        replaced = final.with_name(final.name + REPLACED_SUFFIX)
        if final.exists():      # the same iteration from another attempt: set aside, deleted below
            if replaced.exists():
                shutil.rmtree(replaced)
            os.rename(final, replaced)
        os.replace(staging, final)
        _fsync_dir(final.parent)
        write_text_atomic(final.parent / LATEST_FILE, final.name + "\n")
        if replaced.exists():
            shutil.rmtree(replaced)
        if self.config.checkpoint.keep_last is not None:
            apply_retention(final.parent, self.config.checkpoint.keep_last)
        remove_stale_staging(final.parent, meta["iteration"])

    def _refuse_non_finite(self, parts: TrainerParts, state: TrainingState) -> None:
        """Never store NaN/Inf weights: check every rank's parameters, agree over the world.

        The per-parameter verdicts stay on the device (one 0-d bool each) and are combined there, so
        the check reads the host once (after the all-reduce), not once per parameter."""
        finite = [torch.isfinite(param).all() for chunk in parts.model_chunks for param in chunk.parameters()
                  if param.device.type != "meta"]  # meta: a 4-bit stand-in (model/qlora.py)
        bad = torch.zeros(1, device=self.ctx.device)
        if finite:
            bad = (~torch.stack(finite).all()).to(bad.dtype).reshape(1)  # [1]: 1.0 where any is NaN/Inf
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            raise CheckpointError(f"refusing to save iteration {state.iteration}: parameters hold NaN or Inf; "
                                  f"resume from the previous checkpoint under {self.root} with a lower lr")

    def _meta(self, parts: TrainerParts, state: TrainingState, step: int) -> dict[str, Any]:
        optimizer = parts.optimizer
        return {
            "format": META_FORMAT, "iteration": state.iteration,
            "consumed_train_samples": state.consumed_train_samples, "skipped_iterations": state.skipped_iterations,
            "skipped_in_a_row": state.skipped_in_a_row,
            "lr_scheduler": parts.lr_scheduler.state_dict(),
            "grad_scaler": None if optimizer.grad_scaler is None else optimizer.grad_scaler.state_dict(),
            "adam_step": step, "optimizer_kind": optimizer.kind, "layout": layout_of(self.config, self.ctx),
            "config_yaml": self.config.to_yaml(),
            "base_weights": self.config.checkpoint.init_weights if self.config.finetune.lora is not None else None,
        }

    def _checkpoint_group(self) -> Optional[dist.ProcessGroup]:
        """A gloo group over the world for the writer thread (created collectively on first use)."""
        if dist.is_initialized() and self._group is None:
            self._group = dist.new_group(backend="gloo",
                                         timeout=timedelta(minutes=self.config.distributed.nccl_timeout_minutes))
        return self._group

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
