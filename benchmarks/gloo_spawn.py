"""Run a benchmark's worker on N local CPU processes joined in one gloo process group.

``spawn_gloo(world_size, worker, *args)`` starts ``world_size`` processes (``torch.multiprocessing.spawn``),
each of which joins the default gloo group on 127.0.0.1 (a free port, ``RANK`` and ``WORLD_SIZE`` set as
torchrun sets them), calls ``worker(rank, *args)`` and leaves the group. It returns the workers' return
values in rank order. A worker that raises ends the others and re-raises here with its traceback
(``ProcessRaisedException``), so a failed benchmark never waits forever on its peers. ``worker`` must be
importable from a fresh process: a module-level function of the benchmark script.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(rank: int, world_size: int, port: int, results, worker: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results.put((rank, worker(rank, *args)))
    finally:
        dist.destroy_process_group()


def spawn_gloo(world_size: int, worker: Callable[..., Any], *args: Any) -> list[Any]:
    """``worker(rank, *args)`` on ``world_size`` gloo processes; their return values, rank 0 first (module
    docstring)."""
    results = mp.get_context("spawn").SimpleQueue()
    processes = mp.spawn(_run, args=(world_size, _free_port(), results, worker, args), nprocs=world_size,
                         join=False)
    by_rank: dict[int, Any] = {}

    def drain() -> None:
        while not results.empty():
            rank, value = results.get()
            by_rank[rank] = value

    while not processes.join(timeout=0.5):  # raises as soon as one worker fails
        drain()   # read while they run: a large result must not block its writer on a full pipe
    drain()
    return [by_rank[rank] for rank in range(world_size)]
