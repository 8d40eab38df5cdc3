"""ZeRO-1's parameter all-gather overlapped with the next forward (``parallel.overlap_param_gather``)
gives bit for bit the run that gathers at the step's end: losses, parameters, the checkpoint it saves
and a resume from that checkpoint.

The overlapped runs gather with ``deferred_all_gather``: each bucket's gathered values land in the parameters only
when its gather is waited for, as a slow network would leave them. A parameter read before its
bucket's wait (a missing or misplaced forward pre-hook, a save or an evaluation that did not finish
the gathers) then sees the previous step's values, and the run departs from the reference.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from distributed import run_distributed
from megatron_aquila.checkpoint.full_state import gather_full_state_dict
from megatron_aquila.optim import param_gather
from megatron_aquila.optim.param_gather import forward_units
from megatron_aquila.parallel.collectives import all_gather_single
from training import train_with

BASE = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=96", "model.seq_length=32", "model.vocab_size=250", "model.make_vocab_size_divisible_by=8",
    "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=5", "training.seed=7",
    "optimizer.lr=1e-2", "optimizer.min_lr=1e-3", "optimizer.lr_warmup_iters=0", "optimizer.clip_grad=0.5",
    "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0",
    "parallel.distributed_optimizer=true", "parallel.grad_bucket_size_mb=0.01",   # about ten buckets a chunk
    "checkpoint.save_interval=2", "training.eval_interval=4", "training.eval_iters=1",
]
# Iterations 2 and 4 overlap the gathers of steps 1 and 3; the saves after steps 2 and 4 and the evaluation
# after step 4 wait for them first (as the end of training does after step 5).
OVERLAPPED_FORWARDS = 2
LORA = ["finetune.lora={rank: 4, alpha: 8.0, targets: [qkv, dense, gate_up, down]}"]   # base: the "off" run
PP2_VPP2 = ["model.num_layers=4", "parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=2",
            "training.recompute=full", "checkpoint.async_save=true", "training.train_iters=4",
            "precision.dtype=bf16"]   # bf16 parameters: the gather writes the cast masters


class DeferredWork:
    """A finished all-gather whose result is copied into the output only at ``wait()``."""

    def __init__(self, output: torch.Tensor, gathered: torch.Tensor):
        self.output, self.gathered = output, gathered

    def wait(self) -> bool:
        self.output.copy_(self.gathered)
        return True


def deferred_all_gather(output, local, group=None, async_op=False):
    """``all_gather_single`` done now into a copy, handed to the parameters at ``wait()``."""
    gathered = torch.empty_like(output)  # [bucket]
    all_gather_single(gathered, local.clone(), group=group)
    return DeferredWork(output, gathered)


def named_units(chunk) -> list:
    """(name, module) of a chunk's forward units, in forward order."""
    names = {id(module): name for name, module in chunk.named_modules()}
    return [(names[id(unit)], unit) for unit in forward_units(chunk)]


def probe(parts, record: list) -> None:
    """Record ((chunk, unit), gathers in flight) at each unit's forward, after the gather's own hooks, and
    ("step", gathers in flight) after each optimizer step."""
    gather, step = parts.optimizer.param_gather, parts.optimizer.step
    for index, chunk in enumerate(parts.model_chunks):
        for name, unit in named_units(chunk):
            unit.register_forward_pre_hook(lambda module, args, key=(index, name): record.append((key, gather.pending)))

    def recorded_step():
        result = step()
        record.append(("step", gather.pending))
        return result
    parts.optimizer.step = recorded_step


def expected_in_flight(parts) -> list:
    """((chunk, unit), gathers still in flight once the unit's hook has waited) in forward order, from the layout."""
    bucket_of = {id(param): (index, bucket.index) for index, buffer in enumerate(parts.grad_buffers)
                 for bucket in buffer.buckets for param in bucket.params}
    buckets, waited, expected = len(set(bucket_of.values())), set(), []
    for index, chunk in enumerate(parts.model_chunks):
        for name, unit in named_units(chunk):
            waited |= {bucket_of[id(p)] for p in unit.parameters() if id(p) in bucket_of}
            expected.append(((index, name), buckets - len(waited)))
    return expected


def worker(rank: int, world_size: int, overrides: list[str], deferred: bool):
    record: list = []
    original = param_gather.all_gather_single
    if deferred:
        param_gather.all_gather_single = deferred_all_gather
    try:
        state, parts, ctx = train_with(BASE + overrides, world_size, prepare=lambda parts, ctx: probe(parts, record))
    finally:
        param_gather.all_gather_single = original
    result = {"history": state.history, "params": gather_full_state_dict(parts.model_chunks, ctx),
              "expected": expected_in_flight(parts), "record": record,
              "buckets": len(parts.optimizer.param_gather.buckets)}
    gathered = [None] * world_size
    dist.all_gather_object(gathered, result)   # every stage's parameters and records
    return gathered if rank == 0 else None


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole (read in this process)."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    values = {key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
              for key, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}
    with warnings.catch_warnings():   # DCP warns that it loads in one process: that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(values, checkpoint_id=str(path), no_dist=True)
    return values


def assert_identical(run, reference, what: str, first_iteration: int = 1) -> None:
    history = torch.tensor(run[0]["history"])
    ref_history = torch.tensor(reference[0]["history"][first_iteration - 1:])
    assert torch.equal(history, ref_history), f"{what}: losses {history.tolist()} vs {ref_history.tolist()}"
    for rank, (ours, theirs) in enumerate(zip(run, reference)):
        assert ours["params"].keys() == theirs["params"].keys()
        for name, value in ours["params"].items():
            assert torch.equal(value, theirs["params"][name]), f"{what}: rank {rank} parameter {name} differs"


def assert_same_checkpoint(path: Path, reference: Path) -> None:
    ours, theirs = saved_tensors(path), saved_tensors(reference)
    assert ours.keys() == theirs.keys() and any(key.startswith("optim.") for key in ours)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), f"{path.name}: {key} differs from the gather at the step's end"


def assert_overlapped(run, forwards: int) -> None:
    """Each step leaves every bucket's gather in flight. In ``forwards`` of the forwards that follow a step, each
    unit of every rank sees exactly the gathers of later units' buckets in flight: it waited for its own buckets
    and no others. Nothing is in flight in the other forwards (a save or an evaluation finished the gathers)."""
    for rank, result in enumerate(run):
        expected, record, buckets = result["expected"], result["record"], result["buckets"]
        assert expected[0][1] > 0, f"rank {rank}: the first unit {expected[0][0]} needs every bucket: no overlap"
        steps = [i for i, (key, _) in enumerate(record) if key == "step"]
        assert [record[i][1] for i in steps] == [buckets] * len(steps), f"rank {rank}: {record}"
        overlapped = 0
        for start, end in zip(steps, steps[1:] + [len(record)]):
            first_seen: dict = {}
            for key, pending in record[start + 1:end]:
                first_seen.setdefault(key, pending)
            if list(first_seen.items()) == expected:
                overlapped += 1
            else:
                assert set(first_seen.values()) <= {0}, f"rank {rank}: after a step {first_seen}, expected {expected}"
        assert overlapped == forwards, f"rank {rank}: {overlapped} overlapped forwards, expected {forwards}"


@pytest.fixture(scope="module")
def dp2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("param_gather")
    runs = {name: run_distributed(worker, 2, args=(
        [f"parallel.overlap_param_gather={overlap}", f"checkpoint.save={root / name}"], overlap))[0]
        for name, overlap in (("off", False), ("on", True))}
    runs["resumed"] = run_distributed(worker, 2, args=(
        ["parallel.overlap_param_gather=true", f"checkpoint.load={root / 'on' / 'iter_0000002'}",
         f"checkpoint.save={root / 'resumed'}"], True))[0]
    for name, overlap in (("lora_off", False), ("lora_on", True)):   # only the adapters are in buckets
        runs[name] = run_distributed(worker, 2, args=(
            [*LORA, f"checkpoint.init_weights={root / 'off'}", f"parallel.overlap_param_gather={overlap}",
             f"checkpoint.save={root / name}"], overlap))[0]
    return root, runs


def test_dp2_overlapped_gather_is_bit_identical_to_the_gather_at_the_step_end(dp2_runs):
    root, runs = dp2_runs
    assert runs["off"][0]["history"][-1] < runs["off"][0]["history"][0], "the reference run did not learn"
    assert_identical(runs["on"], runs["off"], "DP2 overlapped")
    assert_overlapped(runs["on"], forwards=OVERLAPPED_FORWARDS)


def test_dp2_checkpoints_and_resume_equal_the_gather_at_the_step_end(dp2_runs):
    root, runs = dp2_runs
    for iteration in ("iter_0000002", "iter_0000004", "iter_0000005"):
        assert_same_checkpoint(root / "on" / iteration, root / "off" / iteration)
    assert_identical(runs["resumed"], runs["off"], "DP2 resumed from the overlapped run's checkpoint",
                     first_iteration=3)


def test_pp2_vpp2_dp2_bf16_with_recompute_and_async_save(tmp_path):
    off, on = (run_distributed(worker, 4, args=(
        [*PP2_VPP2, f"parallel.overlap_param_gather={overlap}", f"checkpoint.save={tmp_path / name}"], overlap))[0]
        for name, overlap in (("off", False), ("on", True)))
    assert_identical(on, off, "PP2 x VPP2 x DP2 bf16 overlapped")
    assert_overlapped(on, forwards=OVERLAPPED_FORWARDS)
    for iteration in ("iter_0000002", "iter_0000004"):
        assert_same_checkpoint(tmp_path / "on" / iteration, tmp_path / "off" / iteration)


def test_dp2_lora_gathers_only_the_adapters_and_equals_the_gather_at_the_step_end(dp2_runs):
    root, runs = dp2_runs
    assert_identical(runs["lora_on"], runs["lora_off"], "DP2 LoRA overlapped")
    assert_overlapped(runs["lora_on"], forwards=OVERLAPPED_FORWARDS)
    (first_unit, in_flight), *_ = runs["lora_on"][0]["expected"]
    assert first_unit == (0, "embedding") and in_flight == runs["lora_on"][0]["buckets"], "a frozen unit waits"
    for iteration in ("iter_0000002", "iter_0000005"):
        assert_same_checkpoint(root / "lora_on" / iteration, root / "lora_off" / iteration)
