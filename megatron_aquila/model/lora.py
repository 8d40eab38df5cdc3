"""LoRA (Hu et al. 2021) on the tensor-parallel Aquila layers: the trainable branch, its merge, PEFT export.

A targeted linear layer y = x W^T (W [out, in], frozen) becomes

    y = x W^T + s (drop(x) A^T) B^T,      A [r, in], B [out, r], s = alpha / r,

and only A and B are trained. Init as in the LoRA paper and PEFT: B = 0 and A ~ kaiming-uniform(a = sqrt(5))
(U(-1/sqrt(in), 1/sqrt(in))), drawn over A's FULL TP1 shape from a CPU generator seeded by (seed, global name)
and sliced for the TP rank, like every base weight (docs/design.md section 3.8): any TP layout starts from
the same adapter, and step 0 equals the base model exactly (the branch adds exact zeros).

Targets (``LoraSettings.targets``): ``qkv``, ``dense`` (alias ``o``), ``gate_up`` and ``down`` are whole
layers; ``q``, ``k``, ``v`` select projections of the fused qkv layer and ``gate``, ``up`` of the fused
gate_up. A fused layer has ONE branch whose A is shared by its targeted projections; B covers every row
and the forward uses B * M with M a fixed 0/1 row mask (1 on the targeted projections' rows), so the other
rows of B get zero grads and stay exactly zero under AdamW. In PEFT terms that is one lora_A per
projection, all equal to A, and lora_B = the projection's rows of B (``peft_adapter_tensors``).

Tensor parallelism (p ranks, rank t; docs/design.md sections 3.2 and 3.3), parameters registered on the
layer module itself as ``lora_a`` / ``lora_b`` (global names ``layers.3.attention.qkv.lora_a``):

- column-parallel (qkv, gate_up; W_t [out/p, in]): y_t = X W_t^T + s (drop(X) A^T) B_t^T, A replicated
  (partition_dim -1), B_t [out/p, r] split like W (dim 0; dim 1 of [2, f/p, r] for gate_up). The r-wide
  U = drop(X) A^T is formed BEFORE the TP region and enters it through copy_to_tp (backward all-reduce of
  dU), so dA = dU^T drop(X) is complete on every rank. Under SP (X_t = sequence shard [s/p, b, h]):
  U_t = drop(X_t) A^T [s/p, b, r] is all-gathered along the sequence (backward reduce-scatter) to
  [s, b, r], a gather r wide; dA_t = dU_t^T drop(X_t) is then this shard's part of the sum over the
  sequence, so A is marked ``sequence_parallel`` and the grad buffer sums it over TP.
- row-parallel (dense, down; W_t [out, in/p], input X_t [s, b, in/p]): by linearity the branch is added
  to the rank's PARTIAL before the layer's own reduction, partial_t = X_t W_t^T + s (drop(X_t) A_t^T) B^T,
  with A_t [r, in/p] split along dim 1 and B [out, r] replicated: no new collective. dB_t =
  s dY^T (drop(X_t) A_t^T) is one rank's addend of dB = sum_t dB_t, so B is marked ``sequence_parallel``.

Dropout (p = ``LoraSettings.dropout``, training mode only) draws its mask from the model's
RNGStatesTracker like ``hidden_dropout``: the data-parallel stream for X replicated over TP (column layer
without SP), the model-parallel stream for TP-sharded inputs (SP shards, row-parallel X_t).

``apply_lora`` must run before the grad buffers and the optimizer are built: it freezes every base
parameter, and only ``requires_grad`` parameters enter the grad buffer.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from megatron_aquila.checkpoint.hf_mapping import (
    _owned,
    _permute_heads,
    check_names_and_shapes,
    tensor_shapes,
)
from megatron_aquila.config import LORA_TARGET_NAMES, LoraConfig, ModelConfig
from megatron_aquila.model.aquila import AquilaModel, parameter_seed
from megatron_aquila.model.kernels import dropout
from megatron_aquila.parallel.context import ProcessGroup, group_rank, group_size
from megatron_aquila.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    full_shape,
    set_tensor_parallel_attributes,
)
from megatron_aquila.parallel.mappings import (
    _all_gather_dim0,
    _reduce_scatter_dim0,
    copy_to_tp,
    reduce_from_tp,
    reduce_scatter_to_sequence_parallel,
)
from megatron_aquila.parallel.random import DATA_PARALLEL, MODEL_PARALLEL, RNGStatesTracker

# Layer (name inside a TransformerBlock) -> its projections, in the layer's row order, HF-named.
LAYER_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "attention.qkv": ("q", "k", "v"),
    "attention.dense": ("o",),
    "mlp.gate_up": ("gate", "up"),
    "mlp.down": ("down",),
}
# Target name -> (layer, projections it selects).
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {  # keys: config.LORA_TARGET_NAMES
    "qkv": ("attention.qkv", ("q", "k", "v")), "q": ("attention.qkv", ("q",)),
    "k": ("attention.qkv", ("k",)), "v": ("attention.qkv", ("v",)),
    "dense": ("attention.dense", ("o",)), "o": ("attention.dense", ("o",)),
    "gate_up": ("mlp.gate_up", ("gate", "up")), "gate": ("mlp.gate_up", ("gate",)), "up": ("mlp.gate_up", ("up",)),
    "down": ("mlp.down", ("down",)),
}
assert set(TARGETS) == set(LORA_TARGET_NAMES), "lora.TARGETS and config.LORA_TARGET_NAMES must name the same targets"
LORA_PARAMETERS = ("lora_a", "lora_b")
_LAYER_NAME = re.compile(r"layers\.(\d+)\.(attention\.qkv|attention\.dense|mlp\.gate_up|mlp\.down)")
_HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
PEFT_PREFIX = "base_model.model.model.layers."
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    """What LoRA adapts and how; every decoder layer gets the same targets."""

    rank: int = 8                 # r: A is [r, in], B is [out, r]; >= 1
    alpha: float = 16.0           # the branch is scaled by s = alpha / r; > 0
    dropout: float = 0.0          # dropout on the branch input, training mode only; in [0, 1)
    targets: tuple[str, ...] = ("qkv", "dense", "gate_up", "down")  # names of TARGETS (o == dense)

    def __post_init__(self):
        if isinstance(self.targets, str):
            raise ValueError(f"lora targets {self.targets!r} must be a list of names, e.g. [{self.targets!r}]")
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank {self.rank!r} must be an integer >= 1 (A is [rank, in]); 8 or 16 is usual")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha {self.alpha!r} must be > 0 (the branch scale is alpha / rank); "
                             "2 x rank is usual")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout {self.dropout!r} must be in [0, 1); 0 disables it")
        unknown = [name for name in self.targets if name not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora targets {list(self.targets)} must be a non-empty list of {list(TARGETS)}"
                             + (f"; unknown: {unknown}" if unknown else ""))

    @classmethod
    def from_config(cls, config: LoraConfig) -> "LoraSettings":
        """The settings of a recipe's ``finetune.lora`` section."""
        return cls(rank=config.rank, alpha=config.alpha, dropout=config.dropout, targets=tuple(config.targets))

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank

    def layer_projections(self) -> dict[str, tuple[str, ...]]:
        """Targeted layer -> its targeted projections (in the layer's row order), layers in block order."""
        chosen: dict[str, set[str]] = {}
        for name in self.targets:
            layer, projections = TARGETS[name]
            chosen.setdefault(layer, set()).update(projections)
        return {layer: tuple(p for p in every if p in chosen[layer])
                for layer, every in LAYER_PROJECTIONS.items() if layer in chosen}

    def hf_target_modules(self) -> list[str]:
        """PEFT ``target_modules``: the HF projection names targeted (``q_proj``, ...), sorted."""
        return sorted(f"{p}_proj" for projections in self.layer_projections().values() for p in projections)


# ------------------------------------------------------------------ shapes, masks, maths shared by all paths
def adapter_parameters(config: ModelConfig, settings: LoraSettings) -> int:
    """LoRA parameters of the whole model (every A and B at full TP1 shape): the FLOPs count's adapters."""
    return sum(math.prod(shape) for shape in lora_full_shapes(config, settings).values())


def lora_full_shapes(config: ModelConfig, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """Every LoRA parameter's global name and full TP1 shape (``layers.i.attention.qkv.lora_a``: [r, h], ...)."""
    n, g, d, h, f, r = (config.num_attention_heads, config.kv_heads, config.head_dim, config.hidden_size,
                        config.ffn_size, settings.rank)
    weights = {"attention.qkv": ((n + 2 * g) * d, h), "attention.dense": (h, n * d),
               "mlp.gate_up": (2, f, h), "mlp.down": (h, f)}
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config.num_layers):
        for layer in settings.layer_projections():
            weight = weights[layer]
            shapes[f"layers.{i}.{layer}.lora_a"] = (r, weight[-1])
            shapes[f"layers.{i}.{layer}.lora_b"] = weight[:-1] + (r,)
    return shapes


def lora_row_mask(config: ModelConfig, layer: str, projections: tuple[str, ...]) -> Optional[torch.Tensor]:
    """M: 1 on the rows of B (full TP1 shape, last dim 1) of the targeted projections, 0 elsewhere; None when
    every row is targeted. qkv rows are grouped by kv group j: its n/g query heads, k_j, v_j, d rows each
    (``model/transformer.py``), so M is [g, n/g + 2, d, 1] viewed as [(n + 2g) d, 1]; gate_up M is [2, f, 1]."""
    if set(projections) == set(LAYER_PROJECTIONS[layer]):
        return None
    if layer == "attention.qkv":
        n, g, d = config.num_attention_heads, config.kv_heads, config.head_dim
        per_group = n // g
        slots = {"q": slice(0, per_group), "k": slice(per_group, per_group + 1),
                 "v": slice(per_group + 1, per_group + 2)}
        mask = torch.zeros(g, per_group + 2, d, 1)
        for projection in projections:
            mask[:, slots[projection]] = 1.0
        return mask.view((n + 2 * g) * d, 1)
    mask = torch.zeros(2, config.ffn_size, 1)  # mlp.gate_up: [gate, up]
    for projection in projections:
        mask[LAYER_PROJECTIONS[layer].index(projection)] = 1.0
    return mask


def adapted_layer(name: str, settings: LoraSettings) -> Optional[str]:
    """The layer kind (``mlp.down``, ...) when ``name`` (``layers.3.mlp.down.weight``) is the base weight of a
    layer ``settings`` adapts, else None."""
    match = _LAYER_NAME.fullmatch(name.removesuffix(".weight")) if name.endswith(".weight") else None
    return match.group(2) if match is not None and match.group(2) in settings.layer_projections() else None


def _masked(lora_b: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return lora_b if mask is None else lora_b * mask


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, mask: Optional[torch.Tensor], scale: float
               ) -> torch.Tensor:
    """dW = s (B * M) A in fp32: [out, r] @ [r, in] -> [out, in] ([2, f, r] @ [r, h] -> [2, f, h])."""
    lora_b = lora_b.float() if mask is None else lora_b.float() * mask.float()
    return scale * (lora_b @ lora_a.float())


# ------------------------------------------------------------------ the branch inside the TP layers
class _GatherFromSequenceParallel(torch.autograd.Function):
    """U = [U_1; ...; U_p] = all_gather(U_t) along dim 0 (the sequence).

    Backward: dU_t = chunk t of sum_q dU^(q) (reduce-scatter along dim 0), since every rank q consumes the
    whole U (each for its own column block of the output) and U_t is chunk t of it.
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_dim0(shard, group)  # [s, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_dim0(grad, ctx.group), None  # [s/p, ...]


def _lora_input(layer: nn.Module, x: torch.Tensor, stream: str) -> torch.Tensor:
    """drop(x) with the layer's LoRA dropout, the mask from ``stream`` of the model's tracker (training only)."""
    if layer.lora_dropout == 0 or not layer.training:
        return x
    with layer.lora_rng.fork(stream):
        return dropout(x, layer.lora_dropout)


class LoraColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear + s (drop(X) A^T) (B_t * M_t)^T, maths in the module docstring.

    Set by ``apply_lora`` (class swap of a built layer): ``lora_a`` [r, in] replicated, ``lora_b``
    [out/p, r] or [stack, out/p, r] split like the weight, ``lora_row_mask`` (buffer shaped like
    ``lora_b`` with last dim 1, or None), ``lora_scale`` s, ``lora_dropout``, ``lora_rng``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:  # x [s/p, b, in]
            shard = F.linear(_lora_input(self, x, MODEL_PARALLEL), self.lora_a)  # [s/p, b, r]
            u = _GatherFromSequenceParallel.apply(shard, self.tp_group)  # [s, b, r]
        else:  # x [s, b, in], replicated over TP
            u = copy_to_tp(F.linear(_lora_input(self, x, DATA_PARALLEL), self.lora_a), self.tp_group)  # [s, b, r]
        lora_b = _masked(self.lora_b, self.lora_row_mask).flatten(0, -2)  # [stack * out/p, r]
        return self.base_output(x) + F.linear(u * self.lora_scale, lora_b)  # [s, b, stack * out/p]

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's X W_t^T [s, b, stack * out/p] (Q-LoRA overrides it with 4-bit W)."""
        return ColumnParallelLinear.forward(self, x)


class LoraRowParallelLinear(RowParallelLinear):
    """RowParallelLinear whose partial gains s (drop(X_t) A_t^T) B^T before the reduction (module docstring).

    Set by ``apply_lora``: ``lora_a`` [r, in/p] split along dim 1, ``lora_b`` [out, r] replicated (marked
    ``sequence_parallel``), ``lora_row_mask`` None, ``lora_scale``, ``lora_dropout``, ``lora_rng``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [s, b, in/p]
        u = F.linear(_lora_input(self, x, MODEL_PARALLEL), self.lora_a)  # [s, b, r]
        partial = self.base_partial(x) + F.linear(u * self.lora_scale, self.lora_b)  # [s, b, out]
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel(partial, self.tp_group)  # [s/p, b, out]
        return reduce_from_tp(partial, self.tp_group)  # [s, b, out]

    def base_partial(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's addend X_t W_t^T [s, b, out] (Q-LoRA overrides it with 4-bit W)."""
        return F.linear(x, self.weight)


_BASE_CLASS = {LoraColumnParallelLinear: ColumnParallelLinear, LoraRowParallelLinear: RowParallelLinear}
_LORA_ATTRIBUTES = ("lora_a", "lora_b", "lora_row_mask", "lora_scale", "lora_dropout", "lora_rng")


def _rank_slice(full: torch.Tensor, local: torch.Tensor, partition_dim: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of ``full`` for a local tensor shaped like ``local`` (all of it when replicated)."""
    if partition_dim < 0:
        return full
    size = local.shape[partition_dim]
    return full.narrow(partition_dim, tp_rank * size, size)


def _attach(layer: nn.Module, name: str, projections: tuple[str, ...], config: ModelConfig,
            settings: LoraSettings, seed: int, rng: RNGStatesTracker, device: torch.device) -> None:
    """Swap ``layer`` to its LoRA class and register A (seeded, sliced), B = 0 and the row mask on it."""
    tp_size, tp_rank = group_size(layer.tp_group), group_rank(layer.tp_group)
    weight = layer.weight  # [out/p, in] | [2, f/p, in] (column), [out, in/p] (row)
    column = isinstance(layer, ColumnParallelLinear)
    a_dim = -1 if column else 1                    # column: A replicated; row: A split along in
    b_dim = weight.partition_dim if column else -1  # column: B split like W; row: B replicated
    a_full = (settings.rank, full_shape(weight, tp_size)[-1])  # [r, in]
    factory = dict(dtype=weight.dtype, device=device)
    lora_a = set_tensor_parallel_attributes(
        nn.Parameter(torch.empty(settings.rank, weight.shape[-1], **factory)), a_dim)  # [r, in] | [r, in/p]
    lora_b = set_tensor_parallel_attributes(
        nn.Parameter(torch.zeros(weight.shape[:-1] + (settings.rank,), **factory)), b_dim)  # like W, last dim r
    # Replicated parameters whose grad on each TP rank is a partial sum (module docstring): the grad buffer
    # sums them over TP.
    lora_a.sequence_parallel = column and layer.sequence_parallel
    lora_b.sequence_parallel = not column
    if device.type != "meta":
        generator = torch.Generator().manual_seed(parameter_seed(seed, f"{name}.lora_a"))
        drawn = nn.init.kaiming_uniform_(torch.empty(a_full), a=math.sqrt(5), generator=generator)  # [r, in]
        with torch.no_grad():
            lora_a.copy_(_rank_slice(drawn, lora_a, a_dim, tp_rank))
    mask = lora_row_mask(config, _LAYER_NAME.fullmatch(name).group(2), projections)
    if mask is not None:
        mask = _rank_slice(mask, lora_b, b_dim, tp_rank).to(**factory)
    layer.__class__ = LoraColumnParallelLinear if column else LoraRowParallelLinear
    layer.lora_a, layer.lora_b = lora_a, lora_b
    layer.register_buffer("lora_row_mask", mask, persistent=False)
    layer.lora_scale, layer.lora_dropout, layer.lora_rng = settings.scale, settings.dropout, rng


def apply_lora(model: AquilaModel, settings: LoraSettings, seed: int) -> None:
    """Freeze every parameter of ``model`` (one pipeline chunk) and give each targeted layer a LoRA branch.

    The branch parameters ``lora_a`` / ``lora_b`` live on the layer module (``layers.3.mlp.down.lora_b``)
    and are the only trainable parameters. A is drawn from (``seed``, its global name) over its full shape
    (module docstring); on the meta device nothing is drawn. Call before the grad buffer and optimizer exist.
    """
    if not isinstance(settings, LoraSettings):
        raise TypeError(f"apply_lora needs LoraSettings, got {type(settings).__name__}")
    if lora_state_names(model):
        raise ValueError("apply_lora was already called on this model (it has lora_a/lora_b parameters); "
                         "build a fresh model, or merge_lora first")
    buffered = [name for name, param in model.named_parameters() if hasattr(param, "main_grad")]
    if buffered:
        raise RuntimeError(f"apply_lora must run before the grad buffer is built, but {buffered[0]} already has "
                           "main_grad; apply LoRA right after building the model")
    # The chunk's device: a Q-LoRA base weight may already be a storage-less meta stand-in (model/qlora.py).
    device = next((param.device for param in model.parameters() if param.device.type != "meta"),
                  torch.device("meta"))
    for param in model.parameters():
        param.requires_grad_(False)
    targets = settings.layer_projections()
    for name, module in list(model.named_modules()):
        match = _LAYER_NAME.fullmatch(name)
        if match is not None and match.group(2) in targets:
            _attach(module, name, targets[match.group(2)], model.config, settings, seed, model.rng, device)


def lora_state_names(model: nn.Module) -> list[str]:
    """Global names of the LoRA parameters of ``model`` (its trainable state), in parameter order."""
    return [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in LORA_PARAMETERS]


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W_t += s (B_t * M_t) A (column) or s B A_t (row), in fp32 and cast back; then remove every branch.

    The model is afterwards a plain AquilaModel with merged weights, every parameter trainable again.
    """
    for module in model.modules():
        base = _BASE_CLASS.get(type(module))
        if base is None:
            continue
        delta = lora_delta(module.lora_a, module.lora_b, module.lora_row_mask, module.lora_scale)  # like weight
        module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
        for attribute in _LORA_ATTRIBUTES:
            delattr(module, attribute)
        module.__class__ = base
    for param in model.parameters():
        param.requires_grad_(True)


# ------------------------------------------------------------------ full (TP1) tensors: merge and PEFT export
def _check_lora_tensors(full: Mapping[str, torch.Tensor], config: ModelConfig, settings: LoraSettings) -> None:
    shapes = {name: shape for name, shape in tensor_shapes(full).items()
              if name.rsplit(".", 1)[-1] in LORA_PARAMETERS}
    check_names_and_shapes(shapes, lora_full_shapes(config, settings), "the LoRA tensors",
                           "Pass the model config and LoRA settings (rank, targets) the adapter was trained with.")


class MergedLoraWeights(Mapping[str, torch.Tensor]):
    """A full state dict with W <- W + s (B * M) A in fp32 for every targeted layer (left in fp32: the
    export casts once to its output dtype, so a bf16 base exported as fp32 is not rounded to bf16 on the
    way), computed lazily tensor by tensor (``to-hf --merge-lora`` streams it like any checkpoint).
    ``base`` holds the base weights (LoRA entries in it are dropped), ``lora`` the ``layers.{i}.{layer}.
    lora_a / lora_b`` tensors; both may be lazy readers. Untargeted tensors pass through as they are."""

    def __init__(self, base: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], config: ModelConfig,
                 settings: LoraSettings):
        _check_lora_tensors(lora, config, settings)
        self.base, self.lora, self.config, self.settings = base, lora, config, settings
        lora_names = lora_full_shapes(config, settings)
        self.names = [name for name in base if name not in lora_names]
        self.targets = settings.layer_projections()

    def shape_of(self, name: str) -> tuple[int, ...]:
        shape_of = getattr(self.base, "shape_of", None)
        return tuple(shape_of(name)) if shape_of is not None else tuple(self.base[name].shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        weight = self.base[name]
        layer_kind = adapted_layer(name, self.settings)
        if layer_kind is None:
            return weight
        layer = name.removesuffix(".weight")
        delta = lora_delta(self.lora[f"{layer}.lora_a"], self.lora[f"{layer}.lora_b"],
                           lora_row_mask(self.config, layer_kind, self.targets[layer_kind]), self.settings.scale)
        return weight.float() + delta

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _projection_rows(layer: str, lora_b: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """B's rows of each projection of ``layer`` in HF row order (qkv: undo the grouping as ``hf_mapping`` does
    for the weights, and turn interleaved rotary rows into halves for q and k)."""
    if layer == "attention.qkv":
        n, g, d = config.num_attention_heads, config.kv_heads, config.head_dim
        r = lora_b.shape[-1]
        grouped = lora_b.view(g, n // g + 2, d, r)
        q, k = grouped[:, : n // g].reshape(n * d, r), grouped[:, n // g].reshape(g * d, r)
        if config.rope_interleaved:
            q, k = _permute_heads(q, n, to_halves=True), _permute_heads(k, g, to_halves=True)
        return {"q": q, "k": k, "v": grouped[:, n // g + 1].reshape(g * d, r)}
    if layer == "mlp.gate_up":
        return {"gate": lora_b[0], "up": lora_b[1]}  # [2, f, r] -> 2 x [f, r]
    return {LAYER_PROJECTIONS[layer][0]: lora_b}


def peft_adapter_tensors(full: Mapping[str, torch.Tensor], config: ModelConfig, settings: LoraSettings,
                         dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """PEFT ``adapter_model.safetensors`` tensors of the LoRA entries of a full state dict (other entries unread).

    ``base_model.model.model.layers.{i}.{self_attn.{q,k,v,o}_proj | mlp.{gate,up,down}_proj}.lora_{A,B}.weight``
    with lora_A [r, in] (the layer's shared A, one copy per projection) and lora_B [out, r] (the projection's
    rows of B, HF row order); only targeted projections. Every tensor owns its storage, in ``dtype`` if given.
    """
    _check_lora_tensors(full, config, settings)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(config.num_layers):
        for layer, projections in settings.layer_projections().items():
            lora_a = full[f"layers.{i}.{layer}.lora_a"]
            rows = _projection_rows(layer, full[f"layers.{i}.{layer}.lora_b"], config)
            for projection in projections:
                prefix = f"{PEFT_PREFIX}{i}.{_HF_MODULE[projection]}"
                tensors[f"{prefix}.lora_A.weight"] = _owned(lora_a, dtype)
                tensors[f"{prefix}.lora_B.weight"] = _owned(rows[projection], dtype)
    return tensors


def peft_adapter_config(settings: LoraSettings, base_model_name_or_path: str) -> dict[str, Any]:
    """PEFT ``adapter_config.json`` contents (LoRA, causal LM, scale lora_alpha / r, no rsLoRA, no bias)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
        "target_modules": settings.hf_target_modules(), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "inference_mode": True, "modules_to_save": None,
    }


def write_peft_adapter(directory: str | Path, tensors: Mapping[str, torch.Tensor],
                       adapter_config: Mapping[str, Any]) -> None:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` into ``directory`` (each under a temporary
    name renamed when complete), the layout ``peft.PeftModel.from_pretrained`` reads."""
    if not tensors:
        raise ValueError(f"no adapter tensors to write to {directory}; peft_adapter_tensors found no LoRA entries")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / ADAPTER_WEIGHTS_FILE
    save_file(dict(tensors), str(weights) + ".tmp", metadata={"format": "pt"})
    os.replace(str(weights) + ".tmp", weights)
    config_path = directory / ADAPTER_CONFIG_FILE
    with open(str(config_path) + ".tmp", "w") as handle:
        json.dump(dict(adapter_config), handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(str(config_path) + ".tmp", config_path)
