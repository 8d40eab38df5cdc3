"""The Aquila (LLaMA-architecture) decoder block: RMSNorm, GQA attention with RoPE (``model/rope.py``), SwiGLU MLP.

Activations are [s, b, h] (sequence first, Megatron's layout; [s/tp, b, h] between blocks under
sequence parallelism). Tensor parallelism splits heads (whole kv groups per rank) and the FFN width.
Under context parallelism s is this rank's two chunks of the sequence (S/cp tokens) and attention
gathers K/V over the CP group (``parallel/context_parallel.py``); every other op is per token.

Activation recompute (``recompute``): "selective" checkpoints only the attention core
(softmax(QK^T)V), "full" the whole block; both use ``torch.utils.checkpoint`` (non-reentrant),
which replays the default generator, and ``_checkpoint`` below also rewinds the model's
``RNGStatesTracker`` so dropout masks drawn from its streams are identical in the recompute.

Compiled blocks (``model.compile``, ``model/compile.py``): run without dropout, so ``_checkpoint`` is the
plain checkpoint there, and SwiGLU and rotary (``model/rope.py``) run as plain ops for the compiler.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_aquila.config import ModelConfig
from megatron_aquila.model.kernels import AttentionFn, NormFn, Segments, dropout
from megatron_aquila.model.rope import apply_rotary
from megatron_aquila.parallel.context import ProcessGroup, group_size
from megatron_aquila.parallel.context_parallel import context_parallel_attention
from megatron_aquila.parallel.layers import ColumnParallelLinear, RowParallelLinear, set_tensor_parallel_attributes
from megatron_aquila.parallel.random import DATA_PARALLEL, MODEL_PARALLEL, RNGStatesTracker

RECOMPUTE_MODES = ("none", "selective", "full")


def hidden_dropout(x: torch.Tensor, p: float, training: bool, rng: RNGStatesTracker,
                   sequence_parallel: bool) -> torch.Tensor:
    """``dropout(x, p)`` (model/kernels.py) in training, ``x`` otherwise (embedding output and both residual branches).

    The mask comes from the tracker's model-parallel stream for sequence-parallel shards (they differ
    across TP ranks) and from its data-parallel stream for replicated activations (every TP rank must
    draw the same mask).
    """
    if p == 0 or not training:
        return x
    with rng.fork(MODEL_PARALLEL if sequence_parallel else DATA_PARALLEL):
        return dropout(x, p)


def _checkpoint(fn: Callable, tracker: RNGStatesTracker, *args: torch.Tensor) -> torch.Tensor:
    """``checkpoint(fn, *args)`` whose recompute sees the tracker streams of the first run."""
    if torch.compiler.is_compiling():
        # Compiled blocks run without dropout (model/compile.py refuses it): no stream to replay, and
        # dynamo traces the plain checkpoint as a region its backward recomputes.
        return checkpoint(fn, *args, use_reentrant=False)
    snapshot = tracker.get_states()
    calls = [0]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            return fn(*inputs)
        current = tracker.get_states()
        tracker.set_states(snapshot)
        try:
            return fn(*inputs)
        finally:
            tracker.set_states(current)

    return checkpoint(run, *args, use_reentrant=False)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32. Replicated over TP; under
    sequence parallelism the weight is marked ``sequence_parallel`` (its grad needs a TP all-reduce)."""

    def __init__(self, hidden_size: int, eps: float, norm_fn: NormFn, *, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.eps = eps
        self.norm_fn = norm_fn
        self.weight = set_tensor_parallel_attributes(
            nn.Parameter(torch.empty(hidden_size, dtype=params_dtype, device=device)), -1)
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, self.weight, self.eps)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings, heads split over TP.

    ``qkv.weight`` rows (full TP1 layout) are grouped by kv group j: the n/g query heads of group j,
    then k_j, then v_j (each d rows), so a contiguous TP split hands each rank whole groups.
    """

    def __init__(self, config: ModelConfig, tp_group: ProcessGroup, attention_fn: AttentionFn,
                 rng: RNGStatesTracker, *, sequence_parallel: bool, selective_recompute: bool,
                 params_dtype: torch.dtype, device: torch.device | str | None, cp_group: ProcessGroup = None,
                 tp_comm_overlap: bool = True):
        super().__init__()
        self.cp_group = cp_group if group_size(cp_group) > 1 else None
        tp = group_size(tp_group)
        n, g, d = config.num_attention_heads, config.kv_heads, config.head_dim
        if n % g != 0 or g % tp != 0:
            raise ValueError(f"attention heads {n} must be a multiple of kv heads {g}, and kv heads a multiple of "
                             f"tensor_parallel {tp} (GQA keeps whole query groups on one rank)")
        self.local_heads, self.local_kv_heads, self.head_dim = n // tp, g // tp, d
        self.heads_per_group = n // g
        self.interleaved = config.rope_interleaved
        self.dropout = config.attention_dropout
        self.selective_recompute = selective_recompute
        self.rng = rng
        self.core = attention_fn
        self.qkv = ColumnParallelLinear(config.hidden_size, (n + 2 * g) * d, tp_group,
                                        sequence_parallel=sequence_parallel, tp_comm_overlap=tp_comm_overlap,
                                        params_dtype=params_dtype, device=device)
        self.dense = RowParallelLinear(n * d, config.hidden_size, tp_group,
                                       sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
        return self.core(q, k, v, self.training, segments)  # [sq, b, n/tp * d]

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
        fork = self.rng.fork(MODEL_PARALLEL) if self.dropout > 0 and self.training else contextlib.nullcontext()
        with fork:
            if self.cp_group is not None:
                return context_parallel_attention(self._attend, q, k, v, self.cp_group, segments)  # [s, b, n/tp*d]
            return self._attend(q, k, v, segments)  # [s, b, n/tp * d]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments = None) -> torch.Tensor:
        qkv = self.qkv(x)  # [s, b, (n + 2g)/tp * d]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.local_kv_heads, self.heads_per_group + 2, self.head_dim)
        # One split rather than three indexings: its backward writes the three grads into one new
        # [s, b, g/tp, n/g + 2, d] tensor (a cat), where indexing zero-fills and adds one such tensor each.
        q, k, v = qkv.split([self.heads_per_group, 1, 1], dim=3)
        q = apply_rotary(q, cos, sin, self.interleaved).view(s, b, self.local_heads, self.head_dim)  # [s, b, n/tp, d]
        k = apply_rotary(k.squeeze(3), cos, sin, self.interleaved)  # [s, b, g/tp, d]
        # A copy: attention saves v, and a strided view would keep the whole fused QKV output alive.
        v = v.squeeze(3).contiguous()  # [s, b, g/tp, d]
        if self.selective_recompute and torch.is_grad_enabled():
            context = _checkpoint(self._core, self.rng, q, k, v, segments)
        else:
            context = self._core(q, k, v, segments)
        return self.dense(context)  # [s, b, h] ([s/tp, b, h] under SP)


class _SwiGLU(torch.autograd.Function):
    """y = silu(a) * u for gate_up = [a, u] split in halves along the last dim (Megatron-LM's
    ``bias_swiglu`` without bias), silu(a) = a * sigmoid(a).

    Backward, with g = dL/dy: du = g * silu(a), da = (g * u) * silu'(a) where
    silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a))). Saved for backward: gate_up only;
    silu(a) is recomputed, not kept (plain autograd would keep it besides gate_up).
    The ops are those plain autograd runs (``aten.silu_backward`` for silu'), in the same dtype.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)  # 2 x [s, b, f/tp]
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up, memory_format=torch.contiguous_format)  # [s, b, 2f/tp]
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_gate_up


class MLP(nn.Module):
    """SwiGLU: down(silu(x W_gate^T) * (x W_up^T)); gate and up fused in one [2, f/tp, h] weight."""

    def __init__(self, config: ModelConfig, tp_group: ProcessGroup, *, sequence_parallel: bool,
                 params_dtype: torch.dtype, device: torch.device | str | None, tp_comm_overlap: bool = True):
        super().__init__()
        self.gate_up = ColumnParallelLinear(config.hidden_size, config.ffn_size, tp_group, stack=2,
                                            sequence_parallel=sequence_parallel, tp_comm_overlap=tp_comm_overlap,
                                            params_dtype=params_dtype, device=device)
        self.down = RowParallelLinear(config.ffn_size, config.hidden_size, tp_group,
                                      sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device)

    @staticmethod
    def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of gate_up [..., 2f/tp] = [gate, up] -> [..., f/tp], saving only gate_up (``_SwiGLU``)."""
        if torch.compiler.is_compiling():  # plain ops: the compiler fuses them and recomputes silu in backward
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate) * up
        return _SwiGLU.apply(gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.swiglu(self.gate_up(x)))  # [s, b, 2f/tp] -> [s, b, f/tp] -> [s, b, h]


class TransformerBlock(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(.)); pre-norm residual block."""

    def __init__(self, config: ModelConfig, tp_group: ProcessGroup, rng: RNGStatesTracker, *,
                 attention_fn: AttentionFn, norm_fn: NormFn, sequence_parallel: bool = False,
                 recompute: str = "none", params_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, cp_group: ProcessGroup = None,
                 tp_comm_overlap: bool = True):
        super().__init__()
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute {recompute!r} must be one of {RECOMPUTE_MODES}")
        sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.sequence_parallel = sequence_parallel
        self.full_recompute = recompute == "full"
        self.hidden_dropout = config.hidden_dropout
        self.rng = rng
        norm = dict(sequence_parallel=sequence_parallel, params_dtype=params_dtype, device=device)
        linear = dict(sequence_parallel=sequence_parallel, tp_comm_overlap=tp_comm_overlap, params_dtype=params_dtype,
                      device=device)
        self.input_norm = RMSNorm(config.hidden_size, config.norm_eps, norm_fn, **norm)
        self.attention = Attention(config, tp_group, attention_fn, rng, selective_recompute=recompute == "selective",
                                   cp_group=cp_group, **linear)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.norm_eps, norm_fn, **norm)
        self.mlp = MLP(config, tp_group, **linear)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return hidden_dropout(x, self.hidden_dropout, self.training, self.rng, self.sequence_parallel)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        x = x + self._dropout(self.attention(self.input_norm(x), cos, sin, segments))  # [s, b, h]
        return x + self._dropout(self.mlp(self.post_attention_norm(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments = None) -> torch.Tensor:
        """``segments``: the micro-batch's ``DocumentMask`` for per-document attention, or None."""
        if self.full_recompute and torch.is_grad_enabled():
            return _checkpoint(self._forward, self.rng, x, cos, sin, segments)
        return self._forward(x, cos, sin, segments)


def scaled_init_std(init_std: float, num_layers: int) -> float:
    """Megatron's init for the residual-branch output projections: std / sqrt(2 * num_layers)."""
    return init_std / math.sqrt(2.0 * num_layers)
