"""Every shipped recipe, planner against dry run, as the markdown table of docs/gpu.md section 13.

    python benchmarks/bench_dry_run.py [--full-34b]

For each recipe in examples/aquila2/ and the cluster its header plans for, the first and the last
pipeline stage's rank 0 is dry-run at full size (``megatron_aquila.dryrun``) with as many
micro-batches as pipeline stages (the first stage's peak holds pp of them under 1F1B; more only
repeat the steady state), and its peak is printed next to the planner's (``memory_model``), with
the largest measured terms and the seconds the dry run took. ``--full-34b`` also times the 34B
recipe's first stage with its full 32 micro-batches, the figure docs/design.md section 13 quotes.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from megatron_aquila.config import load_config
from megatron_aquila.dryrun.report import memory_terms, planned_rank
from megatron_aquila.dryrun.runner import DryRunSettings, dry_run
from megatron_aquila.memory_model import GIB, RESERVED_FRACTION, ActivationShape, rank_memory
from megatron_aquila.parallel.context import grid_rank
from megatron_aquila.plan import SHIPPED_RECIPES, gpu_spec

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-34b", action="store_true", help="also time the 34B first stage at 32 micro-batches")
    args = parser.parse_args()
    print("| recipe | GPUs | rank (stage) | dry run GiB | planner GiB | difference | fits (usable GiB) | "
          "largest terms (dry run) | dry run s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (nodes, gpus_per_node, gpu_name) in SHIPPED_RECIPES.items():
        gpu, world = gpu_spec(gpu_name), nodes * gpus_per_node
        config = load_config(ROOT / "examples/aquila2" / name)
        p = config.parallel
        dp = config.data_parallel_size(world)
        for pp_rank in sorted({0, p.pipeline_parallel - 1}):
            rank = grid_rank(0, 0, 0, pp_rank, p.tensor_parallel, p.context_parallel, dp)
            report = dry_run(config, DryRunSettings(world_size=world, rank=rank, microbatches=p.pipeline_parallel))
            planned = rank_memory(config, world, planned_rank(config, world, report), ActivationShape.from_config(config))
            terms = memory_terms(report, planned, p.distributed_optimizer)
            total = terms[-1]
            usable = gpu.memory_gib * (1 - RESERVED_FRACTION)
            largest = ", ".join(f"{t.name} {t.measured / GIB:.1f}" for t in sorted(terms[:-1], key=lambda t: -t.measured)[:3])
            print(f"| {name} | {world} x {gpu.name} | {rank} ({pp_rank}) | {total.measured / GIB:.2f} | "
                  f"{total.planned / GIB:.2f} | {total.relative_difference:+.1%} | "
                  f"{'yes' if total.measured / GIB <= usable else 'NO'} ({usable:.1f}) | {largest} | "
                  f"{report.seconds:.1f} |")
    if args.full_34b:
        config = load_config(ROOT / "examples/aquila2/34b/aquila2_34b.yaml")
        started = time.perf_counter()
        report = dry_run(config, DryRunSettings(world_size=512, rank=0))
        print(f"\n34B first stage, full batch ({report.num_microbatches} micro-batches, 2 iterations): "
              f"{time.perf_counter() - started:.1f} s, peak {report.peak.total / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
