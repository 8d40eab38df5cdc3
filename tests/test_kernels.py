"""Kernel selection (GPU libraries simulated as importable, never imported) and the torch kernels."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_aquila.model import kernels


def _pretend_importable(monkeypatch, *modules: str) -> None:
    monkeypatch.setattr(kernels, "_importable", lambda name: name in modules)


@pytest.mark.parametrize("device, dtype, importable, attention, norm", [
    ("cpu", torch.bfloat16, ("flash_attn", "transformer_engine", "apex"), "torch-sdpa", "torch"),
    ("cuda", torch.bfloat16, ("flash_attn", "transformer_engine", "apex"), "flash-attn", "apex"),
    ("cuda", torch.float16, ("flash_attn",), "flash-attn", "torch"),
    ("cuda", torch.float32, ("flash_attn",), "torch-sdpa", "torch"),  # flash-attn has no fp32
    ("cuda", torch.float32, ("flash_attn", "transformer_engine"), "transformer-engine", "transformer-engine"),
    ("cuda", torch.bfloat16, ("transformer_engine",), "transformer-engine", "transformer-engine"),
    ("cuda", torch.bfloat16, ("apex",), "torch-sdpa", "apex"),
    ("cuda", torch.bfloat16, (), "torch-sdpa", "torch"),
])
def test_selection(monkeypatch, device, dtype, importable, attention, norm):
    _pretend_importable(monkeypatch, *importable)
    choice = kernels.select_kernels(device, dtype)
    assert (choice.attention, choice.norm) == (attention, norm)
    assert attention in choice.describe() and norm in choice.describe()


def test_unknown_kernel_names_raise():
    with pytest.raises(ValueError, match="torch-sdpa"):
        kernels.build_attention("xformers", 4, 2, 8, 0.0)
    with pytest.raises(ValueError, match="apex"):
        kernels.build_rms_norm("fused")


def test_torch_sdpa_gqa_matches_naive_causal_attention():
    torch.manual_seed(0)
    s, b, n, g, d = 7, 2, 6, 2, 8
    q, k, v = torch.randn(s, b, n, d), torch.randn(s, b, g, d), torch.randn(s, b, g, d)
    out = kernels.build_attention("torch-sdpa", n, g, d, 0.0)(q, k, v, True)
    assert out.shape == (s, b, n * d)
    for head in range(n):
        kv = head // (n // g)  # query head i reads kv head i // (n/g)
        scores = torch.einsum("sbd,tbd->bst", q[:, :, head], k[:, :, kv]) / math.sqrt(d)
        scores = scores + torch.full((s, s), float("-inf")).triu(1)
        ref = torch.einsum("bst,tbd->sbd", scores.softmax(-1), v[:, :, kv])
        torch.testing.assert_close(out[:, :, head * d:(head + 1) * d], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_rms_norm(dtype):
    torch.manual_seed(0)
    x, weight = torch.randn(5, 3, 16).to(dtype), torch.rand(16).to(dtype)
    out = kernels.build_rms_norm("torch")(x, weight, 1e-5)
    x32 = x.float()
    ref = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def _plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The textbook formula through plain autograd, statistics in fp32 (fp64 stays fp64)."""
    x_wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x_wide * torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def test_torch_rms_norm_gradient_is_the_derivative_of_its_forward():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    torch.autograd.gradcheck(lambda x, w: kernels.build_rms_norm("torch")(x, w, 1e-5), (x, weight))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_torch_rms_norm_forward_and_backward_equal_plain_autograd(dtype, tol):
    torch.manual_seed(0)
    x, weight, grad = torch.randn(6, 2, 32).to(dtype), (torch.rand(32) + 0.5).to(dtype), torch.randn(6, 2, 32)
    results = []
    for norm in (kernels.build_rms_norm("torch"), _plain_rms_norm):
        x_leaf, w_leaf = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = norm(x_leaf, w_leaf, 1e-5)
        out.backward(grad.to(dtype))
        assert out.dtype == x_leaf.grad.dtype == w_leaf.grad.dtype == dtype
        results.append((out, x_leaf.grad, w_leaf.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_torch_rms_norm_saves_its_input_in_its_dtype_and_fp32_rstd_only():
    x, weight = torch.randn(5, 2, 16, dtype=torch.bfloat16, requires_grad=True), torch.ones(16, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.build_rms_norm("torch")(x, weight.requires_grad_(), 1e-5)
    assert sorted((tuple(t.shape), t.dtype) for t in saved if t is not weight) == [
        ((5, 2, 1), torch.float32), ((5, 2, 16), torch.bfloat16)]


@pytest.mark.parametrize("backend, importable, attention, norm", [
    ("torch", ("flash_attn", "transformer_engine", "apex"), "torch-sdpa", "torch"),
    ("flash-attn", ("flash_attn",), "flash-attn", "torch"),
    ("transformer-engine", ("transformer_engine",), "transformer-engine", "transformer-engine"),
    ("apex", ("apex",), "torch-sdpa", "apex"),
    ("auto", ("apex",), "torch-sdpa", "apex"),
])
def test_the_switch_forces_a_backend(monkeypatch, backend, importable, attention, norm):
    _pretend_importable(monkeypatch, *importable)
    choice = kernels.choose_kernels(backend, "cuda", torch.bfloat16)
    assert (choice.attention, choice.norm) == (attention, norm)


@pytest.mark.parametrize("backend, device, dtype, importable, words", [
    ("flash-attn", "cpu", torch.bfloat16, ("flash_attn",), ["needs a CUDA device", "device cpu"]),
    ("transformer-engine", "cuda", torch.bfloat16, (), ["transformer_engine not installed"]),
    ("flash-attn", "cuda", torch.float32, ("flash_attn",), ["fp16 or bf16", "torch.float32"]),
    ("xformers", "cuda", torch.bfloat16, (), ["must be one of"]),
])
def test_a_forced_backend_that_cannot_run_is_an_error(monkeypatch, backend, device, dtype, importable, words):
    _pretend_importable(monkeypatch, *importable)
    with pytest.raises(ValueError) as error:
        kernels.choose_kernels(backend, device, dtype)
    for word in words:
        assert word in str(error.value)


def _qkv(s: int = 6, b: int = 2, n: int = 4, g: int = 2, d: int = 8) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, b, heads, d, generator=generator) for heads in (n, g, g))


def test_torch_sdpa_drops_out_only_in_training():
    q, k, v = _qkv()
    plain = kernels.build_attention("torch-sdpa", 4, 2, 8, 0.0)(q, k, v, True)
    dropping = kernels.build_attention("torch-sdpa", 4, 2, 8, 0.5)
    torch.testing.assert_close(dropping(q, k, v, False), plain, atol=0, rtol=0)
    torch.manual_seed(0)
    trained = dropping(q, k, v, True)
    assert (trained - plain).abs().max() > 0.1
    torch.manual_seed(0)
    assert torch.equal(dropping(q, k, v, True), trained)  # the mask comes from the default generator


def test_flash_attn_gets_dropout_only_in_training(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, dropout_p, causal):  # [b, s, heads, d] like flash-attn
        calls.append((dropout_p, causal))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    q, k, v = _qkv()
    attend = kernels.build_attention("flash-attn", 4, 2, 8, 0.5)
    out = attend(q, k, v, False)
    attend(q, k, v, True)
    assert calls == [(0.0, True), (0.5, True)]
    torch.testing.assert_close(out, kernels.build_attention("torch-sdpa", 4, 2, 8, 0.0)(q, k, v, True))


def test_transformer_engine_attention_follows_the_training_flag(monkeypatch):
    """TE's DotProductAttention drops out only while its own ``training`` is set (its backends use
    ``attention_dropout if self.training else 0``); ours sits outside the module tree, so the kernel
    must set that flag at every call."""
    built, seen = [], []

    class DotProductAttention(torch.nn.Module):
        def __init__(self, num_heads, head_dim, *, num_gqa_groups, attention_dropout, qkv_format, attn_mask_type):
            super().__init__()
            built.append((num_heads, head_dim, num_gqa_groups, attention_dropout, qkv_format, attn_mask_type))

        def forward(self, q, k, v):
            seen.append(self.training)
            return q.flatten(2)

    te_pytorch = types.SimpleNamespace(DotProductAttention=DotProductAttention)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.SimpleNamespace(pytorch=te_pytorch))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te_pytorch)
    q, k, v = _qkv()
    attend = kernels.build_attention("transformer-engine", 4, 2, 8, 0.5)
    for training in (False, True, False):
        assert attend(q, k, v, training).shape == (6, 2, 32)
    assert built == [(4, 8, 2, 0.5, "sbhd", "causal")]
    assert seen == [False, True, False]
