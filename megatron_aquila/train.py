"""Entry point: ``torchrun --nproc_per_node N -m megatron_aquila.train RECIPE.yaml [section.key=value ...]``.

Parses and validates the recipe before any process-group work, initialises torch.distributed
(NCCL on GPU, gloo on CPU; ``distributed.nccl_timeout_minutes``), starts the rank's hang
``Watchdog``, builds the components and runs the training loop.

Ending (docs/design.md, "Failure handling"): a run that returns leaves in step, every rank at a
barrier and then destroying its groups. An exception on one rank must not wait for the others,
which are blocked in some collective of their own: the rank logs one line naming itself, ``rank R
(tp .. cp .. pp .. dp ..) failed: Error: message``, followed by the traceback (bad-input errors,
whose message says what to fix, without one), aborts its process groups (no barrier) and leaves
with ``os._exit(1)``; torchrun then stops the other ranks. A single process (no torchrun) raises
as usual.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from megatron_aquila.build import build_metrics, build_trainer_parts
from megatron_aquila.checkpoint.hf_mapping import ConversionError
from megatron_aquila.checkpoint.manager import CheckpointError
from megatron_aquila.config import Config, ConfigError, load_config
from megatron_aquila.cpu_runtime import keep_freed_memory, share_cpu_threads
from megatron_aquila.data.indexed_dataset import IndexedDatasetError
from megatron_aquila.parallel.context import ParallelContext, default_device
from megatron_aquila.trainer import Trainer, TrainingState
from megatron_aquila.watchdog import Watchdog

logger = logging.getLogger("megatron_aquila")

# Errors about the run's inputs (data, checkpoints, weights), reported as one line.
USER_ERRORS = (IndexedDatasetError, CheckpointError, ConversionError)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_aquila.train",
        description="Pretrain an Aquila2 model. Launch with torchrun, one process per device.")
    parser.add_argument("recipe", help="YAML recipe, e.g. examples/tiny/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.train_iters=100")
    return parser.parse_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank {rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)


def init_distributed(config: Config) -> ParallelContext:
    """Join the torchrun job (if any) and build the parallel grid."""
    device = default_device()
    if "RANK" not in os.environ:
        return ParallelContext.single_process(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=config.distributed.nccl_timeout_minutes)
    if not dist.is_initialized():
        # NCCL creates communicators lazily, on a group's first operation and among only the ranks
        # in it. Binding the default group to this rank's GPU (device_id) creates the world
        # communicator now, and lets NCCL split the subgroups' communicators from it;
        # ParallelContext.initialize then runs one all-reduce on every group (see
        # parallel/context.py warm_up_groups) so no group is first used by a point-to-point
        # exchange among some of its ranks. gloo has no such state: no device to bind.
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group(backend="gloo", timeout=timeout)
    return ParallelContext.initialize(config.parallel.tensor_parallel, config.parallel.pipeline_parallel, device,
                                      cp_size=config.parallel.context_parallel, timeout=timeout)


def save_resolved_config(config: Config, ctx: ParallelContext) -> None:
    output_dir = config.logging.output_dir or config.checkpoint.save
    if ctx.rank != 0 or output_dir is None:
        return
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".yaml.tmp")
    temporary.write_text(config.to_yaml())
    temporary.replace(path)


def main(argv: Optional[list[str]] = None) -> TrainingState:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = load_config(args.recipe, args.overrides)
        config.validate(world_size)
    except ConfigError as error:
        raise SystemExit(f"configuration error: {error}") from None
    if default_device().type == "cpu":
        share_cpu_threads()
        keep_freed_memory()
    ctx = init_distributed(config)
    watchdog = Watchdog(config.distributed.hang_timeout_minutes, rank_label(ctx)).start()
    watchdog.beat("start-up")
    with errors_end_the_job(ctx, watchdog):
        logger.info(f"resolved configuration:\n{config.to_yaml()}")
        save_resolved_config(config, ctx)
        state = run(config, ctx, watchdog)
    watchdog.beat("shut-down")
    if dist.is_initialized():
        shut_down(ctx)
    watchdog.stop()
    return state


def run(config: Config, ctx: ParallelContext, watchdog: Optional[Watchdog] = None) -> TrainingState:
    """Build and train; everything built here is released when it returns."""
    parts, state = build_trainer_parts(config, ctx)
    metrics = build_metrics(config, ctx)
    return Trainer(config, ctx, parts, metrics, state, watchdog).train()


def rank_label(ctx: ParallelContext) -> str:
    """This rank and its grid coordinates, as failure messages and watchdog dumps name it."""
    return f"rank {ctx.rank} (tp {ctx.tp_rank} cp {ctx.cp_rank} pp {ctx.pp_rank} dp {ctx.dp_rank})"


@contextlib.contextmanager
def errors_end_the_job(ctx: ParallelContext, watchdog: Watchdog) -> Iterator[None]:
    """An exception in the block ends this rank by ``end_after_error``: bad input (``USER_ERRORS``: the
    message says what, where and how to fix) with one line, anything else with its traceback."""
    try:
        yield
    except USER_ERRORS as error:
        end_after_error(ctx, watchdog, error, with_traceback=False)
        raise SystemExit(f"{rank_label(ctx)} failed: {type(error).__name__}: {error}") from None
    except BaseException as error:
        end_after_error(ctx, watchdog, error, with_traceback=True)
        raise


def end_after_error(ctx: ParallelContext, watchdog: Watchdog, error: BaseException, with_traceback: bool) -> None:
    """In a torchrun job: log ``error`` once, abort the process groups and exit 1, entering no collective
    (module docstring). A single process has no peers to spare: stop the watchdog and return, to raise."""
    if not dist.is_initialized():
        watchdog.stop()
        return
    message = f"{rank_label(ctx)} failed: {type(error).__name__}: {error}"
    if with_traceback:
        message += "\n" + "".join(traceback.format_exception(error)).rstrip()
    logger.error(message)
    abort_process_groups()
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def abort_process_groups() -> None:
    """Abort every process group without waiting for a peer (torch's ``_abort_process_group``, or
    ``destroy_process_group`` on a torch without it); a failure is logged, the process exits anyway."""
    try:
        if hasattr(c10d, "_abort_process_group"):
            c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception as error:
        logger.error(f"aborting the process groups failed too ({type(error).__name__}: {error}); exiting")


def shut_down(ctx: ParallelContext) -> None:
    """Leave the job in step: wait for every rank, release what holds process groups, destroy them."""
    dist.barrier()
    ctx.release_groups()
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
