"""The log line's throughput arithmetic (docs/design.md section 6), the peak it divides by, and the metric sinks."""
from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from distributed import run_distributed
from megatron_aquila.config import load_config
from megatron_aquila.metrics import IterationStats, MetricsWriter
from megatron_aquila.model.flops import flops_per_iteration
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.peak_flops import (
    best_of_repeats, gpu_peak_tflops, measure_cpu_matmul_tflops, shared_peak_tflops)

# Dense bf16 TFLOP/s from NVIDIA's data sheets, written out here independently of peak_flops.py,
# keyed by the names torch.cuda.get_device_name reports.
DATA_SHEET_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0, "NVIDIA GH200 480GB": 989.0, "NVIDIA H800": 989.0, "NVIDIA H20": 148.0,
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA A800-SXM4-80GB": 312.0,
    "NVIDIA B200": 2250.0,
}


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


@pytest.mark.parametrize("name", sorted(DATA_SHEET_PEAKS))
def test_gpu_peak_by_exact_model_name(name):
    assert gpu_peak_tflops(name) == DATA_SHEET_PEAKS[name]


def test_gpu_names_match_whole_model_tokens():
    assert gpu_peak_tflops("NVIDIA H200") == 989.0 != gpu_peak_tflops("NVIDIA H20")  # "H20" is inside "H200"
    assert gpu_peak_tflops("NVIDIA GH200 480GB") == 989.0  # and inside "GH200"
    assert gpu_peak_tflops("nvidia a100 80gb pcie") == 312.0  # order and case of the tokens do not matter


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-32GB", "NVIDIA H200 NVL",
                                  "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA H800 PCIe", "NVIDIA GB200", ""])
def test_unknown_gpu_has_no_peak_and_the_line_no_mfu(name):
    peak = gpu_peak_tflops(name)
    assert peak is None
    s = stats(peak_tflops=peak)
    assert s.mfu is None and "mfu" not in s.scalars()
    line = s.format()
    assert "MFU" not in line and line.endswith("TFLOP/s/device"), line
    assert f"{s.tflops_per_device:8.4f} TFLOP/s/device" in line  # throughput is still reported


def test_override_wins_and_nothing_is_measured():
    def must_not_run() -> float:
        raise AssertionError("measured although logging.peak_tflops is set")

    config = load_config(None, ["logging.peak_tflops=5.0"])
    assert shared_peak_tflops(config, ParallelContext.single_process(), must_not_run) == 5.0


def test_cpu_peak_is_the_processes_share_of_the_machine(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    config = load_config(None, [])
    assert shared_peak_tflops(config, ParallelContext.single_process(), lambda: 0.2) == 0.2 / 4


def test_best_of_repeats_warns_when_repeats_disagree(caplog):
    disturbed = iter([0.060, 0.0326, 0.065])  # TFLOP/s; one repeat shared the cores with another job
    with caplog.at_level(logging.WARNING, logger="megatron_aquila"):
        assert best_of_repeats(lambda: next(disturbed), 3, tolerance=1.25) == 0.065
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ratio 1.99 > 1.25" in warnings[0] and "32.6 GFLOP/s" in warnings[0], warnings
    caplog.clear()
    steady = iter([0.060, 0.065, 0.062])  # ratio 1.08
    with caplog.at_level(logging.WARNING, logger="megatron_aquila"):
        assert best_of_repeats(lambda: next(steady), 3, tolerance=1.25) == 0.065
    assert not caplog.records


def test_cpu_matmul_measurement_restores_the_thread_count():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert measure_cpu_matmul_tflops(size=128, repeats=2, threads=2) > 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def _shared_peak_worker(rank: int, world_size: int, marker: str) -> tuple[float, int, bool]:
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    ctx = ParallelContext.initialize(1, 1, torch.device("cpu"))
    calls, saw_marker = [], []

    def measure_machine() -> float:
        calls.append(1)
        saw_marker.append(os.path.exists(marker))  # rank 1 arrived before the measurement started
        return 0.13

    if rank == 1:
        time.sleep(0.5)  # still "building" while rank 0 is ready to measure
        open(marker, "w").close()
    peak = shared_peak_tflops(load_config(None, []), ctx, measure_machine)
    ctx.release_groups()
    return peak, len(calls), all(saw_marker)


def test_cpu_peak_measured_by_rank_0_after_every_rank_arrives(tmp_path):
    results = run_distributed(_shared_peak_worker, world_size=2, args=(str(tmp_path / "rank1_arrived"),))
    assert [peak for peak, _, _ in results] == [0.13 / 2, 0.13 / 2]
    assert [calls for _, calls, _ in results] == [1, 0]
    assert results[0][2], "rank 0 measured before rank 1 reached the barrier"


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
    import wandb

    # finish() only asks wandb-core to close the run; teardown waits for it to write the file and exit
    # (at the end of a training process the same happens at exit).
    wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected one offline run under {tmp_path / 'wandb'}, found {runs}"
    record = runs[0].read_bytes()
    for key in (b"train/loss", b"train/mfu", b"train/tokens_per_second_per_device", b"hidden_size"):
        assert key in record, f"{key!r} not recorded in {runs[0]}"
