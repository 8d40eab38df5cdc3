"""``python -m megatron_aquila.check_resume``: train N, resume from N/2 in a fresh process group, compare bit for bit.

- Under torchrun (2 gloo processes, DP2 with ZeRO-1, mock data) the check passes, says so in one
  line and deletes its temporary checkpoint.
- A resume that does not restore the data position (the train stream made to ignore the consumed
  samples) fails naming the first differing iteration, quantity and both values; one process, in
  this process, to keep it fast.
- Bad input fails before any process group is joined.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_aquila import check_resume

REPO = Path(__file__).resolve().parents[1]
RECIPE = """
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, num_kv_heads: 2, ffn_hidden_size: 128,
        seq_length: 32, vocab_size: 256, make_vocab_size_divisible_by: 64}
parallel: {tensor_parallel: 1, distributed_optimizer: true, grad_bucket_size_mb: 0.01}
training: {micro_batch_size: 2, global_batch_size: 4, train_iters: 1000, seed: 5}
optimizer: {lr: 3.0e-3, min_lr: 3.0e-4, lr_warmup_iters: 1}
data: {mock: true, num_workers: 0}
logging: {log_interval: 1, peak_tflops: 1.0}
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def test_passes_under_torchrun_and_removes_its_checkpoint(tmp_path, recipe):
    workdir = tmp_path / "work"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "megatron_aquila.check_resume", str(recipe), "--iters", "4", "--workdir", str(workdir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    passed = re.findall(r"^resume check passed: .*$", output, re.MULTILINE)
    assert passed == ["resume check passed: iterations 3-4 bit-identical (loss, grad norm) on "
                      "TP1 CP1 PP1 DP2, ZeRO-1, fp32, 2 processes on cpu"], output[-4000:]
    assert list(workdir.iterdir()) == []   # the temporary checkpoint is gone


def test_a_resume_that_loses_the_data_position_fails_at_the_first_resumed_iteration(tmp_path, recipe, monkeypatch):
    import megatron_aquila.build as build

    real = build.build_streams

    def forgetful(config, ctx, train_samples):   # every train stream starts at sample 0, resumed or not
        train, valid, sources = real(config, ctx, train_samples)
        return (lambda consumed: train(0)), valid, sources

    monkeypatch.setattr(build, "build_streams", forgetful)
    monkeypatch.setattr(check_resume, "share_cpu_threads", lambda: None)   # leave this process's settings alone
    monkeypatch.setattr(check_resume, "keep_freed_memory", lambda: None)
    with pytest.raises(SystemExit) as failure:
        check_resume.main([str(recipe), "--iters", "4", "--workdir", str(tmp_path / "work")])
    message = str(failure.value.code)
    assert re.match(r"rank 0: resume check FAILED on TP1 CP1 PP1 DP1, ZeRO-1, fp32, 1 process on cpu: "
                    r"iteration 3: loss \S+ \(0x\S+\) uninterrupted, \S+ \(0x\S+\) resumed from iteration 2\. "
                    r"The checkpoint is kept in (\S+)$", message), message
    kept = Path(message.rsplit(" ", 1)[1])
    assert (kept / ".metadata").is_file() and kept.name == "iter_0000002"


@pytest.mark.parametrize("arguments, environment, expected", [
    (["--iters", "1", "--workdir", "w"], {}, r"--iters 1 must be >= 2: the check saves at iteration 1 // 2 = 0"),
    (["--iters", "4", "--workdir", "w", "parallel.tensor_parallel=2"], {"WORLD_SIZE": "3"},
     r"world size 3 is not divisible by tensor_parallel 2"),
    (["--iters", "4", "--workdir", "w", "checkpoint.no_load_optim=true"], {},
     r"no_load_optim True .* not exact by design"),
    (["--iters", "4", "--workdir", ""], {}, r"nowhere to write the temporary checkpoint: give --workdir DIR"),
])
def test_bad_input_fails_before_any_process_group(recipe, monkeypatch, arguments, environment, expected):
    joined = []
    monkeypatch.setattr(check_resume, "join_process_group", lambda *args: joined.append(args))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=rf"^configuration error: .*{expected}") as failure:
        check_resume.main([str(recipe), *arguments])
    assert joined == [], failure.value
