"""End-to-end training under TP, SP, DP and the distributed optimizer equals one process.

Each layout trains the same small Aquila-shaped model (GQA) on the same mock sample stream for
several iterations through the real Trainer; the losses of every iteration and the final
parameters (gathered over tensor parallelism) must equal the single-process run in fp32.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megatron_aquila.checkpoint.full_state import gather_full_state_dict
from training import train_with

BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=96", "model.seq_length=32", "model.vocab_size=250", "model.make_vocab_size_divisible_by=8",
    "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=4", "training.seed=7",
    "optimizer.lr=1e-2", "optimizer.min_lr=1e-3", "optimizer.lr_warmup_iters=1", "optimizer.clip_grad=0.5",
    "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0",
]


def train(overrides: list[str], world_size: int):
    state, parts, ctx = train_with(BASE + overrides, world_size)
    return state.history, gather_full_state_dict(parts.model_chunks, ctx)  # TP1 view of every parameter


def worker(rank: int, world_size: int, overrides: list[str]):
    history, params = train(overrides, world_size)
    return (history, params) if rank == 0 else None


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return train([], 1)


LAYOUTS = {
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "tp2-sp": (2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
    "dp2": (2, []),
    "dp2-distopt": (2, ["parallel.distributed_optimizer=true"]),
    "tp2-dp2-sp-distopt": (4, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                               "parallel.distributed_optimizer=true"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference):
    world_size, overrides = LAYOUTS[layout]
    history, params = run_distributed(worker, world_size, args=(overrides,))[0]
    ref_history, ref_params = reference
    assert len(history) == len(ref_history) == 4
    torch.testing.assert_close(torch.tensor(history), torch.tensor(ref_history), rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{layout}: losses {history} vs single process {ref_history}\n{m}")
    assert ref_history[-1] < ref_history[0], f"the reference run did not learn: {ref_history}"
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{layout}: parameter {name} differs after 4 steps\n{m}")
