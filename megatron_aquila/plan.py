"""Dry-run planner: check a recipe's layout for a cluster and estimate memory and speed, on a CPU.

    python -m megatron_aquila.plan RECIPE.yaml --nodes N --gpus-per-node G --gpu NAME [--mfu 0.5] [overrides...]

What it does, without a GPU and without allocating a single weight:

1. ``Config.validate(nodes x gpus_per_node)``: every divisibility the real launch checks.
2. Builds every distinct (TP rank, PP rank) model chunk set (``partition.chunk_layer_ids`` for
   virtual stages) as ``AquilaModel`` on the meta device and counts its parameters. The layers
   read their TP size and rank from the TP group, here a ``DescribedGroup`` that states them and
   never communicates, so the shards are exactly what that rank would hold.
3. Memory per GPU (bytes): weights (2 per parameter in fp16/bf16, 4 in fp32), grads (the fp32 grad
   buffer, 4), optimizer state (fp32 master copy 4 unless the model is fp32, Adam m and v 8),
   replicated or sharded over DP by the distributed optimizer, and activations after Korthikanti
   et al. 2022 (16-bit activations; doubled for fp32), per layer per micro-batch with s seq length,
   b micro batch, h hidden, a heads, t TP:
       no TP                 s b h (34 + 5 a s / h)
       TP, no SP             s b h (10 + 24/t + 5 a s / (h t))
       TP + SP               s b h / t (34 + 5 a s / h)
       selective recompute   the 5 a s / h term dropped (flash attention drops it too: no s x s scores)
       full recompute        2 s b h per layer (its input; / t under SP) + one layer's working set
   Pipeline rank r keeps the activations of its in-flight micro-batches: min(m, pp - r) with 1F1B
   (the first stage holds pp), min(m v, 2 (pp - r - 1) + (v - 1) pp + 1) chunk micro-batches when
   interleaved with v chunks. The last stage adds the output layer and loss, 4 s b h / t (1 + V / h).
4. FLOPs per iteration (``model.flops``, DESIGN.md section 6) and, at the given MFU against the
   GPU's dense bf16 peak, the iteration time, tokens/s/GPU and run length in days.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megatron_aquila.config import Config, ConfigError, load_config
from megatron_aquila.metrics import GPU_PEAK_TFLOPS
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.flops import flops_per_iteration, num_parameters
from megatron_aquila.parallel.context import DescribedGroup, ParallelContext, ProcessGroup
from megatron_aquila.parallel.pipeline.partition import chunk_has_embedding, chunk_has_head, chunk_layer_ids

GIB = 1024 ** 3

# Device memory in GiB by the --gpu names the planner accepts.
GPU_MEMORY_GIB: dict[str, float] = {
    "A100-40G": 40.0, "A100-80G": 80.0, "A800-80G": 80.0, "H100": 80.0, "H800": 80.0, "H20": 96.0,
}
# Share of device memory kept free for what the estimate leaves out: CUDA context, NCCL buffers,
# allocator fragmentation, temporaries (logits upcasts, all-gather buffers, fused kernels' workspaces).
RESERVED_FRACTION = 0.10

MODEL_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class PlanError(ValueError):
    """A planner argument that cannot be used; the message says what is accepted."""


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16 tensor-core peak (metrics.GPU_PEAK_TFLOPS)


def gpu_spec(name: str) -> GpuSpec:
    """Memory and peak of a GPU named like A800-80G, A100-40G, A100-80G, H100, H800 or H20."""
    key = name.strip().upper()
    if key not in GPU_MEMORY_GIB:
        raise PlanError(f"unknown GPU {name!r}; known: {', '.join(GPU_MEMORY_GIB)} "
                        "(add it to GPU_MEMORY_GIB in megatron_aquila/plan.py and GPU_PEAK_TFLOPS in metrics.py)")
    peaks = [peak for table_key, peak in GPU_PEAK_TFLOPS if table_key in key]
    if not peaks:
        raise PlanError(f"GPU {name!r} has no peak TFLOP/s in metrics.GPU_PEAK_TFLOPS")
    return GpuSpec(key, GPU_MEMORY_GIB[key], peaks[0])


@dataclass
class RankParameters:
    """Parameters held by one (TP rank, PP rank): all its virtual chunks."""

    tp_rank: int
    pp_rank: int
    chunk_layer_ids: list[list[int]]
    total: int       # parameters on this rank
    sharded: int     # of which shards of TP-split tensors
    replicated: int  # of which replicated over TP (RMSNorm weights)


def _planning_context(config: Config, world_size: int, tp_rank: int, pp_rank: int,
                      tp_group: ProcessGroup) -> ParallelContext:
    tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    return ParallelContext(
        rank=0, world_size=world_size, tp_size=tp, dp_size=world_size // (tp * pp), pp_size=pp,
        tp_rank=tp_rank, dp_rank=0, pp_rank=pp_rank, tp_group=tp_group, dp_group=None, pp_group=None,
        model_parallel_group=None, world_group=None, pp_ranks=tuple(range(pp)), device=torch.device("meta"))


def rank_parameters(config: Config, world_size: int) -> list[RankParameters]:
    """Build every (TP rank, PP rank) chunk set on the meta device and count its parameters."""
    m, p = config.model, config.parallel
    dtype = config.precision.torch_dtype
    ranks = []
    for tp_rank in range(p.tensor_parallel):
        tp_group = DescribedGroup(p.tensor_parallel, tp_rank) if p.tensor_parallel > 1 else None
        for pp_rank in range(p.pipeline_parallel):
            ctx = _planning_context(config, world_size, tp_rank, pp_rank, tp_group)
            layer_ids, sharded, replicated = [], 0, 0
            for chunk in range(p.virtual_pipeline_stages):
                ids = chunk_layer_ids(m.num_layers, p.pipeline_parallel, p.virtual_pipeline_stages, pp_rank,
                                      chunk, p.pipeline_layers)
                model = AquilaModel(
                    m, ctx, sequence_parallel=p.sequence_parallel, recompute=config.training.recompute,
                    layer_ids=ids, pre_process=chunk_has_embedding(pp_rank, chunk),
                    post_process=chunk_has_head(pp_rank, chunk, p.pipeline_parallel, p.virtual_pipeline_stages),
                    params_dtype=dtype, device="meta", seed=config.training.seed)
                layer_ids.append(ids)
                for param in model.parameters():
                    if getattr(param, "tensor_model_parallel", False):
                        sharded += param.numel()
                    else:
                        replicated += param.numel()
            ranks.append(RankParameters(tp_rank, pp_rank, layer_ids, sharded + replicated, sharded, replicated))
    return ranks


def activation_bytes_per_layer(config: Config, *, scores_stored: bool) -> float:
    """Korthikanti et al. 2022 activation bytes of one layer for one micro-batch (module docstring)."""
    m, p = config.model, config.parallel
    s, b, h, a = m.seq_length, config.training.micro_batch_size, m.hidden_size, m.num_attention_heads
    t, sp = p.tensor_parallel, p.sequence_parallel and p.tensor_parallel > 1
    recompute = config.training.recompute
    scale = 2.0 if config.precision.dtype == "fp32" else 1.0  # the paper counts 16-bit activations
    if recompute == "full":
        return scale * 2 * s * b * h / (t if sp else 1)
    scores = 5 * a * s / h if (recompute == "none" and scores_stored) else 0.0
    if sp or t == 1:
        return scale * s * b * h / t * (34 + scores)
    return scale * s * b * h * (10 + 24 / t + scores / t)


def in_flight_microbatches(config: Config, world_size: int, pp_rank: int) -> float:
    """Micro-batches whose activations pipeline rank ``pp_rank`` holds at once (in whole-rank units)."""
    p, t = config.parallel, config.training
    pp, vpp = p.pipeline_parallel, p.virtual_pipeline_stages
    microbatches = t.global_batch_size // (t.micro_batch_size * config.data_parallel_size(world_size))
    if pp == 1:
        return 1.0
    if vpp == 1:
        return float(min(microbatches, pp - pp_rank))
    chunk_microbatches = min(microbatches * vpp, 2 * (pp - pp_rank - 1) + (vpp - 1) * pp + 1)
    return chunk_microbatches / vpp  # each chunk holds 1/vpp of the rank's layers (even split)


@dataclass
class RankMemory:
    pp_rank: int
    parameters: int
    weights: float
    grads: float
    optimizer_replicated: float
    optimizer_sharded: float
    activations: float
    in_flight: float

    def total(self, distributed_optimizer: bool) -> float:
        optimizer = self.optimizer_sharded if distributed_optimizer else self.optimizer_replicated
        return self.weights + self.grads + optimizer + self.activations


def rank_memory(config: Config, world_size: int, rank: RankParameters, *, scores_stored: bool) -> RankMemory:
    m, p = config.model, config.parallel
    n, dp = rank.total, config.data_parallel_size(world_size)
    dtype = config.precision.dtype
    optimizer_per_param = (0 if dtype == "fp32" else 4) + 8  # fp32 master (unless fp32 model) + Adam m, v
    layers = sum(len(ids) for ids in rank.chunk_layer_ids)
    in_flight = in_flight_microbatches(config, world_size, rank.pp_rank)
    activations = in_flight * layers * activation_bytes_per_layer(config, scores_stored=scores_stored)
    if config.training.recompute == "full" and layers:
        # the layer being recomputed holds its full activations during its backward
        no_recompute = replace(config, training=replace(config.training, recompute="none"))
        activations += activation_bytes_per_layer(no_recompute, scores_stored=scores_stored)
    if rank.pp_rank == p.pipeline_parallel - 1:
        s, b, h, t = m.seq_length, config.training.micro_batch_size, m.hidden_size, p.tensor_parallel
        activations += 4 * s * b * h / t * (1 + m.padded_vocab_size(t) / h)
    return RankMemory(
        pp_rank=rank.pp_rank, parameters=n, weights=n * MODEL_DTYPE_BYTES[dtype], grads=n * 4.0,
        optimizer_replicated=n * float(optimizer_per_param),
        optimizer_sharded=math.ceil(n / dp) * float(optimizer_per_param),
        activations=activations, in_flight=in_flight)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:7.2f} GiB"


def plan(config: Config, nodes: int, gpus_per_node: int, gpu: GpuSpec, mfu: float,
         flash_attention: bool = True) -> tuple[list[str], bool]:
    """The report lines and whether the plan fits ``gpu``. Raises ConfigError for an invalid layout."""
    world = nodes * gpus_per_node
    config.validate(world)
    m, p, t = config.model, config.parallel, config.training
    tp, pp, vpp, dp = p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_stages, config.data_parallel_size(world)
    padded_vocab = m.padded_vocab_size(tp)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    scores_stored = not (flash_attention and config.precision.dtype in ("bf16", "fp16"))
    out = [f"layout: {nodes} nodes x {gpus_per_node} {gpu.name} = {world} GPUs; TP {tp} x PP {pp} (virtual {vpp}) "
           f"x DP {dp}; sequence parallel {p.sequence_parallel}; distributed optimizer {p.distributed_optimizer}",
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

    memories = [rank_memory(config, world, r, scores_stored=scores_stored) for r in ranks if r.tp_rank == 0]
    out.append(f"memory per GPU (largest TP rank of each PP rank; weights {config.precision.dtype}, fp32 grad buffer, "
               f"fp32 master + Adam m,v):")
    for mem in memories:
        out.append(f"  pp {mem.pp_rank}: weights {_gib(mem.weights)} | grads {_gib(mem.grads)} | optimizer "
                   f"{_gib(mem.optimizer_replicated)} replicated, {_gib(mem.optimizer_sharded)} sharded over DP {dp} | "
                   f"activations {_gib(mem.activations)} ({mem.in_flight:g} micro-batches in flight)")
    worst = max(memories, key=lambda mem: mem.total(p.distributed_optimizer))
    out.append(f"activations: Korthikanti et al. 2022 (GPT shape: 4h GeLU MLP, multi-head attention); Aquila's "
               f"SwiGLU (ffn {m.ffn_size}) and GQA ({m.kv_heads} kv heads) differ, so treat it as an estimate; "
               f"recompute {t.recompute}; attention scores "
               + ("stored (5as/h term kept)" if scores_stored else "not stored (flash attention, 5as/h term dropped)"))
    total_dist, total_repl = worst.total(True), worst.total(False)
    out.append(f"peak memory per GPU (pp {worst.pp_rank}): {_gib(total_dist)} with the distributed optimizer, "
               f"{_gib(total_repl)} without")
    used = total_dist if p.distributed_optimizer else total_repl
    usable = gpu.memory_gib * GIB * (1 - RESERVED_FRACTION)
    fits = used <= usable
    out.append(f"margin: {_gib(usable - used)} left of {_gib(usable)} usable ({gpu.memory_gib:g} GiB "
               f"{gpu.name} minus {RESERVED_FRACTION:.0%} reserved for CUDA context, NCCL buffers, fragmentation)")

    flops = flops_per_iteration(m, t.global_batch_size, padded_vocab)
    iteration_s = flops / (world * gpu.peak_tflops * 1e12 * mfu)
    tokens_per_gpu = t.global_batch_size * m.seq_length / iteration_s / world
    out.append(f"FLOPs per iteration (global batch {t.global_batch_size}): {flops:.4e}")
    out.append(f"at MFU {mfu:.0%} of {gpu.peak_tflops:g} TFLOP/s: {iteration_s:.2f} s/iteration, "
               f"{tokens_per_gpu:,.0f} tokens/s/GPU, {gpu.peak_tflops * mfu:.0f} TFLOP/s/GPU")
    if t.train_samples is not None:
        days = t.train_samples / t.global_batch_size * iteration_s / 86400
        out.append(f"run: {t.train_samples:,} samples = {t.train_samples * m.seq_length / 1e12:.2f}T tokens, "
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
    parser.add_argument("--gpu", required=True, help=f"one of {', '.join(GPU_MEMORY_GIB)}")
    parser.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilisation assumed (0-1]")
    parser.add_argument("--no-flash-attention", dest="flash_attention", action="store_false",
                        help="count the s x s attention scores as stored activations")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if not 0 < args.mfu <= 1:
            raise PlanError(f"--mfu {args.mfu} must be in (0, 1]")
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise PlanError(f"--nodes {args.nodes} and --gpus-per-node {args.gpus_per_node} must be >= 1")
        gpu = gpu_spec(args.gpu)
        config = load_config(args.recipe, args.overrides)
        lines, fits = plan(config, args.nodes, args.gpus_per_node, gpu, args.mfu, args.flash_attention)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    except PlanError as error:
        print(f"planner error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
