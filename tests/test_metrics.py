"""The log line's throughput arithmetic (DESIGN.md section 6) and the metric sinks."""
from __future__ import annotations

import torch

from megatron_aquila.config import load_config
from megatron_aquila.metrics import IterationStats, MetricsWriter, device_peak_tflops
from megatron_aquila.model.flops import flops_per_iteration


def stats(**changes) -> IterationStats:
    values = dict(iteration=10, consumed_samples=17280, consumed_tokens=17280 * 2048, lr=2e-5, loss=2.5,
                  grad_norm=0.8, loss_scale=522893.0, skipped_iterations=1, iteration_seconds=10.0,
                  global_batch_size=1728, seq_length=2048, world_size=96, flops_per_iteration=1.5191e17,
                  peak_tflops=312.0)
    values.update(changes)
    return IterationStats(**values)


def test_throughput_and_mfu_follow_the_definitions():
    s = stats()
    assert s.tokens_per_second_per_device == 1728 * 2048 / 10.0 / 96
    assert abs(s.tflops_per_device - 1.5191e17 / (10.0 * 96) / 1e12) < 1e-9
    assert abs(s.mfu - s.tflops_per_device / 312.0) < 1e-12
    line = s.format()
    for field in ("iter      10", "loss 2.50000", "grad norm 0.8000", "loss scale 522893.0", "skipped 1",
                  "tokens/s/device", "TFLOP/s/device", "MFU  50.7%"):
        assert field in line, f"{field!r} missing from {line!r}"
    assert "loss scale" not in stats(loss_scale=None).format()


def test_aquila2_7b_flops_per_iteration_by_hand():
    m = load_config(None, ["model.preset=aquila2-7b"]).model
    L, h, n, d, s, f, V = 32, 4096, 32, 128, 2048, 11008, 100096
    expected = 6 * 1728 * s * (L * (h * (2 * d * n + 2 * d * 32) + 3 * h * f + s * d * n) + h * V)
    assert flops_per_iteration(m, 1728, V) == expected


def test_peak_sources():
    assert device_peak_tflops(torch.device("cpu"), 5.0, 4) == (5.0, "logging.peak_tflops")
    measured, source = device_peak_tflops(torch.device("cpu"), None, 2)
    assert measured > 0 and "shared by 2 process(es)" in source


def test_tensorboard_sink_writes_events(tmp_path):
    writer = MetricsWriter(str(tmp_path / "tb"), None, "offline", {}, None)
    writer.log_iteration(stats())
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert abs(events.Scalars("train/mfu")[0].value - stats().mfu) < 1e-6  # stored as float32


def test_wandb_offline_sink_records_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(None, "megatron-aquila-test", "offline", {"model": {"hidden_size": 64}}, str(tmp_path))
    writer.log_iteration(stats())
    writer.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected one offline run under {tmp_path / 'wandb'}, found {runs}"
    record = runs[0].read_bytes()
    for key in (b"train/loss", b"train/mfu", b"train/tokens_per_second_per_device", b"hidden_size"):
        assert key in record, f"{key!r} not recorded in {runs[0]}"
