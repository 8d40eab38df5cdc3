"""Throughput accounting and the per-iteration log line, with optional TensorBoard and wandb sinks.

TFLOP/s per device = F / (iteration seconds x world size) / 1e12, with F from ``model.flops``;
MFU = that / the device's peak. GPU peaks come from a table of dense bf16 figures (overridable
with ``logging.peak_tflops``); on a CPU the peak is measured once at start-up with a large fp32
matmul using every core of the machine, and each of the node's processes is credited an equal share.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger("megatron_aquila")

# Dense bf16 tensor-core TFLOP/s per device, by a substring of torch.cuda.get_device_name().
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100", 989.0), ("H800", 989.0), ("H20", 148.0), ("A100", 312.0), ("A800", 312.0),
)


def measure_cpu_matmul_tflops(size: int = 2048, repeats: int = 5, threads: Optional[int] = None) -> float:
    """Best-of-``repeats`` fp32 matmul rate of this machine in TFLOP/s (2 n^3 FLOPs per product)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm up the kernels and the thread pool
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return 2 * size ** 3 / best / 1e12
    finally:
        torch.set_num_threads(previous)


def device_peak_tflops(device: torch.device, override: Optional[float], processes_per_node: int) -> tuple[float, str]:
    """Peak TFLOP/s credited to one process, and where the figure came from (for the start-up log)."""
    if override is not None:
        return override, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS:
            if key in name:
                return peak, f"table entry {key} (bf16 dense) for {name}"
        return math.nan, f"unknown GPU {name}: set logging.peak_tflops to report MFU"
    machine = measure_cpu_matmul_tflops()
    return machine / processes_per_node, (
        f"measured fp32 matmul peak of this CPU {machine * 1e3:.1f} GFLOP/s shared by {processes_per_node} process(es)")


@dataclass
class IterationStats:
    """What one logged iteration reports; the averages cover the iterations since the last log."""

    iteration: int
    consumed_samples: int
    consumed_tokens: int
    lr: float
    loss: float
    grad_norm: float
    loss_scale: Optional[float]
    skipped_iterations: int
    iteration_seconds: float
    global_batch_size: int
    seq_length: int
    world_size: int
    flops_per_iteration: float
    peak_tflops: float

    @property
    def tokens_per_second_per_device(self) -> float:
        return self.global_batch_size * self.seq_length / self.iteration_seconds / self.world_size

    @property
    def tflops_per_device(self) -> float:
        return self.flops_per_iteration / (self.iteration_seconds * self.world_size) / 1e12

    @property
    def mfu(self) -> float:
        return self.tflops_per_device / self.peak_tflops

    def format(self) -> str:
        scale = f" | loss scale {self.loss_scale:.1f}" if self.loss_scale is not None else ""
        return (
            f"iter {self.iteration:7d} | samples {self.consumed_samples:10d} | tokens {self.consumed_tokens:13d} "
            f"| lr {self.lr:.3e} | loss {self.loss:.5f} | grad norm {self.grad_norm:.4f}{scale} "
            f"| skipped {self.skipped_iterations} | {self.iteration_seconds * 1e3:9.1f} ms/iter "
            f"| {self.tokens_per_second_per_device:9.1f} tokens/s/device "
            f"| {self.tflops_per_device:8.4f} TFLOP/s/device | MFU {100 * self.mfu:5.1f}%"
        )

    def scalars(self) -> dict[str, float]:
        values = {
            "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
            "skipped_iterations": float(self.skipped_iterations), "ms_per_iteration": self.iteration_seconds * 1e3,
            "tokens_per_second_per_device": self.tokens_per_second_per_device,
            "tflops_per_device": self.tflops_per_device, "mfu": self.mfu,
            "consumed_samples": float(self.consumed_samples),
        }
        if self.loss_scale is not None:
            values["loss_scale"] = self.loss_scale
        return values


class MetricsWriter:
    """Rank-0 sinks: the log line always; TensorBoard and wandb when configured (imported lazily)."""

    def __init__(self, tensorboard_dir: Optional[str], wandb_project: Optional[str], wandb_mode: str,
                 run_config: dict, wandb_dir: Optional[str]):
        self.tensorboard = None
        self.wandb_run = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            import wandb

            self.wandb_run = wandb.init(project=wandb_project, mode=wandb_mode, config=run_config, dir=wandb_dir)

    def log_iteration(self, stats: IterationStats) -> None:
        logger.info(stats.format())
        self.log_scalars("train", stats.scalars(), stats.iteration)

    def log_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({f"{prefix}/{key}": value for key, value in values.items()}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
