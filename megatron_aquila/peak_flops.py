"""The peak TFLOP/s that MFU divides by (docs/design.md section 6), one figure shared by every rank.

Where it comes from, first match wins:
1. ``logging.peak_tflops``, per device.
2. On a GPU, the dense bf16 tensor-core peak of its model. The name from
   ``torch.cuda.get_device_name`` is split into tokens on spaces and hyphens and every token must be
   understood: the vendor (NVIDIA), memory (80GB, 144G, HBM3, HBM3e), the form factor (PCIe, NVL,
   SXM/SXM4/SXM5; a name with none is an SXM-type module) and exactly one chip (H100, A800, ...).
       "NVIDIA H100 80GB HBM3" -> H100 SXM      "NVIDIA H100 PCIe"   -> H100 PCIE
       "NVIDIA A100-SXM4-80GB" -> A100 SXM      "NVIDIA GH200 480GB" -> GH200 SXM
   Chips match whole tokens, so "H200" is not "H20". A name with any other token (another chip,
   "MIG 1g.10gb", a GeForce card) or a (chip, form) pair missing from the table has no peak: the
   log line then leaves MFU out instead of reporting it against a wrong peak.
3. On a CPU, rank 0 measures the node's fp32 matmul rate with every core while the other ranks
   wait at a barrier and then in the broadcast of the result, so nothing of this job competes with
   the measurement. Best of several repeats; repeats that disagree by more than
   ``DISAGREEMENT_TOLERANCE`` (best / worst) mean something else was running, and a warning says so.
   Each of the node's ``LOCAL_WORLD_SIZE`` processes is credited an equal share; every node is
   assumed to be like rank 0's.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_aquila.config import Config
from megatron_aquila.parallel.context import ParallelContext

logger = logging.getLogger("megatron_aquila")


@dataclass(frozen=True)
class GpuModel:
    """A GPU model as its device name tells it: the chip and the form factor."""

    chip: str  # e.g. "H100"
    form: str  # "SXM" (also names that state no form factor), "PCIE" or "NVL"


# Dense (no sparsity) bf16 tensor-core TFLOP/s per device, from NVIDIA's data sheets.
DENSE_BF16_PEAK_TFLOPS: dict[GpuModel, float] = {
    GpuModel("A100", "SXM"): 312.0, GpuModel("A100", "PCIE"): 312.0,
    GpuModel("A800", "SXM"): 312.0, GpuModel("A800", "PCIE"): 312.0,
    GpuModel("H100", "SXM"): 989.0, GpuModel("H100", "NVL"): 835.0, GpuModel("H100", "PCIE"): 756.0,
    GpuModel("H800", "SXM"): 989.0, GpuModel("H20", "SXM"): 148.0,
    GpuModel("H200", "SXM"): 989.0, GpuModel("GH200", "SXM"): 989.0,
    GpuModel("B200", "SXM"): 2250.0,
}

_IGNORED_TOKENS = re.compile(r"NVIDIA|\d+GB?|HBM\d+E?")  # vendor, memory size, memory kind
_FORM_TOKENS = {"PCIE": "PCIE", "NVL": "NVL"}
_SXM_TOKEN = re.compile(r"SXM\d*")

# Best / worst of the CPU repeats above which the measurement is reported as disturbed.
DISAGREEMENT_TOLERANCE = 1.25


def parse_gpu_name(name: str) -> Optional[GpuModel]:
    """The GPU model named by ``torch.cuda.get_device_name``; None if any token is not understood."""
    chips, forms = [], []
    for token in re.split(r"[\s\-]+", name.strip().upper()):
        if not token or _IGNORED_TOKENS.fullmatch(token):
            continue
        if token in _FORM_TOKENS:
            forms.append(_FORM_TOKENS[token])
        elif _SXM_TOKEN.fullmatch(token):
            forms.append("SXM")
        else:
            chips.append(token)
    if len(chips) != 1 or len(forms) > 1:
        return None
    return GpuModel(chips[0], forms[0] if forms else "SXM")


def gpu_peak_tflops(name: str) -> Optional[float]:
    """Dense bf16 peak of the GPU called ``name`` (as ``torch.cuda.get_device_name`` spells it); None if unknown."""
    model = parse_gpu_name(name)
    return DENSE_BF16_PEAK_TFLOPS.get(model) if model is not None else None


def best_of_repeats(measure_once: Callable[[], float], repeats: int,
                    tolerance: float = DISAGREEMENT_TOLERANCE) -> float:
    """The largest of ``repeats`` calls of ``measure_once`` (TFLOP/s); warns if best / worst > ``tolerance``."""
    rates = [measure_once() for _ in range(repeats)]
    best, worst = max(rates), min(rates)
    if best > tolerance * worst:
        logger.warning(
            f"CPU peak measurements disagree: best {best * 1e3:.1f} GFLOP/s, worst {worst * 1e3:.1f} GFLOP/s "
            f"(ratio {best / worst:.2f} > {tolerance}) over {repeats} repeats; something else was using the "
            "cores, so the peak may be low and MFU high; keep the machine idle at start-up or set "
            "logging.peak_tflops")
    return best


def measure_cpu_matmul_tflops(size: int = 1536, repeats: int = 5, threads: Optional[int] = None) -> float:
    """Best-of-``repeats`` fp32 matmul rate of this machine in TFLOP/s (2 n^3 FLOPs per product).

    Uses ``threads`` (default: every core) and restores torch's thread count afterwards. At the
    default size one product is 7.2 GFLOP: about 0.1 s at 60 GFLOP/s, 0.6 s in all with the warm-up.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)  # [n, n] each
        torch.mm(a, b)  # warm up the kernels and the thread pool

        def one_product() -> float:
            start = time.perf_counter()
            torch.mm(a, b)
            return 2 * size ** 3 / (time.perf_counter() - start) / 1e12

        return best_of_repeats(one_product, repeats)
    finally:
        torch.set_num_threads(previous)


def _cpu_peak_per_process(ctx: ParallelContext, measure_machine: Callable[[], float],
                          processes_per_node: int) -> float:
    """Rank 0 measures the machine with the other ranks idle; every rank receives its share."""
    value = torch.zeros(1, dtype=torch.float64)
    if ctx.world_size > 1:
        dist.barrier(group=ctx.world_group)  # every rank has finished building and now only waits
    if ctx.rank == 0:
        value[0] = measure_machine() / processes_per_node
    if ctx.world_size > 1:
        dist.broadcast(value, src=0, group=ctx.world_group)
    return float(value.item())


def shared_peak_tflops(config: Config, ctx: ParallelContext,
                       measure_machine: Callable[[], float] = measure_cpu_matmul_tflops) -> Optional[float]:
    """Peak TFLOP/s per device for MFU, or None when unknown (MFU is then left out of the log line).

    On a CPU without ``logging.peak_tflops`` this is collective over ``ctx.world_group``: every rank
    must call it. ``measure_machine`` returns the whole machine's TFLOP/s and runs on rank 0 only.
    """
    if config.logging.peak_tflops is not None:
        peak, source = config.logging.peak_tflops, "logging.peak_tflops"
    elif ctx.device.type == "cuda":
        name = torch.cuda.get_device_name(ctx.device)
        peak, source = gpu_peak_tflops(name), f"dense bf16 peak of {name}"
        if peak is None:
            if ctx.rank == 0:
                logger.warning(f"MFU left out of the log line: no dense bf16 peak known for GPU {name!r} "
                               "(megatron_aquila/peak_flops.py); set logging.peak_tflops=<TFLOP/s per device>")
            return None
    else:
        processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        peak = _cpu_peak_per_process(ctx, measure_machine, processes_per_node)
        source = (f"fp32 matmul peak of this CPU measured by rank 0, {peak * processes_per_node * 1e3:.1f} "
                  f"GFLOP/s shared by {processes_per_node} process(es)")
    if ctx.rank == 0:
        logger.info(f"MFU peak: {peak:.4f} TFLOP/s per device ({source})")
    return peak
