"""Stand-ins for the CUDA attention kernels, for the dry run on fake CPU tensors.

A CPU-only torch cannot run CUDA kernels, even on fake tensors, and the CPU kernels save other
tensors for backward than the CUDA ones. The dry run therefore keeps our own wrappers
(``model/kernels.py``: layouts, masks, GQA copies) and swaps only the innermost kernel call for a
stand-in that returns outputs of the right shape and saves for backward what the CUDA kernel saves
(FlashAttention-2 and PyTorch's memory-efficient kernel, from their sources):

    flash (flash-attn, or SDPA's flash backend)   q, k, v, out (in q's memory layout), logsumexp
                                                  [b, n, sq] fp32; GQA native; fp16/bf16 only
    memory-efficient (SDPA)                       q, k, v, out (a new [b, sq, n, d] buffer), logsumexp
                                                  [b, n, ceil(sq/32)*32] fp32 and the additive mask when
                                                  one is given; no GQA
    math (SDPA's fallback)                        q, k, v (per query head under GQA) and the
                                                  probabilities [b, n, sq, sk] in the input dtype
    flash varlen (flash-attn, packed documents)   q, k, v [total, heads, d], out [total_q, n, d] (a new
                                                  buffer), logsumexp [n, total_q] fp32 (the unpadded
                                                  layout; releases before it pad to [documents, n,
                                                  max_seqlen_q], which fake tensors cannot size), and
                                                  cu_seqlens_q, cu_seqlens_k int32; GQA native
    FlexAttention (packed documents)              q, k, v, out (in q's layout), logsumexp [b, n, sq]
                                                  fp32 and the block mask (its own tensors, built by
                                                  torch's create_block_mask on the fake tensors and
                                                  cached per micro-batch: about 4 x b x (s/128)^2 int32
                                                  indices, a few KiB); GQA native

``cuda_sdpa`` chooses among them as CUDA SDPA does for the calls our wrapper makes. The stand-ins
compute nothing: they refuse real tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.attention.bias import CausalBias

FUSED_DTYPES = (torch.float16, torch.bfloat16)
FLASH_ATTN_VERSION = "2.5.8"  # the version the Dockerfile installs


def _require_fake(*tensors: torch.Tensor) -> None:
    if not all(isinstance(t, FakeTensor) for t in tensors):
        raise RuntimeError("the CUDA attention stand-ins compute nothing: only the dry run (FakeTensorMode) "
                           "may call them")


class _SavesForBackward(torch.autograd.Function):
    """out: q's layout (``sequence_major``: the flash kernels' ``empty_like(q)``, which keeps q's strides)
    or a new [b, sq, n, d] buffer seen as [b, n, sq, d] (the memory-efficient kernel); saves q, k, v, out
    and ``residuals`` for backward, whose gradients are empty tensors shaped like q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, sequence_major, *residuals):
        _require_fake(q, k, v)
        out = torch.empty_like(q) if sequence_major else q.new_empty(
            (q.shape[0], q.shape[2], q.shape[1], q.shape[3])).transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, *residuals)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors  # read once: under full recompute each read would re-run the block
        q, k, v = saved[:3]
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, *([None] * (len(saved) - 4)))


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    causal: bool = False, **_unused) -> torch.Tensor:
    """flash-attn's ``flash_attn_func``: q [b, sq, n, d], k and v [b, sk, g, d] -> out [b, sq, n, d]."""
    b, sq, n, _ = q.shape
    lse = q.new_empty((b, n, sq), dtype=torch.float32)
    return _SavesForBackward.apply(q, k, v, True, lse)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           causal: bool = False, **_unused) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func``: q [total_q, n, d], k and v [total_k, g, d] -> out [total_q, n, d]."""
    total_q, n, _ = q.shape
    lse = q.new_empty((n, total_q), dtype=torch.float32)
    return _SavesForBackward.apply(q, k, v, True, lse, cu_seqlens_q, cu_seqlens_k)


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask=None,
                   enable_gqa: bool = False, **_unused) -> torch.Tensor:
    """torch's compiled ``flex_attention``: query [b, n, sq, d], key and value [b, g, sk, d] -> [b, n, sq, d]."""
    b, n, sq, _ = query.shape
    lse = query.new_empty((b, n, sq), dtype=torch.float32)
    mask_tensors = [t for t in block_mask.as_tuple() if isinstance(t, torch.Tensor)]
    return _SavesForBackward.apply(query, key, value, True, lse, *mask_tensors)


def _flash(q, k, v):  # SDPA layout [b, n, s, d]
    b, n, sq, _ = q.shape
    return _SavesForBackward.apply(q, k, v, True, q.new_empty((b, n, sq), dtype=torch.float32))


def _efficient(q, k, v, bias: Optional[torch.Tensor]):
    b, n, sq, _ = q.shape
    lse = q.new_empty((b, n, math.ceil(sq / 32) * 32), dtype=torch.float32)
    return _SavesForBackward.apply(q, k, v, False, lse, *([] if bias is None else [bias]))


def _math(q, k, v, bias: Optional[torch.Tensor]):
    n, g = q.shape[1], k.shape[1]
    if g != n:  # the math path repeats K and V per query head
        k, v = (x.repeat_interleave(n // g, dim=1) for x in (k, v))
    probabilities = q.new_empty((*q.shape[:3], k.shape[2]))  # [b, n, sq, sk]
    return _SavesForBackward.apply(q, k, v, False, probabilities)


def cuda_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
              is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as CUDA runs it for our wrapper's calls (module docstring)."""
    fused_dtype = query.dtype in FUSED_DTYPES
    same_heads = key.shape[1] == query.shape[1]
    if attn_mask is None or isinstance(attn_mask, CausalBias):  # causal (upper-left or lower-right): no mask tensor
        if fused_dtype:
            return _flash(query, key, value)
        return _efficient(query, key, value, None) if same_heads else _math(query, key, value, None)
    return _efficient(query, key, value, attn_mask) if same_heads else _math(query, key, value, attn_mask)


def math_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
              is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA's math path (no fused kernel): the [b, n, sq, sk] probabilities are stored."""
    return _math(query, key, value, None)
