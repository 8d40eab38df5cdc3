"""Distributed checkpoints: exact resume, resharding across layouts, atomic saves, signals, faults.

Runs go through ``megatron_aquila.train.main`` (gloo, fp32, mock data, a 2-layer model). The tests
of signals, killed ranks and killed writers ``launch`` torchrun subprocesses: a small runner script
calls ``main`` and writes rank 0's per-iteration losses as JSON. Every other run (``run``) calls
``main`` in the pooled gloo workers of tests/distributed.py, which join the process group ``main``
then uses (``train.init_distributed`` keeps an initialised one), and returns rank 0's losses: the
same training and checkpoint code without a launcher start-up per run. The losses compared are
the exact floats. The reference is one uninterrupted TP2 x DP2 run with the distributed
optimizer; every resumed run must reproduce its losses (bit for bit in the same layout, to 1e-5
relative under another layout).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from distributed import run_distributed
from megatron_aquila.checkpoint.manager import CheckpointError, load_checkpoint_into, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN_ITERS = 24
SAVE_INTERVAL = 4
RECIPE = f"""
model: {{num_layers: 2, hidden_size: 64, num_attention_heads: 4, num_kv_heads: 2, ffn_hidden_size: 128,
         seq_length: 32, vocab_size: 256, make_vocab_size_divisible_by: 64}}
parallel: {{tensor_parallel: 2, pipeline_parallel: 1, distributed_optimizer: true, grad_bucket_size_mb: 0.01}}
training: {{micro_batch_size: 2, global_batch_size: 8, train_iters: {TRAIN_ITERS}, seed: 7}}
optimizer: {{lr: 3.0e-3, min_lr: 3.0e-4, lr_warmup_iters: 2}}
data: {{mock: true, num_workers: 0}}
logging: {{log_interval: 1}}
"""
RUNNER = """
import json, os, signal, sys, threading
import torch.distributed.checkpoint as dcp
from megatron_aquila.train import main
kill_at = os.environ.get("KILL_WRITER_AT")  # "RANK:iter_XXXXXXX": SIGKILL that rank while it writes that save
if kill_at:
    rank, directory = kill_at.split(":")
    real_write = dcp.FileSystemWriter.write_data
    def write_then_die(self, plan, planner):
        result = real_write(self, plan, planner)
        if os.environ["RANK"] == rank and directory in str(self.path):
            assert threading.current_thread() is not threading.main_thread(), "expected the async writer thread"
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    dcp.FileSystemWriter.write_data = write_then_die
losses_path, argv = sys.argv[1], sys.argv[2:]
state = main(argv)
import os
if os.environ.get("RANK", "0") == "0":
    first = state.iteration - len(state.history)
    with open(losses_path, "w") as handle:
        json.dump({str(first + 1 + i): loss for i, loss in enumerate(state.history)}, handle)
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoint")
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "runner.py").write_text(RUNNER)
    return root


def launch(workdir: Path, name: str, nproc: int, overrides: list[str], extra_env: Optional[dict[str, str]] = None
           ) -> tuple[subprocess.Popen, Path, Path]:
    """Start a run (torchrun when nproc > 1); returns the process, its losses file and its log file."""
    losses, log = workdir / f"{name}.losses.json", workdir / f"{name}.log"
    script = [str(workdir / "runner.py"), str(losses), str(workdir / "recipe.yaml"), *overrides]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *script]
    else:
        command = [sys.executable, *script]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return process, losses, log


def _train_worker(rank: int, world_size: int, recipe: str, overrides: list[str]) -> dict[int, float]:
    from megatron_aquila.train import main

    state = main([recipe, *overrides])
    first = state.iteration - len(state.history)
    return {first + 1 + i: loss for i, loss in enumerate(state.history)}


def run(workdir: Path, name: str, nproc: int, overrides: list[str]) -> dict[int, float]:
    """Train ``nproc`` ranks in the pooled gloo workers (module docstring); rank 0's losses by iteration."""
    return run_distributed(_train_worker, nproc, (str(workdir / "recipe.yaml"), overrides), timeout=600)[0]


def worker_pids(launcher_pid: int) -> list[int]:
    """PIDs of the runner processes torchrun started (its children running runner.py)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == launcher_pid and b"runner.py" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def wait_for(condition, process: subprocess.Popen, log: Path, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"gave up waiting for {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.02)


def latest_iteration(save: Path) -> int:
    return int((save / "latest").read_text().strip().split("_")[1])


@pytest.fixture(scope="module")
def reference(workdir: Path) -> dict[int, float]:
    """The uninterrupted TP2 x DP2 (ZeRO-1) run, checkpointing every SAVE_INTERVAL iterations."""
    losses = run(workdir, "reference", 4, [f"checkpoint.save={workdir / 'reference'}",
                                          f"checkpoint.save_interval={SAVE_INTERVAL}"])
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    assert latest_iteration(workdir / "reference") == TRAIN_ITERS
    return losses


def copy_checkpoint(workdir: Path, iteration: int, name: str) -> Path:
    """A save directory holding only the reference's checkpoint at ``iteration`` (and ``latest``)."""
    target = workdir / name
    source = workdir / "reference" / f"iter_{iteration:07d}"
    shutil.copytree(source, target / source.name)
    (target / "latest").write_text(source.name + "\n")
    return target


def test_exact_resume_with_exit_interval(workdir, reference):
    save = copy_checkpoint(workdir, 12, "resume")
    common = [f"checkpoint.save={save}", f"checkpoint.load={save}"]
    first = run(workdir, "resume_a", 4, [*common, "training.exit_interval=16"])
    assert sorted(first) == [13, 14, 15, 16]
    assert latest_iteration(save) == 16          # exit_interval saved before stopping
    second = run(workdir, "resume_b", 4, common)
    assert sorted(second) == list(range(17, TRAIN_ITERS + 1))
    resumed = {**first, **second}
    assert resumed == {i: reference[i] for i in range(13, TRAIN_ITERS + 1)}   # bit-identical losses


@pytest.mark.parametrize("name, nproc, layout", [
    ("tp1_single_process", 1, ["parallel.tensor_parallel=1", "parallel.distributed_optimizer=false"]),
    ("tp1_pp2_dp2", 4, ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=2"]),
    ("tp1_dp4_zero1", 4, ["parallel.tensor_parallel=1"]),
    ("tp2_dp2_no_zero1", 4, ["parallel.distributed_optimizer=false"]),
    ("tp2_cp2_zero1", 4, ["parallel.context_parallel=2"]),
])
def test_reshard_continues_the_run(workdir, reference, name, nproc, layout):
    load = workdir / "reference" / "iter_0000012"
    losses = run(workdir, name, nproc, [*layout, f"checkpoint.load={load}", "training.exit_interval=14"])
    assert sorted(losses) == [13, 14]
    for iteration in (13, 14):
        assert losses[iteration] == pytest.approx(reference[iteration], rel=1e-5, abs=0), (name, iteration)


def test_reshard_tp2_pp2_dp2_to_tp1_pp4_dp2_and_one_process(workdir):
    """A resharding example: an 8-process TP2 x PP2 x DP2 run (sequence parallel, ZeRO-1) saves at
    iteration 4; TP1 x PP4 x DP2 and one process load it and continue with the original run's losses."""
    save = workdir / "tp2pp2dp2"
    four_layers = ["model.num_layers=4", "training.train_iters=6"]
    original = run(workdir, "tp2pp2dp2", 8, [*four_layers, "parallel.pipeline_parallel=2",
                                             "parallel.sequence_parallel=true", f"checkpoint.save={save}",
                                             "checkpoint.save_interval=4"])
    assert sorted(original) == list(range(1, 7))
    load = save / "iter_0000004"
    for name, nproc, layout in [
        ("tp1_pp4_dp2", 8, ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=4"]),
        ("from_tp2pp2dp2_single", 1, ["parallel.tensor_parallel=1", "parallel.distributed_optimizer=false"]),
    ]:
        losses = run(workdir, name, nproc, [*four_layers, *layout, f"checkpoint.load={load}"])
        assert sorted(losses) == [5, 6], name
        for iteration in (5, 6):
            assert losses[iteration] == pytest.approx(original[iteration], rel=1e-5, abs=0), (name, iteration)


def test_reshard_across_context_parallel_degrees(workdir):
    """A CP2 x DP2 run (ZeRO-1 over DP x CP) saves at iteration 4; CP4 and one process (no CP) load
    it and continue with the original run's losses."""
    save = workdir / "cp2dp2"
    layout = ["parallel.tensor_parallel=1", "training.train_iters=6"]
    original = run(workdir, "cp2dp2", 4, [*layout, "parallel.context_parallel=2", f"checkpoint.save={save}",
                                          "checkpoint.save_interval=4"])
    assert sorted(original) == list(range(1, 7))
    load = save / "iter_0000004"
    for name, nproc, overrides in [
        ("from_cp2_to_cp4", 4, ["parallel.context_parallel=4"]),
        ("from_cp2_to_single", 1, ["parallel.distributed_optimizer=false"]),
    ]:
        losses = run(workdir, name, nproc, [*layout, *overrides, f"checkpoint.load={load}"])
        assert sorted(losses) == [5, 6], name
        for iteration in (5, 6):
            assert losses[iteration] == pytest.approx(original[iteration], rel=1e-5, abs=0), (name, iteration)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_resume_is_exact(workdir, dtype):
    """bf16/fp16 parameters with fp32 masters sharded by ZeRO-1 (DP2), and fp16's loss-scaler state,
    survive save and resume: the resumed iterations equal the straight run bit for bit."""
    save = workdir / f"resume_{dtype}"
    layout = ["parallel.tensor_parallel=1", f"precision.dtype={dtype}", "precision.initial_loss_scale=4096",
              "precision.loss_scale_window=2",  # fp16: the scale grows every 2 clean steps, so its state matters
              "training.train_iters=6"]
    straight = run(workdir, f"{dtype}_straight", 2, [*layout, f"checkpoint.save={save}", "checkpoint.save_interval=3"])
    resumed = run(workdir, f"{dtype}_resumed", 2, [*layout, f"checkpoint.load={save / 'iter_0000003'}"])
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {i: straight[i] for i in (4, 5, 6)}


def test_crash_mid_save_keeps_the_previous_checkpoint(workdir, reference, monkeypatch):
    from megatron_aquila.checkpoint import manager
    from megatron_aquila.train import main

    save = copy_checkpoint(workdir, 20, "crash")
    real_save = manager.dcp.save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)            # the shards and .metadata are written into the .tmp directory
        raise RuntimeError("simulated crash during save")

    monkeypatch.setattr(manager.dcp, "save", save_then_crash)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([str(workdir / "recipe.yaml"), "parallel.tensor_parallel=1", "parallel.distributed_optimizer=false",
              f"checkpoint.save={save}", f"checkpoint.load={save}", "training.exit_interval=21"])
    assert (save / "iter_0000021.tmp" / ".metadata").is_file()
    assert not (save / "iter_0000021").exists()
    assert (save / "latest").read_text().strip() == "iter_0000020"
    assert resolve_checkpoint(save) == save / "iter_0000020"

    # The previous checkpoint still loads (one TP1 process, the HF-export path) and holds the full model.
    from megatron_aquila.config import load_config
    from megatron_aquila.model.aquila import AquilaModel
    from megatron_aquila.parallel.context import ParallelContext

    config = load_config(workdir / "recipe.yaml", ["parallel.tensor_parallel=1"])
    model = AquilaModel(config.model, ParallelContext.single_process(), seed=123)
    before = model.output_layer.weight.detach().clone()
    meta = load_checkpoint_into([model], save, ParallelContext.single_process())
    assert meta["iteration"] == 20
    assert not torch.equal(before, model.output_layer.weight)

    with pytest.raises(CheckpointError, match=r"iter_0000021\.tmp.*unfinished"):
        resolve_checkpoint(save / "iter_0000021.tmp")
    (save / "iter_0000020" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"iter_0000020 is incomplete or corrupt: missing \.metadata"):
        resolve_checkpoint(save)


def test_load_from_empty_directory_starts_from_scratch(tmp_path):
    assert resolve_checkpoint(tmp_path / "not-yet") is None
    (tmp_path / "latest").write_text("iter_0000005\n")
    with pytest.raises(CheckpointError, match="iter_0000005.*does not exist"):
        resolve_checkpoint(tmp_path)


def test_sigterm_saves_on_every_rank_and_exits_cleanly(workdir, reference):
    save = workdir / "sigterm"
    process, losses_path, log = launch(workdir, "sigterm_a", 4, [f"checkpoint.save={save}"])
    wait_for(lambda: "iter       3 |" in log.read_text(), process, log, "iteration 3")
    workers = worker_pids(process.pid)
    assert len(workers) == 4, workers
    os.kill(workers[-1], signal.SIGTERM)      # one rank only: the flag is agreed over the world
    assert process.wait(timeout=300) == 0, log.read_text()[-4000:]
    stopped = latest_iteration(save)
    assert 3 <= stopped < TRAIN_ITERS, stopped
    first = {int(k): v for k, v in json.loads(losses_path.read_text()).items()}
    assert max(first) == stopped
    second = run(workdir, "sigterm_b", 4, [f"checkpoint.save={save}", f"checkpoint.load={save}"])
    assert sorted(second) == list(range(stopped + 1, TRAIN_ITERS + 1))
    assert {**first, **second} == reference


def test_killed_rank_then_relaunch_matches_uninterrupted_run(workdir, reference):
    save = workdir / "fault"
    overrides = [f"checkpoint.save={save}", f"checkpoint.load={save}", f"checkpoint.save_interval={SAVE_INTERVAL}"]
    process, _, log = launch(workdir, "fault_a", 4, overrides)
    wait_for(lambda: (save / "latest").is_file(), process, log, "the first checkpoint")
    workers = worker_pids(process.pid)
    assert len(workers) == 4, workers
    os.kill(workers[1], signal.SIGKILL)
    assert process.wait(timeout=300) != 0, "the job should fail when a rank dies"
    resumed_from = latest_iteration(save)
    assert resumed_from < TRAIN_ITERS
    losses = run(workdir, "fault_b", 4, overrides)
    assert sorted(losses) == list(range(resumed_from + 1, TRAIN_ITERS + 1))
    assert losses == {i: reference[i] for i in losses}


def test_zero1_off_to_on_and_dp2_to_dp4(workdir):
    """A plain-optimizer DP2 checkpoint continues under ZeRO-1 with DP4, like the run that saved it."""
    save = workdir / "plain_dp2"
    layout = ["parallel.tensor_parallel=1", "parallel.distributed_optimizer=false", "training.train_iters=6"]
    original = run(workdir, "plain_dp2", 2, [*layout, f"checkpoint.save={save}", "checkpoint.save_interval=4"])
    losses = run(workdir, "zero1_dp4", 4, [*layout, "parallel.distributed_optimizer=true",
                                           f"checkpoint.load={save / 'iter_0000004'}"])
    assert sorted(losses) == [5, 6]
    for iteration in (5, 6):
        assert losses[iteration] == pytest.approx(original[iteration], rel=1e-5, abs=0), iteration


def test_async_save_killed_mid_write_keeps_the_previous_checkpoint(workdir, reference):
    """Async saves: a rank killed while its writer thread writes iteration 8 leaves iteration 4 (written
    in the background too) as latest; relaunching resumes from it bit-exactly, saving asynchronously."""
    save = workdir / "async_kill"
    overrides = [f"checkpoint.save={save}", f"checkpoint.load={save}", f"checkpoint.save_interval={SAVE_INTERVAL}",
                 "checkpoint.async_save=true"]
    process, _, log = launch(workdir, "async_kill_a", 4, overrides, {"KILL_WRITER_AT": "1:iter_0000008"})
    assert process.wait(timeout=600) != 0, "the job should fail when a rank dies"
    assert latest_iteration(save) == 4
    assert (save / "iter_0000008.tmp").is_dir() and not (save / "iter_0000008").exists()
    losses = run(workdir, "async_kill_b", 4, overrides)
    assert losses == {i: reference[i] for i in range(5, TRAIN_ITERS + 1)}
    assert latest_iteration(save) == TRAIN_ITERS


def test_save_refuses_non_finite_weights_with_one_host_read(tmp_path):
    from megatron_aquila.build import build_trainer_parts
    from megatron_aquila.checkpoint.saver import CheckpointSaver
    from megatron_aquila.config import load_config
    from megatron_aquila.dryrun.syncs import HostSyncCounter
    from megatron_aquila.parallel.context import ParallelContext
    from megatron_aquila.training_state import TrainingState

    config = load_config(None, [
        "model.num_layers=3", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=64", "data.mock=true",
        "data.num_workers=0", "logging.peak_tflops=1.0", "training.micro_batch_size=2",
        "training.global_batch_size=2", "training.train_iters=1", f"checkpoint.save={tmp_path}"])
    config.validate(1)
    ctx = ParallelContext.single_process()
    parts, _ = build_trainer_parts(config, ctx)
    saver = CheckpointSaver(config, ctx)
    params = list(parts.model_chunks[0].parameters())
    with HostSyncCounter(fake=False) as syncs:
        saver._refuse_non_finite(parts, TrainingState(iteration=7))  # all finite: passes
    assert list(syncs.counts.values()) == [1], f"{dict(syncs.counts)} to check {len(params)} parameters"
    assert "checkpoint/saver.py" in next(iter(syncs.counts)), syncs.counts

    with torch.no_grad():
        params[len(params) // 2].view(-1)[3] = math.inf
    with pytest.raises(CheckpointError, match="refusing to save iteration 7: parameters hold NaN or Inf"):
        saver.save(parts, TrainingState(iteration=7))
    assert not (tmp_path / "iter_0000007").exists() and not (tmp_path / "iter_0000007.tmp").exists()
