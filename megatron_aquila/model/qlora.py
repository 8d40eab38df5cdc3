"""Q-LoRA (Dettmers et al. 2023): LoRA adapters (model/lora.py) over base weights stored in 4 bits.

Storage. A LoRA-targeted layer's frozen weight, this TP rank's shard flattened to the 2-D [rows, in] its
matmul uses (rows = out/p, or stack * out/p for gate_up), is quantized by bitsandbytes in row-major blocks
of 64 weights: block j keeps a scale m_j = max |w| over the block and a 4-bit code c_jk per weight,

    w_jk ~ m_j Q[c_jk],   Q = the 16 NF4 values (quantiles of a normal, the paper's) or the FP4 values,

0.5 byte per weight. Double quantization stores the fp32 scales m_j themselves as 8-bit codes in blocks of
256 (minus their mean, with one fp32 scale per block of 256): 1/64 byte of scale per weight instead of 4/64.
``finetune.qlora: {bits: 4, quant_type, double_quant, compute_dtype}`` chooses the format.

Compute. y = x W~^T with W~ = dequant(W_t) in the compute dtype (= precision.dtype), formed per layer in
forward and again in backward (dx = dy W~), then freed; W is frozen, so no dW and nothing of x is saved.
At most the layer in flight holds a full-precision copy of its weight, never the whole model.

Tensor parallelism. Each rank quantizes its own shard, so no block straddles a shard boundary. With in
(column-parallel) and in/p (row-parallel) multiples of 64, every block lies in one row of one shard and
is the same 64 weights as a TP1 block: the codes and scales equal TP1's without double quantization.
With it, the 8-bit rounding of the scales depends on which 256 scales share a block (and their mean),
so TP layouts (and our fused qkv / gate_up layers against HF's separate projections) differ by that
rounding of the scales, far below the 4-bit rounding of the weights (tests/test_qlora.py measures both).

Layers. Column-parallel (qkv, gate_up): X -> copy_to_tp, or under SP the all-gather of the sequence shards
(backward reduce-scatter), -> X W~_t^T. Row-parallel (dense, down): the partial X_t W~_t^T, to which the
LoRA branch adds before the layer's own reduction (model/lora.py).

Loading. The model is built with each targeted weight quantized right after its block is constructed
(``quantizing_block_hook``), so at most one block is ever held at full precision. The layer's ``weight``
then becomes a meta Parameter (shape and TP attributes, no storage) whose ``quantized_loader`` takes this
rank's slice of a streamed tensor and quantizes it in place of the copy (``checkpoint/full_state.py``):
``checkpoint.init_weights`` streams one tensor at a time as for every run. Checkpoints hold the adapters
only, as for LoRA; exports merge or pair them with the original bf16 base (docs/design.md section 12, Q-LoRA).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megatron_aquila.config import QLoraConfig
from megatron_aquila.model.lora import (
    LoraColumnParallelLinear,
    LoraRowParallelLinear,
    LoraSettings,
    _GatherFromSequenceParallel,
)
from megatron_aquila.parallel.mappings import copy_to_tp

BLOCK_SIZE = 64          # weights per 4-bit block (bitsandbytes' and HF's default for Q-LoRA)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bitsandbytes_functional() -> Any:
    """``bitsandbytes.functional``, imported on first use (the optional ``[qlora]`` extra)."""
    try:
        return importlib.import_module("bitsandbytes.functional")
    except ImportError as error:
        raise ImportError(f"finetune.qlora needs bitsandbytes ({error}): pip install -e '.[qlora]'") from error


def prime_bitsandbytes(device: torch.device | str) -> None:
    """Quantize a few real weights on ``device`` once: bitsandbytes caches the 8-bit code table of double
    quantization at its first use, and a first use under the dry run's fake tensor mode would cache a fake
    table that every later real quantization in the process would read."""
    functional = bitsandbytes_functional()
    functional.quantize_4bit(torch.ones(BLOCK_SIZE, device=device), blocksize=BLOCK_SIZE, compress_statistics=True)


@dataclass(frozen=True)
class QLoraSettings:
    """The 4-bit format of the base weights (module docstring)."""

    quant_type: str = "nf4"                  # nf4 | fp4
    double_quant: bool = True                # 8-bit scales in blocks of 256
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"qlora quant_type {self.quant_type!r} must be nf4 or fp4")

    @classmethod
    def from_config(cls, config: QLoraConfig) -> "QLoraSettings":
        if config.bits != 4:
            raise ValueError(f"finetune.qlora.bits {config.bits}: only 4-bit weights are supported")
        return cls(quant_type=config.quant_type, double_quant=config.double_quant,
                   compute_dtype=DTYPES[config.compute_dtype])


class QuantizedWeight:
    """One weight shard [rows, in] as bitsandbytes 4-bit blocks: ``packed`` [rows * in / 2, 1] uint8 (two codes
    per byte) and bitsandbytes' ``QuantState`` (scales, code table, shape, dtype)."""

    def __init__(self, weight: torch.Tensor, settings: QLoraSettings):  # weight [rows, in]
        if weight.dim() != 2 or weight.numel() % BLOCK_SIZE != 0:
            raise ValueError(f"a 4-bit weight must be 2-D with a multiple of {BLOCK_SIZE} elements, got "
                             f"{tuple(weight.shape)}")
        self.settings = settings
        self.shape = tuple(weight.shape)
        self.quantize_(weight)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored blocks by those of ``weight`` [rows, in] (any float dtype, cast to the compute dtype)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"4-bit weight {self.shape} cannot take a tensor of shape {tuple(weight.shape)}")
        self.packed, self.state = bitsandbytes_functional().quantize_4bit(
            weight.to(self.settings.compute_dtype).contiguous(), blocksize=BLOCK_SIZE,
            compress_statistics=self.settings.double_quant, quant_type=self.settings.quant_type,
            quant_storage=torch.uint8)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W~ [rows, in] in ``dtype``."""
        return bitsandbytes_functional().dequantize_4bit(self.packed, self.state).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the format keeps on the device (codes, scales, nested scales, code tables)."""
        state, found = self.state, [self.packed]
        while state is not None:
            found += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
            state = state.state2 if getattr(state, "nested", False) else None
        return found


def bytes_per_4bit_weight(double_quant: bool) -> float:
    """Device bytes per 4-bit weight: the code (1/2) and the block scale shared by 64 weights, an fp32 (4/64)
    or, double-quantized, one byte (1/64) plus an fp32 scale per 256 blocks (4/(64 x 256))."""
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


class _DequantizedLinear(torch.autograd.Function):
    """y = x W~^T with W~ = dequant(W) formed in forward and again in backward (dx = dy W~), never saved;
    W is frozen, so there is no dW and x is not saved. x [..., in] -> y [..., rows]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.matmul(ctx.weight.dequantize(grad.dtype)), None


class QLoraColumnParallelLinear(LoraColumnParallelLinear):
    """LoraColumnParallelLinear whose frozen W_t is a ``QuantizedWeight`` (``quantized_weight``)."""

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # x [s/p, b, in]
            return _DequantizedLinear.apply(_GatherFromSequenceParallel.apply(x, self.tp_group), self.quantized_weight)
        return _DequantizedLinear.apply(copy_to_tp(x, self.tp_group), self.quantized_weight)  # [s, b, rows]


class QLoraRowParallelLinear(LoraRowParallelLinear):
    """LoraRowParallelLinear whose frozen W_t is a ``QuantizedWeight`` (``quantized_weight``)."""

    def base_partial(self, x: torch.Tensor) -> torch.Tensor:  # x [s, b, in/p]
        return _DequantizedLinear.apply(x, self.quantized_weight)  # [s, b, out]


_QLORA_CLASS = {LoraColumnParallelLinear: QLoraColumnParallelLinear, LoraRowParallelLinear: QLoraRowParallelLinear}


def _quantize_layer(layer: nn.Module, settings: QLoraSettings) -> None:
    """Quantize ``layer.weight`` and leave a meta Parameter in its place whose loader re-quantizes."""
    weight = layer.weight  # [out/p, in] | [stack, out/p, in] | [out, in/p]
    flat = weight.detach().flatten(0, -2)  # [rows, in] as the matmul sees it
    layer.quantized_weight = QuantizedWeight(flat, settings)
    stand_in = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="meta"), requires_grad=False)
    stand_in.tensor_model_parallel, stand_in.partition_dim = weight.tensor_model_parallel, weight.partition_dim
    stand_in.quantized_loader = lambda shard: layer.quantized_weight.quantize_(shard.flatten(0, -2))
    layer.weight = stand_in


def quantizing_block_hook(lora: LoraSettings, settings: QLoraSettings) -> Callable[[str, nn.Module], None]:
    """An ``AquilaModel`` block hook quantizing the LoRA-targeted layers of each block as it is built."""
    layers = lora.layer_projections()  # targeted layer kinds: attention.qkv, mlp.down, ...

    def quantize_block(_block_name: str, block: nn.Module) -> None:
        for name, module in block.named_modules():
            if name in layers:
                _quantize_layer(module, settings)
    return quantize_block


def apply_qlora(model: nn.Module) -> None:
    """After ``apply_lora``: give each LoRA layer whose base weight was quantized its Q-LoRA class."""
    for module in model.modules():
        quantized = hasattr(module, "quantized_weight")
        cls = _QLORA_CLASS.get(type(module))
        if quantized and cls is None:
            raise ValueError(f"{type(module).__name__} has a 4-bit weight but no LoRA branch: apply_lora first, "
                             "with the same targets the weights were quantized for")
        if cls is not None:
            if not quantized:
                raise ValueError("a LoRA layer's base weight was not quantized: build the model with "
                                 "quantizing_block_hook for the same LoRA targets")
            module.__class__ = cls


def quantized_weights(model: nn.Module) -> Iterator[tuple[str, QuantizedWeight]]:
    """(layer name, its 4-bit weight) for every quantized layer of ``model``."""
    for name, module in model.named_modules():
        if hasattr(module, "quantized_weight"):
            yield name, module.quantized_weight
