"""A training checkpoint exports to a Hugging Face directory that transformers runs identically.

A TP2 x DP2 run (4 gloo processes, so the checkpoint holds sharded DTensors) saves; the
converter reads the checkpoint in one process without building a model and writes a
LlamaForCausalLM directory; transformers' logits and greedy generation equal ours.
"""
from __future__ import annotations

import pytest
import torch

from data_fixtures import small_corpus_texts
from distributed import run_distributed
from megatron_aquila.data.tokenizer import train_tiny_bbpe
from megatron_aquila.build import build_model_chunks
from megatron_aquila.checkpoint.manager import load_checkpoint_into
from megatron_aquila.config import load_config
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.train import run

OVERRIDES = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=96", "model.seq_length=32", "model.vocab_size=300", "model.make_vocab_size_divisible_by=8",
    "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=3",
    "optimizer.lr_warmup_iters=1", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
    "parallel.distributed_optimizer=true", "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0",
]


def train_and_save(rank: int, world_size: int, save: str) -> None:
    config = load_config(None, OVERRIDES + [f"checkpoint.save={save}"])
    config.validate(world_size)
    run(config, ParallelContext.initialize(2, 1))


def greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        logits = model(tokens, None, None, None)[:, -1, : model.config.vocab_size]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_checkpoint_to_hf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tools.convert_checkpoint import main as convert

    save = tmp_path / "checkpoints"
    run_distributed(train_and_save, 4, args=(str(save),))
    tokenizer = train_tiny_bbpe(small_corpus_texts(20), tmp_path / "tokenizer", vocab_size=300)
    assert convert(["to-hf", "--checkpoint", str(save), "--output", str(tmp_path / "hf"), "--dtype", "fp32",
                    "--tokenizer-dir", str(tokenizer)]) == 0

    config = load_config(None, OVERRIDES[:8] + ["parallel.tensor_parallel=1"])
    ours = build_model_chunks(config, ParallelContext.single_process())[0].eval()
    load_checkpoint_into([ours], save, ParallelContext.single_process())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"

    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        our_logits = ours(tokens, None, None, None)[..., :300]
        hf_logits = hf(tokens).logits
        difference = (our_logits - hf_logits).abs().max().item()
        assert difference < 1e-4, f"max |logits difference| {difference} between ours and transformers"
        prompt = tokens[:1, :8]
        our_tokens = greedy(ours, prompt, 8)
        hf_tokens = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(our_tokens, hf_tokens), f"greedy tokens differ: ours {our_tokens} vs transformers {hf_tokens}"
