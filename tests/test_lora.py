"""LoRA (model/lora.py) against independent references.

- TP1: step 0 equals the base model bit for bit, only the LoRA parameters train, their count is the hand
  formula, and with a random B the logits equal a base model whose weights were merged by hand,
  W + s (B * M) A, with the row mask M written here from the qkv grouping rule;
- TP2 with and without SP (one spawn): logits and the grads of A and B, after the real grad buffer's
  finish_grad_sync (which sums over TP the parameters marked ``sequence_parallel``), equal the TP1 model
  with the same full A and B, also for partial targets and for LoRA dropout on replicated inputs;
  merge_lora and MergedLoraWeights agree with it;
- PEFT: the exported adapter, loaded by ``peft.PeftModel`` on transformers' LlamaForCausalLM, gives our logits.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from hf_models import random_llama
from megatron_aquila.checkpoint.full_state import gather_full_state_dict, load_full_state_dict
from megatron_aquila.checkpoint.hf_mapping import TokenIds, full_to_hf, hf_config_dict, hf_to_full
from megatron_aquila.config import ModelConfig
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.lora import (
    LoraSettings,
    apply_lora,
    lora_full_shapes,
    lora_state_names,
    merge_lora,
    MergedLoraWeights,
    peft_adapter_config,
    peft_adapter_tensors,
    write_peft_adapter,
)
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer
from megatron_aquila.parallel.layers import ColumnParallelLinear, RowParallelLinear

ATOL = 1e-5
CONFIG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96,
              vocab_size=210, make_vocab_size_divisible_by=16, seq_length=8)  # 210 pads to 224 for TP1 and TP2
ALL = ("qkv", "dense", "gate_up", "down")
PARTIAL = ("q", "v", "gate", "o")  # q and v of qkv, gate of gate_up, o (== dense)
LAYERS = ("attention.qkv", "attention.dense", "mlp.gate_up", "mlp.down")


def _settings(targets, dropout: float = 0.0) -> LoraSettings:
    return LoraSettings(rank=4, alpha=12.0, dropout=dropout, targets=targets)


def _random_b(config: ModelConfig, settings: LoraSettings, seed: int = 5) -> dict[str, torch.Tensor]:
    """A random non-zero full B for every LoRA layer (the init is B = 0)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.1 * torch.randn(shape, generator=generator)
            for name, shape in sorted(lora_full_shapes(config, settings).items()) if name.endswith("lora_b")}


def _local(full: torch.Tensor, param: torch.Tensor, tp_rank: int) -> torch.Tensor:
    if not param.tensor_model_parallel:
        return full
    size = param.shape[param.partition_dim]
    return full.narrow(param.partition_dim, tp_rank * size, size)


def _set_b(model: AquilaModel, full_b: dict[str, torch.Tensor], tp_rank: int) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in full_b.items():
            params[name].copy_(_local(full, params[name], tp_rank))


def _hand_mask(config: ModelConfig, layer: str, targets: tuple[str, ...]) -> torch.Tensor:
    """1 on the rows of B that the targets select, from the row index: qkv row i is in slot (i // d) mod
    (n/g + 2) of its kv group (slots < n/g: q, n/g: k, n/g + 1: v); gate_up [2, f, .] row (0, .) is gate."""
    n, g, d, f = config.num_attention_heads, config.kv_heads, config.head_dim, config.ffn_size
    wanted = {name for name in targets}
    if "qkv" in wanted:
        wanted |= {"q", "k", "v"}
    if "gate_up" in wanted:
        wanted |= {"gate", "up"}
    if layer == "attention.qkv":
        slot = (torch.arange((n + 2 * g) * d) // d) % (n // g + 2)
        names = [("q" if s < n // g else "k" if s == n // g else "v") for s in slot.tolist()]
        return torch.tensor([float(name in wanted) for name in names]).unsqueeze(-1)  # [(n + 2g) d, 1]
    if layer == "mlp.gate_up":
        return torch.tensor([float("gate" in wanted), float("up" in wanted)]).view(2, 1, 1).expand(2, f, 1)
    return torch.ones(1, 1)


def _trainable_count(config: ModelConfig, layers: tuple[str, ...], r: int) -> int:
    """r (in + out) per targeted layer: A [r, in] plus B [out, r], B covering the whole fused layer."""
    n, g, d, h, f = (config.num_attention_heads, config.kv_heads, config.head_dim, config.hidden_size,
                     config.ffn_size)
    in_out = {"attention.qkv": (h, (n + 2 * g) * d), "attention.dense": (n * d, h), "mlp.gate_up": (h, 2 * f),
              "mlp.down": (f, h)}
    return config.num_layers * sum(r * sum(in_out[layer]) for layer in layers)


def _batch(config: ModelConfig, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=generator)
    return ids, torch.randint(0, config.vocab_size, (2, config.seq_length), generator=generator)


# ------------------------------------------------------------------ single process
@pytest.mark.parametrize("targets,layers", [(ALL, LAYERS), (PARTIAL, ("attention.qkv", "attention.dense",
                                                                       "mlp.gate_up"))])
def test_step0_equals_base_and_only_lora_trains(targets, layers):
    config = ModelConfig(**CONFIG)
    ctx = ParallelContext.single_process()
    base = AquilaModel(config, ctx, seed=7).train()
    model = AquilaModel(config, ctx, seed=7).train()
    settings = _settings(targets, dropout=0.25)  # dropout active in training mode: still exact at step 0
    apply_lora(model, settings, seed=11)
    ids, labels = _batch(config)
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))

    model(ids, labels=labels).mean().backward()
    names = set(lora_state_names(model))
    assert names == set(lora_full_shapes(config, settings)) and len(names) == 2 * len(layers) * config.num_layers
    for name, param in model.named_parameters():
        if name in names:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert all(model.get_parameter(n).grad.abs().max() > 0 for n in names if n.endswith("lora_b"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == _trainable_count(config, layers, settings.rank)
    for name in names:  # init: B = 0, A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5))
        param = model.get_parameter(name).detach()
        if name.endswith("lora_b"):
            assert torch.count_nonzero(param) == 0, name
        else:
            bound = 1.0 / math.sqrt(param.shape[1])
            assert 0.9 * bound < param.abs().max() <= bound, name
    with pytest.raises(ValueError, match="already called"):
        apply_lora(model, settings, seed=11)


@pytest.mark.parametrize("targets", [ALL, PARTIAL, ("k", "up", "down")])
def test_lora_forward_and_merge_equal_hand_merged_base(targets):
    config = ModelConfig(**CONFIG)
    ctx = ParallelContext.single_process()
    settings = _settings(targets)
    model = AquilaModel(config, ctx, seed=7).eval()
    apply_lora(model, settings, seed=11)
    _set_b(model, _random_b(config, settings), 0)
    merged_by_hand = AquilaModel(config, ctx, seed=7).eval()
    lora = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in merged_by_hand.named_parameters():
            layer = name.removesuffix(".weight")
            if layer + ".lora_a" in lora:
                b = lora[layer + ".lora_b"] * _hand_mask(config, layer.split(".", 2)[2], targets)
                weight += settings.alpha / settings.rank * torch.einsum("...or,ri->...oi", b, lora[layer + ".lora_a"])
    ids, _ = _batch(config)
    with torch.no_grad():
        logits = model(ids)
        assert (logits - merged_by_hand(ids)).abs().max() < ATOL
        assert (logits - AquilaModel(config, ctx, seed=7)(ids)).abs().max() > 1e-3  # the branch matters
        merge_lora(model)
        assert (model(ids) - logits).abs().max() < ATOL
    assert not lora_state_names(model) and all(p.requires_grad for p in model.parameters())
    linear_types = {type(m) for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    assert linear_types == {ColumnParallelLinear, RowParallelLinear}  # the LoRA subclasses are gone
    assert not any("lora" in name for name, _ in model.named_buffers())


def test_full_recompute_replays_lora_dropout():
    """Recompute reruns the branch with the same dropout masks: loss and grads equal the plain run's."""
    config = ModelConfig(**CONFIG)
    settings = _settings(ALL, dropout=0.3)
    grads = []
    for recompute in ("none", "full"):
        model = AquilaModel(config, ParallelContext.single_process(), seed=7, recompute=recompute).train()
        apply_lora(model, settings, seed=11)
        _set_b(model, _random_b(config, settings), 0)
        ids, labels = _batch(config)
        loss = model(ids, labels=labels).mean()
        loss.backward()
        grads.append([loss.detach()] + [model.get_parameter(n).grad for n in lora_state_names(model)])
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(*grads))
    with torch.no_grad():
        assert (model(ids, labels=labels).mean() - grads[0][0]).abs() > 1e-4  # new masks: dropout is active


def test_settings_reject_bad_values():
    for bad, match in ((dict(rank=0), "rank"), (dict(alpha=0.0), "alpha"), (dict(dropout=1.0), "dropout"),
                       (dict(targets=("qkv", "w1")), "unknown"), (dict(targets=()), "non-empty"),
                       (dict(targets="qkv"), "list of names")):
        with pytest.raises(ValueError, match=match):
            LoraSettings(**bad)
    settings = LoraSettings(rank=8, alpha=16, targets=["v", "o", "q", "up", "dense"])
    assert settings.scale == 2.0 and settings.targets == ("v", "o", "q", "up", "dense")
    assert settings.layer_projections() == {"attention.qkv": ("q", "v"), "attention.dense": ("o",),
                                            "mlp.gate_up": ("up",)}
    assert settings.hf_target_modules() == ["o_proj", "q_proj", "up_proj", "v_proj"]


# ------------------------------------------------------------------ TP2 (one spawn)
def _gathered_logits(logits: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    pieces = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    dist.all_gather(pieces, logits.contiguous(), group=ctx.tp_group)
    return torch.cat(pieces, dim=-1)  # [b, s, V_pad]


def _check_case(ctx: ParallelContext, config: ModelConfig, settings: LoraSettings, sp: bool, tag: str,
                errors: dict) -> None:
    reference = AquilaModel(config, ParallelContext.single_process(), seed=7).train()
    model = AquilaModel(config, ctx, sequence_parallel=sp, seed=7).train()
    full_b = _random_b(config, settings)
    for net, rank in ((reference, 0), (model, ctx.tp_rank)):
        apply_lora(net, settings, seed=11)
        _set_b(net, full_b, rank)
    ref_params = dict(reference.named_parameters())
    names = lora_state_names(model)
    errors[f"{tag}_init_a"] = max((model.get_parameter(n) - _local(ref_params[n], model.get_parameter(n),
                                                                   ctx.tp_rank)).abs().max().item()
                                  for n in names if n.endswith("lora_a"))
    ids, labels = _batch(config)
    ref_logits = reference(ids)
    errors[f"{tag}_logits"] = (_gathered_logits(model(ids), ctx) - ref_logits).abs().max().item()
    buffer = DataParallelGradBuffer(model, ctx, overlap_grad_reduce=False)  # the real grad path of training
    errors[f"{tag}_only_lora_in_buffer"] = float(sorted(buffer.param_names.values()) != sorted(names))
    reference(ids, labels=labels).mean().backward()
    model(ids, labels=labels).mean().backward()
    partial_before = [(model.get_parameter(n).main_grad - ref_params[n].grad).abs().max().item()
                      for n in names if getattr(model.get_parameter(n), "sequence_parallel", False)]
    buffer.finish_grad_sync()  # sums the grads of parameters marked sequence_parallel over TP
    errors[f"{tag}_lora_grads"] = max(
        (p.main_grad - _local(ref_params[n].grad, p, ctx.tp_rank)).abs().max().item()
        for n, p in ((n, model.get_parameter(n)) for n in names))
    # The marked grads really are partial on each rank before the sum (row B always; column A under SP).
    errors[f"{tag}_marked_grads_partial"] = 0.0 if partial_before and min(partial_before) > 1e-4 else 1.0
    errors[f"{tag}_base_frozen"] = float(any(p.grad is not None for n, p in model.named_parameters()
                                             if n not in names))
    masked_rows = 0.0  # untargeted rows of a fused layer's B get exactly zero grad
    for name in names:
        if name.endswith("lora_b"):
            mask = _hand_mask(config, name.split(".", 2)[2].removesuffix(".lora_b"), settings.targets)
            masked_rows = max(masked_rows, (ref_params[name].grad * (1 - mask)).abs().max().item())
    errors[f"{tag}_masked_rows_zero_grad"] = masked_rows

    model.eval()
    with torch.no_grad():
        logits = _gathered_logits(model(ids), ctx)
        lora_full = gather_full_state_dict([model], ctx)
        merge_lora(model)
        errors[f"{tag}_merge_logits"] = (_gathered_logits(model(ids), ctx) - logits).abs().max().item()
        merged = gather_full_state_dict([model], ctx)
    expected = dict(MergedLoraWeights(lora_full, lora_full, config, settings))
    errors[f"{tag}_merge_full_names"] = float(sorted(expected) != sorted(merged))
    errors[f"{tag}_merge_full"] = max((merged[n] - expected[n]).abs().max().item() for n in merged)


def _check_dropout(ctx: ParallelContext, config: ModelConfig, errors: dict) -> None:
    """Column-layer LoRA dropout without SP draws from the data-parallel stream: the TP1 masks on every rank."""
    settings = _settings(("qkv", "gate_up"), dropout=0.5)
    reference = AquilaModel(config, ParallelContext.single_process(), seed=7).train()
    model = AquilaModel(config, ctx, seed=7).train()
    full_b = _random_b(config, settings)
    for net, rank in ((reference, 0), (model, ctx.tp_rank)):
        apply_lora(net, settings, seed=11)
        _set_b(net, full_b, rank)
    ids, _ = _batch(config)
    ref_logits = reference(ids)
    errors["dropout_logits"] = (_gathered_logits(model(ids), ctx) - ref_logits).abs().max().item()
    with torch.no_grad():
        errors["dropout_active"] = 0.0 if (reference.eval()(ids) - ref_logits).abs().max() > 1e-3 else 1.0


def _worker(rank: int, world_size: int) -> dict:
    ctx = ParallelContext.initialize(tp_size=world_size, pp_size=1, device=torch.device("cpu"))
    config = ModelConfig(**CONFIG)
    errors: dict[str, float] = {}
    for sp in (False, True):
        for name, targets in (("all", ALL), ("partial", PARTIAL)):
            _check_case(ctx, config, _settings(targets), sp, f"sp{sp}_{name}", errors)
    _check_dropout(ctx, config, errors)
    return errors


def test_tp2_lora_matches_single_process():
    results = run_distributed(_worker, world_size=2)
    for rank, errors in enumerate(results):
        assert len(errors) == 4 * 10 + 2, errors
        bad = {key: value for key, value in errors.items() if not value <= ATOL}
        assert not bad, f"rank {rank}: mismatches beyond {ATOL}: {bad}"


# ------------------------------------------------------------------ PEFT
def _random_hf_model(config: ModelConfig):
    """A random transformers model of ``config``'s shape."""
    return random_llama(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.kv_heads, max_position_embeddings=config.seq_length, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=False)


@pytest.mark.parametrize("targets,interleaved", [(ALL, False), (PARTIAL, False), (("q", "k", "up", "down"), True)])
def test_peft_adapter_gives_our_logits_in_transformers(tmp_path, targets, interleaved):
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    config = ModelConfig(**{**CONFIG, "vocab_size": 250, "seq_length": 16, "rope_interleaved": interleaved})
    ctx = ParallelContext.single_process()
    if interleaved:  # HF is rotate-half: export our interleaved model, whose q/k rows the export permutes
        model = AquilaModel(config, ctx, seed=7)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(
            hf_config_dict(config, dtype=torch.float32, token_ids=TokenIds(bos=1, eos=2, pad=0)))).eval()
        hf.load_state_dict(full_to_hf(gather_full_state_dict([model], ctx), config))
    else:  # a random transformers model, imported
        hf = _random_hf_model(config)
        model = AquilaModel(config, ctx, initialize=False)
        load_full_state_dict([model], hf_to_full(hf.state_dict(), config, tp_size=1), ctx, config)
    settings = LoraSettings(rank=4, alpha=12.0, dropout=0.1, targets=targets)
    apply_lora(model, settings, seed=11)
    _set_b(model, _random_b(config, settings), 0)
    ids, _ = _batch(config)
    with torch.no_grad():
        ours = model.eval()(ids)[..., : config.vocab_size]
        base = hf(ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter changes the output

    full = {name: param.detach() for name, param in model.named_parameters()}  # TP1: full tensors
    tensors = peft_adapter_tensors(full, config, settings)
    adapter = tmp_path / "adapter"
    write_peft_adapter(adapter, tensors, peft_adapter_config(settings, "random-llama"))
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == settings.hf_target_modules()
    projections = len(settings.hf_target_modules())
    assert len(tensors) == 2 * projections * config.num_layers
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (theirs - ours).abs().max() < 1e-4
