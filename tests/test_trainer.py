"""Training-loop behaviour in one process: precision paths, ramp-up, stopping on a bad loss."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_aquila.build import build_trainer_parts
from megatron_aquila.config import load_config
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.trainer import NonFiniteLossError, Trainer

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


def test_nan_loss_stops_the_run_naming_the_iteration():
    trainer = make_trainer(["training.train_iters=6"])
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        return output * math.nan if calls["n"] > 4 else output  # 2 micro-batches per iteration: iteration 3

    trainer.parts.model_chunks[0].final_norm.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="at iteration 3"):
        trainer.train()


def test_fp16_overflow_is_skipped_and_the_scale_backs_off():
    trainer = make_trainer(["training.train_iters=12", "precision.dtype=fp16", "precision.initial_loss_scale=16777216",
                            "precision.hysteresis=1", "optimizer.lr_warmup_iters=1"])
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
