"""Name the slowest and the fastest rank every ``logging.straggler_interval`` iterations.

A slow rank (a throttled GPU, a busy host) holds every other rank up at the next collective, so
the iteration's wall time is the same everywhere and names nobody. What differs is each rank's own
work before it waits for the data-parallel replicas: the trainer times, on every rank, the
iteration from its start to the end of its forward-backward schedule, before ``finish_grad_sync``
waits for the gradient reduction (CUDA events on the compute stream on GPU, where the host only
queues kernels; ``time.perf_counter`` on CPU). The data-parallel reduction overlaps backward
without blocking it, so a slow replica's time is longer and the others' are not.

Every ``interval`` iterations each rank's mean over the interval is all-gathered over the world
(one ``all_gather_single`` of a float64 on ``ctx.device``), and rank 0 logs one line: the slowest
and fastest ranks, their hosts (``socket.gethostname()``, gathered once, at the first report) and the
ratio of their times.

Limits: collectives inside the schedule make ranks wait for each other: tensor-parallel ranks at
every layer, context-parallel ranks in attention, pipeline stages at every transfer (and, with
``training.loss_average: per_token``, the data-parallel replicas once, at the start, for the
loss-token count: only what a rank does after it, the forward and backward passes, tells). A slow rank
therefore lengthens the times of its model-parallel group as well, and the line names the slow
group's rank that measured longest; across data-parallel replicas it names the slow one. Stages
with unequal work (the first holds the embedding, the last the output layer) differ by that work.
"""
from __future__ import annotations

import logging
import socket
import time

import torch
import torch.distributed as dist

from megatron_aquila.parallel.collectives import all_gather_single
from megatron_aquila.parallel.context import ParallelContext

logger = logging.getLogger("megatron_aquila")


class StragglerDetector:
    """Times each iteration's own work on this rank and reports the extremes over the world (module docstring).

    Per iteration: ``start()``, ``stop()`` (after the schedule), ``record()`` (once the device is
    synchronised); then ``report(iteration)`` on every rank, a collective every ``interval`` iterations.
    """

    def __init__(self, ctx: ParallelContext, interval: int):
        self.ctx, self.interval = ctx, interval
        self.hosts: list[str] = []   # by global rank, gathered at the first report (a collective)
        self.cuda = ctx.device.type == "cuda"
        # (start, stop) on the compute stream
        self._events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) if self.cuda else None
        self._started = self._stopped = 0.0
        self._seconds, self._iterations = 0.0, 0   # over the iterations since the last report

    def start(self) -> None:
        if self.cuda:
            self._events[0].record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._events[1].record()
        else:
            self._stopped = time.perf_counter()

    def record(self) -> None:
        """Add this iteration's time (on CUDA, once the device has been synchronised)."""
        self._seconds += (self._events[0].elapsed_time(self._events[1]) / 1000.0 if self.cuda
                          else self._stopped - self._started)
        self._iterations += 1

    def report(self, iteration: int) -> None:
        """After iteration ``iteration``, on every rank: every ``interval`` iterations, gather and log (rank 0)."""
        if self.ctx.world_size == 1 or iteration % self.interval != 0:
            return
        if not self.hosts:
            self.hosts = [socket.gethostname()] * self.ctx.world_size
            dist.all_gather_object(self.hosts, socket.gethostname(), group=self.ctx.world_group)
        mean = torch.tensor([self._seconds / self._iterations], dtype=torch.float64, device=self.ctx.device)
        gathered = torch.empty(self.ctx.world_size, dtype=torch.float64, device=self.ctx.device)
        all_gather_single(gathered, mean, group=self.ctx.world_group)
        first = iteration - self._iterations + 1
        self._seconds, self._iterations = 0.0, 0
        if self.ctx.rank != 0:
            return
        times = gathered.tolist()
        slowest = max(range(len(times)), key=times.__getitem__)
        fastest = min(range(len(times)), key=times.__getitem__)
        logger.info(f"stragglers, iterations {first}-{iteration}: slowest rank {slowest} ({self.hosts[slowest]}) "
                    f"{times[slowest]:.3f} s, fastest rank {fastest} ({self.hosts[fastest]}) {times[fastest]:.3f} s "
                    f"of work per iteration before the gradient sync; ratio "
                    f"{times[slowest] / max(times[fastest], 1e-9):.2f}")
