"""The planner's memory model: parameters, grads, optimizer state, activations and temporaries per rank.

Analytic, from the shapes alone (``python -m megatron_aquila.plan``), and answerable to the dry run
(``megatron_aquila.dryrun``), which executes the real step of a rank at full size and measures each
term; ``tests/test_dry_run.py`` holds every shipped recipe to 5% of it.

Memory per GPU (bytes): weights (2 per parameter in fp16/bf16, 4 in fp32), grads (the fp32 grad
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
       math attention        (``--math-attention``, or fp32 under GQA) adds the s x s probabilities
                             a b n s^2 / t (cp s^2 under CP), and K and V per query head
   First stage: the token ids (8 s b; 9 s b under TP). Last stage: the final norm, the output layer
   input a s' b h and the cross entropy's fp32 exp(z - m) of the local vocabulary shard 4 s b V/t
   (+ 13 s b for its fp32 sums, int64 targets and bool mask).
   Later stages' received inputs (a s' b h) cost nothing extra: the first layer's norm (or the full
   recompute checkpoint) saves that very tensor.
   Pipeline rank r keeps the activations of its in-flight micro-batches: min(m, pp - r) with 1F1B
   (the first stage holds pp), min(m v, 2 (pp - r - 1) + (v - 1) pp + 1) chunk micro-batches when
   interleaved with v chunks. Not modelled: allocator fragmentation, kernel workspaces, the CUDA
   context and NCCL buffers (the 10% reserve, RESERVED_FRACTION, stands for them), and the backward's
   temporaries off the last stage.
   Attention kernels (what a GPU run calls, ``ActivationShape.from_config``): flash (flash-attn, or
   SDPA's flash backend) writes its output in q's [s, b, n, d] layout, so the dense layer's input is
   a view of it; the memory-efficient kernel (SDPA with a mask tensor: packed SFT; or fp32) writes
   [b, s, n, d], so with b > 1 the dense input is a second copy, and its logsumexp rows are padded
   to 32. Packed SFT on flash-attn's varlen kernel (model/packed_attention.py) saves what flash does,
   but its output is [b s, n, d], so with b > 1 the dense input is a copy, and under CP with b > 1 the
   keys and values it saves are batch-major copies of each chunk's key prefix; on the memory-efficient
   kernel (attention dropout) it adds one additive document mask [b, 1, s, cp s] per micro-batch
   (built once, shared by every layer). LoRA adds its r-wide products and, with dropout, the boolean masks
   (``lora_activation_bytes``); its frozen embedding and output layer save no inputs.
   Temporaries: the last stage peaks inside the last micro-batch's cross entropy, where the logits
   in the model dtype and the fp32 softmax being built (not yet saved) are alive
   (``head_peak_temporaries``); other stages' temporaries at their peak are under 2% (the dry run
   lists them) and are not modelled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_aquila.config import Config
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.kernels import KernelChoice, flash_attention_applies
from megatron_aquila.model.packed_attention import packed_attention_path
from megatron_aquila.model.lora import LORA_PARAMETERS, LoraSettings, adapted_layer, apply_lora
from megatron_aquila.model.qlora import bytes_per_4bit_weight
from megatron_aquila.parallel.context import DescribedGroup, ParallelContext, ProcessGroup
from megatron_aquila.parallel.pipeline.partition import chunk_has_embedding, chunk_has_head, chunk_layer_ids

GIB = 1024 ** 3
# Share of device memory kept free for what neither the planner nor the dry run sees: the CUDA context,
# NCCL buffers, allocator fragmentation, fused kernels' workspaces.
RESERVED_FRACTION = 0.10
MODEL_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ATTENTION_KERNEL_NOTES = {
    "flash": "flash (flash-attn or SDPA's flash backend: no s x s scores stored)",
    "efficient": "memory-efficient (SDPA with a mask tensor, or fp32: no s x s scores stored)",
    "math": "math path, s x s scores stored (estimate)",
    "varlen": "flash-attn varlen (packed documents: no s x s mask or scores stored)",
}


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
    quantized: int = 0  # of ``total``, the base weights stored 4-bit (finetune.qlora)

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
    quantized_targets = (None if config.finetune.qlora is None  # Q-LoRA: these layers' base weights are 4-bit
                         else LoraSettings.from_config(config.finetune.lora))
    for tp_rank in range(p.tensor_parallel):
        tp_group = DescribedGroup(p.tensor_parallel, tp_rank) if p.tensor_parallel > 1 else None
        for pp_rank in range(p.pipeline_parallel):
            ctx = _planning_context(config, world_size, tp_rank, pp_rank, tp_group)
            layer_ids, sharded, replicated, adapters, quantized = [], 0, 0, 0, 0
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
                    if quantized_targets is not None and adapted_layer(name, quantized_targets) is not None:
                        quantized += param.numel()
                    if name.rsplit(".", 1)[-1] in LORA_PARAMETERS:
                        adapters += param.numel()
                    elif getattr(param, "tensor_model_parallel", False):
                        sharded += param.numel()
                    else:
                        replicated += param.numel()
            ranks.append(RankParameters(tp_rank, pp_rank, layer_ids, sharded + replicated, sharded, replicated,
                                        adapters, quantized))
    return ranks


@dataclass(frozen=True)
class ActivationShape:
    """What the saved-activation bytes of one micro-batch depend on (module docstring)."""

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
    attention_kernel: str = "flash"   # flash | efficient (a mask tensor, or fp32) | math (s x s scores stored)
                                      # | varlen (packed SFT on flash-attn: batch-major copies, no mask)
    cp: int = 1               # context parallel: attention sees the keys of cp x seq_length tokens
    document_mask: bool = False  # packed SFT: one [b, 1, s, cp s] additive mask per micro-batch
    lora_targets: tuple[str, ...] = ()  # finetune.lora targets (frozen base weights)
    lora_rank: int = 0
    lora_dropout: bool = False  # LoRA dropout > 0: a boolean mask per targeted input

    @classmethod
    def from_config(cls, config: Config, *, math_attention: bool = False) -> "ActivationShape":
        """The shape of a GPU run of ``config``. Attention: a flash kernel (flash-attn, or torch SDPA's own)
        for causal fp16/bf16; for packed SFT what ``packed_attention_path`` picks on a GPU with flash-attn
        and FlexAttention (varlen in fp16/bf16; FlexAttention, which saves what flash does, in fp32; the
        memory-efficient kernel with the document mask under attention dropout); the memory-efficient
        kernel for fp32; the math path (s x s scores stored) for fp32 under GQA, or everywhere with
        ``math_attention``."""
        m, p = config.model, config.parallel
        packed = packed_attention_path("cuda", config.precision.torch_dtype, True, True, m.attention_dropout)
        if config.data.sft and not math_attention:
            kernel = {"varlen": "varlen", "flex": "flash", "dense": "efficient"}[packed]
        elif flash_attention_applies(config.precision.torch_dtype) and not math_attention:
            kernel = "flash"
        elif math_attention or m.kv_heads != m.num_attention_heads:
            kernel = "math"  # fp32 under GQA: no fused kernel without a mask takes it
        else:
            kernel = "efficient"
        lora = config.finetune.lora
        return cls(
            seq_length=m.seq_length // p.context_parallel, micro_batch=config.training.micro_batch_size,
            hidden=m.hidden_size,
            heads=m.num_attention_heads, kv_heads=m.kv_heads, head_dim=m.head_dim, ffn=m.ffn_size,
            padded_vocab=m.padded_vocab_size(p.tensor_parallel), tp=p.tensor_parallel,
            sequence_parallel=p.sequence_parallel and p.tensor_parallel > 1, recompute=config.training.recompute,
            dtype_bytes=MODEL_DTYPE_BYTES[config.precision.dtype], attention_kernel=kernel, cp=p.context_parallel,
            document_mask=config.data.sft and kernel in ("efficient", "math"),
            lora_targets=tuple(lora.targets) if lora else (), lora_rank=lora.rank if lora else 0,
            lora_dropout=bool(lora and lora.dropout > 0))

    @property
    def lora(self) -> bool:
        return bool(self.lora_targets)

    @property
    def norm_seq(self) -> int:
        """s': the sequence length an RMSNorm (and the residual stream) sees on this rank."""
        return self.seq_length // self.tp if self.sequence_parallel else self.seq_length


def rms_norm_activation_bytes(shape: ActivationShape) -> int:
    """One RMSNorm: the input [s', b, h] in its dtype and the fp32 rstd [s', b, 1] (torch, apex and TE kernels)."""
    a, rows = shape.dtype_bytes, shape.norm_seq * shape.micro_batch
    return a * rows * shape.hidden + 4 * rows


def activation_bytes_per_layer(shape: ActivationShape, recompute: Optional[str] = None) -> int:
    """Bytes one decoder layer saves for backward for one micro-batch (module docstring)."""
    recompute = recompute or shape.recompute
    s, b, h, t, a = shape.seq_length, shape.micro_batch, shape.hidden, shape.tp, shape.dtype_bytes
    n, d, f = shape.heads, shape.head_dim, shape.ffn
    if recompute == "full":
        return a * shape.norm_seq * b * h  # the checkpoint's input; the layer itself is replayed in backward
    norms = 2 * rms_norm_activation_bytes(shape)
    column_inputs = 2 * a * shape.norm_seq * b * h  # QKV and gate_up inputs [s', b, h] (the shard under SP)
    attention = a * s * b * d * 2 * n // t + _saved_keys_and_values(shape, recompute)  # rotated q, out [n d]
    if recompute == "none":
        attention += _logsumexp_bytes(shape)
        if shape.cp > 1:  # out kept twice (the chunks' kernel outputs and their concatenation)
            attention += a * s * b * n * d // t
        elif shape.attention_kernel != "flash" and b > 1:
            # the memory-efficient and math kernels write out as [b, s, n, d]: the dense layer's [s, b, n d]
            # input is a copy (flash writes out in q's layout, [s, b, n, d], and the copy is a view)
            attention += a * s * b * n * d // t
    if shape.attention_kernel == "math" and recompute == "none":
        attention += a * b * n * s * s * shape.cp // t  # softmax probabilities [b, n/t, s, cp s] (upper bound)
    mlp = 3 * a * s * b * f // t  # gate_up output [s, b, 2f/t] and silu(gate) * up [s, b, f/t]
    return norms + column_inputs + attention + mlp + lora_activation_bytes(shape)


def _saved_keys_and_values(shape: ActivationShape, recompute: str) -> int:
    """K and V as attention saves them: the local [s, b, g/t, d] each, or under context parallelism the
    gathered [cp s, b, g/t, d]; the memory-efficient and math kernels take no GQA, so with g < n the
    wrapper hands them per-query-head copies [b, n/t, keys, d], where keys is s, or under CP the two
    chunks' key prefixes, (2 cp + 1) s / 2 in all (parallel/context_parallel.py)."""
    s, b, t, a, d, n, g, cp = (shape.seq_length, shape.micro_batch, shape.tp, shape.dtype_bytes, shape.head_dim,
                               shape.heads, shape.kv_heads, shape.cp)
    if recompute != "none":  # the checkpointed core keeps its inputs, the local k and v
        return a * s * b * 2 * g * d // t
    if shape.attention_kernel not in ("flash", "varlen") and g != n:
        keys = s if cp == 1 else (2 * cp + 1) * s // 2
        return a * keys * b * 2 * n * d // t
    if shape.attention_kernel == "varlen" and cp > 1 and b > 1:  # batch-major copies of each chunk's key prefix
        return a * (2 * cp + 1) * s // 2 * b * 2 * g * d // t
    return a * cp * s * b * 2 * g * d // t


def _logsumexp_bytes(shape: ActivationShape) -> int:
    """The attention kernel's fp32 logsumexp [b, n/t, rows]: rows = s (flash), s rounded up to 32 per call
    (memory-efficient: one call per CP chunk of s / 2 rows under context parallelism)."""
    s, b, n, t = shape.seq_length, shape.micro_batch, shape.heads, shape.tp
    if shape.attention_kernel in ("flash", "varlen"):
        return 4 * b * n * s // t
    calls, rows = (2, s // 2) if shape.cp > 1 else (1, s)
    return 4 * b * n * calls * (32 * math.ceil(rows / 32)) // t


def lora_activation_bytes(shape: ActivationShape) -> int:
    """What LoRA adds to a layer (model/lora.py): s (drop(x) A^T) [s, b, r] saved by B's product in each
    targeted layer, and with dropout the boolean mask of each targeted input (torch.native_dropout):
    qkv and gate_up [s', b, h], dense [s, b, n d/t], down [s, b, f/t]. The frozen base products save no
    input of their own, so each dropped input takes the place of the input the base would have saved."""
    if not shape.lora:
        return 0
    s, b, h, t, a, r = shape.seq_length, shape.micro_batch, shape.hidden, shape.tp, shape.dtype_bytes, shape.lora_rank
    targets = {_LORA_LAYER[target] for target in shape.lora_targets}
    total = a * s * b * r * len(targets)
    if shape.lora_dropout:
        masks = {"qkv": shape.norm_seq * b * h, "gate_up": shape.norm_seq * b * h,
                 "dense": s * b * shape.heads * shape.head_dim // t, "down": s * b * shape.ffn // t}
        total += sum(masks[layer] for layer in targets)
    return total


# finetune.lora target -> the layer that carries its branch (fused layers hold one branch)
_LORA_LAYER = {"qkv": "qkv", "q": "qkv", "k": "qkv", "v": "qkv", "dense": "dense", "o": "dense",
               "gate_up": "gate_up", "gate": "gate_up", "up": "gate_up", "down": "down"}


def document_mask_bytes(shape: ActivationShape) -> int:
    """Packed SFT: the micro-batch's additive document mask [b, 1, s, cp s] in the model dtype, built once and
    saved (by reference) by every layer's attention (model/kernels.py DocumentMask)."""
    return shape.dtype_bytes * shape.micro_batch * shape.seq_length * shape.seq_length * shape.cp \
        if shape.document_mask else 0


def embedding_activation_bytes(shape: ActivationShape) -> int:
    """First stage: the token ids [b, s] int64 (TP > 1: the shard-local ids int64 and the out-of-shard mask bool);
    a frozen embedding (LoRA) keeps only the TP mask."""
    s, b = shape.seq_length, shape.micro_batch
    if shape.lora:
        return s * b if shape.tp > 1 else 0
    return 9 * s * b if shape.tp > 1 else 8 * s * b


def head_activation_bytes(shape: ActivationShape) -> int:
    """Last stage: final RMSNorm, the output layer's input [s', b, h] and the vocab-parallel cross entropy's
    fp32 softmax [s, b, V/t] with its local targets (int64) and out-of-shard mask (bool)."""
    b, h, a = shape.micro_batch, shape.hidden, shape.dtype_bytes
    output_input = 0 if shape.lora else a * shape.norm_seq * b * h  # a frozen output layer saves no input
    return rms_norm_activation_bytes(shape) + output_input + cross_entropy_saved_bytes(shape)


def cross_entropy_saved_bytes(shape: ActivationShape) -> int:
    """The vocab-parallel cross entropy's fp32 exp(z - m) [s, b, V/t], fp32 sums S, local targets (int64)
    and mask (bool)."""
    s, b = shape.seq_length, shape.micro_batch
    return 4 * s * b * shape.padded_vocab // shape.tp + 13 * s * b


def head_peak_temporaries(shape: ActivationShape) -> int:
    """The last stage's peak is inside the cross entropy's forward: the logits [s, b, V/t] in the model dtype
    are alive next to the fp32 softmax being built (not yet saved) and the targets."""
    return shape.dtype_bytes * shape.seq_length * shape.micro_batch * shape.padded_vocab // shape.tp \
        + cross_entropy_saved_bytes(shape)


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
    activations: float    # saved for backward at the rank's peak
    in_flight: float
    temporaries: float = 0.0  # alive at the peak and not saved: the last stage's logits and softmax being built

    def optimizer(self, distributed_optimizer: bool) -> float:
        return self.optimizer_sharded if distributed_optimizer else self.optimizer_replicated

    def total(self, distributed_optimizer: bool) -> float:
        return self.weights + self.grads + self.optimizer(distributed_optimizer) + self.activations + self.temporaries


def rank_memory(config: Config, world_size: int, rank: RankParameters, shape: ActivationShape) -> RankMemory:
    p = config.parallel
    n, dp = rank.total, config.data_parallel_size(world_size) * p.context_parallel  # ZeRO-1 shards over DP x CP
    dtype = config.precision.dtype
    replicated_per_param = (0 if dtype == "fp32" else 4) + 8  # fp32 master (unless fp32 model) + Adam m, v
    sharded_per_param = 4 + 8   # the distributed optimizer keeps fp32 master pieces even for an fp32 model
    layers = sum(len(ids) for ids in rank.chunk_layer_ids)
    in_flight = in_flight_microbatches(config, world_size, rank.pp_rank)
    per_microbatch = layers * activation_bytes_per_layer(shape) + (document_mask_bytes(shape) if layers else 0)
    if rank.pp_rank == 0:
        per_microbatch += embedding_activation_bytes(shape)
    activations = in_flight * per_microbatch + p.virtual_pipeline_stages * rotary_table_bytes(shape)
    # the layer being recomputed holds its full activations during its backward
    recomputed_layer = activation_bytes_per_layer(shape, recompute="none") if shape.recompute == "full" and layers else 0
    temporaries = 0.0
    if rank.pp_rank == p.pipeline_parallel - 1:
        # the last micro-batch's cross entropy: its softmax is not saved yet (a temporary); with full recompute
        # that forward peak and the recomputed layer's (in backward, the head's tensors freed) never coincide
        head = head_activation_bytes(shape) - cross_entropy_saved_bytes(shape)
        head_temporaries = float(head_peak_temporaries(shape))
        if head + head_temporaries >= recomputed_layer:
            activations, temporaries = activations + head, head_temporaries
        else:
            activations += recomputed_layer
    else:
        activations += recomputed_layer
    trainable = rank.trainable  # frozen LoRA base weights have no grads and no optimizer state
    qlora = config.finetune.qlora
    quantized_bytes = 0.0 if qlora is None else rank.quantized * bytes_per_4bit_weight(qlora.double_quant)
    return RankMemory(
        pp_rank=rank.pp_rank, parameters=n,
        weights=(n - rank.quantized + rank.adapters) * MODEL_DTYPE_BYTES[dtype] + quantized_bytes,
        grads=trainable * 4.0, optimizer_replicated=trainable * float(replicated_per_param),
        optimizer_sharded=math.ceil(trainable / dp) * float(sharded_per_param),
        activations=activations, in_flight=in_flight, temporaries=temporaries)
