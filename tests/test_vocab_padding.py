"""Padded vocabulary rows (``model.make_vocab_size_divisible_by``) are no part of the model's distribution.

- The vocab-parallel cross entropy, under TP1 and TP2, with fp32 and bf16 logits, equals torch's cross
  entropy over the real columns alone: without padding, with padding on the last rank only, and with a
  last rank that holds no real column. The padded columns' grads are exactly 0, fp32 logits are not
  modified.
- A tiny transformers ``LlamaForCausalLM`` (vocab 300) imported with ``from-hf`` and the default padding
  (300 -> 384 rows at TP1, 512 at TP2, all 212 of TP2 rank 1's padded rows on one rank) starts where
  transformers is: before any step our per-token loss equals transformers' within fp32 rounding, the
  logits we return equal its logits on the real columns and hold the dtype's lowest value on the
  padded ones, the output layer's grad equals ``lm_head``'s, and the padded rows' grads are exactly 0.
  With the padded rows in the softmax (their logits 0), the per-token loss differed by up to 4.6e-2
  relative here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_distributed
from hf_models import random_llama
from megatron_aquila.checkpoint.full_state import load_full_state, load_full_state_dict
from megatron_aquila.config import ModelConfig
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.cross_entropy import vocab_parallel_cross_entropy

VOCAB, BATCH, SEQ = 300, 2, 16
PADDED = {1: 384, 2: 512}  # 300 rounded up to a multiple of 128 x TP (the default make_vocab_size_divisible_by)
LOSS_RTOL = 1e-6


# ------------------------------------------------------------------ the cross entropy alone
def _cross_entropy_errors(ctx: ParallelContext) -> dict[str, float]:
    """Max |difference| from torch's cross entropy over the first V of 64 columns, for each case."""
    errors: dict[str, float] = {}
    generator = torch.Generator().manual_seed(0)
    for vocab in (64, 50, 20):  # TP2: no padding; 18 real columns on rank 1; none on rank 1
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(3, 5, 64, generator=generator) * 3).to(dtype)
            target = torch.randint(0, vocab, (3, 5), generator=generator)
            weight = torch.rand(3, 5, generator=generator)  # a non-uniform upstream gradient
            full = logits.float().clone().requires_grad_()
            ref = F.cross_entropy(full[..., :vocab].reshape(-1, vocab), target.view(-1), reduction="none")
            (ref.view(3, 5) * weight).sum().backward()
            local = logits.chunk(ctx.tp_size, -1)[ctx.tp_rank].clone().requires_grad_()
            before = local.detach().clone()
            loss = vocab_parallel_cross_entropy(local, target, ctx.tp_group, vocab)
            (loss * weight).sum().backward()
            tag = f"V{vocab}_{str(dtype).removeprefix('torch.')}"
            errors[f"loss_{tag}"] = (loss - ref.view(3, 5)).abs().max().item()
            expected_grad = full.grad.chunk(ctx.tp_size, -1)[ctx.tp_rank].to(dtype)
            errors[f"grad_{tag}"] = (local.grad.float() - expected_grad.float()).abs().max().item()
            padded = local.grad[..., max(vocab - ctx.tp_rank * local.shape[-1], 0):]
            errors[f"padded_grad_nonzero_{tag}"] = float(torch.count_nonzero(padded))
            errors[f"logits_modified_{tag}"] = float(not torch.equal(local.detach(), before))
    return errors


def _cross_entropy_worker(rank: int, world_size: int) -> dict[str, float]:
    return _cross_entropy_errors(ParallelContext.initialize(tp_size=world_size, pp_size=1,
                                                            device=torch.device("cpu")))


def _tolerance(key: str) -> float:
    """fp32 rounding for losses and fp32 grads; one bf16 ulp below 1 for bf16 grads (both sides round an
    fp32 grad computed in another order); exactly 0 for the counts."""
    if key.startswith("loss_"):
        return 1e-5
    if key.startswith("grad_"):
        return 2.0 ** -8 if key.endswith("bfloat16") else 1e-6
    return 0.0


def test_cross_entropy_leaves_padded_columns_out_tp1_and_tp2():
    results = [_cross_entropy_errors(ParallelContext.single_process())]
    results += run_distributed(_cross_entropy_worker, world_size=2)
    for rank, errors in enumerate(results):
        assert len(errors) == 24, errors
        bad = {key: value for key, value in errors.items() if value > _tolerance(key)}
        assert not bad, f"{'TP1' if rank == 0 else f'TP2 rank {rank - 1}'}: {bad}"


def test_vocab_size_outside_the_padded_vocabulary_is_refused():
    logits, target = torch.zeros(2, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="vocab_size 9 must be in \\[1, 8\\]"):
        vocab_parallel_cross_entropy(logits, target, None, 9)


# ------------------------------------------------------------------ an imported HF model
def _hf_model(directory: Path):
    """A random fp32 LlamaForCausalLM (norm weights too), saved to ``directory``."""
    model = random_llama(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(directory)
    return model


def _imported(hf_dir: Path, out: Path, tp: int) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """``from-hf`` with the default padding, read back as owned tensors (they travel to worker processes)."""
    from tools.convert_checkpoint import main as convert

    assert convert(["from-hf", "--hf-dir", str(hf_dir), "--output", str(out), "--tensor-parallel", str(tp)]) == 0
    full, config = load_full_state(out)
    assert config.padded_vocab_size(tp) == PADDED[tp] and full["output_layer.weight"].shape[0] == PADDED[tp]
    return {name: tensor.clone() for name, tensor in full.items()}, config


def _gathered(local: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor:
    if ctx.tp_size == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(pieces, local.contiguous(), group=ctx.tp_group)
    return torch.cat(pieces, dim=dim)


def _ours(ctx: ParallelContext, full: dict, config: ModelConfig, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token loss, padded logits and the vocabulary-row grads of one mean-loss backward, gathered over TP."""
    model = AquilaModel(config, ctx).eval()
    load_full_state_dict([model], full, ctx, config)
    with torch.no_grad():
        logits = _gathered(model(tokens[:, :-1]), ctx, -1)  # [b, s, V_pad]
    loss = model(tokens[:, :-1], labels=tokens[:, 1:])  # [b, s]
    loss.mean().backward()
    return {"loss": loss.detach(), "logits": logits,
            "output_grad": _gathered(model.output_layer.weight.grad, ctx, 0),
            "embedding_grad": _gathered(model.embedding.weight.grad, ctx, 0)}


def _tp2_worker(rank: int, world_size: int, full: dict, config: ModelConfig, tokens: torch.Tensor):
    ctx = ParallelContext.initialize(tp_size=world_size, pp_size=1, device=torch.device("cpu"))
    return _ours(ctx, full, config, tokens)


def _theirs(hf, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' per-token loss (from its logits), its own mean loss, logits and lm_head grad."""
    hf.zero_grad()
    out = hf(input_ids=tokens, labels=tokens)  # shifts the labels itself: position i predicts token i + 1
    out.loss.backward()
    logits = out.logits[:, :-1].detach()  # the last position predicts nothing
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none")
    return {"loss": per_token.view(BATCH, SEQ), "mean_loss": out.loss.detach(), "logits": logits,
            "lm_head_grad": hf.lm_head.weight.grad.clone(), "embed_grad": hf.model.embed_tokens.weight.grad.clone()}


def _check(ours: dict, theirs: dict, tp: int) -> None:
    worst = ((ours["loss"] - theirs["loss"]).abs() / theirs["loss"].abs()).max().item()
    assert worst < LOSS_RTOL, f"TP{tp}: per-token loss differs from transformers' by {worst:.2e} relative"
    mean = ours["loss"].mean().item()
    assert abs(mean - theirs["mean_loss"].item()) < LOSS_RTOL * mean, \
        f"TP{tp}: mean loss {mean:.7f}, transformers' {theirs['mean_loss'].item():.7f}"
    logits = ours["logits"]
    assert logits.shape == (BATCH, SEQ, PADDED[tp])
    assert (logits[..., :VOCAB] - theirs["logits"]).abs().max().item() < 1e-5
    assert torch.all(logits[..., VOCAB:] == torch.finfo(torch.float32).min), f"TP{tp}: padded logits not masked"
    for name, hf_name in (("output_grad", "lm_head_grad"), ("embedding_grad", "embed_grad")):
        grad = ours[name]
        difference = (grad[:VOCAB] - theirs[hf_name]).abs().max().item()
        assert difference < 1e-6, f"TP{tp}: {name} differs from transformers' by {difference:.2e}"
        assert torch.count_nonzero(grad[VOCAB:]) == 0, f"TP{tp}: {name} is nonzero on padded rows"


def test_imported_hf_model_starts_at_transformers_loss_tp1_and_tp2(tmp_path):
    hf = _hf_model(tmp_path / "hf")
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    theirs = _theirs(hf, tokens)

    full, config = _imported(tmp_path / "hf", tmp_path / "tp1", tp=1)
    _check(_ours(ParallelContext.single_process(), full, config, tokens), theirs, tp=1)

    full, config = _imported(tmp_path / "hf", tmp_path / "tp2", tp=2)
    _check(run_distributed(_tp2_worker, 2, args=(full, config, tokens))[0], theirs, tp=2)
