"""Throughput accounting and the per-iteration log line, with optional TensorBoard and wandb sinks.

TFLOP/s per device = F / (iteration seconds x world size) / 1e12, with F from ``model.flops``;
MFU = that / the device's peak (docs/design.md section 6). The peak comes from ``peak_flops``;
when it is unknown (None: a GPU missing from its table) the log line and the sinks leave MFU out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger("megatron_aquila")


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
    peak_tflops: Optional[float]  # per device; None when unknown

    @property
    def tokens_per_second_per_device(self) -> float:
        return self.global_batch_size * self.seq_length / self.iteration_seconds / self.world_size

    @property
    def tflops_per_device(self) -> float:
        return self.flops_per_iteration / (self.iteration_seconds * self.world_size) / 1e12

    @property
    def mfu(self) -> Optional[float]:
        """Model FLOPs utilisation (docs/design.md section 6); None when the peak is unknown."""
        return self.tflops_per_device / self.peak_tflops if self.peak_tflops is not None else None

    def format(self) -> str:
        scale = f" | loss scale {self.loss_scale:.1f}" if self.loss_scale is not None else ""
        mfu = f" | MFU {100 * self.mfu:5.1f}%" if self.mfu is not None else ""
        return (
            f"iter {self.iteration:7d} | samples {self.consumed_samples:10d} | tokens {self.consumed_tokens:13d} "
            f"| lr {self.lr:.3e} | loss {self.loss:.5f} | grad norm {self.grad_norm:.4f}{scale} "
            f"| skipped {self.skipped_iterations} | {self.iteration_seconds * 1e3:9.1f} ms/iter "
            f"| {self.tokens_per_second_per_device:9.1f} tokens/s/device "
            f"| {self.tflops_per_device:8.4f} TFLOP/s/device{mfu}"
        )

    def scalars(self) -> dict[str, float]:
        values = {
            "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
            "skipped_iterations": float(self.skipped_iterations), "ms_per_iteration": self.iteration_seconds * 1e3,
            "tokens_per_second_per_device": self.tokens_per_second_per_device,
            "tflops_per_device": self.tflops_per_device, "consumed_samples": float(self.consumed_samples),
        }
        if self.mfu is not None:
            values["mfu"] = self.mfu
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
