"""Run a function on N gloo processes on this CPU and collect what each rank returns.

Usage in a test: ``results = run_distributed(worker, world_size=4, args=(...))`` where ``worker``
is a module-level function ``worker(rank, world_size, *args)``; an exception on any rank fails
the test with that rank's traceback.

The processes are kept between calls: one pool of ``world_size`` spawned workers per world size,
each running one task after another, every task in a process group of its own (a fresh port,
``init_process_group`` before and ``destroy_process_group`` after). Spawning a process and
importing torch costs seconds, and the suite calls this about sixty times. A task that fails or
times out ends its pool (the other ranks may be stuck in a collective): the processes are killed
and the next call starts new ones. Workers must leave no state behind: a worker that patches a
module restores it before returning.
"""
from __future__ import annotations

import atexit
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_CONTEXT = mp.get_context("spawn")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_loop(rank: int, world_size: int, tasks, results) -> None:
    """Run tasks (port, fn, args) until a None arrives; report (rank, status, payload) for each."""
    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            return
        port, fn, args = task
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        try:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            result = fn(rank, world_size, *args)
            # Plain pickle copies tensor data by value: the parent may read it after this process exits
            # (the queue's own pickler would pass shared-memory handles that die with the process).
            results.put((rank, "ok", pickle.dumps(result)))
        except BaseException:  # report any failure to the parent with its traceback
            results.put((rank, "error", traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class _Pool:
    """``world_size`` spawned workers, each with its own task queue, sharing one result queue."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.results = _CONTEXT.Queue()
        self.tasks = [_CONTEXT.Queue() for _ in range(world_size)]
        # Not daemonic: a worker may start processes of its own (data loader workers).
        self.processes = [_CONTEXT.Process(target=_worker_loop, args=(rank, world_size, self.tasks[rank], self.results))
                          for rank in range(world_size)]
        for process in self.processes:
            process.start()

    def run(self, fn: Callable, args: tuple, timeout: float) -> tuple[dict[int, Any], list[str]]:
        port = free_port()
        for tasks in self.tasks:
            tasks.put((port, fn, args))
        results: dict[int, Any] = {}
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        while len(results) < self.world_size and not errors:
            try:
                rank, status, payload = self.results.get(timeout=1.0)
            except queue_module.Empty:
                # A process that died without reporting (killed, or failed before its loop, e.g. while
                # unpickling ``fn``) would otherwise leave this loop waiting for ever.
                dead = [f"rank {r} exited with code {p.exitcode} without a result"
                        for r, p in enumerate(self.processes) if not p.is_alive() and r not in results]
                if dead or time.monotonic() > deadline:
                    errors.extend(dead or [f"no result from ranks {sorted(set(range(self.world_size)) - set(results))} "
                                           f"within {timeout:.0f} s"])
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
        return results, errors

    def close(self, kill: bool) -> None:
        if not kill:
            for tasks in self.tasks:
                tasks.put(None)
        for process in self.processes:
            process.join(timeout=0 if kill else 5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)


_POOLS: dict[int, _Pool] = {}  # by world size, least recently used first
MAX_POOLS = 3  # idle workers hold memory: keep the pools of the three most recent world sizes


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close(kill=False)
    _POOLS.clear()


def run_distributed(fn: Callable, world_size: int, args: tuple = (), timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results by rank."""
    pool = _POOLS.pop(world_size, None)
    if pool is not None and not all(process.is_alive() for process in pool.processes):
        pool.close(kill=True)
        pool = None
    while pool is None and len(_POOLS) >= MAX_POOLS:
        _POOLS.pop(next(iter(_POOLS))).close(kill=False)
    pool = _POOLS[world_size] = pool or _Pool(world_size)
    results, errors = pool.run(fn, args, timeout)
    if errors:
        # Ranks that did not fail may wait in a collective for the failed one: start afresh next time.
        pool.close(kill=True)
        del _POOLS[world_size]
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
