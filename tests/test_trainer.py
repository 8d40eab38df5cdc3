"""Training-loop behaviour: precision paths, ramp-up, skipped steps, stopping and its collectives."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from megatron_aquila.build import build_trainer_parts
from megatron_aquila.config import load_config
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.trainer import SkippedStepsError, Trainer
from training import train_with

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=64", "model.make_vocab_size_divisible_by=8",
    "training.micro_batch_size=2", "training.global_batch_size=4", "data.mock=true", "data.num_workers=0",
    "logging.peak_tflops=1.0", "optimizer.lr=1e-2", "optimizer.min_lr=1e-3",
]


def make_trainer(overrides: list[str]) -> Trainer:
    config = load_config(None, SMALL + overrides)
    config.validate(1)
    ctx = ParallelContext.single_process()
    parts, state = build_trainer_parts(config, ctx)
    return Trainer(config, ctx, parts, None, state)


# The optimizer skips a step whose grads are not finite in every precision; under fp16 only a skip
# at the minimum loss scale counts toward max_skipped_in_a_row (the scaler cannot back off further).
SKIPPING_PRECISIONS = {
    "fp32": [],
    "bf16": ["precision.dtype=bf16"],
    "fp16-at-min-scale": ["precision.dtype=fp16", "precision.initial_loss_scale=1", "precision.min_loss_scale=1"],
}


def poison_iterations(trainer: Trainer, bad: set[int]) -> None:
    """Make the loss (and so every grad) NaN in the 1-based iterations ``bad``, as a corrupt batch would."""
    def hook(module, inputs, output):
        return output * math.nan if trainer.state.iteration + 1 in bad else output

    trainer.parts.model_chunks[0].final_norm.register_forward_hook(hook)


def logged_losses(caplog) -> dict[int, float]:
    """iteration -> loss of the log lines (IterationStats.format)."""
    found = {}
    for record in caplog.records:
        match = re.match(r"iter\s+(\d+) .*?\| loss ([-+.\w]+) ", record.getMessage())
        if match:
            found[int(match.group(1))] = float(match.group(2))
    return found


@pytest.mark.parametrize("precision", list(SKIPPING_PRECISIONS))
def test_nan_batches_skip_their_steps_and_the_run_goes_on(precision, caplog):
    caplog.set_level(logging.INFO, logger="megatron_aquila")
    trainer = make_trainer(["training.train_iters=8", "training.max_skipped_in_a_row=3", "logging.log_interval=4",
                            *SKIPPING_PRECISIONS[precision]])
    poison_iterations(trainer, {3, 5, 6})
    state = trainer.train()
    assert state.iteration == 8 and state.skipped_iterations == 3
    assert [math.isnan(loss) for loss in state.history] == [False, False, True, False, True, True, False, False]
    assert trainer.parts.lr_scheduler.num_steps == 5, "skipped steps must not advance the learning rate"
    for name, param in trainer.parts.model_chunks[0].named_parameters():
        assert torch.isfinite(param).all(), f"a skipped step changed {name}"
    # the interval means leave the NaN losses out and say how many steps were skipped so far
    history = state.history
    assert logged_losses(caplog) == pytest.approx({4: (history[0] + history[1] + history[3]) / 3,
                                                   8: (history[6] + history[7]) / 2}, abs=1e-5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("iteration 3: optimizer step skipped" in w and "1 in a row" in w for w in warnings), warnings
    assert any("iteration 6: optimizer step skipped" in w and "2 in a row" in w for w in warnings), warnings


@pytest.mark.parametrize("precision", list(SKIPPING_PRECISIONS))
def test_max_skipped_in_a_row_stops_the_run_naming_the_iteration(precision):
    trainer = make_trainer(["training.train_iters=10", "training.max_skipped_in_a_row=3",
                            *SKIPPING_PRECISIONS[precision]])
    poison_iterations(trainer, {2, 4, 5, 6, 7})  # iteration 3 succeeds and resets the count
    with pytest.raises(SkippedStepsError) as error:
        trainer.train()
    message = str(error.value)
    for words in ("3 optimizer steps in a row", "iteration 6", "max_skipped_in_a_row 3", "lower optimizer.lr", "bf16"):
        assert words in message, f"{words!r} not in {message}"
    assert trainer.state.iteration == 6 and trainer.state.skipped_iterations == 4


def test_fp16_overflow_is_skipped_and_the_scale_backs_off():
    # max_skipped_in_a_row 1: overflow skips while the scale can still back off must not stop the run
    trainer = make_trainer(["training.train_iters=12", "precision.dtype=fp16", "precision.initial_loss_scale=16777216",
                            "precision.hysteresis=1", "optimizer.lr_warmup_iters=1", "training.max_skipped_in_a_row=1"])
    assert trainer.parts.model_chunks[0].embedding.weight.dtype == torch.float16
    state = trainer.train()
    assert state.skipped_iterations >= 1, "a 2^24 loss scale must overflow fp16 grads"
    assert trainer.parts.optimizer.loss_scale < 2 ** 24
    assert all(math.isfinite(loss) for loss in state.history)
    assert state.skipped_iterations < 12, f"the scaler never recovered: scale {trainer.parts.optimizer.loss_scale}"


def test_bf16_trains_with_fp32_master_weights():
    trainer = make_trainer(["training.train_iters=8", "precision.dtype=bf16", "optimizer.lr_warmup_iters=1"])
    state = trainer.train()
    assert trainer.parts.model_chunks[0].embedding.weight.dtype == torch.bfloat16
    assert state.skipped_iterations == 0
    assert state.history[-1] < state.history[0], f"bf16 run did not learn: {state.history}"


def test_rampup_grows_the_batch_and_counts_samples():
    trainer = make_trainer(["training.train_samples=40", "training.global_batch_size=8",
                            "training.rampup_batch_size=[2, 2, 12]", "training.micro_batch_size=1"])
    state = trainer.train()
    # batches 2, 2, 4 (consumed 8 >= 12/3 x 2), 6, 8, ... until 40 samples
    assert state.consumed_train_samples >= 40
    assert state.iteration == trainer.parts.batch_schedule.iterations_for(40) == len(state.history)
    assert state.iteration > 40 // 8, "the ramp-up must take more iterations than full batches would"


def test_missing_dataset_is_one_clear_line(tmp_path, monkeypatch):
    from megatron_aquila.train import main

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test process's setting
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "absent.yaml")])
    assert "recipe" in str(stop.value) and "absent.yaml does not exist" in str(stop.value)
    prefix = tmp_path / "nope_text_document"
    with pytest.raises(SystemExit) as stop:
        main([str(ROOT / "examples" / "tiny" / "tiny.yaml"), *SMALL, "data.mock=false",
              f"data.data_path=[{prefix}]", "parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
              "parallel.distributed_optimizer=false", "training.train_iters=1", "checkpoint.load=null",
              "checkpoint.save=null", "checkpoint.save_interval=null", "logging.output_dir=null"])
    message = str(stop.value)
    assert "IndexedDatasetError" in message and f"{prefix}.idx: file not found" in message, message


# ---------------------------------------------------------------------------- stopping on time
def test_exit_duration_collective_runs_on_the_context_device(monkeypatch):
    """NCCL has no CPU tensors: the elapsed-time MAX must be taken on ctx.device (here a stand-in)."""
    trainer = make_trainer(["training.train_iters=5", "training.exit_duration_minutes=60"])
    trainer.ctx = dataclasses.replace(trainer.ctx, world_size=2, device=torch.device("meta"))
    devices = []

    class Reached(Exception):
        pass

    def recording_all_reduce(tensor, *args, **kwargs):
        devices.append(tensor.device)
        raise Reached

    monkeypatch.setattr(torch.distributed, "all_reduce", recording_all_reduce)
    with pytest.raises(Reached):
        trainer.should_stop(time.time(), iterations_this_run=1)
    assert devices == [torch.device("meta")]


def exit_duration_worker(rank: int, world_size: int) -> int:
    state, _, _ = train_with(SMALL + ["training.train_iters=5", "training.exit_duration_minutes=0"], world_size)
    return state.iteration


def test_exit_duration_stops_every_rank_after_the_same_iteration():
    assert run_distributed(exit_duration_worker, 2) == [1, 1]
