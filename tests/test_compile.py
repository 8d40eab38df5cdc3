"""model.compile (model/compile.py): compiled transformer blocks train exactly like eager ones.

Each layout trains the same tiny model for 3 iterations eagerly and then with every block compiled
(inductor's C++ backend), in the same gloo processes; the fp32 losses must agree to 1e-5. The
collectives of TP/SP (parallel/mappings.py) and CP (parallel/context_parallel.py) sit inside the
compiled blocks (traced, or run eagerly at graph breaks: model/compile.py), the pipeline send/receive
between them; selective and full recompute ride along. The first compile takes seconds per layout.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from distributed import run_distributed
from megatron_aquila.build import build_model_chunks
from megatron_aquila.config import QLoraConfig, load_config
from megatron_aquila.model.compile import check_compile_config
from megatron_aquila.model.rope import apply_rotary
from megatron_aquila.model.transformer import MLP
from megatron_aquila.parallel.context import ParallelContext
from training import train_with

BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=96", "model.seq_length=32", "model.vocab_size=250", "model.make_vocab_size_divisible_by=8",
    "training.micro_batch_size=2", "training.global_batch_size=4", "training.train_iters=3", "training.seed=7",
    "optimizer.lr=1e-2", "optimizer.min_lr=1e-3", "optimizer.lr_warmup_iters=1", "optimizer.clip_grad=0.5",
    "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0",
]


def worker(rank: int, world_size: int, overrides: list[str]):
    """(eager losses, compiled losses, graphs compiled) of the same run on this rank."""
    torch.set_num_threads(1)
    try:
        eager = train_with(BASE + overrides, world_size)[0].history
        counters.clear()
        with inductor_config.patch(compile_threads=1):  # no pool of compile processes per rank on 2 cores
            compiled = train_with(BASE + overrides + ["model.compile=true"], world_size)[0].history
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()  # the pooled process keeps no compiled code for the next task
        counters.clear()
    return eager, compiled, graphs


LAYOUTS = {
    "tp2-pp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "training.recompute=selective"]),
    "cp2": (2, ["parallel.context_parallel=2", "training.recompute=full"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_blocks_match_eager(layout):
    world_size, overrides = LAYOUTS[layout]
    for rank, (eager, compiled, graphs) in enumerate(run_distributed(worker, world_size, args=(overrides,))):
        assert graphs > 0, f"{layout} rank {rank}: model.compile=true compiled nothing"
        assert len(eager) == len(compiled) == 3
        torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{layout} rank {rank}: compiled {compiled} vs eager {eager}\n{m}")
    assert eager[-1] < eager[0], f"the eager run did not learn: {eager}"


def test_missing_cpp_compiler_fails_before_training(monkeypatch):
    """Inductor's own compiler search (its C++ compiler list) finds nothing: the build stops with one line."""
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/bin/g++"))
    config = load_config(None, BASE + ["model.compile=true"])
    with pytest.raises(RuntimeError, match=r"^model\.compile=true: inductor's CPU backend needs a C\+\+ compiler .*"
                                           r"set model\.compile=false") as error:
        build_model_chunks(config, ParallelContext.single_process())
    assert "\n" not in str(error.value)


def test_missing_triton_is_named_for_cuda(monkeypatch):
    import torch.utils._triton as triton_probe

    monkeypatch.setattr(triton_probe, "has_triton", lambda: False)
    with pytest.raises(RuntimeError, match=r"model\.compile=true: inductor's CUDA backend needs triton"):
        check_compile_config(load_config(None, BASE + ["model.compile=true"]), "cuda")


@pytest.mark.parametrize("key", ["model.hidden_dropout", "model.attention_dropout"])
def test_dropout_is_refused(key):
    config = load_config(None, BASE + ["model.compile=true", f"{key}=0.1"])
    with pytest.raises(ValueError, match=rf"model\.compile=true runs without dropout, but \{{'{key}': 0\.1\}}"):
        check_compile_config(config, "cpu")
    check_compile_config(load_config(None, BASE + [f"{key}=0.1"]), "cpu")  # eager runs with dropout


def test_qlora_is_refused():
    config = load_config(None, BASE + ["model.compile=true"])
    config.finetune.qlora = QLoraConfig()
    with pytest.raises(ValueError, match=r"model\.compile=true with finetune\.qlora is not supported.*"
                                         r"set model\.compile=false"):
        check_compile_config(config, "cpu")


@pytest.mark.parametrize("interleaved", [False, True])
def test_traced_rotary_and_swiglu_equal_their_autograd_functions(interleaved):
    """Under dynamo, rotary and SwiGLU switch to plain ops (AOTAutograd differentiates them): same values and grads."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, 8, generator=generator, requires_grad=True)  # [s, b, heads, d]
    angles = torch.randn(6, 1, 1, 4, generator=generator)  # [s, 1, 1, d/2]
    gate_up = torch.randn(6, 2, 10, generator=generator, requires_grad=True)  # [s, b, 2f]

    def both(x, gate_up):
        return apply_rotary(x, angles.cos(), angles.sin(), interleaved), MLP.swiglu(gate_up)

    results = []
    for fn in (both, torch.compile(both, backend="aot_eager", fullgraph=True)):
        rotated, swiglu = fn(x, gate_up)
        grads = torch.autograd.grad((rotated * rotated.detach()).sum() + (swiglu * swiglu.detach()).sum(), (x, gate_up))
        results.append((rotated, swiglu, *grads))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()
