"""Continued pretraining from a Hugging Face model: from-hf, then checkpoint.init_weights in a TP2 run.

A random LlamaForCausalLM (vocab 300) is converted with ``from-hf`` for TP1 (vocab padded to 304)
into a directory of full-state shards, which ``checkpoint.init_weights`` names;
a TP2 x DP1 run with the distributed optimizer starts from it, re-padding the vocabulary for TP2
(to 320), and takes one optimizer step at learning rate 0 (the first warmup step). Its logits must
still equal transformers' logits, which also proves the fp32 master weights were refreshed from the
loaded weights (a stale master would write the random init back).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from hf_models import random_llama
from megatron_aquila.build import build_trainer_parts
from megatron_aquila.config import load_config
from megatron_aquila.parallel.context import ParallelContext
from training import train_with

VOCAB = 300


def overrides(weights: str) -> list[str]:
    return [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=96", "model.seq_length=16", f"model.vocab_size={VOCAB}",
        "model.make_vocab_size_divisible_by=16", "parallel.tensor_parallel=2", "parallel.distributed_optimizer=true",
        "training.micro_batch_size=2", "training.global_batch_size=2", "training.train_iters=1",
        "optimizer.lr_warmup_iters=2", "optimizer.lr_decay_iters=10", "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0",
        f"checkpoint.init_weights={weights}",
    ]


def continue_from(rank: int, world_size: int, weights: str, tokens: torch.Tensor) -> torch.Tensor:
    _, parts, ctx = train_with(overrides(weights), world_size)
    model = parts.model_chunks[0].eval()
    with torch.no_grad():
        local = model(tokens, None, None, None).contiguous()  # [b, s, V/tp]
    pieces = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(pieces, local, group=ctx.tp_group)
    return torch.cat(pieces, dim=-1)[..., :VOCAB]


def test_tp2_run_starts_from_hf_weights(tmp_path):
    from tools.convert_checkpoint import main as convert

    hf = random_llama(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf.save_pretrained(tmp_path / "hf")
    assert convert(["from-hf", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "ours"),
                    "--tensor-parallel", "1", "--make-vocab-size-divisible-by", "16", "--max-shard-size", "50KB"]) == 0
    assert len(list((tmp_path / "ours").glob("full_state-*.safetensors"))) > 4

    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = run_distributed(continue_from, 2, args=(str(tmp_path / "ours"), tokens))[0]  # from-hf's output directory
    with torch.no_grad():
        expected = hf(tokens).logits
    difference = (ours - expected).abs().max().item()
    assert difference < 1e-4, f"max |logits difference| {difference} after starting from the HF weights"


def test_missing_init_weights_is_a_clear_error(tmp_path):
    from megatron_aquila.checkpoint.hf_mapping import ConversionError

    config = load_config(None, overrides(str(tmp_path / "nope.safetensors")) + ["parallel.tensor_parallel=1",
                                                                               "parallel.distributed_optimizer=false"])
    with pytest.raises(ConversionError, match="nope.safetensors does not exist.*from-hf"):
        build_trainer_parts(config, ParallelContext.single_process())


def extend_context(rank: int, world_size: int, save: str):
    """Start a CP2 run with twice the context (PI factor 2) from checkpoint ``save``; one step at lr 0."""
    from megatron_aquila.checkpoint.full_state import gather_full_state_dict

    base = [item for item in overrides(save) if not item.startswith(("parallel.", "model.seq_length"))]
    state, parts, ctx = train_with(base + ["model.seq_length=32", "model.rope_scaling=linear",
                                           "model.rope_scaling_factor=2", "parallel.context_parallel=2",
                                           "parallel.distributed_optimizer=true"], world_size)
    return state.iteration, gather_full_state_dict(parts.model_chunks, ctx)


def test_context_extension_starts_from_own_checkpoint(tmp_path):
    """checkpoint.init_weights names a finished run's save directory: a CP2 run with seq 16 -> 32 and
    linear RoPE scaling loads exactly its weights (resharded), with fresh counters."""
    from megatron_aquila.checkpoint.full_state import gather_full_state_dict

    save = tmp_path / "base"
    base = [item for item in overrides("unused") if not item.startswith(("parallel.", "checkpoint."))]
    state, parts, ctx = train_with(base + ["training.train_iters=2", "optimizer.lr_warmup_iters=0",
                                           f"checkpoint.save={save}"], 1)
    trained = gather_full_state_dict(parts.model_chunks, ctx)
    assert (save / "iter_0000002").is_dir() and state.iteration == 2
    iteration, extended = run_distributed(extend_context, 2, args=(str(save),))[0]
    assert iteration == 1, f"the extension run must count its own iterations from 0, ended at {iteration}"
    assert extended.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(extended[name], value), f"{name}: the extension run does not start from the checkpoint"
