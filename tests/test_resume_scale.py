"""Resume at scale: one rank checks a checkpoint's shard files, failed saves leave no litter, the writer's GPU.

- ``check_complete`` runs on rank 0 only: on a 2-rank gloo job the other rank makes no metadata
  call (stat, is_file, getsize) on any shard file while loading, and a missing shard still fails
  on every rank with the same error naming the file.
- A complete save deletes the ``iter_*.tmp`` directories that failed saves of earlier iterations
  left, never one of a later iteration, synchronous or in the background.
- The background writer thread binds itself to the rank's GPU before its first write, and does
  nothing of the kind on a CPU.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from megatron_aquila.checkpoint import saver
from megatron_aquila.config import load_config

RECIPE_KEYS = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
               "model.ffn_hidden_size=128", "model.seq_length=32", "model.vocab_size=256",
               "model.make_vocab_size_divisible_by=64", "training.micro_batch_size=2", "training.global_batch_size=4",
               "training.seed=7", "optimizer.lr=3.0e-3", "data.mock=true", "data.num_workers=0",
               "parallel.tensor_parallel=1", "parallel.distributed_optimizer=true", "training.train_iters=2",
               "logging.peak_tflops=1.0"]


def _count_shard_metadata_calls(monkeypatch_targets: list, calls: list[str]):
    """Wrap os.stat, os.path.getsize and Path.is_file to record their .distcp arguments."""
    originals = []
    for owner, name in monkeypatch_targets:
        real = getattr(owner, name)

        def recording(*args, _real=real, **kwargs):
            if str(args[0]).endswith(".distcp"):
                calls.append(str(args[0]))
            return _real(*args, **kwargs)

        originals.append((owner, name, real))
        setattr(owner, name, recording)
    return originals


def _load_counting_worker(rank: int, world_size: int, save_dir: str) -> dict:
    import torch.distributed as dist

    from megatron_aquila.build import build_trainer_parts
    from megatron_aquila.checkpoint.manager import CheckpointError
    from training import train_with

    state, parts, ctx = train_with([*RECIPE_KEYS, f"checkpoint.save={save_dir}"], world_size)   # saves at the end
    config = load_config(None, [*RECIPE_KEYS, f"checkpoint.load={save_dir}"])
    calls: list[str] = []
    originals = _count_shard_metadata_calls([(os, "stat"), (os.path, "getsize"), (Path, "is_file")], calls)
    try:
        _, resumed = build_trainer_parts(config, ctx)
    finally:
        for owner, name, real in originals:
            setattr(owner, name, real)
    checkpoint = Path(save_dir) / "iter_0000002"
    shards = sorted(path.name for path in checkpoint.glob("*.distcp"))
    dist.barrier()
    if rank == 0:
        (checkpoint / shards[-1]).unlink()
    dist.barrier()
    try:
        build_trainer_parts(config, ctx)
        error = None
    except CheckpointError as caught:
        error = str(caught)
    return {"calls": calls, "shards": shards, "iteration": resumed.iteration, "error": error}


def test_only_rank_0_checks_the_shard_files_and_every_rank_fails_alike(tmp_path):
    results = run_distributed(_load_counting_worker, 2, (str(tmp_path / "ckpt"),))
    shards = results[0]["shards"]
    assert len(shards) == 2 and all(r["iteration"] == 2 for r in results), results
    assert set(shards) <= {Path(call).name for call in results[0]["calls"]}, results[0]   # rank 0 checked each one
    assert results[1]["calls"] == [], f"rank 1 made {len(results[1]['calls'])} metadata calls on shard files"
    errors = {r["error"] for r in results}
    assert len(errors) == 1 and shards[-1] in errors.pop(), results


# ---------------------------------------------------------------------------------- .tmp litter
@pytest.mark.parametrize("async_save", [False, True])
def test_a_complete_save_removes_earlier_failed_saves_only(tmp_path, monkeypatch, async_save):
    from megatron_aquila.checkpoint.manager import load_checkpoint_into
    from megatron_aquila.model.aquila import AquilaModel
    from megatron_aquila.parallel.context import ParallelContext
    from training import train_with

    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: bound.append(device))
    state, parts, ctx = train_with(RECIPE_KEYS, 1)   # iteration 2
    root = tmp_path / "ckpt"
    for name in ("iter_0000001.tmp", "iter_0000003.tmp"):   # a failed earlier save; a later one in flight
        (root / name).mkdir(parents=True)
        (root / name / "__0_0.distcp").write_bytes(b"partial")
    config = load_config(None, [*RECIPE_KEYS, f"checkpoint.save={root}", f"checkpoint.async_save={async_save}"])
    writer = saver.CheckpointSaver(config, ctx)
    writer.save(parts, state)
    writer.close()
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "iter_0000003.tmp", "latest"]
    model = AquilaModel(config.model, ParallelContext.single_process(), seed=99)
    load_checkpoint_into([model], root, ParallelContext.single_process())
    assert torch.equal(model.output_layer.weight, parts.model_chunks[0].output_layer.weight)
    assert bound == []   # a CPU rank's writer thread binds no GPU


# ---------------------------------------------------------------------------------- writer thread
def test_the_writer_thread_binds_the_ranks_gpu_before_writing(monkeypatch):
    bound = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: bound.append((device, threading.current_thread().name)))
    executor = saver.writer_executor(torch.device("cuda", 3))
    try:
        ran_on = executor.submit(lambda: threading.current_thread().name).result()
    finally:
        executor.shutdown()
    assert bound == [(torch.device("cuda", 3), ran_on)] and ran_on.startswith("checkpoint-writer")
