"""Checkpoints that hold at scale: each rank saves and loads only what it owns, retention, bad input.

The memory bound is proven by what a rank hands to torch.distributed.checkpoint: under ZeRO-1
every optimizer chunk must be a view of the rank's own master / Adam tensors (no new
allocation) and their bytes must equal exactly the rank's shard, on save and on load.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from distributed import run_distributed
from megatron_aquila.checkpoint import manager, saver
from megatron_aquila.checkpoint.manager import CheckpointError, check_complete, read_dcp_metadata, read_meta
from megatron_aquila.checkpoint.shards import ShardedBoxes, flat_range_boxes
from megatron_aquila.config import ConfigError, load_config

RECIPE_KEYS = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
               "model.ffn_hidden_size=128", "model.seq_length=32", "model.vocab_size=256",
               "model.make_vocab_size_divisible_by=64", "training.micro_batch_size=2", "training.global_batch_size=8",
               "training.seed=7", "optimizer.lr=3.0e-3", "data.mock=true", "data.num_workers=0",
               "parallel.grad_bucket_size_mb=0.01"]


# ---------------------------------------------------------------------------------- boxes
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1), (1, 6)])
def test_flat_range_boxes_partition_every_range(shape):
    """Every flat range is covered exactly once by boxes that are contiguous in memory."""
    total = math.prod(shape)
    flat = torch.arange(total).view(shape)
    for lo in range(total + 1):
        for hi in range(lo, total + 1):
            covered = torch.zeros(shape, dtype=torch.int64)
            boxes = flat_range_boxes(shape, lo, hi)
            assert len(boxes) <= 2 * len(shape) - 1
            for box in boxes:
                region = tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))
                covered[region] += 1
                values = flat[region].reshape(-1).tolist()
                assert values == list(range(box.flat_start, box.flat_start + len(values))), (lo, hi, box)
            expected = torch.zeros(total, dtype=torch.int64)
            expected[lo:hi] = 1
            assert torch.equal(covered.reshape(-1), expected), (shape, lo, hi, boxes)


# ---------------------------------------------------------------------------------- bytes per rank
def _storages(parts) -> set[int]:
    """Storage addresses of the rank's own parameters, fp32 masters and Adam moments."""
    owned = {p.untyped_storage().data_ptr() for chunk in parts.model_chunks for p in chunk.parameters()}
    for piece in parts.optimizer.pieces:
        owned.add(piece.master.untyped_storage().data_ptr())
        for key in ("exp_avg", "exp_avg_sq"):
            tensor = parts.optimizer.adamw.state.get(piece.master, {}).get(key)
            if tensor is not None:
                owned.add(tensor.untyped_storage().data_ptr())
    return owned


def _handed_bytes(values: dict, owned: set[int]) -> dict[str, int]:
    """Bytes of model and optimizer chunks handed to DCP; every chunk must be a view of an owned tensor."""
    totals = {"model": 0, "optim": 0}
    for key, value in values.items():
        if key.startswith("rng."):
            continue
        assert isinstance(value, ShardedBoxes), (key, type(value))
        for tensor in value.tensors():
            assert tensor.untyped_storage().data_ptr() in owned, f"{key}: a new allocation was handed to DCP"
        totals[key.split(".")[0]] += value.nbytes
    return totals


def _zero1_bytes_worker(rank: int, world_size: int, save_dir: str) -> dict:
    from megatron_aquila.build import build_trainer_parts
    from megatron_aquila.checkpoint.saver import CheckpointSaver
    from training import train_with

    overrides = [*RECIPE_KEYS, "parallel.tensor_parallel=1", "parallel.distributed_optimizer=true",
                 "training.train_iters=2"]
    recorded: dict[str, dict] = {}
    real_save, real_load = dcp.save, dcp.load

    def record(kind, real):
        def wrapper(values, *args, **kwargs):
            recorded[kind] = dict(values)
            return real(values, *args, **kwargs)
        return wrapper

    state, parts, ctx = train_with(overrides, world_size)   # trains without saving
    config = load_config(None, [*overrides, f"checkpoint.save={save_dir}"])
    dcp.save = record("save", real_save)
    try:
        CheckpointSaver(config, ctx).save(parts, state)
    finally:
        dcp.save = real_save
    saved = _handed_bytes(recorded["save"], _storages(parts))

    config = load_config(None, [*overrides, f"checkpoint.load={save_dir}"])
    dcp.load = record("load", real_load)
    try:
        resumed, _ = build_trainer_parts(config, ctx)
    finally:
        dcp.load = real_load
    loaded = _handed_bytes(recorded["load"], _storages(resumed))
    shard = sum(piece.hi - piece.lo for piece in parts.optimizer.pieces)
    params = sum(p.numel() for chunk in parts.model_chunks for p in chunk.parameters())
    same = all(torch.equal(a, b) for a, b in zip(parts.model_chunks[0].parameters(),
                                                  resumed.model_chunks[0].parameters()))
    return {"saved": saved, "loaded": loaded, "shard_elements": shard, "param_elements": params, "same": same}


def test_zero1_save_and_load_hand_dcp_only_the_local_shard(tmp_path):
    """ZeRO-1 DP2: each rank hands DCP exactly its optimizer shard and its share of the replicated
    parameters (each written by one rank, balanced by bytes), as views; a load reads every parameter."""
    results = run_distributed(_zero1_bytes_worker, 2, (str(tmp_path / "ckpt"),))
    model_bytes = 4 * results[0]["param_elements"]
    for rank, result in enumerate(results):
        owned_optimizer_bytes = 3 * 4 * result["shard_elements"]        # master, exp_avg, exp_avg_sq in fp32
        assert result["saved"]["optim"] == owned_optimizer_bytes, (rank, result)
        assert result["loaded"]["optim"] == owned_optimizer_bytes, (rank, result)
        assert result["loaded"]["model"] == model_bytes, (rank, result)
        assert 0.3 * model_bytes < result["saved"]["model"] < 0.7 * model_bytes, (rank, result)  # balanced
        assert result["same"], f"rank {rank}: resumed parameters differ from the saved ones"
    assert sum(r["saved"]["model"] for r in results) == model_bytes, "each parameter is written exactly once"
    total = sum(r["shard_elements"] for r in results)
    assert total == results[0]["param_elements"], "the DP shards partition the model"
    # A checkpoint missing one rank's shard file fails with the file's name, before DCP reads anything.
    checkpoint = tmp_path / "ckpt" / "iter_0000002"
    check_complete(checkpoint, read_dcp_metadata(checkpoint))
    lost = sorted(checkpoint.glob("*.distcp"))[-1]
    lost.unlink()
    with pytest.raises(CheckpointError, match=rf"missing or has truncated shard file\(s\) {lost.name}"):
        check_complete(checkpoint, read_dcp_metadata(checkpoint))


# ---------------------------------------------------------------------------------- one process
def _single(tmp_path: Path, *extra: str) -> list[str]:
    return [*RECIPE_KEYS, "parallel.tensor_parallel=1", f"checkpoint.save={tmp_path / 'ckpt'}", *extra]


def test_keep_last_deletes_older_checkpoints_only_after_a_newer_one_is_complete(tmp_path):
    from training import train_with

    train_with(_single(tmp_path, "training.train_iters=8", "checkpoint.save_interval=2", "checkpoint.keep_last=2"), 1)
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000006", "iter_0000008", "latest"]
    assert (root / "latest").read_text().strip() == "iter_0000008"


def test_retention_never_deletes_the_latest_target(tmp_path):
    for iteration in (2, 4, 6, 8):
        directory = tmp_path / f"iter_{iteration:07d}"
        directory.mkdir()
        (directory / "meta.json").write_text("{}")
        (directory / ".metadata").write_text("")
    (tmp_path / "iter_0000010.tmp").mkdir()          # an unfinished save is never counted or touched
    (tmp_path / "latest").write_text("iter_0000004\n")
    deleted = saver.apply_retention(tmp_path, 1)
    assert sorted(p.name for p in deleted) == ["iter_0000002", "iter_0000006"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", "iter_0000008", "iter_0000010.tmp",
                                                           "latest"]
    with pytest.raises(CheckpointError, match="keep_last 0 must be >= 1"):
        saver.apply_retention(tmp_path, 0)
    with pytest.raises(ConfigError, match="checkpoint.keep_last 0 must be >= 1"):
        load_config(None, ["data.mock=true", "training.train_iters=1", "checkpoint.keep_last=0"]).validate(1)


def test_resume_skips_the_random_initialiser_and_restores_every_parameter(tmp_path, monkeypatch):
    from megatron_aquila.build import build_trainer_parts
    from megatron_aquila.model.aquila import AquilaModel
    from megatron_aquila.parallel.context import ParallelContext
    from training import train_with

    overrides = _single(tmp_path, "training.train_iters=2")
    _, trained, _ = train_with(overrides, 1)

    def no_random_init(self, seed):
        raise AssertionError("a resumed run drew random weights that the checkpoint overwrites")

    monkeypatch.setattr(AquilaModel, "init_weights", no_random_init)
    config = load_config(None, [*overrides, f"checkpoint.load={tmp_path / 'ckpt'}"])
    resumed, state = build_trainer_parts(config, ParallelContext.single_process())
    assert state.iteration == 2
    for (name, a), b in zip(trained.model_chunks[0].named_parameters(), resumed.model_chunks[0].parameters()):
        assert torch.equal(a, b), name


def _rewrite_as_v1(source: Path, target: Path) -> None:
    """A format-v1 checkpoint of one process: every tensor written whole, meta.json saying v1."""
    metadata = dcp.FileSystemReader(str(source)).read_metadata().state_dict_metadata
    values = {key: torch.empty(tuple(item.size), dtype=item.properties.dtype) for key, item in metadata.items()}
    dcp.load(values, checkpoint_id=str(source), no_dist=True)
    dcp.save(values, checkpoint_id=str(target), no_dist=True)
    meta = json.loads((source / "meta.json").read_text())
    (target / "meta.json").write_text(json.dumps({**meta, "format": "megatron_aquila.checkpoint.v1"}))


def test_format_v1_loads_and_an_unknown_format_is_refused(tmp_path):
    from megatron_aquila.build import build_trainer_parts
    from megatron_aquila.parallel.context import ParallelContext
    from training import train_with

    overrides = _single(tmp_path, "training.train_iters=2")
    _, trained, _ = train_with(overrides, 1)
    v1 = tmp_path / "v1" / "iter_0000002"
    _rewrite_as_v1(tmp_path / "ckpt" / "iter_0000002", v1)
    config = load_config(None, [*overrides, f"checkpoint.load={v1}"])
    resumed, state = build_trainer_parts(config, ParallelContext.single_process())
    assert state.iteration == 2
    for a, b in zip(trained.optimizer.pieces, resumed.optimizer.pieces):
        assert torch.equal(a.master, b.master)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(trained.optimizer.adamw.state[a.master][key], resumed.optimizer.adamw.state[b.master][key])
    meta = json.loads((v1 / "meta.json").read_text())
    (v1 / "meta.json").write_text(json.dumps({**meta, "format": "megatron_aquila.checkpoint.v9"}))
    with pytest.raises(CheckpointError, match=r"iter_0000002/meta.json has format 'megatron_aquila.checkpoint.v9'"):
        read_meta(v1)


def test_resume_may_extend_the_context_but_not_change_the_shape(tmp_path, caplog):
    from megatron_aquila.build import build_trainer_parts
    from megatron_aquila.parallel.context import ParallelContext
    from training import train_with

    overrides = _single(tmp_path, "training.train_iters=2")
    train_with(overrides, 1)
    load = f"checkpoint.load={tmp_path / 'ckpt'}"
    longer = load_config(None, [*overrides, load, "model.seq_length=64", "model.rope_scaling=linear",
                                "model.rope_scaling_factor=2.0"])
    with caplog.at_level("INFO", logger="megatron_aquila"):
        _, state = build_trainer_parts(longer, ParallelContext.single_process())
    assert state.iteration == 2
    assert "changed model section: seq_length 32 -> 64; rope_scaling none -> linear; rope_scaling_factor 1.0 -> 2.0" \
        in caplog.text
    wider = load_config(None, [*overrides, load, "model.ffn_hidden_size=256"])
    with pytest.raises(CheckpointError, match=r"another shape \(ffn_size 128 -> 256\)"):
        build_trainer_parts(wider, ParallelContext.single_process())


def test_the_skip_streak_survives_a_resume(tmp_path):
    """Consecutive skipped steps count toward max_skipped_in_a_row across a restart too."""
    from megatron_aquila.build import build_trainer_parts
    from megatron_aquila.checkpoint.saver import CheckpointSaver
    from megatron_aquila.parallel.context import ParallelContext
    from training import train_with

    overrides = [*RECIPE_KEYS, "parallel.tensor_parallel=1", "training.train_iters=2"]
    state, parts, ctx = train_with(overrides, 1)
    state.skipped_in_a_row = 3
    CheckpointSaver(load_config(None, [*overrides, f"checkpoint.save={tmp_path / 'ckpt'}"]), ctx).save(parts, state)
    config = load_config(None, [*overrides, f"checkpoint.load={tmp_path / 'ckpt'}"])
    _, resumed = build_trainer_parts(config, ParallelContext.single_process())
    assert (resumed.iteration, resumed.skipped_in_a_row) == (2, 3)


def test_a_second_save_of_an_iteration_replaces_it_and_a_crash_midway_falls_back(tmp_path):
    """Restarting from an earlier checkpoint into the same directory saves over the old attempt's
    checkpoints; the old one is set aside (never deleted before the new one is in place)."""
    from megatron_aquila.checkpoint.manager import load_checkpoint_into, resolve_checkpoint
    from megatron_aquila.checkpoint.saver import CheckpointSaver
    from megatron_aquila.model.aquila import AquilaModel
    from megatron_aquila.parallel.context import ParallelContext
    from training import train_with

    overrides = [*RECIPE_KEYS, "parallel.tensor_parallel=1", "training.train_iters=2"]
    state, parts, ctx = train_with(overrides, 1)
    config = load_config(None, [*overrides, f"checkpoint.save={tmp_path / 'ckpt'}"])
    CheckpointSaver(config, ctx).save(parts, state)
    with torch.no_grad():
        parts.model_chunks[0].output_layer.weight.add_(1.0)      # another attempt's state at iteration 2
    CheckpointSaver(config, ctx).save(parts, state)
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000002", "latest"]
    model = AquilaModel(config.model, ParallelContext.single_process(), seed=99)
    load_checkpoint_into([model], root, ParallelContext.single_process())
    assert torch.equal(model.output_layer.weight, parts.model_chunks[0].output_layer.weight)

    (root / "iter_0000002").rename(root / "iter_0000002.replaced")   # a crash between the two renames
    assert resolve_checkpoint(root) == root / "iter_0000002.replaced"
