"""Data-parallel gradient buffer: fp32 grad accumulation, buckets, overlapped reduce over DP (x CP).

Every trainable parameter ``p`` of a model chunk gets ``p.main_grad``, an fp32 view into one
contiguous buffer. A post-accumulate-grad hook adds ``p.grad`` into ``p.main_grad`` (in fp32,
whatever the model dtype) and frees ``p.grad``, so over ``m`` micro-batches

    main_grad = sum_{j=1..m} dL_j/dp                    (local to this DP rank)

The buffer is laid out in reverse parameter order (the order backward produces grads) and cut
into buckets of about ``bucket_size_mb`` MB. On the final micro-batch (outside ``no_sync()``)
a bucket's collective is launched asynchronously as soon as all its parameters have their grad,
overlapping the rest of backward. The reduce runs over every rank holding the same weights: the
DP x CP group (``ctx.dp_cp_group``; plain DP without context parallelism, docs/design.md section
3.10). With that group's size ``d`` and rank ``r`` the buffer ``g_r``:

- plain optimizer, all-reduce:       g_r <- (1/d) * sum_{k=0..d-1} g_k      (on every rank)
- distributed optimizer, reduce-scatter: each bucket ``B`` (padded so that d | |B|) is split
  into ``d`` equal contiguous shards ``B = [B_0, ..., B_{d-1}]`` and rank ``r`` gets
  ``B_r <- (1/d) * sum_k B_r^(k)`` by ``reduce_scatter_single`` into the shard's own place in the
  buffer (on NCCL and gloo alike); the rest of its buffer is stale and must not be read.

``finish_grad_sync()`` launches whatever is not yet launched, waits for every bucket and then
all-reduces (sums) over the TP group the grads of parameters marked ``sequence_parallel = True``
(norm weights replicated over TP but fed a sequence shard on each TP rank):

    main_grad(p) <- sum_{t in TP} main_grad_t(p)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_aquila.parallel.collectives import reduce_scatter_single
from megatron_aquila.parallel.context import ParallelContext, group_size

FP32_BYTES = 4


@dataclass
class GradBucket:
    """A contiguous slice ``[start, end)`` of the grad buffer reduced by one collective."""

    index: int
    params: list[nn.Parameter]
    start: int                   # offset in the buffer (elements)
    end: int                     # exclusive; end - start is a multiple of dp size under ZeRO-1
    data: torch.Tensor           # fp32 [end - start] view of the buffer
    pending: set[int] = field(default_factory=set)  # ids of params whose final grad has not arrived
    launched: bool = False
    handle: Optional[dist.Work] = None

    @property
    def numel(self) -> int:
        return self.end - self.start

    def shard_range(self, dp_rank: int, dp_size: int) -> tuple[int, int]:
        """Buffer offsets ``[start, end)`` of the 1/dp shard that DP rank ``dp_rank`` owns."""
        size = self.numel // dp_size
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size


class DataParallelGradBuffer:
    """fp32 grad buffer of one model chunk with bucketed, optionally overlapped DP reduction.

    Args:
        module: the model chunk; its ``requires_grad`` parameters get ``main_grad``.
        ctx: parallel context (``dp_cp_group`` for the reduce, ``tp_group`` for sequence-parallel grads).
        bucket_size_mb: target bucket size in MB of fp32 grads (a bucket closes once it reaches it).
        overlap_grad_reduce: launch each bucket's collective during backward; if False every
            bucket is reduced in ``finish_grad_sync``.
        distributed_optimizer: reduce-scatter instead of all-reduce, and pad buckets to a multiple
            of the DP x CP size.
    """

    def __init__(self, module: nn.Module, ctx: ParallelContext, bucket_size_mb: float = 40.0,
                 overlap_grad_reduce: bool = True, distributed_optimizer: bool = False):
        if bucket_size_mb <= 0:
            raise ValueError(f"grad bucket size {bucket_size_mb} MB must be > 0 (parallel.grad_bucket_size_mb)")
        self.module, self.ctx = module, ctx
        self.overlap_grad_reduce = overlap_grad_reduce
        self.distributed_optimizer = distributed_optimizer
        self.dp_size, self.dp_rank = ctx.dp_cp_size, ctx.dp_cp_rank  # the grad-averaging group (DP x CP)
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{type(module).__name__} has no trainable parameters: nothing to put in a grad buffer")
        self.param_names: dict[int, str] = {id(p): name for name, p in named}
        self.params: list[nn.Parameter] = [p for _, p in named]
        self.param_ranges: dict[int, tuple[int, int]] = {}   # id(param) -> [start, end) in the buffer
        bucket_numel = max(1, int(bucket_size_mb * 2 ** 20 / FP32_BYTES))
        pad_to = self.dp_size if distributed_optimizer else 1

        layout: list[tuple[list[nn.Parameter], int, int]] = []   # (params, start, padded end)
        offset, bucket_start, bucket_params = 0, 0, []
        for param in reversed(self.params):   # backward produces the last parameters' grads first
            self.param_ranges[id(param)] = (offset, offset + param.numel())
            offset += param.numel()
            bucket_params.append(param)
            if offset - bucket_start >= bucket_numel:
                offset = bucket_start + pad_to * math.ceil((offset - bucket_start) / pad_to)
                layout.append((bucket_params, bucket_start, offset))
                bucket_start, bucket_params = offset, []
        if bucket_params:
            offset = bucket_start + pad_to * math.ceil((offset - bucket_start) / pad_to)
            layout.append((bucket_params, bucket_start, offset))

        device = self.params[0].device
        self.buffer = torch.zeros(offset, dtype=torch.float32, device=device)  # [total padded numel]
        self.buckets: list[GradBucket] = []
        self._bucket_of: dict[int, GradBucket] = {}
        for index, (params, start, end) in enumerate(layout):
            bucket = GradBucket(index, params, start, end, self.buffer[start:end])
            self.buckets.append(bucket)
            for param in params:
                self._bucket_of[id(param)] = bucket
        for param in self.params:
            start, end = self.param_ranges[id(param)]
            param.main_grad = self.buffer[start:end].view(param.shape)
        self._sequence_parallel_params = [p for p in self.params if getattr(p, "sequence_parallel", False)]
        self._sync_enabled = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate) for p in self.params]
        self._reset_buckets()

    # ------------------------------------------------------------------ backward side
    def _accumulate(self, param: nn.Parameter) -> None:
        """Hook after autograd accumulated ``param.grad``: move it into fp32 ``main_grad``."""
        param.main_grad.add_(param.grad)
        param.grad = None
        if not (self._sync_enabled and self.overlap_grad_reduce):
            return
        bucket = self._bucket_of[id(param)]
        if id(param) not in bucket.pending:
            raise RuntimeError(
                f"parameter {self.param_names[id(param)]} received a second final-micro-batch grad before "
                "finish_grad_sync(); run non-final micro-batches inside no_sync() and call finish_grad_sync() "
                "(and zero_grad()) once per step")
        bucket.pending.discard(id(param))
        if not bucket.pending:
            self._launch(bucket)

    def _launch(self, bucket: GradBucket) -> None:
        """Start the asynchronous average over DP of one bucket (see the module docstring)."""
        bucket.launched = True
        if self.dp_size == 1:
            return
        bucket.data.mul_(1.0 / self.dp_size)
        if self.distributed_optimizer:   # in place: the output is this rank's shard of the bucket's input
            start, end = bucket.shard_range(self.dp_rank, self.dp_size)
            shard = self.buffer[start:end]   # [bucket / d]
            bucket.handle = reduce_scatter_single(shard, bucket.data, op=dist.ReduceOp.SUM,
                                                       group=self.ctx.dp_cp_group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(bucket.data, op=dist.ReduceOp.SUM, group=self.ctx.dp_cp_group,
                                            async_op=True)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate grads locally without any DP communication (all but the last micro-batch)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    # ------------------------------------------------------------------ step side
    def finish_grad_sync(self) -> None:
        """Reduce every bucket not yet launched, wait for all, then sum sequence-parallel grads over TP."""
        if not self._sync_enabled:
            raise RuntimeError("finish_grad_sync() called inside no_sync(); call it after the last micro-batch")
        for bucket in self.buckets:   # same bucket order on every rank, so collectives match up
            if not bucket.launched:
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
        self._reset_buckets()
        if self._sequence_parallel_params and group_size(self.ctx.tp_group) > 1:
            grads = [p.main_grad for p in self._sequence_parallel_params]
            flat = torch.cat([g.reshape(-1) for g in grads])   # [sum of numels]
            dist.all_reduce(flat, group=self.ctx.tp_group)
            for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(piece.view_as(grad))

    def zero_grad(self) -> None:
        """Zero the fp32 buffer (every ``main_grad``) and forget any partial bucket state."""
        self.buffer.zero_()
        for param in self.params:
            param.grad = None
        self._reset_buckets()

    def _reset_buckets(self) -> None:
        for bucket in self.buckets:
            bucket.pending = {id(p) for p in bucket.params}
            bucket.launched, bucket.handle = False, None

    # ------------------------------------------------------------------ layout queries
    def name_of(self, param: nn.Parameter) -> str:
        return self.param_names[id(param)]

    def range_of(self, param: nn.Parameter) -> tuple[int, int]:
        """``[start, end)`` of ``param``'s flattened grad inside the buffer."""
        return self.param_ranges[id(param)]

    def owned_pieces(self) -> list[tuple[nn.Parameter, int, int]]:
        """The pieces of parameters inside this DP rank's shards: ``(param, lo, hi)`` with
        ``[lo, hi)`` a range of the flattened parameter (empty pieces left out).

        The shards of all DP ranks partition every parameter exactly (padding belongs to none).
        """
        pieces = []
        for bucket in self.buckets:
            shard_start, shard_end = bucket.shard_range(self.dp_rank, self.dp_size)
            for param in bucket.params:
                start, end = self.param_ranges[id(param)]
                lo, hi = max(start, shard_start), min(end, shard_end)
                if lo < hi:
                    pieces.append((param, lo - start, hi - start))
        return pieces
