"""Graceful stop on SIGTERM / SIGUSR1 (Slurm's pre-emption warnings): save, then exit cleanly.

The handler only sets a flag. At the end of each iteration the trainer calls ``should_stop``,
which takes the MAX of the flag over the world, so every rank agrees to stop after the same
iteration even when the signal reached only some of them.
"""
from __future__ import annotations

import logging
import signal
from typing import Optional

import torch
import torch.distributed as dist

from megatron_aquila.parallel.context import ParallelContext

logger = logging.getLogger("megatron_aquila")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignalHandler:
    """Context manager installing flag-setting handlers for ``STOP_SIGNALS``; restores the old ones on exit."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignalHandler":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def should_stop(self) -> bool:
        """True on every rank when any rank received a stop signal (collective over the world)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=self.ctx.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.world_group)
        if flag.item() and self.received is not None:
            logger.warning(f"rank {self.ctx.rank} received {signal.Signals(self.received).name}: saving and stopping")
        return bool(flag.item())
