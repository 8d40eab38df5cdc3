"""Q-LoRA (model/qlora.py): 4-bit base weights under LoRA adapters, against transformers + bitsandbytes + peft.

- Step 0: our logits equal transformers' 4-bit base (BitsAndBytesConfig nf4, double quant) on the same
  HF model. Without double quantization both quantize the same rows in the same blocks of 64, so the
  dequantized weights are identical and the logits agree to fp32 rounding. With it, our fused qkv and
  gate_up layers group the 8-bit-rounded block scales differently from HF's separate projections: the
  difference must stay far below the 4-bit error itself (4-bit base vs the unquantized one).
- A few SGD steps later our adapter gradients equal peft's on the 4-bit HF base, and the exported
  adapter loaded by peft on that base gives our logits.
- TP2 (with and without sequence parallelism) gives the loss and the adapter gradients of one process.
- Only a 4-bit copy of each targeted weight stays; while the model is built, no earlier block's
  full-precision weight outlives its quantization; bad configs are refused at validation.
"""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megatron_aquila.checkpoint.full_state import load_full_state_dict
from megatron_aquila.checkpoint.hf_mapping import hf_to_full
from megatron_aquila.config import ConfigError, ModelConfig, load_config
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.lora import (
    LoraSettings,
    apply_lora,
    lora_state_names,
    peft_adapter_config,
    peft_adapter_tensors,
    write_peft_adapter,
)
from megatron_aquila.model.qlora import QLoraSettings, apply_qlora, quantized_weights, quantizing_block_hook
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.layers import full_shape
from test_lora import _random_hf_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# hidden and ffn (and their halves, for TP2) multiples of 64: every 4-bit block lies inside one row
CONFIG = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=256,
              vocab_size=256, make_vocab_size_divisible_by=16, seq_length=16)
LORA = LoraSettings(rank=4, alpha=8.0, targets=("q", "o", "gate", "down"))  # one projection per layer, as peft
STEPS, LR = 3, 0.5


def _hf_model() -> "transformers.LlamaForCausalLM":
    """test_lora's random Llama at this file's shape, in bf16 as published: both sides quantize the same values."""
    return _random_hf_model(ModelConfig(**CONFIG)).to(torch.bfloat16)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qlora") / "hf"
    _hf_model().save_pretrained(directory)
    return directory


def _hf_4bit(hf_dir, double_quant: bool, dtype: torch.dtype = torch.float32):
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, quantization_config=quantization, device_map="cpu",
                                                          dtype=dtype)
    # Training mode (Llama has no dropout): in eval mode bitsandbytes repacks the weights for its AVX512-bf16 CPU
    # kernel, which rounds the activations to bf16; training mode dequantizes and multiplies in compute_dtype.
    return model.train()


def _our_qlora(hf_dir, ctx: ParallelContext, double_quant: bool, sequence_parallel: bool = False) -> AquilaModel:
    config = ModelConfig(**CONFIG)
    settings = QLoraSettings(quant_type="nf4", double_quant=double_quant, compute_dtype=torch.float32)
    model = AquilaModel(config, ctx, initialize=False, sequence_parallel=sequence_parallel,
                        block_hook=quantizing_block_hook(LORA, settings))
    apply_lora(model, LORA, seed=11)
    apply_qlora(model)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
    load_full_state_dict([model], hf_to_full(hf.state_dict(), config, tp_size=ctx.tp_size), ctx, config)
    return model


def _batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (2, CONFIG["seq_length"])
    return (torch.randint(0, CONFIG["vocab_size"], shape, generator=generator),
            torch.randint(0, CONFIG["vocab_size"], shape, generator=generator))


def _our_logits(model: AquilaModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)[..., : CONFIG["vocab_size"]].float()


def test_step0_logits_equal_transformers_4bit_base(hf_dir):
    ids, _ = _batch()
    with torch.no_grad():
        unquantized = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(ids).logits
    ctx = ParallelContext.single_process()
    for double_quant in (False, True):
        ours = _our_logits(_our_qlora(hf_dir, ctx, double_quant), ids)
        with torch.no_grad():
            theirs = _hf_4bit(hf_dir, double_quant)(ids).logits
        four_bit_error = (theirs - unquantized).abs().max().item()
        difference = (ours - theirs).abs().max().item()
        assert four_bit_error > 1e-2, f"the 4-bit base should differ from the unquantized one, {four_bit_error}"
        if double_quant:  # the scales' 8-bit rounding, grouped differently: far below the 4-bit rounding
            assert difference < 0.05 * four_bit_error, (difference, four_bit_error)
        else:  # identical codes and scales: fp32 rounding only
            assert difference < 1e-5, difference


def _peft_model(hf_dir, ours: AquilaModel, adapter_dir):
    """peft on the 4-bit HF base with our adapter (trainable), read through our PEFT export."""
    config = ModelConfig(**CONFIG)
    full = {name: param.detach() for name, param in ours.named_parameters() if name in lora_state_names(ours)}
    write_peft_adapter(adapter_dir, peft_adapter_tensors(full, config, LORA), peft_adapter_config(LORA, str(hf_dir)))
    return peft.PeftModel.from_pretrained(_hf_4bit(hf_dir, double_quant=False), adapter_dir, is_trainable=True)


def test_adapter_grads_match_peft_on_4bit_base_and_export_loads(hf_dir, tmp_path):
    ctx, config = ParallelContext.single_process(), ModelConfig(**CONFIG)
    ours = _our_qlora(hf_dir, ctx, double_quant=False).train()
    theirs = _peft_model(hf_dir, ours, tmp_path / "initial").train()
    ours_optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=LR)
    their_optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        ids, labels = _batch(seed=step)
        ours_optimizer.zero_grad()
        their_optimizer.zero_grad()
        ours(ids, labels=labels).mean().backward()
        logits = theirs(ids).logits  # [b, s, V]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        if step == STEPS - 1:  # B moved off zero: every gradient is non-trivial by now
            full = {name: param.grad for name, param in ours.named_parameters() if param.requires_grad}
            expected = peft_adapter_tensors(full, config, LORA)
            got = {name.replace(".default", ""): param.grad for name, param in theirs.named_parameters()
                   if param.requires_grad}
            assert set(got) == set(expected)
            for name, grad in expected.items():
                assert grad.abs().max() > 0, name
                torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=name)
        ours_optimizer.step()
        their_optimizer.step()

    ids, _ = _batch(seed=9)
    exported = _peft_model(hf_dir, ours, tmp_path / "trained")  # training mode: see _hf_4bit (no dropout)
    with torch.no_grad():
        assert (exported(ids).logits - _our_logits(ours, ids)).abs().max().item() < 1e-5


def _loss_and_grads(ctx: ParallelContext, hf_dir, sequence_parallel: bool, double_quant: bool):
    """Loss and full adapter gradients of one step with a non-zero B (the same on every layout)."""
    model = _our_qlora(hf_dir, ctx, double_quant, sequence_parallel).train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                full = 0.05 * torch.randn(full_shape(param, ctx.tp_size), generator=torch.Generator().manual_seed(
                    len(name)))
                param.copy_(full if param.partition_dim < 0 else
                            full.chunk(ctx.tp_size, dim=param.partition_dim)[ctx.tp_rank])
    ids, labels = _batch()
    loss = model(ids, labels=labels).mean()
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad and ctx.tp_size > 1:
            grad = param.grad
            if getattr(param, "sequence_parallel", False):  # partial sums over TP (model/lora.py)
                dist.all_reduce(grad, group=ctx.tp_group)
            if param.partition_dim >= 0:
                shards = [torch.empty_like(grad) for _ in range(ctx.tp_size)]
                dist.all_gather(shards, grad.contiguous(), group=ctx.tp_group)
                grad = torch.cat(shards, dim=param.partition_dim)
            grads[name] = grad
        elif param.requires_grad:
            grads[name] = param.grad
    return loss.item(), grads


def _tp2_worker(rank: int, world_size: int, hf_dir):
    ctx = ParallelContext.initialize(tp_size=world_size, pp_size=1, device=torch.device("cpu"))
    return {(sp, dq): _loss_and_grads(ctx, hf_dir, sp, dq) for sp in (False, True) for dq in (False, True)}


def test_tp2_matches_one_process(hf_dir):
    """Without double quantization the shards' blocks are TP1's (exact up to fp32 sums); with it each shard
    rounds its block scales to 8 bits in its own groups of 256, a small relative change of the weights."""
    ctx = ParallelContext.single_process()
    results = run_distributed(_tp2_worker, 2, args=(hf_dir,))[0]
    for double_quant, tolerance in ((False, 1e-5), (True, 2e-3)):
        loss, grads = _loss_and_grads(ctx, hf_dir, False, double_quant)
        for sequence_parallel in (False, True):
            tp_loss, tp_grads = results[sequence_parallel, double_quant]
            where = f"sequence_parallel {sequence_parallel}, double_quant {double_quant}"
            assert abs(tp_loss - loss) < tolerance, (where, tp_loss, loss)
            for name, grad in grads.items():
                error = (tp_grads[name] - grad).abs().max().item()
                assert error <= tolerance * max(grad.abs().max().item(), 1.0), (where, name, error)


def test_only_4bit_weights_stay_and_one_block_at_a_time_is_full_precision():
    config = ModelConfig(**{**CONFIG, "num_layers": 4})
    every_linear = LoraSettings(rank=4, alpha=8.0, targets=("qkv", "dense", "gate_up", "down"))
    quantize = quantizing_block_hook(every_linear, QLoraSettings(compute_dtype=torch.bfloat16))
    full_precision: list[weakref.ref] = []
    live_when_built: list[int] = []

    def watching_hook(name: str, block: torch.nn.Module) -> None:  # the weights of the block just built
        live_when_built.append(sum(ref() is not None for ref in full_precision))
        full_precision.extend(weakref.ref(module.weight) for module in block.modules() if hasattr(module, "weight")
                              and module.weight.dim() >= 2)
        quantize(name, block)

    model = AquilaModel(config, ParallelContext.single_process(), initialize=False, params_dtype=torch.bfloat16,
                        block_hook=watching_hook)
    apply_lora(model, every_linear, seed=1)
    apply_qlora(model)
    # when each block is built, no earlier block's full-precision weight is alive any more
    assert live_when_built == [0] * config.num_layers and len(full_precision) == 4 * config.num_layers
    assert all(ref() is None for ref in full_precision)
    stored = dict(quantized_weights(model))
    assert len(stored) == 4 * config.num_layers
    for name, weight in stored.items():
        stand_in = model.get_submodule(name).weight
        elements, nbytes = stand_in.numel(), sum(t.numel() * t.element_size() for t in weight.tensors())
        assert stand_in.device.type == "meta" and not stand_in.requires_grad
        assert weight.dequantize(torch.bfloat16).shape == stand_in.flatten(0, -2).shape
        # 0.5 byte per weight, 1 byte per block of 64, 4 bytes per 256 blocks (+ the mean), the code tables
        assert nbytes <= elements / 2 + elements / 64 + 4 * (elements / (64 * 256) + 1) + 4 * (16 + 256), name


@pytest.mark.parametrize("override,message", [
    ("finetune.lora=null", "add a finetune.lora section"),
    ("finetune.qlora={bits: 8}", "only 4-bit"),
    ("finetune.qlora={quant_type: int8}", "must be nf4 or fp4"),
    ("finetune.qlora={compute_dtype: fp16}", "must equal precision.dtype"),
])
def test_bad_qlora_configs_are_refused(tmp_path, override, message):
    base = ["data.mock=true", "training.train_iters=1", "precision.dtype=bf16", f"checkpoint.init_weights={tmp_path}",
            "finetune.lora={rank: 4}", "finetune.qlora={bits: 4}"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, base + [override]).validate(1)


def test_missing_bitsandbytes_is_refused_with_the_install_line(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[qlora\]'"):
        load_config(None, ["data.mock=true", "training.train_iters=1", "precision.dtype=bf16",
                           f"checkpoint.init_weights={tmp_path}", "finetune.lora={rank: 4}",
                           "finetune.qlora={bits: 4}"]).validate(1)


# ------------------------------------------------------------------ end to end: from-hf -> SFT -> exports
def test_qlora_sft_run_checkpoint_and_exports(tmp_path):
    """from-hf -> 3 Q-LoRA SFT iterations (checkpoint: adapters only) -> to-peft on the 4-bit HF base and
    to-hf --merge-lora onto the original base, each giving the logits it should."""
    import numpy as np

    from megatron_aquila.checkpoint.manager import read_dcp_metadata
    from megatron_aquila.data.tokenizer import train_tiny_bbpe
    from test_sft_training import SEQ, write_conversations
    from tools.convert_checkpoint import main as convert
    from training import train_with

    vocab = 304  # above the byte-level tokenizer's 256 + specials, a multiple of 16
    hf = _hf_model()
    hf.resize_token_embeddings(vocab)
    hf.save_pretrained(tmp_path / "hf")
    assert convert(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "base"),
                    "--make-vocab-size-divisible-by", "16"]) == 0
    train_tiny_bbpe(["a tiny corpus for a tiny tokenizer"] * 20, tmp_path / "tokenizer", vocab_size=300)
    write_conversations(tmp_path / "chat", np.random.RandomState(1).randint(4, 20, size=24).tolist(), seed=4)
    args = [
        "model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=256", f"model.seq_length={SEQ}", f"model.vocab_size={vocab}",
        "model.make_vocab_size_divisible_by=16", "training.micro_batch_size=2", "training.global_batch_size=4",
        "training.train_iters=3", "optimizer.lr=5e-2", "optimizer.lr_decay_style=constant", "optimizer.min_lr=5e-2",
        "data.sft=true", f"data.data_path=[{tmp_path / 'chat'}]", "data.split=100,0,0", "data.num_workers=0",
        "logging.peak_tflops=1.0", f"checkpoint.init_weights={tmp_path / 'base'}",
        "finetune.lora={rank: 4, alpha: 8.0, targets: [qkv, dense, gate_up, down]}",
        "finetune.qlora={quant_type: nf4, double_quant: false, compute_dtype: fp32}",
        f"checkpoint.save={tmp_path / 'save'}", "checkpoint.save_interval=3", f"checkpoint.load={tmp_path / 'save'}",
    ]
    state, _, _ = train_with(args, 1)
    assert len(state.history) == 3 and all(np.isfinite(state.history))
    metadata = read_dcp_metadata(tmp_path / "save" / "iter_0000003").state_dict_metadata
    model_keys = sorted(key for key in metadata if key.startswith("model."))
    assert len(model_keys) == 2 * 4 * 2 and all(key.endswith((".lora_a", ".lora_b")) for key in model_keys)

    _, parts, _ = train_with(args + ["checkpoint.save=null", "checkpoint.save_interval=null"], 1)  # loads iteration 3
    ids = torch.randint(1, vocab, (2, SEQ), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ours = parts.model_chunks[0].eval()(ids, torch.arange(SEQ).expand(2, SEQ))[..., :vocab]

    assert convert(["to-peft", "--checkpoint", str(tmp_path / "save"), "--output", str(tmp_path / "adapter")]) == 0
    on_4bit = peft.PeftModel.from_pretrained(_hf_4bit(tmp_path / "hf", double_quant=False), tmp_path / "adapter")
    on_4bit.train()  # no dropout anywhere; eval mode would take bitsandbytes' bf16 CPU kernel (see _hf_4bit)
    with torch.no_grad():
        adapter_effect = (_hf_4bit(tmp_path / "hf", double_quant=False)(ids).logits - ours).abs().max().item()
        assert (on_4bit(ids).logits - ours).abs().max().item() < 1e-4
    assert adapter_effect > 1e-2, f"the adapters changed the logits by only {adapter_effect}: the test could not tell"

    # merged onto the ORIGINAL (unquantized) base: equals peft's adapter on that base, not our 4-bit model
    assert convert(["to-hf", "--checkpoint", str(tmp_path / "save"), "--merge-lora", "--output",
                    str(tmp_path / "merged"), "--dtype", "fp32", "--tokenizer-dir", str(tmp_path / "tokenizer")]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    on_base = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (merged(ids).logits - on_base(ids).logits).abs().max().item() < 1e-4
