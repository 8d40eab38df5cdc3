"""Graceful stop on SIGTERM / SIGUSR1 (Slurm's warning before the time limit): save, then exit cleanly.

The handler only sets a flag. At the end of each iteration the trainer calls ``should_stop``,
which takes the MAX of the flag over the world, so every rank agrees to stop after the same
iteration even when the signal reached only some of them; then every rank saves and exits 0.

How the signal reaches the ranks (examples/aquila2/stop_signals.sh; timing in docs/gpu.md
section 6): torchrun never forwards SIGUSR1 and gives ranks only 30 s after it forwards SIGTERM,
so the launchers start torchrun with SIGUSR1 ignored and send the signal to its children, the
ranks, themselves. The ranks inherit that ignored disposition: a SIGUSR1 that arrives before the
training loop installs this handler (start-up, building, loading a checkpoint) is dropped, while
a SIGTERM then ends the rank at once. Either way no iteration has run since the last checkpoint.
"""
from __future__ import annotations

import logging
import signal
import time
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
        self.received_at: Optional[float] = None  # time.monotonic() of the first stop signal
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()

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
            # How much of the launcher's lead time the rest of the iteration took; the save follows.
            waited = time.monotonic() - self.received_at
            logger.warning(f"rank {self.ctx.rank} received {signal.Signals(self.received).name} {waited:.1f} s "
                           "before the end of this iteration: saving and stopping")
        return bool(flag.item())
