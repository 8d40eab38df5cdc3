"""What the training loop drives and what a checkpoint restores: the built parts and the counters.

Its own module so that ``trainer`` and ``checkpoint.manager`` both import it without importing
each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from megatron_aquila.batch_schedule import BatchSchedule
from megatron_aquila.parallel.pipeline.schedules import Microbatch

MicrobatchStreamFactory = Callable[[int], Iterator[Microbatch]]  # consumed samples -> micro-batches


@dataclass
class TrainingState:
    """Progress counters; what a checkpoint must restore to resume exactly."""

    iteration: int = 0
    consumed_train_samples: int = 0
    skipped_iterations: int = 0
    skipped_in_a_row: int = 0   # consecutive skipped steps, toward training.max_skipped_in_a_row
    history: list[float] = field(default_factory=list)  # every iteration's reduced loss (this process's run)


@dataclass
class TrainerParts:
    """The built components the loop drives (see ``megatron_aquila.build``)."""

    model_chunks: list[torch.nn.Module]
    grad_buffers: list
    optimizer: object          # MixedPrecisionOptimizer / DistributedOptimizer
    lr_scheduler: object       # LRScheduler
    batch_schedule: BatchSchedule
    train_stream: MicrobatchStreamFactory
    valid_stream: Optional[MicrobatchStreamFactory]
    flops_per_sample: float    # model FLOPs per sample (section 6 formula with B = 1)
    peak_tflops: Optional[float]  # per device; None when unknown (MFU left out of the log line)
    describe_samples: Callable[[int], str] = lambda index: f"sample {index}"  # a train sample's source documents
