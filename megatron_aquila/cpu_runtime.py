"""Process settings for training on CPUs (the gloo development path).

Two things decide CPU training speed besides the kernels: threads and the allocator.
- Threads: each of a node's processes gets an equal share of the cores, so N processes on C
  cores never oversubscribe.
- Allocator: glibc returns large freed blocks (activations, logits, grads) to the OS and every
  step page-faults them back in; on this project's benchmark shape that halves throughput.
  ``keep_freed_memory`` raises glibc's trim and mmap thresholds with ``mallopt`` so freed memory
  is reused. It is a no-op where glibc is absent.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

logger = logging.getLogger("megatron_aquila")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound on 64-bit (HEAP_MAX_SIZE / 2)


def share_cpu_threads() -> int:
    """Set torch's intra-op threads to this process's share of the node's cores; return it."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    return threads


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of unmapping it; True if applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        trim = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 ** 31 - 1))
        mmap = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD_MAX))
    except (OSError, AttributeError):
        return False
    return bool(trim and mmap)
