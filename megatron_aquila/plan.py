"""Dry-run planner: check a recipe's layout for a cluster and estimate memory and speed, on a CPU.

    python -m megatron_aquila.plan RECIPE.yaml --nodes N --gpus-per-node G --gpu NAME [--mfu 0.5] [overrides...]

What it does, without a GPU and without allocating a single weight:

1. ``Config.validate(nodes x gpus_per_node)``: every divisibility the real launch checks.
2. Builds every distinct (TP rank, PP rank) model chunk set (``partition.chunk_layer_ids`` for
   virtual stages) as ``AquilaModel`` on the meta device and counts its parameters. The layers
   read their TP size and rank from the TP group, here a ``DescribedGroup`` that states them and
   never communicates, so the shards are exactly what that rank would hold.
3. Memory per GPU from ``memory_model`` (weights, grads, optimizer state, activations, the last
   stage's temporaries; its docstring has the formulas), or with ``--dry-run`` the real training step
   of chosen ranks executed at full size on fake tensors (``megatron_aquila.dryrun``), each measured
   term next to the planner's, the host syncs, the communication against ``comm_model``, and the
   host memory an async save stages.
4. FLOPs per iteration (``model.flops``, docs/design.md section 6) and, at the given MFU against the
   GPU's dense bf16 peak, the iteration time, tokens/s/GPU and run length in days.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

from megatron_aquila.config import Config, ConfigError, load_config
from megatron_aquila.dryrun.report import format_report
from megatron_aquila.dryrun.runner import DryRunError, DryRunSettings, dry_run
from megatron_aquila.memory_model import (ATTENTION_KERNEL_NOTES, GIB, RESERVED_FRACTION, ActivationShape,
                                          activation_bytes_per_layer, rank_memory, rank_parameters)
from megatron_aquila.model.flops import flops_per_iteration, num_parameters
from megatron_aquila.model.lora import LoraSettings, adapter_parameters
from megatron_aquila.parallel.context import grid_rank
from megatron_aquila.peak_flops import DENSE_BF16_PEAK_TFLOPS, GpuModel

# The --gpu names the planner accepts: the GPU model (its peak is in peak_flops.DENSE_BF16_PEAK_TFLOPS)
# and its memory in GiB, the nominal capacity (the driver reports up to 1% less: inside RESERVED_FRACTION).
PLANNER_GPUS: dict[str, tuple[GpuModel, float]] = {
    "A100-40G": (GpuModel("A100", "SXM"), 40.0), "A100-80G": (GpuModel("A100", "SXM"), 80.0),
    "A800-80G": (GpuModel("A800", "SXM"), 80.0), "H100": (GpuModel("H100", "SXM"), 80.0),
    "H800": (GpuModel("H800", "SXM"), 80.0), "H20": (GpuModel("H20", "SXM"), 96.0),
    "H200": (GpuModel("H200", "SXM"), 141.0), "B200": (GpuModel("B200", "SXM"), 180.0),
}


class PlanError(ValueError):
    """A planner argument that cannot be used; the message says what is accepted."""


# Every recipe under examples/aquila2/ -> (nodes, GPUs per node, GPU): the cluster its header plans for
# (benchmarks/bench_dry_run.py and tests/test_dry_run.py dry-run each there).
SHIPPED_RECIPES = {
    "7b/aquila2_7b.yaml": (12, 8, "A800-80G"), "7b/aquila2_7b_8k.yaml": (12, 8, "A800-80G"),
    "7b/aquila2_7b_16k.yaml": (12, 8, "A800-80G"), "7b/sft_7b.yaml": (1, 8, "A100-80G"),
    "7b/sft_7b_lora.yaml": (1, 8, "A100-80G"), "34b/aquila2_34b.yaml": (64, 8, "A100-40G"),
    "34b/aquila2_34b_8k.yaml": (64, 8, "A100-40G"), "34b/aquila2_34b_16k.yaml": (64, 8, "A100-40G"),
    "34b/sft_34b_lora.yaml": (1, 8, "A100-80G"), "34b/sft_34b_qlora.yaml": (1, 1, "A100-80G"),
}


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16 tensor-core peak (peak_flops.DENSE_BF16_PEAK_TFLOPS)


def gpu_spec(name: str) -> GpuSpec:
    """Memory and peak of a GPU named as in PLANNER_GPUS (A100-40G, H100, H200, B200, ...), any case."""
    key = name.strip().upper()
    if key not in PLANNER_GPUS:
        raise PlanError(f"unknown GPU {name!r}; known: {', '.join(PLANNER_GPUS)} (add it to PLANNER_GPUS in "
                        "megatron_aquila/plan.py and its peak to DENSE_BF16_PEAK_TFLOPS in "
                        "megatron_aquila/peak_flops.py)")
    model, memory_gib = PLANNER_GPUS[key]
    return GpuSpec(key, memory_gib, DENSE_BF16_PEAK_TFLOPS[model])


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:7.2f} GiB"


def plan(config: Config, nodes: int, gpus_per_node: int, gpu: GpuSpec, mfu: float,
         math_attention: bool = False) -> tuple[list[str], bool]:
    """The report lines and whether the plan fits ``gpu``. Raises ConfigError for an invalid layout."""
    world = nodes * gpus_per_node
    config.validate(world)
    m, p, t = config.model, config.parallel, config.training
    tp, pp, vpp, dp = p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_stages, config.data_parallel_size(world)
    cp = p.context_parallel
    padded_vocab = m.padded_vocab_size(tp)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    shape = ActivationShape.from_config(config, math_attention=math_attention)
    out = [f"layout: {nodes} nodes x {gpus_per_node} {gpu.name} = {world} GPUs; TP {tp} x CP {cp} x PP {pp} "
           f"(virtual {vpp}) x DP {dp}; sequence parallel {p.sequence_parallel}; distributed optimizer {p.distributed_optimizer}",
           f"batch: micro {t.micro_batch_size} x DP {dp} x {microbatches} micro-batches = global "
           f"{t.global_batch_size}" + (f" (ramp-up {t.rampup_batch_size})" if t.rampup_batch_size else "")]
    if pp > 1:
        bubble = (pp - 1) / (vpp * microbatches + pp - 1)
        out.append(f"pipeline bubble: (p-1)/(v m + p-1) = {bubble:.1%}")

    ranks = rank_parameters(config, world)
    out.append("parameters per rank (built on the meta device):")
    for pp_rank in range(pp):
        same_pp = [r for r in ranks if r.pp_rank == pp_rank]
        counts = sorted({r.total for r in same_pp})
        shown = same_pp[:1] if len(counts) == 1 else same_pp  # TP ranks with equal counts on one line
        for rank in shown:
            who = f"tp 0-{tp - 1}" if len(shown) < len(same_pp) else f"tp {rank.tp_rank}"
            layers = ", ".join(f"{ids[0]}-{ids[-1]}" if ids else "none" for ids in rank.chunk_layer_ids)
            out.append(f"  {who} pp {pp_rank}: {rank.total:>15,} each (layers {layers}; "
                       f"TP-sharded {rank.sharded:,}, replicated over TP {rank.replicated:,})")
    # Every tensor once: shards summed over TP ranks, TP-replicated tensors counted once per PP rank.
    built_total = sum(r.sharded for r in ranks) + sum(r.replicated for r in ranks if r.tp_rank == 0)
    analytic_padded = num_parameters(m, padded_vocab)
    if built_total != analytic_padded:
        raise AssertionError(f"parameters built on meta {built_total:,} != analytic count {analytic_padded:,} "
                             "(model/flops.py num_parameters and model/aquila.py disagree)")
    out.append(f"total parameters: {num_parameters(m):,} (vocab {m.vocab_size}); {analytic_padded:,} with the "
               f"vocab padded to {padded_vocab}")

    if config.finetune.lora is not None:
        lora = config.finetune.lora
        out.append(f"LoRA rank {lora.rank} on {', '.join(lora.targets)}: {max(r.adapters for r in ranks):,} adapter "
                   "parameters on the largest rank train (grads, optimizer state); the base weights are frozen")
    memories = [rank_memory(config, world, r, shape) for r in ranks if r.tp_rank == 0]
    out.append(f"memory per GPU (largest TP rank of each PP rank; weights {config.precision.dtype}, fp32 grad buffer, "
               f"fp32 master + Adam m,v):")
    for mem in memories:
        out.append(f"  pp {mem.pp_rank}: weights {_gib(mem.weights)} | grads {_gib(mem.grads)} | optimizer "
                   f"{_gib(mem.optimizer_replicated)} replicated, {_gib(mem.optimizer_sharded)} sharded over DP x CP {dp * cp} | "
                   f"activations {_gib(mem.activations)} ({mem.in_flight:g} micro-batches in flight)"
                   + (f" | temporaries {_gib(mem.temporaries)}" if mem.temporaries else ""))
    worst = max(memories, key=lambda mem: mem.total(p.distributed_optimizer))
    out.append(f"activations: the tensors this code saves for backward (derived from the model code, measured on CPU "
               f"by tests/test_activation_memory.py): {_gib(activation_bytes_per_layer(shape))} per layer per "
               f"micro-batch; recompute {t.recompute}; RMSNorm input saved in its dtype (torch kernel measured, "
               f"apex/transformer-engine the same from their source)"
               + f"; attention kernel {ATTENTION_KERNEL_NOTES[shape.attention_kernel]}")
    total_dist, total_repl = worst.total(True), worst.total(False)
    out.append(f"peak memory per GPU (pp {worst.pp_rank}): {_gib(total_dist)} with the distributed optimizer, "
               f"{_gib(total_repl)} without")
    used = total_dist if p.distributed_optimizer else total_repl
    usable = gpu.memory_gib * GIB * (1 - RESERVED_FRACTION)
    fits = used <= usable
    out.append(f"margin: {_gib(usable - used)} left of {_gib(usable)} usable ({gpu.memory_gib:g} GiB "
               f"{gpu.name} minus {RESERVED_FRACTION:.0%} reserved for CUDA context, NCCL buffers, fragmentation)")

    lora = config.finetune.lora
    flops = flops_per_iteration(m, t.global_batch_size, padded_vocab,
                                None if lora is None else adapter_parameters(m, LoraSettings.from_config(lora)))
    iteration_s = flops / (world * gpu.peak_tflops * 1e12 * mfu)
    tokens_per_gpu = t.global_batch_size * m.seq_length / iteration_s / world
    out.append(f"FLOPs per iteration (global batch {t.global_batch_size}): {flops:.4e}")
    out.append(f"at MFU {mfu:.0%} of {gpu.peak_tflops:g} TFLOP/s: {iteration_s:.2f} s/iteration, "
               f"{tokens_per_gpu:,.0f} tokens/s/GPU, {gpu.peak_tflops * mfu:.0f} TFLOP/s/GPU")
    if t.train_samples is not None:
        days = t.train_samples / t.global_batch_size * iteration_s / 86400
        tokens = t.train_samples * m.seq_length
        amount = f"{tokens / 1e12:.2f}T" if tokens >= 1e12 else f"{tokens / 1e9:.2f}B"
        out.append(f"run: {t.train_samples:,} samples = {amount} tokens, "
                   f"about {days:.1f} days at full batch (ramp-up and restarts not counted)")
    out.append(("FITS" if fits else "DOES NOT FIT") + f" on {gpu.name}: estimated {_gib(used)} per GPU")
    return out, fits


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_aquila.plan",
                                     description="Validate a recipe's parallel layout and estimate memory and speed.")
    parser.add_argument("recipe", help="YAML recipe, e.g. examples/aquila2/7b/aquila2_7b.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tensor_parallel=2")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu", required=True, help=f"one of {', '.join(PLANNER_GPUS)}")
    parser.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilisation assumed (0-1]")
    parser.add_argument("--math-attention", action="store_true",
                        help="count the s x s attention scores as stored (no fused attention kernel)")
    dry = parser.add_argument_group("dry run: execute the real training step of a rank on fake tensors")
    dry.add_argument("--dry-run", action="store_true", help="run it and compare with the planner, term by term")
    dry.add_argument("--rank", type=int, help="impersonate this global rank (default: the first stage's rank 0)")
    dry.add_argument("--ranks", choices=["first-last-stage"], help="rank 0 of the first and of the last stage")
    dry.add_argument("--all-stages", action="store_true", help="rank 0 of every pipeline stage")
    dry.add_argument("--microbatches", type=int,
                     help="micro-batches per iteration (default: the full batch's); the peak needs only "
                          "enough to fill the pipeline")
    return parser.parse_intermixed_args(argv)


def dry_run_ranks(config: Config, world: int, args: argparse.Namespace) -> list[int]:
    """The global ranks ``--rank``, ``--ranks first-last-stage`` or ``--all-stages`` name (default: rank 0)."""
    p = config.parallel
    dp = config.data_parallel_size(world)
    stage_rank = [grid_rank(0, 0, 0, pp_rank, p.tensor_parallel, p.context_parallel, dp)
                  for pp_rank in range(p.pipeline_parallel)]
    if args.all_stages:
        return stage_rank
    if args.ranks == "first-last-stage":
        return sorted({stage_rank[0], stage_rank[-1]})
    if args.rank is not None and not 0 <= args.rank < world:
        raise PlanError(f"--rank {args.rank} is outside the world of {world} ranks (0-{world - 1})")
    return [args.rank or 0]


def run_dry(config: Config, args: argparse.Namespace, gpu: GpuSpec) -> tuple[list[str], bool]:
    """Dry-run the chosen ranks; their tables and whether every one fits."""
    world = args.nodes * args.gpus_per_node
    config.validate(world)
    lines, fits = [], True
    for rank in dry_run_ranks(config, world, args):
        settings = DryRunSettings(world_size=world, rank=rank, gpus_per_node=args.gpus_per_node,
                                  attention="math" if args.math_attention else "flash-attn",
                                  microbatches=args.microbatches)
        report = dry_run(config, settings)
        rank_lines, rank_fits = format_report(config, world, report, gpu.name, gpu.memory_gib, args.gpus_per_node,
                                              args.math_attention)
        lines += rank_lines
        fits = fits and rank_fits
    return lines, fits


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if not 0 < args.mfu <= 1:
            raise PlanError(f"--mfu {args.mfu} must be in (0, 1]")
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise PlanError(f"--nodes {args.nodes} and --gpus-per-node {args.gpus_per_node} must be >= 1")
        if args.microbatches is not None and args.microbatches < 1:
            raise PlanError(f"--microbatches {args.microbatches} must be >= 1")
        gpu = gpu_spec(args.gpu)
        config = load_config(args.recipe, args.overrides)
        if args.dry_run:
            lines, fits = run_dry(config, args, gpu)
        else:
            lines, fits = plan(config, args.nodes, args.gpus_per_node, gpu, args.mfu, args.math_attention)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    except (PlanError, DryRunError) as error:
        print(f"planner error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
