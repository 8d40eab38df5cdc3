"""Fail fast, never hang: errors end the job, stalls are dumped, stragglers and bad samples are named.

The job tests run ``torchrun -m megatron_aquila.train`` on gloo (a tiny model on mock data) with
the trainer's test hook ``MEGATRON_AQUILA_FAULT_INJECT`` making one rank raise, stall or lag; the
only time limit asserted is the hang guard "the job ends within JOB_LIMIT seconds".
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megatron_aquila.checkpoint.manager import read_meta, resolve_checkpoint
from megatron_aquila.model import kernels
from training import train_with

REPO = Path(__file__).resolve().parents[1]
JOB_LIMIT = 60.0  # seconds: a job that has not ended by then hangs
RECIPE = """
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, num_kv_heads: 2, ffn_hidden_size: 128,
        seq_length: 32, vocab_size: 256, make_vocab_size_divisible_by: 64}
training: {micro_batch_size: 2, global_batch_size: 4, train_iters: 1000, seed: 3}
data: {mock: true, num_workers: 0}
logging: {log_interval: 1, peak_tflops: 1.0}
"""


def torchrun(tmp_path: Path, nproc: int, fault: str, overrides: list[str]) -> tuple[int, str]:
    """Run the job with ``MEGATRON_AQUILA_FAULT_INJECT=fault``; (exit code, stdout and stderr). Fails the
    test, leaving no process behind, if the job has not ended within JOB_LIMIT seconds."""
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    log = tmp_path / "job.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "megatron_aquila.train", str(tmp_path / "recipe.yaml"), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEGATRON_AQUILA_FAULT_INJECT": fault}
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its process group holds torchrun and the ranks
        try:
            code = process.wait(timeout=JOB_LIMIT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"the job did not end within {JOB_LIMIT:.0f} s:\n{log.read_text()[-4000:]}")
    return code, log.read_text()


def test_an_error_on_one_rank_ends_the_job_and_keeps_the_last_checkpoint(tmp_path):
    """TP2 x DP2: rank 2 raises in iteration 3 while the others wait in collectives; the job exits
    non-zero, the error is named once with the rank's grid coordinates, and iteration 2's checkpoint loads."""
    save = tmp_path / "checkpoints"
    code, text = torchrun(tmp_path, 4, "rank=2,iteration=3",
                          ["parallel.tensor_parallel=2", f"checkpoint.save={save}", "checkpoint.save_interval=2"])
    assert code != 0, text[-4000:]
    error = "InjectedFault: injected by MEGATRON_AQUILA_FAULT_INJECT on rank 2 in iteration 3"
    assert text.count(f"rank 2 (tp 0 cp 0 pp 0 dp 1) failed: {error}") == 1, text[-6000:]
    assert text.count(f"megatron_aquila.trainer.{error}") == 1, text[-6000:]  # the traceback, once
    checkpoint = resolve_checkpoint(save)
    assert checkpoint == save / "iter_0000002" and read_meta(checkpoint)["iteration"] == 2


def test_a_stalled_rank_makes_every_rank_dump_its_stacks_and_the_job_end(tmp_path):
    """Rank 1 sleeps in iteration 2 and rank 0 waits for its gradients: both watchdogs fire after
    hang_timeout_minutes 0.1 (6 s), each naming its position and dumping its threads' stacks."""
    code, text = torchrun(tmp_path, 2, "rank=1,iteration=2,sleep=600", ["distributed.hang_timeout_minutes=0.1"])
    assert code != 0, text[-4000:]
    for rank in (0, 1):
        header = re.search(rf"watchdog: rank {rank} \(tp 0 cp 0 pp 0 dp {rank}\): no progress for [\d.]+ s in "
                           r"phase 'iteration', iteration 2\b.*", text)
        assert header is not None, f"rank {rank} dumped no stacks:\n{text[-6000:]}"
    assert re.search(r"trainer\.py\", line \d+, in apply", text), text[-6000:]  # rank 1, in the injected sleep
    assert re.search(r"data_parallel\.py\", line \d+, in finish_grad_sync", text), text[-6000:]  # rank 0, waiting


def test_the_straggler_line_names_the_slow_rank(tmp_path):
    """Rank 1 sleeps 0.3 s per iteration; every 2 iterations rank 0 names it as the slowest, with its host."""
    code, text = torchrun(tmp_path, 2, "rank=1,slow=0.3", ["training.train_iters=4", "logging.straggler_interval=2"])
    assert code == 0, text[-4000:]
    lines = re.findall(r"stragglers, iterations (\d+)-(\d+): slowest rank (\d) \((.+?)\) .* fastest rank (\d)", text)
    host = socket.gethostname()
    assert lines == [("1", "2", "1", host, "0"), ("3", "4", "1", host, "0")], text[-4000:]


def poisoned_run_worker(rank: int, world_size: int) -> tuple[int, list[str]]:
    """DP2, 2 micro-batches per rank: rank 1's second micro-batch of iteration 3 gets a NaN loss."""
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("megatron_aquila").addHandler(Collect())
    forwards = [0]

    def poison(parts, ctx):
        def hook(module, inputs, output):
            forwards[0] += 1
            return output * math.nan if ctx.rank == 1 and forwards[0] == 2 * 2 + 2 else output

        parts.model_chunks[0].final_norm.register_forward_hook(hook)

    state, _, _ = train_with(["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                              "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=64",
                              "model.make_vocab_size_divisible_by=8", "training.micro_batch_size=2",
                              "training.global_batch_size=8", "training.train_iters=3", "data.mock=true",
                              "data.num_workers=0", "logging.peak_tflops=1.0"], world_size, prepare=poison)
    return state.skipped_iterations, warnings


def test_a_skipped_step_names_its_samples():
    """Iteration 3 reads train samples 16-23; rank 1's second micro-batch holds samples 22 and 23
    (the sampler's slice [16 + 4 + 2, 16 + 4 + 4)). Rank 0, which never read them, names them."""
    (skipped_0, warnings), (skipped_1, _) = run_distributed(poisoned_run_worker, 2)
    assert skipped_0 == skipped_1 == 1
    assert any(w.startswith("iteration 3: optimizer step skipped") and
               "its batch is train-dataset samples 16-23, non-finite loss on sample 22; sample 23;" in w
               for w in warnings), warnings


@pytest.mark.parametrize("override, message", [
    ("distributed.hang_timeout_minutes=0", "distributed.hang_timeout_minutes 0.0 must be > 0"),
    ("distributed.nccl_timeout_minutes=-5", "distributed.nccl_timeout_minutes -5.0 must be > 0"),
    ("logging.straggler_interval=0", "logging.straggler_interval 0 must be >= 1"),
])
def test_bad_time_limits_fail_before_any_process_group(tmp_path, monkeypatch, override, message):
    from megatron_aquila.train import main

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test process's setting
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "recipe.yaml"), override])
    assert str(stop.value).startswith("configuration error: ") and message in str(stop.value), str(stop.value)
    assert not dist.is_initialized()


def fake_flash_attn(monkeypatch, version: str) -> list[dict]:
    """A flash_attn module of ``version`` whose flash_attn_func records its keyword options."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p, causal, **options):  # [b, s, heads, d] like flash-attn
        calls.append(options)
        return torch.zeros_like(q)

    monkeypatch.setitem(sys.modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_func=flash_attn_func, __version__=version))
    return calls


def qkv(queries: int, keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(queries, 1, 4, 8), torch.randn(keys, 1, 2, 8), torch.randn(keys, 1, 2, 8)


def test_flash_attn_before_2_1_is_refused_for_fewer_queries_than_keys(monkeypatch):
    """flash-attn < 2.1 aligns causal=True to the top left: context parallelism's chunks (sq < sk) would be wrong."""
    fake_flash_attn(monkeypatch, "2.0.9")
    attend = kernels.build_attention("flash-attn", 4, 2, 8, 0.0)
    assert attend(*qkv(6, 6), False).shape == (6, 1, 32)  # square attention is the same in every version
    with pytest.raises(RuntimeError, match=r"attention of 2 queries to 6 keys .* needs flash-attn >= 2\.1, but "
                                           r"flash-attn 2\.0\.9 is installed"):
        attend(*qkv(2, 6), False)
    fake_flash_attn(monkeypatch, "2.1.0+cu121")
    assert kernels.build_attention("flash-attn", 4, 2, 8, 0.0)(*qkv(2, 6), False).shape == (2, 1, 32)


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_flash_attn_is_asked_for_a_deterministic_backward_when_torch_is(monkeypatch, deterministic_algorithms):
    calls = fake_flash_attn(monkeypatch, "2.4.1")
    kernels.build_attention("flash-attn", 4, 2, 8, 0.0)(*qkv(6, 6), True)
    torch.use_deterministic_algorithms(False)
    kernels.build_attention("flash-attn", 4, 2, 8, 0.0)(*qkv(6, 6), True)
    assert calls == [{"deterministic": True}, {}]  # False is the default, and flash-attn < 2.4.1 lacks the keyword
    torch.use_deterministic_algorithms(True)
    fake_flash_attn(monkeypatch, "2.3.6")
    with pytest.raises(RuntimeError, match=r"deterministic backward .* needs flash-attn >= 2\.4\.1, but flash-attn "
                                           r"2\.3\.6 is installed"):
        kernels.build_attention("flash-attn", 4, 2, 8, 0.0)(*qkv(6, 6), True)


def _group_timeouts_worker(rank: int, world_size: int) -> list:
    from datetime import timedelta

    from megatron_aquila.config import load_config
    from megatron_aquila.train import init_distributed

    config = load_config(None, ["data.mock=true", "parallel.tensor_parallel=2", "distributed.nccl_timeout_minutes=7"])
    recorded, real = [], dist.new_group

    def recording(*args, **kwargs):
        recorded.append(kwargs.get("timeout"))
        return real(*args, **kwargs)

    dist.new_group = recording
    try:  # the pooled worker runs other tests' tasks afterwards: restore
        ctx = init_distributed(config)
    finally:
        dist.new_group = real
    ctx.release_groups()
    return [timeout == timedelta(minutes=7) for timeout in recorded]


def test_every_parallel_group_takes_the_configured_timeout():
    """distributed.nccl_timeout_minutes reaches every group ParallelContext creates, not only the world's."""
    for flags in run_distributed(_group_timeouts_worker, 2):
        assert flags and all(flags), flags
