"""Check that a run resumes bit for bit on this cluster.

    torchrun ... -m megatron_aquila.check_resume RECIPE.yaml [section.key=value ...] --iters N [--workdir DIR]

Launched like training (under torchrun with the recipe's layout, or alone for one process), it
trains N iterations from scratch and saves a checkpoint at iteration N/2 (rounded down) into a
fresh temporary directory under ``--workdir`` (default: the recipe's ``logging.output_dir``, else
``checkpoint.save``; every rank must reach it, as for checkpoints). Then, in the same processes, it
destroys the process group, joins a fresh one, rebuilds everything and resumes from that
checkpoint to N. The loss and the grad norm of iterations N/2+1..N must be the same floats in both
runs, bit for bit. Rank 0 prints

    resume check passed: iterations 3-4 bit-identical (loss, grad norm) on TP2 CP1 PP1 DP2 (4 processes, cuda)

and every process exits 0, after deleting the temporary directory; otherwise every rank exits 1
naming the first difference (iteration, quantity, both values with their hex) and the directory
is kept.

What the check changes in the recipe: the run length (``train_iters`` N, or the ``train_samples``
of N iterations when the recipe counts samples), ``checkpoint.save``/``load``/``save_interval``,
no ``exit_interval`` or ``exit_duration_minutes``, and no metric sinks. The layout, precision,
data, ``async_save`` and everything else are the recipe's. Bad input (N < 2, a recipe that does
not validate for this world size, ``no_load_optim``/``no_load_rng``, nowhere to write) fails
before any process group starts.

The fresh process group takes its store keys under a namespace of its own: a second
``init_process_group`` in the same processes would otherwise find the first one's keys in
torchrun's store (group names restart after ``destroy_process_group``) and connect to the
destroyed group's endpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import struct
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_aquila.batch_schedule import BatchSchedule
from megatron_aquila.build import build_trainer_parts
from megatron_aquila.checkpoint.saver import iteration_dir_name
from megatron_aquila.config import Config, ConfigError, load_config
from megatron_aquila.cpu_runtime import keep_freed_memory, share_cpu_threads
from megatron_aquila.parallel.context import ParallelContext, default_device
from megatron_aquila.parallel.pipeline.schedules import Microbatch
from megatron_aquila.train import errors_end_the_job, init_distributed, rank_label, setup_logging, shut_down
from megatron_aquila.trainer import Trainer
from megatron_aquila.watchdog import Watchdog

Records = dict[int, tuple[float, float]]  # iteration -> (loss, grad norm)


class RecordingTrainer(Trainer):
    """The trainer, recording every iteration's loss and grad norm and saving only at ``save_at``."""

    def __init__(self, *args, save_at: Optional[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.save_at = save_at
        self.records: Records = {}

    def _train_iteration(self, stream: Iterator[Microbatch]):
        loss, seconds, global_batch, result = super()._train_iteration(stream)
        self.records[self.state.iteration] = (loss, result.grad_norm)
        return loss, seconds, global_batch, result

    def save_checkpoint(self) -> None:
        if self.state.iteration == self.save_at:
            super().save_checkpoint()


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_aquila.check_resume",
        description="Train N iterations saving at N/2, resume from N/2 in a fresh process group, and compare "
                    "every loss and grad norm bit for bit. Launch like training (torchrun).")
    parser.add_argument("recipe", help="YAML recipe, e.g. examples/aquila2/7b/aquila2_7b.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.data_path=[/data/x_text_document]")
    parser.add_argument("--iters", type=int, required=True, help="iterations of the uninterrupted run (>= 2)")
    parser.add_argument("--workdir", help="where the temporary checkpoint goes (default: logging.output_dir, "
                                          "else checkpoint.save); every rank must reach it")
    return parser.parse_intermixed_args(argv)


def check_config(args: argparse.Namespace, world_size: int) -> tuple[Config, Path]:
    """The recipe as the check runs it, and the directory for its temporary checkpoint (ConfigError if unfit)."""
    if args.iters < 2:
        raise ConfigError(f"--iters {args.iters} must be >= 2: the check saves at iteration {args.iters} // 2 = "
                          f"{args.iters // 2} and compares the iterations after it; e.g. --iters 4")
    config = load_config(args.recipe, args.overrides)
    config.validate(world_size)   # the recipe as given (its layout), before the check changes it
    c, t = config.checkpoint, config.training
    if c.no_load_optim or c.no_load_rng:
        raise ConfigError(f"checkpoint.no_load_optim {c.no_load_optim} / no_load_rng {c.no_load_rng}: a resume "
                          "that skips optimizer or RNG state is not exact by design; set both to false for the check")
    workdir = args.workdir or config.logging.output_dir or c.save
    if workdir is None:
        raise ConfigError("nowhere to write the temporary checkpoint: give --workdir DIR (a directory every rank "
                          "reaches) or set logging.output_dir or checkpoint.save in the recipe")
    if t.train_samples is not None:   # a recipe counting samples (batch ramp-up): the samples of N iterations
        schedule = BatchSchedule(t.global_batch_size, t.micro_batch_size, config.data_parallel_size(world_size),
                                 tuple(t.rampup_batch_size) if t.rampup_batch_size else None)
        length = {"train_samples": schedule.samples_consumed_by(args.iters)}
    else:
        length = {"train_iters": args.iters}
    config.training = dataclasses.replace(t, **length, exit_interval=None, exit_duration_minutes=None)
    config.logging = dataclasses.replace(config.logging, tensorboard_dir=None, wandb_project=None)
    config.checkpoint = dataclasses.replace(c, save=str(workdir), save_interval=args.iters // 2, load=None)
    config.validate(world_size)
    return config, Path(workdir)


def join_process_group(config: Config, namespace: str) -> ParallelContext:
    """``train.init_distributed`` with the store's keys under ``namespace`` (module docstring)."""
    if "RANK" in os.environ:
        device = default_device()
        timeout = timedelta(minutes=config.distributed.nccl_timeout_minutes)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        backend = {"backend": "gloo"}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            backend = {"backend": "nccl", "device_id": device}
        dist.init_process_group(store=dist.PrefixStore(namespace, store), rank=rank, world_size=world_size,
                                timeout=timeout, **backend)
    return init_distributed(config)


def fresh_directory(workdir: Path, ctx: ParallelContext) -> Path:
    """A new empty directory under ``workdir``, made by rank 0 and named to every rank."""
    name = [None]
    if ctx.rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        name[0] = tempfile.mkdtemp(prefix="check_resume_", dir=workdir)
    if ctx.world_size > 1:
        dist.broadcast_object_list(name, src=0, group=ctx.world_group, device=ctx.device)
    return Path(name[0])


def run_phase(config: Config, namespace: str, save_at: Optional[int], workdir: Optional[Path] = None
              ) -> tuple[Records, str, Optional[Path]]:
    """One run in a process group of its own: (its records, its layout, the fresh directory or None).

    With ``workdir`` it saves under a fresh directory made there (``fresh_directory``). Errors end
    the process as ``train.main``'s do; the process group is destroyed before this returns.
    """
    ctx = join_process_group(config, namespace)
    watchdog = Watchdog(config.distributed.hang_timeout_minutes, rank_label(ctx)).start()
    watchdog.beat("start-up")
    with errors_end_the_job(ctx, watchdog):
        directory = fresh_directory(workdir, ctx) if workdir is not None else None
        if directory is not None:
            config = dataclasses.replace(config, checkpoint=dataclasses.replace(
                config.checkpoint, save=str(directory / "checkpoints")))
        parts, state = build_trainer_parts(config, ctx)
        trainer = RecordingTrainer(config, ctx, parts, None, state, watchdog, save_at=save_at)
        trainer.train()
    records, layout = trainer.records, describe_layout(config, ctx)
    del parts, trainer   # everything holding process groups goes before they are destroyed
    watchdog.beat("shut-down")
    if dist.is_initialized():
        shut_down(ctx)
    watchdog.stop()
    return records, layout, directory


def describe_layout(config: Config, ctx: ParallelContext) -> str:
    """E.g. ``TP2 CP1 PP1 DP2, ZeRO-1, bf16, 4 processes on cuda``."""
    vpp = config.parallel.virtual_pipeline_stages
    return (f"TP{ctx.tp_size} CP{ctx.cp_size} PP{ctx.pp_size}{f' VPP{vpp}' if vpp > 1 else ''} DP{ctx.dp_size}"
            f"{', ZeRO-1' if config.parallel.distributed_optimizer else ''}, {config.precision.dtype}, "
            f"{ctx.world_size} process{'es' if ctx.world_size > 1 else ''} on {ctx.device.type}")


def _show(value: float) -> str:
    return f"{value!r} ({value.hex()})"


def first_difference(reference: Records, resumed: Records, saved_at: int, iterations: int) -> Optional[str]:
    """The first iteration after ``saved_at`` whose loss or grad norm differ in any bit, described; None if none."""
    expected = list(range(saved_at + 1, iterations + 1))
    if sorted(resumed) != expected:
        return (f"the resumed run ran iterations {min(resumed, default=None)}-{max(resumed, default=None)}, expected "
                f"{expected[0]}-{expected[-1]}: it did not continue from the checkpoint of iteration {saved_at}")
    for iteration in expected:
        for index, quantity in enumerate(("loss", "grad norm")):
            a, b = reference[iteration][index], resumed[iteration][index]
            if struct.pack("<d", a) != struct.pack("<d", b):
                return (f"iteration {iteration}: {quantity} {_show(a)} uninterrupted, {_show(b)} resumed from "
                        f"iteration {saved_at}")
    return None


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    try:
        config, workdir = check_config(args, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        raise SystemExit(f"configuration error: {error}") from None
    if default_device().type == "cpu":
        share_cpu_threads()
        keep_freed_memory()
    saved_at = args.iters // 2
    reference, _, directory = run_phase(config, "check_resume/uninterrupted", saved_at, workdir)
    checkpoint = directory / "checkpoints" / iteration_dir_name(saved_at)
    resume = dataclasses.replace(config, checkpoint=dataclasses.replace(
        config.checkpoint, save=None, save_interval=None, load=str(checkpoint)))
    resumed, layout, _ = run_phase(resume, "check_resume/resumed", None)
    difference = first_difference(reference, resumed, saved_at, args.iters)
    if difference is not None:
        raise SystemExit(f"rank {rank}: resume check FAILED on {layout}: {difference}. The checkpoint is kept in "
                         f"{checkpoint}")
    if rank == 0:
        shutil.rmtree(directory)
        print(f"resume check passed: iterations {saved_at + 1}-{args.iters} bit-identical (loss, grad norm) on "
              f"{layout}", flush=True)


if __name__ == "__main__":
    main()
