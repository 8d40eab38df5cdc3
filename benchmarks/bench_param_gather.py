"""Time the training loop is blocked on ZeRO-1's parameter all-gather, with and without overlap, on gloo DP2.

    python benchmarks/bench_param_gather.py [--iters 6] [--rounds 2] [section.key=value ...]

Two gloo processes on this CPU train an Aquila-shaped model (hidden 512, 4 layers, seq 128, vocab
16000, fp32, about 29M parameters, 8 MB grad buckets) with the distributed optimizer through the real
trainer loop, once with ``parallel.overlap_param_gather=false`` (the step waits for every bucket's
gather before it returns) and once with ``true`` (the next forward waits for each bucket where it
first needs it), alternating in ``--rounds`` rounds so both see the same machine load. For every
iteration after the first (the first has no previous step's gathers to wait for when overlapping)
it records ``Trainer.param_gather_seconds``, the host time that iteration waited for gathers, and
the iteration's time, and prints per mode the median over all rounds, and the slowest rank's median.

On a CPU the gathers run on gloo's threads and compete with the compute for the same cores, so the
overlap hides less than it would on a GPU, where NCCL runs beside the compute kernels (there the
host-side wait is near 0 either way: ``optim/param_gather.py``). The figures are meaningful only on
an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from megatron_aquila.build import build_trainer_parts
from megatron_aquila.config import load_config
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.trainer import Trainer

from gloo_spawn import spawn_gloo  # benchmarks/gloo_spawn.py

WORLD_SIZE = 2
MODEL = ["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8", "model.num_kv_heads=8",
         "model.ffn_hidden_size=1376", "model.seq_length=128", "model.vocab_size=16000",
         "training.micro_batch_size=1", "training.global_batch_size=2", "parallel.distributed_optimizer=true",
         "parallel.grad_bucket_size_mb=8", "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0",
         "optimizer.lr_warmup_iters=0", "optimizer.lr=1e-4"]


class RecordingTrainer(Trainer):
    """The trainer loop, recording each iteration's (gather wait, iteration) seconds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[tuple[float, float]] = []

    def _train_iteration(self, stream):
        loss, seconds, global_batch, result = super()._train_iteration(stream)
        self.records.append((self.param_gather_seconds, seconds))
        return loss, seconds, global_batch, result


def run_mode(overlap: bool, iters: int, overrides: list[str]) -> list[tuple[float, float]]:
    config = load_config(None, [*MODEL, f"training.train_iters={iters + 1}",
                                f"parallel.overlap_param_gather={str(overlap).lower()}", *overrides])
    config.validate(WORLD_SIZE)
    ctx = ParallelContext.initialize(config.parallel.tensor_parallel, config.parallel.pipeline_parallel)
    parts, state = build_trainer_parts(config, ctx)
    trainer = RecordingTrainer(config, ctx, parts, None, state)
    trainer.train()
    ctx.release_groups()
    return trainer.records[1:]   # the first iteration waits for no earlier step


def worker(rank: int, args: argparse.Namespace) -> dict[bool, list[tuple[float, float]]]:
    """overlap off/on -> this rank's (seconds blocked on the param gather, iteration seconds) per timed iteration."""
    torch.set_num_threads(args.threads)
    records: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for overlap in (False, True):
            records[overlap] += run_mode(overlap, args.iters, args.overrides)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=6, help="timed iterations per mode and round, after one more")
    parser.add_argument("--rounds", type=int, default=2, help="off/on rounds, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.num_layers=8")
    args = parser.parse_args()
    everyone = spawn_gloo(WORLD_SIZE, worker, args)
    print(f"gloo DP{WORLD_SIZE} ZeRO-1 on this CPU, {args.threads} thread(s) per rank, {args.rounds} round(s) of "
          f"{args.iters} timed iterations per mode; milliseconds per iteration, median (slowest rank's median)")
    for overlap in (False, True):
        waits = [statistics.median(w for w, _ in ranks[overlap]) * 1e3 for ranks in everyone]
        steps = [statistics.median(s for _, s in ranks[overlap]) * 1e3 for ranks in everyone]
        print(f"overlap_param_gather={str(overlap).lower():5}  blocked on the param gather {waits[0]:7.2f} "
              f"({max(waits):7.2f})   iteration {steps[0]:8.1f} ({max(steps):8.1f})")

if __name__ == "__main__":
    main()
