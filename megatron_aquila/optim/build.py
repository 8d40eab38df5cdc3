"""Choose and build the optimizer of a run: plain (fp32 masters of whole parameters) or ZeRO-1
(masters and Adam state sharded over data parallel), with the loss scaler its precision needs."""
from __future__ import annotations

from typing import Optional

from torch import nn

from megatron_aquila.config import OptimizerConfig, PrecisionConfig
from megatron_aquila.optim.distributed_optimizer import DistributedOptimizer
from megatron_aquila.optim.grad_scaler import DynamicGradScaler
from megatron_aquila.optim.optimizer import GradScaler, MixedPrecisionOptimizer
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer


def make_grad_scaler(precision: PrecisionConfig) -> Optional[DynamicGradScaler]:
    """The dynamic scaler for fp16; None (scale 1) for bf16 and fp32."""
    if precision.dtype != "fp16":
        return None
    return DynamicGradScaler(precision.initial_loss_scale, precision.min_loss_scale,
                             precision.loss_scale_window, precision.hysteresis)


def build_optimizer(model_chunks: list[nn.Module], grad_buffers: list[DataParallelGradBuffer],
                    config: OptimizerConfig, precision: PrecisionConfig, ctx: ParallelContext,
                    distributed: bool, grad_scaler: Optional[GradScaler] = None,
                    fused: Optional[bool] = None, overlap_param_gather: bool = False) -> MixedPrecisionOptimizer:
    """The plain or ZeRO-1 optimizer over the chunks' grad buffers (one buffer per chunk, same order).

    ``grad_scaler`` overrides the default (dynamic for fp16, none for bf16/fp32); ``fused`` the AdamW
    kernel's default (``MixedPrecisionOptimizer``). ``overlap_param_gather`` (``parallel.overlap_param_gather``)
    applies to ZeRO-1 only: its parameter all-gathers are left in flight after a step and waited for by the
    next forward (``optim/param_gather.py``); the plain optimizer gathers nothing and ignores it.
    """
    if len(model_chunks) != len(grad_buffers) or any(b.module is not m for m, b in zip(model_chunks, grad_buffers)):
        raise ValueError(f"need one grad buffer per model chunk in the same order: got {len(model_chunks)} chunks "
                         f"and {len(grad_buffers)} buffers")
    if distributed and not all(b.distributed_optimizer for b in grad_buffers):
        raise ValueError("the distributed optimizer needs grad buffers built with distributed_optimizer=True "
                         "(padded buckets, reduce-scatter)")
    scaler = grad_scaler if grad_scaler is not None else make_grad_scaler(precision)
    if distributed:
        return DistributedOptimizer(grad_buffers, config, ctx, scaler, fused, overlap_param_gather)
    return MixedPrecisionOptimizer(grad_buffers, config, ctx, scaler, fused)
