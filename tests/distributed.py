"""Run a function on N gloo processes on this CPU and collect what each rank returns.

Usage in a test: ``results = run_distributed(worker, world_size=4, args=(...))`` where ``worker``
is a module-level function ``worker(rank, world_size, *args)``; an exception on any rank fails
the test with that rank's traceback.
"""
from __future__ import annotations

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor data by value: the parent may read it after this process exits
        # (the queue's own pickler would pass shared-memory handles that die with the process).
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report any failure to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, args: tuple = (), timeout: float = 300.0) -> list[Any]:
    """Spawn ``world_size`` processes running ``fn(rank, world_size, *args)``; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    processes = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for process in processes:
        process.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, status, payload = queue.get(timeout=1.0)
        except queue_module.Empty:
            # A process that died without reporting (killed, or failed before _entry's try, e.g. while
            # unpickling ``fn``) would otherwise leave this loop waiting for ever.
            dead = [f"rank {r} exited with code {p.exitcode} without a result" for r, p in enumerate(processes)
                    if p.exitcode not in (None, 0) and r not in results]
            if dead or time.monotonic() > deadline:
                errors.extend(dead or [f"no result from ranks {sorted(set(range(world_size)) - set(results))} "
                                       f"within {timeout:.0f} s"])
            continue
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    for process in processes:
        process.join(timeout=5 if errors else timeout)
        if process.is_alive():
            process.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
