"""Dry-run planner: check a recipe's layout for a cluster and estimate memory and speed, on a CPU.

    python -m megatron_aquila.plan RECIPE.yaml --nodes N --gpus-per-node G --gpu NAME [--mfu 0.5] [overrides...]

What it does, without a GPU and without allocating a single weight:

1. ``Config.validate(nodes x gpus_per_node)``: every divisibility the real launch checks.
2. Builds every distinct (TP rank, PP rank) model chunk set (``partition.chunk_layer_ids`` for
   virtual stages) as ``AquilaModel`` on the meta device and counts its parameters. The layers
   read their TP size and rank from the TP group, here a ``DescribedGroup`` that states them and
   never communicates, so the shards are exactly what that rank would hold.
3. Memory per GPU (bytes): weights (2 per parameter in fp16/bf16, 4 in fp32), grads (the fp32 grad
   buffer, 4), optimizer state (Adam m and v 8, plus an fp32 master copy 4: always when sharded over
   DP by the distributed optimizer, only for a bf16/fp16 model when replicated), and activations: the bytes of the
   tensors THIS code saves for backward (``activation_bytes_per_layer`` and friends), derived from
   model/transformer.py, kernels.py, parallel/layers.py and cross_entropy.py and measured on CPU by
   tests/test_activation_memory.py (saved_tensors_hooks, TP1 and TP2 with and without SP, fp32 and
   bf16, every recompute mode: equal to the byte). Per layer per micro-batch, with s this rank's
   tokens per sample (seq length / CP), b micro batch, h hidden, n heads, g kv heads, d head dim,
   f ffn width, t TP, s' = s/t under sequence parallelism (else s), a = 2 (fp16/bf16) or 4 (fp32)
   bytes per activation:
       recompute none        2 [a s' b h + 4 s' b]         two RMSNorms: the input in its dtype and the fp32
                                                          rstd (torch, apex and TE kernels alike)
                           + 2 a s' b h                   inputs of QKV and gate_up (under SP the sequence
                                                          shard, all-gathered again in backward)
                           + a s b d (2n + 2g) / t        rotated q, rotated k, v (a contiguous copy, so the
                                                          fused QKV output is freed) and the attention output
                           + 4 b s n / t                  attention logsumexp (flash: no s x s scores)
                           + 3 a s b f / t                gate_up output [2f] (SwiGLU recomputes silu in
                                                          backward) and silu(gate)*up
       selective recompute   the same without the logsumexp: the checkpointed core keeps q, k, v as
                             its inputs, and flash attention stores no scores to drop
       full recompute        a s' b h (the block input) + one layer of "none" while it is recomputed
       context parallel cp>1 without recompute: the local k and v give way to the gathered K and V
                             of the whole sequence, a (cp s) b d 2g / t, and the attention output is
                             kept twice (the chunks' kernel outputs and their concatenation), + a s b n d / t
       --no-flash-attention  adds the s x s probabilities a b n s^2 / t (an estimate, not measured;
                             cp s^2 under CP); fp32 models get it too, since flash-attn needs fp16/bf16
   First stage: the token ids (8 s b; 9 s b under TP). Last stage: the final norm, the output layer
   input a s' b h and the cross entropy's fp32 softmax of the local vocabulary shard 4 s b V/t
   (+ 9 s b for its int64 targets and bool mask).
   Later stages' received inputs (a s' b h) cost nothing extra: the first layer's norm (or the full
   recompute checkpoint) saves that very tensor.
   Pipeline rank r keeps the activations of its in-flight micro-batches: min(m, pp - r) with 1F1B
   (the first stage holds pp), min(m v, 2 (pp - r - 1) + (v - 1) pp + 1) chunk micro-batches when
   interleaved with v chunks. Still estimates: allocator fragmentation, temporaries (logits and
   their fp32 upcast, all-gather buffers, kernel workspaces), CUDA context and NCCL buffers; the
   10% reserve (RESERVED_FRACTION) stands for them.
4. FLOPs per iteration (``model.flops``, docs/design.md section 6) and, at the given MFU against the
   GPU's dense bf16 peak, the iteration time, tokens/s/GPU and run length in days.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_aquila.config import Config, ConfigError, load_config
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.flops import flops_per_iteration, num_parameters
from megatron_aquila.model.lora import LORA_PARAMETERS, LoraSettings, adapter_parameters, apply_lora
from megatron_aquila.model.kernels import KernelChoice
from megatron_aquila.parallel.context import DescribedGroup, ParallelContext, ProcessGroup
from megatron_aquila.parallel.pipeline.partition import chunk_has_embedding, chunk_has_head, chunk_layer_ids
from megatron_aquila.peak_flops import DENSE_BF16_PEAK_TFLOPS, GpuModel

GIB = 1024 ** 3

# The --gpu names the planner accepts: the GPU model (its peak is in peak_flops.DENSE_BF16_PEAK_TFLOPS)
# and its memory in GiB, the nominal capacity (the driver reports up to 1% less: inside RESERVED_FRACTION).
PLANNER_GPUS: dict[str, tuple[GpuModel, float]] = {
    "A100-40G": (GpuModel("A100", "SXM"), 40.0), "A100-80G": (GpuModel("A100", "SXM"), 80.0),
    "A800-80G": (GpuModel("A800", "SXM"), 80.0), "H100": (GpuModel("H100", "SXM"), 80.0),
    "H800": (GpuModel("H800", "SXM"), 80.0), "H20": (GpuModel("H20", "SXM"), 96.0),
    "H200": (GpuModel("H200", "SXM"), 141.0), "B200": (GpuModel("B200", "SXM"), 180.0),
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


@dataclass
class RankParameters:
    """Parameters held by one (TP rank, PP rank): all its virtual chunks."""

    tp_rank: int
    pp_rank: int
    chunk_layer_ids: list[list[int]]
    total: int       # base-model parameters on this rank
    sharded: int     # of which shards of TP-split tensors
    replicated: int  # of which replicated over TP (RMSNorm weights)
    adapters: int = 0  # LoRA A and B on this rank (finetune.lora), on top of ``total``

    @property
    def trainable(self) -> int:
        """Parameters with grads and optimizer state: the adapters under LoRA, else all of them."""
        return self.adapters if self.adapters else self.total


def _planning_context(config: Config, world_size: int, tp_rank: int, pp_rank: int,
                      tp_group: ProcessGroup) -> ParallelContext:
    tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
    return ParallelContext(
        rank=0, world_size=world_size, tp_size=tp, dp_size=config.data_parallel_size(world_size), pp_size=pp,
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
            layer_ids, sharded, replicated, adapters = [], 0, 0, 0
            for chunk in range(p.virtual_pipeline_stages):
                ids = chunk_layer_ids(m.num_layers, p.pipeline_parallel, p.virtual_pipeline_stages, pp_rank,
                                      chunk, p.pipeline_layers)
                model = AquilaModel(
                    m, ctx, sequence_parallel=p.sequence_parallel, recompute=config.training.recompute,
                    layer_ids=ids, pre_process=chunk_has_embedding(pp_rank, chunk),
                    post_process=chunk_has_head(pp_rank, chunk, p.pipeline_parallel, p.virtual_pipeline_stages),
                    params_dtype=dtype, device="meta", seed=config.training.seed,
                    kernels=KernelChoice(attention="torch-sdpa", norm="torch"))  # no effect on parameters
                if config.finetune.lora is not None:
                    apply_lora(model, LoraSettings.from_config(config.finetune.lora), config.training.seed)
                layer_ids.append(ids)
                for name, param in model.named_parameters():
                    if name.rsplit(".", 1)[-1] in LORA_PARAMETERS:
                        adapters += param.numel()
                    elif getattr(param, "tensor_model_parallel", False):
                        sharded += param.numel()
                    else:
                        replicated += param.numel()
            ranks.append(RankParameters(tp_rank, pp_rank, layer_ids, sharded + replicated, sharded, replicated,
                                        adapters))
    return ranks


@dataclass(frozen=True)
class ActivationShape:
    """What the saved-activation bytes of one micro-batch depend on (module docstring, step 3)."""

    seq_length: int           # this rank's tokens per sample: model.seq_length / cp
    micro_batch: int          # b
    hidden: int               # h
    heads: int                # n (all ranks)
    kv_heads: int             # g (all ranks)
    head_dim: int             # d
    ffn: int                  # f (all ranks)
    padded_vocab: int         # V (all ranks)
    tp: int                   # t
    sequence_parallel: bool   # norms and the inputs saved by the column layers on s/t
    recompute: str            # none | selective | full
    dtype_bytes: int          # a: 2 for fp16/bf16 activations, 4 for fp32
    attention_saves_scores: bool = False  # math attention: s x s probabilities kept (estimate only)
    cp: int = 1               # context parallel: attention sees the keys of cp x seq_length tokens

    @classmethod
    def from_config(cls, config: Config, *, attention_saves_scores: bool = False) -> "ActivationShape":
        m, p = config.model, config.parallel
        return cls(
            seq_length=m.seq_length // p.context_parallel, micro_batch=config.training.micro_batch_size,
            hidden=m.hidden_size,
            heads=m.num_attention_heads, kv_heads=m.kv_heads, head_dim=m.head_dim, ffn=m.ffn_size,
            padded_vocab=m.padded_vocab_size(p.tensor_parallel), tp=p.tensor_parallel,
            sequence_parallel=p.sequence_parallel and p.tensor_parallel > 1, recompute=config.training.recompute,
            dtype_bytes=MODEL_DTYPE_BYTES[config.precision.dtype],
            attention_saves_scores=attention_saves_scores, cp=p.context_parallel)

    @property
    def norm_seq(self) -> int:
        """s': the sequence length an RMSNorm (and the residual stream) sees on this rank."""
        return self.seq_length // self.tp if self.sequence_parallel else self.seq_length


def rms_norm_activation_bytes(shape: ActivationShape) -> int:
    """One RMSNorm: the input [s', b, h] in its dtype and the fp32 rstd [s', b, 1] (torch, apex and TE kernels)."""
    a, rows = shape.dtype_bytes, shape.norm_seq * shape.micro_batch
    return a * rows * shape.hidden + 4 * rows


def activation_bytes_per_layer(shape: ActivationShape, recompute: Optional[str] = None) -> int:
    """Bytes one decoder layer saves for backward for one micro-batch (module docstring, step 3)."""
    recompute = recompute or shape.recompute
    s, b, h, t, a = shape.seq_length, shape.micro_batch, shape.hidden, shape.tp, shape.dtype_bytes
    n, g, d, f = shape.heads, shape.kv_heads, shape.head_dim, shape.ffn
    if recompute == "full":
        return a * shape.norm_seq * b * h  # the checkpoint's input; the layer itself is replayed in backward
    norms = 2 * rms_norm_activation_bytes(shape)
    column_inputs = 2 * a * shape.norm_seq * b * h  # QKV and gate_up inputs [s', b, h] (the shard under SP)
    attention = a * s * b * d * (2 * n + 2 * g) // t  # rotated q [n d], rotated k [g d], v [g d], out [n d]
    if recompute == "none":
        attention += 4 * b * n * s // t  # logsumexp [b, n/t, s] fp32
        if shape.cp > 1:  # gathered K, V [cp s, b, g/t, d] replace the local ones; out kept twice (chunks, cat)
            attention += a * (shape.cp - 1) * s * b * d * 2 * g // t + a * s * b * n * d // t
    if shape.attention_saves_scores and recompute == "none":
        attention += a * b * n * s * s * shape.cp // t  # softmax probabilities [b, n/t, s, cp s] (upper bound)
    mlp = 3 * a * s * b * f // t  # gate_up output [s, b, 2f/t] and silu(gate) * up [s, b, f/t]
    return norms + column_inputs + attention + mlp


def embedding_activation_bytes(shape: ActivationShape) -> int:
    """First stage: the token ids [b, s] int64 (TP > 1: the shard-local ids int64 and the out-of-shard mask bool)."""
    s, b = shape.seq_length, shape.micro_batch
    return 9 * s * b if shape.tp > 1 else 8 * s * b


def head_activation_bytes(shape: ActivationShape) -> int:
    """Last stage: final RMSNorm, the output layer's input [s', b, h] and the vocab-parallel cross entropy's
    fp32 softmax [s, b, V/t] with its local targets (int64) and out-of-shard mask (bool)."""
    s, b, h, a = shape.seq_length, shape.micro_batch, shape.hidden, shape.dtype_bytes
    return (rms_norm_activation_bytes(shape) + a * shape.norm_seq * b * h
            + 4 * s * b * shape.padded_vocab // shape.tp + 9 * s * b)


def rotary_table_bytes(shape: ActivationShape) -> int:
    """cos and sin [s, d/2] fp32, cached once per model chunk and saved by every layer's rotary."""
    return 4 * shape.seq_length * shape.head_dim


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


def rank_memory(config: Config, world_size: int, rank: RankParameters, shape: ActivationShape) -> RankMemory:
    p = config.parallel
    n, dp = rank.total, config.data_parallel_size(world_size) * p.context_parallel  # ZeRO-1 shards over DP x CP
    dtype = config.precision.dtype
    replicated_per_param = (0 if dtype == "fp32" else 4) + 8  # fp32 master (unless fp32 model) + Adam m, v
    sharded_per_param = 4 + 8   # the distributed optimizer keeps fp32 master pieces even for an fp32 model
    layers = sum(len(ids) for ids in rank.chunk_layer_ids)
    in_flight = in_flight_microbatches(config, world_size, rank.pp_rank)
    per_microbatch = layers * activation_bytes_per_layer(shape)
    if rank.pp_rank == 0:
        per_microbatch += embedding_activation_bytes(shape)
    activations = in_flight * per_microbatch + p.virtual_pipeline_stages * rotary_table_bytes(shape)
    if shape.recompute == "full" and layers:
        # the layer being recomputed holds its full activations during its backward
        activations += activation_bytes_per_layer(shape, recompute="none")
    if rank.pp_rank == p.pipeline_parallel - 1:
        activations += head_activation_bytes(shape)
    trainable = rank.trainable  # frozen LoRA base weights have no grads and no optimizer state
    return RankMemory(
        pp_rank=rank.pp_rank, parameters=n, weights=(n + rank.adapters) * MODEL_DTYPE_BYTES[dtype],
        grads=trainable * 4.0, optimizer_replicated=trainable * float(replicated_per_param),
        optimizer_sharded=math.ceil(trainable / dp) * float(sharded_per_param),
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
    cp = p.context_parallel
    padded_vocab = m.padded_vocab_size(tp)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    # flash-attn needs fp16/bf16; otherwise count the s x s scores (the math attention path), as an estimate
    shape = ActivationShape.from_config(
        config, attention_saves_scores=not (flash_attention and config.precision.dtype in ("bf16", "fp16")))
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
                   f"activations {_gib(mem.activations)} ({mem.in_flight:g} micro-batches in flight)")
    worst = max(memories, key=lambda mem: mem.total(p.distributed_optimizer))
    out.append(f"activations: the tensors this code saves for backward (derived from the model code, measured on CPU "
               f"by tests/test_activation_memory.py): {_gib(activation_bytes_per_layer(shape))} per layer per "
               f"micro-batch; recompute {t.recompute}; RMSNorm input saved in its dtype (torch kernel measured, "
               f"apex/transformer-engine the same from their source)"
               + "; attention " + ("math path, s x s scores stored (estimate, not measured)"
                                   if shape.attention_saves_scores else "flash (no s x s scores stored)"))
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
