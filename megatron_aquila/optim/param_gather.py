"""ZeRO-1's parameter all-gather, bucket by bucket, optionally overlapped with the next forward.

Storage. Each grad bucket ``B`` of a grad buffer (``parallel/data_parallel.py``: reverse parameter
order, padded so that d | |B| for the DP x CP size d) gets one contiguous tensor ``P_B`` [|B|] in
its parameters' dtype, laid out like the bucket's grads (same offsets, same padding), and every
trainable parameter of the bucket becomes a view into it. DP x CP rank r owns the shard ``P_B_r``
(the grads it reduce-scatters, the masters it steps). After the optimizer has written its updated
pieces, cast to the model dtype, into its own shard, one in-place ``all_gather_single`` per bucket
(rank r's input is the view ``P_B_r`` of the output) gives every rank the whole bucket:

    P_B = [P_B_0; P_B_1; ...; P_B_{d-1}]

It writes the parameters themselves: no staging copy, so every bucket's gather can be in flight at
once without a second copy of the model. Frozen parameters (LoRA's base weights) are in no bucket
and never gathered.

Launch order (``start``): forward order. Chunk 0 (the first virtual stage's forward runs first),
and within a chunk its LAST bucket first: the buffer is laid out in backward order, so the last
bucket holds the first layers (the embedding) and the first bucket the output layer. On NCCL the
gathers run in launch order on one stream, so the bucket the forward needs first is done first.

Overlap (``parallel.overlap_param_gather``). ``start`` returns at once; a forward pre-hook on each
forward unit of a chunk waits, before the unit runs, for the gathers of the buckets holding its
trainable parameters. The units are the chunk's children with ``ModuleList``/``ModuleDict``
containers opened (embedding, each decoder block, final norm, output layer), and the chunk itself
for parameters no child owns; a bucket is therefore waited for by the first unit, in forward order,
that uses one of its parameters, and the forward of the early units overlaps the gathers of the
later buckets. A wait happens once per step: a later micro-batch, a recomputed forward
(``training.recompute``) or a forward under ``no_grad`` (evaluation) finds nothing pending and
triggers nothing. A unit compiled with ``nn.Module.compile`` (``model.compile``) runs its hooks
inside the compiled call: its hook is kept out of the graph (``torch.compiler.disable``: one graph
break at the unit's entry, no guard on the pending state).

Whatever reads parameters outside a forward (checkpoint save, the end of training, the next step's
masters and shard writes, the dry run's end) calls ``finish`` first. ``blocked_seconds`` adds up the
host time spent waiting for gathers (on NCCL ``wait`` only orders the current stream after the
gather, so it stays near 0 there: the stall is then on the device).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_aquila.parallel.collectives import all_gather_single
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer, GradBucket


@dataclass(eq=False)
class BucketParams:
    """One grad bucket's parameter storage and the state of its all-gather."""

    storage: torch.Tensor            # [bucket numel] in the parameters' dtype; the parameters are views of it
    shard: torch.Tensor              # [bucket numel / d] view: this rank's part, the gather's input
    handle: Optional[dist.Work] = None   # the gather in flight, None once waited for


def _bucket_storage(buffer: DataParallelGradBuffer, bucket: GradBucket) -> torch.Tensor:
    """``P_B`` [|B|]: a copy of the bucket's parameters at their grad offsets; each parameter becomes a view of it."""
    dtypes = {p.dtype for p in bucket.params}
    if len(dtypes) != 1:
        raise TypeError(f"grad bucket {bucket.index} of {type(buffer.module).__name__} mixes parameter dtypes "
                        f"{sorted(map(str, dtypes))}; the distributed optimizer gathers one dtype per bucket: keep "
                        "a model chunk's trainable parameters in one dtype (precision.dtype)")
    storage = torch.zeros(bucket.numel, dtype=dtypes.pop(), device=bucket.data.device)  # [bucket]
    with torch.no_grad():
        for param in bucket.params:
            start, end = buffer.range_of(param)
            view = storage[start - bucket.start:end - bucket.start]  # [numel of param]
            view.copy_(param.detach().reshape(-1))
            param.data = view.view(param.shape)
    return storage


def forward_units(chunk: nn.Module) -> Iterator[nn.Module]:
    """The modules a chunk's forward calls in turn: its children, ``ModuleList``/``ModuleDict`` opened."""
    for child in chunk.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from forward_units(child)
        else:
            yield child


class ParamGather:
    """The per-bucket all-gather of ZeRO-1's updated parameters (module docstring).

    Args:
        grad_buffers: one per model chunk, in chunk order, built with ``distributed_optimizer=True``.
        ctx: parallel context; the gather runs over ``ctx.dp_cp_group`` (size > 1).
        overlap: leave the gathers in flight after ``start`` and wait for each in the forward pre-hook
            of the first unit that needs it; otherwise ``start`` waits for all of them.
    """

    def __init__(self, grad_buffers: list[DataParallelGradBuffer], ctx: ParallelContext, overlap: bool):
        if ctx.dp_cp_size < 2:
            raise ValueError(f"ParamGather needs a DP x CP group of 2 or more ranks, got {ctx.dp_cp_size}: with one "
                             "rank the optimizer writes the whole parameters itself")
        self.group, self.overlap = ctx.dp_cp_group, overlap
        self.buckets: list[BucketParams] = []   # forward (launch) order
        bucket_of: dict[int, BucketParams] = {}   # id(param) -> its bucket
        for buffer in grad_buffers:
            for bucket in reversed(buffer.buckets):
                storage = _bucket_storage(buffer, bucket)
                start, end = bucket.shard_range(buffer.dp_rank, buffer.dp_size)
                entry = BucketParams(storage, storage[start - bucket.start:end - bucket.start])
                self.buckets.append(entry)
                bucket_of.update({id(param): entry for param in bucket.params})
        self.blocked_seconds = 0.0   # host time spent in ``wait`` of a gather, since construction
        self._pending = 0            # gathers launched and not yet waited for
        if overlap:
            for buffer in grad_buffers:
                self._register_hooks(buffer.module, bucket_of)

    def _register_hooks(self, chunk: nn.Module, bucket_of: dict[int, BucketParams]) -> None:
        units = list(forward_units(chunk))
        in_units = {id(p) for unit in units for p in unit.parameters()}
        own = [p for p in chunk.parameters() if id(p) not in in_units]   # held by the chunk, no child
        launch_order = {id(bucket): index for index, bucket in enumerate(self.buckets)}
        for module, params in [(chunk, own)] + [(unit, list(unit.parameters())) for unit in units]:
            needed = {id(bucket_of[id(p)]): bucket_of[id(p)] for p in params if id(p) in bucket_of}
            if not needed:   # no trainable parameter (e.g. LoRA's frozen output layer)
                continue
            hook = self._waiting_hook(sorted(needed.values(), key=lambda b: launch_order[id(b)]))
            if getattr(module, "_compiled_call_impl", None) is not None:   # nn.Module.compile: hooks run compiled
                hook = torch.compiler.disable(hook)
            module.register_forward_pre_hook(hook)

    def _waiting_hook(self, needed: list[BucketParams]):
        def wait_for_parameters(module: nn.Module, args) -> None:
            if self._pending:
                self._wait(needed)
        return wait_for_parameters

    # ------------------------------------------------------------------ the gather
    def start(self) -> None:
        """Launch every bucket's all-gather (forward order); wait for all unless overlapping.

        The caller has written this rank's updated pieces into each bucket's shard, after ``finish``.
        """
        if self._pending:
            raise RuntimeError(f"{self._pending} parameter gathers of the previous step are still in flight; "
                               "call finish() before writing the shards and starting new ones")
        for bucket in self.buckets:
            bucket.handle = all_gather_single(bucket.storage, bucket.shard, group=self.group, async_op=True)
        self._pending = len(self.buckets)
        if not self.overlap:
            self.finish()

    def finish(self) -> None:
        """Wait for every gather still in flight: the parameters are then whole and current."""
        if self._pending:
            self._wait(self.buckets)

    @property
    def pending(self) -> int:
        """Gathers launched and not yet waited for."""
        return self._pending

    def _wait(self, buckets: list[BucketParams]) -> None:
        for bucket in buckets:
            if bucket.handle is not None:
                tick = time.perf_counter()
                bucket.handle.wait()
                self.blocked_seconds += time.perf_counter() - tick
                bucket.handle = None
                self._pending -= 1
