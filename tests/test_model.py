"""Single-process checks of AquilaModel against a naive, independently written LLaMA reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_aquila.config import ModelConfig
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.transformer import MLP, apply_rotary
from megatron_aquila.parallel.context import ParallelContext

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96,
             vocab_size=250, make_vocab_size_divisible_by=64, seq_length=12)


def _model(**overrides) -> AquilaModel:
    config = ModelConfig(**{**SHAPE, **overrides.pop("config", {})})
    return AquilaModel(config, ParallelContext.single_process(), **overrides)


def _batch(config: ModelConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=generator)
    labels = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=generator)
    return ids, labels


def _naive_rotary(x: torch.Tensor, positions: torch.Tensor, base: float, interleaved: bool) -> torch.Tensor:
    """x [b, heads, s, d]; the textbook formulas (complex numbers for the interleaved pairs)."""
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None, :]  # [s, d/2]
    if interleaved:
        pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2).float()
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return (x.double() * cos + rotated.double() * sin).float()


def _naive_loss(model: AquilaModel, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LLaMA forward written from the paper with explicit q/k/v/gate/up weights split from ours."""
    c = model.config
    n, g, d, h = c.num_attention_heads, c.kv_heads, c.head_dim, c.hidden_size
    b, s = ids.shape
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w
    x = model.embedding.weight[ids]  # [b, s, h]
    causal = torch.full((s, s), float("-inf")).triu(1)
    for layer in model.layers.values():
        qkv_w = layer.attention.qkv.weight.view(g, n // g + 2, d, h)
        wq = qkv_w[:, : n // g].reshape(n * d, h)
        wk, wv = qkv_w[:, n // g].reshape(g * d, h), qkv_w[:, n // g + 1].reshape(g * d, h)
        y = rms(x, layer.input_norm.weight)
        q = (y @ wq.t()).view(b, s, n, d).transpose(1, 2)
        k = (y @ wk.t()).view(b, s, g, d).transpose(1, 2).repeat_interleave(n // g, dim=1)
        v = (y @ wv.t()).view(b, s, g, d).transpose(1, 2).repeat_interleave(n // g, dim=1)
        q = _naive_rotary(q, torch.arange(s), c.rope_base, c.rope_interleaved)
        k = _naive_rotary(k, torch.arange(s), c.rope_base, c.rope_interleaved)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, dim=-1)
        x = x + (probs @ v).transpose(1, 2).reshape(b, s, n * d) @ layer.attention.dense.weight.t()
        y = rms(x, layer.post_attention_norm.weight)
        gate, up = layer.mlp.gate_up.weight
        x = x + (F.silu(y @ gate.t()) * (y @ up.t())) @ layer.mlp.down.weight.t()
    logits = rms(x, model.final_norm.weight) @ model.output_layer.weight[: c.vocab_size].t()  # no padded rows
    return F.cross_entropy(logits.view(b * s, -1), labels.view(-1), reduction="none").view(b, s)


@pytest.mark.parametrize("interleaved", [False, True])
def test_loss_and_grads_match_naive_reference(interleaved):
    model = _model(config=dict(rope_interleaved=interleaved, norm_init=0.7), seed=3)
    ids, labels = _batch(model.config)
    loss = model(ids, labels=labels)
    assert loss.shape == (2, 12) and loss.dtype == torch.float32
    loss.mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    ref = _naive_loss(model, ids, labels)
    ref.mean().backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_random_init_loss_is_near_log_vocab_and_logits_shape():
    model = _model()
    ids, labels = _batch(model.config)
    loss = model(ids, labels=labels)
    assert abs(loss.mean().item() - math.log(model.config.vocab_size)) < 0.05
    logits = model(ids)
    assert logits.shape == (2, 12, model.padded_vocab_size)
    torch.testing.assert_close(model(ids, position_ids=torch.arange(12).expand(2, 12), labels=labels), loss)


def test_rotate_half_and_interleaved_differ_and_match_formulas():
    torch.manual_seed(0)
    x = torch.randn(12, 2, 3, 16, requires_grad=True)  # [s, b, heads, d]
    model = _model()
    cos, sin = model.rotary(12, None, torch.device("cpu"))
    out = {}
    for interleaved in (False, True):
        out[interleaved] = apply_rotary(x, cos, sin, interleaved)
        ref = _naive_rotary(x.detach().permute(1, 2, 0, 3), torch.arange(12), 10000.0, interleaved).permute(2, 0, 1, 3)
        torch.testing.assert_close(out[interleaved], ref, atol=1e-5, rtol=1e-5)
        # Backward: a rotation's adjoint is the inverse rotation, so grad of <R x, u> is R^-1 u.
        upstream = torch.randn_like(x)
        (grad,) = torch.autograd.grad((out[interleaved] * upstream).sum(), x)
        back = apply_rotary(grad, cos, sin, interleaved)
        torch.testing.assert_close(back, upstream, atol=1e-5, rtol=1e-5)
    assert (out[False] - out[True]).abs().max() > 1e-2
    # Position 0 is not rotated in either layout.
    torch.testing.assert_close(out[False][0], x[0].detach())
    loss_half = _model(config=dict(rope_interleaved=False))(*_batch(ModelConfig(**SHAPE))[:1])
    loss_inter = _model(config=dict(rope_interleaved=True))(*_batch(ModelConfig(**SHAPE))[:1])
    assert (loss_half - loss_inter).abs().max() > 0


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_matches_no_recompute_with_dropout(recompute):
    dropout = dict(attention_dropout=0.1, hidden_dropout=0.1)
    results = []
    for mode in ("none", recompute):
        model = _model(config=dropout, recompute=mode, seed=5)
        ids, labels = _batch(model.config)
        torch.manual_seed(11)  # the default stream (replicated dropout) starts equal in both runs
        loss = model(ids, labels=labels)
        loss.mean().backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_none, grads_none), (loss_re, grads_re) = results
    torch.testing.assert_close(loss_re, loss_none, atol=0, rtol=0)
    for name in grads_none:
        torch.testing.assert_close(grads_re[name], grads_none[name], atol=1e-6, rtol=1e-6, msg=name)


def test_init_statistics_names_and_layer_subset():
    config = ModelConfig(**{**SHAPE, "num_layers": 8, "hidden_size": 128, "init_std": 0.05, "norm_init": 0.3})
    model = AquilaModel(config, ParallelContext.single_process(), layer_ids=[6, 2], seed=1)
    params = dict(model.named_parameters())
    assert list(model.layers.keys()) == ["6", "2"]
    assert abs(params["layers.6.attention.qkv.weight"].std().item() - 0.05) < 0.003
    assert abs(params["layers.6.mlp.down.weight"].std().item() - 0.05 / math.sqrt(16)) < 0.001
    assert torch.all(params["layers.2.post_attention_norm.weight"] == 0.3)
    assert params["layers.6.mlp.gate_up.weight"].shape == (2, config.ffn_size, 128)
    full = AquilaModel(config, ParallelContext.single_process(), seed=1)
    torch.testing.assert_close(dict(full.named_parameters())["layers.2.mlp.down.weight"],
                               params["layers.2.mlp.down.weight"], atol=0, rtol=0)
    other_seed = AquilaModel(config, ParallelContext.single_process(), layer_ids=[2], seed=2)
    assert not torch.equal(dict(other_seed.named_parameters())["layers.2.mlp.down.weight"],
                           params["layers.2.mlp.down.weight"])


def test_pipeline_chunks_compose_to_the_whole_model():
    whole = _model(seed=4)
    ids, labels = _batch(whole.config)
    first = _model(seed=4, layer_ids=[0], post_process=False)
    last = _model(seed=4, layer_ids=[1], pre_process=False)
    hidden = first(ids)
    assert hidden.shape == (12, 2, 64)
    torch.testing.assert_close(last(hidden_states=hidden, labels=labels), whole(ids, labels=labels))
    assert not hasattr(first, "output_layer") and not hasattr(last, "embedding")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="layer_ids"):
        _model(layer_ids=[0, 5])
    with pytest.raises(ValueError, match="recompute"):
        _model(recompute="everything")
    with pytest.raises(ValueError, match="input_ids"):
        _model()(labels=torch.zeros(2, 12, dtype=torch.long))
    meta = _model(device="meta")
    assert meta.output_layer.weight.is_meta


def test_swiglu_gradient_is_the_derivative_of_its_forward():
    torch.manual_seed(0)
    gate_up = torch.randn(5, 2, 12, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(MLP.swiglu, (gate_up,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_forward_and_backward_equal_plain_autograd(dtype):
    torch.manual_seed(0)
    gate_up, grad = torch.randn(7, 3, 20).to(dtype), torch.randn(7, 3, 10).to(dtype)
    fused, plain = gate_up.clone().requires_grad_(), gate_up.clone().requires_grad_()
    out = MLP.swiglu(fused)
    gate, up = plain.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out.backward(grad)
    ref.backward(grad)
    assert out.dtype == fused.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(fused.grad, plain.grad, atol=tol, rtol=tol)
    # and against the hand derivative: d silu(a)/da = sigmoid(a) (1 + a (1 - sigmoid(a)))
    a, u, g = (t.double() for t in (gate_up[..., :10], gate_up[..., 10:], grad))
    sig = torch.sigmoid(a)
    hand = torch.cat([g * u * sig * (1 + a * (1 - sig)), g * a * sig], dim=-1)
    torch.testing.assert_close(fused.grad.double(), hand, atol=tol * 4, rtol=tol * 4)


def test_swiglu_saves_only_the_gate_up_output():
    gate_up = torch.randn(4, 2, 8, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MLP.swiglu(gate_up)
    assert len(saved) == 1 and saved[0].untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr()
