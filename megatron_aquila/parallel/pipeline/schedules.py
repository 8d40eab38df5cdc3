"""Forward-backward schedules over the micro-batches of one iteration.

Every schedule runs ``num_microbatches`` micro-batches through the model chunks and returns, per
micro-batch, the pair [S_j, n_j] (detached fp32 [2], on the last pipeline stage; empty elsewhere):
S_j = sum of the token losses whose loss mask is 1, n_j = the number of such tokens. What is
back-propagated depends on ``loss_average`` (``training.loss_average``). With ``m`` micro-batches
per DP rank, ``d`` DP ranks, loss scale ``K``, and the DP grad reduction averaging over the ``d``
ranks (``parallel/data_parallel.py``: g <- (1/d) sum_r g_r):

- per_microbatch: rank r back-propagates K x (S_j / max(n_j, 1)) / m per micro-batch, so the
  reduced grad is the gradient of (1/(d m)) sum_{r,j} S_{r,j} / n_{r,j}: the mean over all
  micro-batches of their masked-mean losses (exactly one large batch when every n_j is equal).
- per_token (Megatron's calculate_per_token_loss): with N = sum_{r,j} n_{r,j} the loss tokens of
  the whole iteration over DP, rank r back-propagates K x S_j x d / N per micro-batch. Its grad
  buffer then holds g_r = (d / N) sum_j grad S_{r,j}, and the DP average gives
  (1/d) sum_r g_r = (1/N) sum_{r,j} grad S_{r,j}: the gradient of the per-token mean
  L = sum_{r,j} S_{r,j} / N, whatever the masks. The factor d cancels the DP average, which this
  schedule cannot change. N must be known before the first backward, but only where the loss
  is: the last stage draws all ``m`` micro-batches at the start of the iteration (every rank's
  stream carries loss_mask) and all-reduces its local count over DP (one scalar on ctx.device);
  the other stages draw lazily as before. (Megatron instead back-propagates S_j, sums grads over
  DP and rescales them by 1/N afterwards; that would need N on every stage and a rescale of the
  grad buffers outside the schedule, and un-normalised sums overflow fp16 sooner.)

Context parallelism (``cp`` ranks each holding S / cp tokens of every sample,
``parallel/context_parallel.py``): a micro-batch's pair is the sum of its CP ranks' local pairs,
so the reported [S_j, n_j] is all-reduced over the CP group (two floats per micro-batch, on the
last stage). The weights are replicated over DP x CP and the grad reduction averages over those
``d cp`` ranks, while the total loss is the sum of what the CP ranks back-propagate (the K/V
all-gather's backward routes each rank's share to the others). So rank r back-propagates its local
sum S_{r,j}^local times cp / n_j (per_microbatch; n_j the micro-batch's CP-summed count) or times
d cp / N (per_token; N summed over DP x CP): the factor cp cancels the CP part of the average and
the gradient is that of the same loss as without context parallelism.

The trainer reduces the pairs to the reported loss the same way (``Trainer._reduce_loss``); see
docs/design.md section 3.4.

Pipeline schedules (Narayanan et al. 2021), ``p`` stages, ``m`` micro-batches, ``v`` chunks per
stage, forward F and backward B taking about t_f and t_b:

- 1F1B: stage r runs ``w = min(p - r - 1, m)`` warmup forwards, then alternates one forward and
  one backward ``m - w`` times, then ``w`` cooldown backwards. At most ``p - r`` micro-batches'
  activations are alive on stage r. Bubble: (p - 1) / (m + p - 1) of the iteration.
- Interleaved 1F1B: stage r holds chunks c = 0..v-1 (layers of part c x p + r, partition.py).
  Virtual micro-batch k (0 <= k < v m) runs chunk ((k mod p v) div p) on micro-batch
  (k div p v) x p + (k mod p); backwards visit the chunks in reverse. Warmup is
  (p - r - 1) x 2 + (v - 1) x p forwards (all of them when m == p). Needs m % p == 0.
  Bubble: (p - 1) / (v m + p - 1).

Memory: once a stage has sent a chunk's output to the next stage, the output's storage is freed
(``deallocate_output``) and only its autograd node is kept; backward then starts from that node
with the received gradient (``backward_from``), which skips autograd's shape check against the
freed storage. Only the first stage reads tokens, only the last reads labels and the loss mask,
and every chunk reads position_ids (rotary) and, with packed SFT data, ``documents`` (the host form of
the whole rows' documents, found by the loader: model/packed_attention.py, "Host syncs"); every rank
draws all ``m`` micro-batches from the iterator so that data streams stay aligned. The data-parallel
grad reduce runs only in the backward of each chunk's last micro-batch (``no_sync`` of that chunk's
grad buffer otherwise).
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from megatron_aquila.model.packed_attention import PackedDocuments
from megatron_aquila.parallel.context import ParallelContext, group_size
from megatron_aquila.parallel.pipeline.p2p import PipelineP2P

# tokens, labels, loss_mask, position_ids: each [b, s]; packed SFT adds "documents" (PackedDocuments of [b, S])
Microbatch = dict[str, Union[torch.Tensor, PackedDocuments]]
LOSS_AVERAGES = ("per_microbatch", "per_token")


@dataclass
class ScheduleSpec:
    """Everything a schedule needs besides the micro-batches."""

    model_chunks: list[nn.Module]
    grad_buffers: list            # one DataParallelGradBuffer per chunk (no_sync / finish_grad_sync)
    ctx: ParallelContext
    num_microbatches: int
    micro_batch_size: int
    seq_length: int               # this rank's tokens per sample: model.seq_length / context_parallel
    hidden_size: int
    sequence_parallel: bool
    activation_dtype: torch.dtype
    loss_scale: float = 1.0
    forward_only: bool = False
    loss_average: str = "per_microbatch"  # per_microbatch | per_token (module docstring)
    timeline: Optional[list] = None  # if a list, pipeline schedules append (kind "F"|"B", chunk,
    #                                  micro-batch, start s, end s) per step (benchmarks)


def loss_terms(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, n) of one micro-batch: the sum of the per-token losses [b, s] whose mask is 1, and their count."""
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum(), mask.sum()


def global_loss_tokens(batches: list[Microbatch], ctx: ParallelContext) -> float:
    """N = sum over DP x CP ranks and the given micro-batches of the loss-mask sums (at least 1).

    All-reduce SUM over ``ctx.dp_cp_group`` on ``ctx.device``, in float64 so that counts stay exact
    beyond 2^24 tokens per iteration.
    """
    local = torch.stack([batch["loss_mask"].sum(dtype=torch.float64) for batch in batches]).sum()
    local = local.to(ctx.device).reshape(1)
    if ctx.dp_cp_size > 1:
        dist.all_reduce(local, group=ctx.dp_cp_group)
    return max(float(local.item()), 1.0)


class _Objective:
    """What one micro-batch back-propagates, and the [S, n] pair it reports (module docstring)."""

    def __init__(self, spec: ScheduleSpec, feed: "_MicrobatchFeed", holds_loss: bool):
        if spec.loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average {spec.loss_average!r} must be one of {', '.join(LOSS_AVERAGES)} "
                             "(training.loss_average)")
        self.spec = spec
        self.per_token_factor: Optional[float] = None  # K x d cp / N (per_token training on the loss stage)
        if spec.loss_average == "per_token" and holds_loss and not spec.forward_only:
            batches = [feed.get(index) for index in range(spec.num_microbatches)]
            self.per_token_factor = spec.loss_scale * spec.ctx.dp_cp_size / global_loss_tokens(batches, spec.ctx)

    def __call__(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, detached [S, n] fp32 [2]) of one micro-batch."""
        loss_sum, count = loss_terms(per_token_loss, loss_mask)
        reported = torch.stack([loss_sum.detach(), count]).float()
        ctx = self.spec.ctx
        if ctx.cp_size > 1:  # the micro-batch's [S, n] over all its CP ranks (module docstring)
            dist.all_reduce(reported, group=ctx.cp_group)
            count = reported[1]
        if self.per_token_factor is not None:
            return loss_sum * self.per_token_factor, reported
        mean = loss_sum * ctx.cp_size / count.clamp(min=1.0)
        return mean * (self.spec.loss_scale / self.spec.num_microbatches), reported


def run_forward(model: nn.Module, batch: Optional[Microbatch], hidden_states: Optional[torch.Tensor],
                is_last: bool) -> torch.Tensor:
    """One chunk's forward: the per-token loss [b, s] (fp32) on the last stage, else hidden states."""
    tokens = batch["tokens"] if batch is not None else None
    positions = batch["position_ids"] if batch is not None else None
    labels = batch["labels"] if (batch is not None and is_last) else None
    documents = batch.get("documents") if batch is not None else None
    return model(tokens, positions, labels, hidden_states, documents=documents)


def _sync_context(spec: ScheduleSpec, final: bool) -> contextlib.AbstractContextManager:
    """Suppress the data-parallel grad reduce on every micro-batch but the last."""
    if final or spec.forward_only:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for buffer in spec.grad_buffers:
        if buffer is not None:
            stack.enter_context(buffer.no_sync())
    return stack


def forward_backward_no_pipelining(spec: ScheduleSpec, microbatches: Iterator[Microbatch]) -> list[torch.Tensor]:
    """Gradient accumulation on one stage: forward and backward each micro-batch in turn."""
    assert len(spec.model_chunks) == 1, f"no-pipeline schedule takes one model chunk, got {len(spec.model_chunks)}"
    model = spec.model_chunks[0]
    feed = _MicrobatchFeed(microbatches, spec.num_microbatches)
    objective = _Objective(spec, feed, holds_loss=True)
    losses: list[torch.Tensor] = []
    for index in range(spec.num_microbatches):
        batch = feed.get(index)
        feed.release(index)
        with _sync_context(spec, final=index == spec.num_microbatches - 1):
            with torch.no_grad() if spec.forward_only else contextlib.nullcontext():
                loss, reported = objective(run_forward(model, batch, None, is_last=True), batch["loss_mask"])
            if not spec.forward_only:
                loss.backward()
        losses.append(reported)
    return losses


# ---------------------------------------------------------------------------- pipeline helpers
def deallocate_output(output: Optional[torch.Tensor]) -> None:
    """Free the storage of a sent output, keeping its autograd node (shape metadata stays there).

    Skipped for outputs that own no autograd node or are views (a leaf passed straight through a
    chunk without layers, say): their storage may be shared with a tensor still in use.
    """
    if output is None or output.grad_fn is None or output._base is not None:
        return
    output.data = torch.empty((1,), dtype=output.dtype, device=output.device)


def backward_from(output: torch.Tensor, output_grad: Optional[torch.Tensor]) -> None:
    """Back-propagate ``output_grad`` (None: ``output`` is the scalar loss) from ``output``.

    Calls the autograd engine directly: ``torch.autograd.backward`` would compare the gradient's
    shape with ``output``'s (possibly freed, 1-element) storage; the engine checks it against the
    shape recorded in the autograd node, which is the true one.
    """
    if output_grad is None:
        output.backward()
        return
    torch.autograd.Variable._execution_engine.run_backward(
        tensors=(output,), grad_tensors=(output_grad,), keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True)


class _MicrobatchFeed:
    """Micro-batch ``i`` of the iteration, drawn from the iterator on first use and kept until released."""

    def __init__(self, microbatches: Iterator[Microbatch], count: int):
        self.iterator, self.count = microbatches, count
        self.cache: dict[int, Microbatch] = {}
        self.drawn = 0

    def get(self, index: int) -> Microbatch:
        while self.drawn <= index:
            self.cache[self.drawn] = next(self.iterator)
            self.drawn += 1
        return self.cache[index]

    def release(self, index: int) -> None:
        self.cache.pop(index, None)

    def drain(self) -> None:
        """Draw the micro-batches nobody asked for, so every rank's iterator advances by ``count``."""
        while self.drawn < self.count:
            next(self.iterator)
            self.drawn += 1
        self.cache.clear()


class _StageRunner:
    """Forward and backward steps of this stage's chunks: loss scaling, DP sync, freeing, timeline."""

    def __init__(self, spec: ScheduleSpec, microbatches: Iterator[Microbatch]):
        self.spec, self.ctx = spec, spec.ctx
        self.num_chunks = len(spec.model_chunks)
        self.feed = _MicrobatchFeed(microbatches, spec.num_microbatches)
        self.p2p = PipelineP2P.from_context(spec.ctx, spec.seq_length, spec.micro_batch_size, spec.hidden_size,
                                            spec.sequence_parallel, spec.activation_dtype)
        self.objective = _Objective(spec, self.feed, holds_loss=spec.ctx.is_last_stage)
        self.losses: list[torch.Tensor] = []
        self.backward_count = [0] * self.num_chunks

    def chunk_is_first(self, chunk: int) -> bool:
        return self.ctx.is_first_stage and chunk == 0

    def chunk_is_last(self, chunk: int) -> bool:
        return self.ctx.is_last_stage and chunk == self.num_chunks - 1

    def _record(self, kind: str, chunk: int, microbatch: int, start: float) -> None:
        if self.spec.timeline is not None:
            self.spec.timeline.append((kind, chunk, microbatch, start, time.perf_counter()))

    def received(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A received activation becomes a leaf whose grad is sent back (training only)."""
        if tensor is not None and not self.spec.forward_only:
            tensor.requires_grad_(True)
        return tensor

    def forward(self, chunk: int, microbatch: int, input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
        """Hidden states [s', b, h] to send, or on the last chunk the scaled loss to back-propagate."""
        start = time.perf_counter()
        is_last = self.chunk_is_last(chunk)
        batch = self.feed.get(microbatch)
        with torch.no_grad() if self.spec.forward_only else contextlib.nullcontext():
            output = run_forward(self.spec.model_chunks[chunk], batch, input_tensor, is_last)
            if is_last:
                output, reported = self.objective(output, batch["loss_mask"])
                self.losses.append(reported)
        if chunk == self.num_chunks - 1:  # this stage's last use of the micro-batch
            self.feed.release(microbatch)
        self._record("F", chunk, microbatch, start)
        return output

    def backward(self, chunk: int, microbatch: int, input_tensor: Optional[torch.Tensor], output: torch.Tensor,
                 output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Back-propagate one micro-batch through ``chunk``; the gradient for the previous stage."""
        start = time.perf_counter()
        self.backward_count[chunk] += 1
        final = self.backward_count[chunk] == self.spec.num_microbatches
        buffers = self.spec.grad_buffers
        buffer = buffers[chunk] if chunk < len(buffers) else None
        with buffer.no_sync() if (buffer is not None and not final) else contextlib.nullcontext():
            backward_from(output, output_grad)
        self._record("B", chunk, microbatch, start)
        return None if input_tensor is None else input_tensor.grad

    def finish(self) -> list[torch.Tensor]:
        self.feed.drain()
        return self.losses


# ---------------------------------------------------------------------------- 1F1B
def forward_backward_pipelining(spec: ScheduleSpec, microbatches: Iterator[Microbatch]) -> list[torch.Tensor]:
    """1F1B over one model chunk per stage (module docstring); forward_only runs forwards only."""
    assert len(spec.model_chunks) == 1, (
        f"1F1B takes one model chunk per stage, got {len(spec.model_chunks)}; use the interleaved schedule")
    run = _StageRunner(spec, microbatches)
    ctx, p2p, m = spec.ctx, run.p2p, spec.num_microbatches
    first, last = ctx.is_first_stage, ctx.is_last_stage
    warmup = m if spec.forward_only else min(ctx.pp_size - ctx.pp_rank - 1, m)
    steady = m - warmup
    saved: deque[tuple[Optional[torch.Tensor], torch.Tensor]] = deque()  # (input, output) awaiting backward

    for index in range(warmup):
        input_tensor = run.received(None if first else p2p.recv_forward())
        output = run.forward(0, index, input_tensor)
        if not last:
            p2p.send_forward(output.detach() if spec.forward_only else output)
        if not spec.forward_only:
            saved.append((input_tensor, output))
            if not last:
                deallocate_output(output)

    input_tensor = run.received(p2p.recv_forward()) if steady > 0 and not first else None
    for index in range(steady):
        output = run.forward(0, warmup + index, input_tensor)
        output_grad = None if last else p2p.send_forward_recv_backward(output)
        saved.append((input_tensor, output))
        if not last:
            deallocate_output(output)
        oldest_input, oldest_output = saved.popleft()
        input_grad = run.backward(0, index, oldest_input, oldest_output, output_grad)
        if index == steady - 1:
            input_tensor = None
            if not first:
                p2p.send_backward(input_grad)
        elif first:
            input_tensor = None
        else:
            input_tensor = run.received(p2p.send_backward_recv_forward(input_grad))

    if not spec.forward_only:
        for index in range(steady, m):  # cooldown
            output_grad = None if last else p2p.recv_backward()
            oldest_input, oldest_output = saved.popleft()
            input_grad = run.backward(0, index, oldest_input, oldest_output, output_grad)
            if not first:
                p2p.send_backward(input_grad)
    return run.finish()


# ---------------------------------------------------------------------------- interleaved 1F1B
def forward_backward_pipelining_interleaved(spec: ScheduleSpec,
                                            microbatches: Iterator[Microbatch]) -> list[torch.Tensor]:
    """Interleaved 1F1B over ``v = len(model_chunks)`` chunks per stage (module docstring)."""
    ctx, m, v = spec.ctx, spec.num_microbatches, len(spec.model_chunks)
    p, rank = ctx.pp_size, ctx.pp_rank
    assert v >= 2, f"the interleaved schedule needs >= 2 model chunks per stage, got {v}; use 1F1B"
    if m % p != 0:
        raise ValueError(f"interleaved pipelining needs micro-batches per step ({m}) divisible by pipeline_parallel "
                         f"{p}; change global_batch_size / (micro_batch_size x data_parallel)")
    run = _StageRunner(spec, microbatches)
    p2p, first, last = run.p2p, ctx.is_first_stage, ctx.is_last_stage
    total = m * v
    all_warmup = spec.forward_only or m == p
    warmup = total if all_warmup else min((p - rank - 1) * 2 + (v - 1) * p, total)
    steady = total - warmup

    def chunk_of(k: int, forward: bool) -> int:
        chunk = (k % (p * v)) // p
        return chunk if forward else v - 1 - chunk

    def microbatch_of(k: int) -> int:
        return (k // (p * v)) * p + (k % (p * v)) % p

    pending_inputs: list[deque] = [deque() for _ in range(v)]   # received activations, per chunk
    pending_grads: list[deque] = [deque() for _ in range(v)]    # received output grads, per chunk
    saved: list[deque] = [deque() for _ in range(v)]            # (input, output) awaiting backward

    def forward_step(k: int) -> Optional[torch.Tensor]:
        """Forward of virtual micro-batch k; returns the output to send (None: nothing to send)."""
        chunk = chunk_of(k, forward=True)
        input_tensor = None if run.chunk_is_first(chunk) else pending_inputs[chunk].popleft()
        output = run.forward(chunk, microbatch_of(k), input_tensor)
        if not spec.forward_only:
            saved[chunk].append((input_tensor, output))
        if run.chunk_is_last(chunk):
            return None
        return output.detach() if spec.forward_only else output

    def backward_step(k: int) -> Optional[torch.Tensor]:
        """Backward of the k-th virtual micro-batch in backward order; the grad to send (None: nothing)."""
        chunk = chunk_of(k, forward=False)
        input_tensor, output = saved[chunk].popleft()
        output_grad = None if run.chunk_is_last(chunk) else pending_grads[chunk].popleft()
        input_grad = run.backward(chunk, microbatch_of(k), input_tensor, output, output_grad)
        return None if run.chunk_is_first(chunk) else input_grad

    def keep(queue: deque, tensor: Optional[torch.Tensor]) -> None:
        if tensor is not None:
            queue.append(tensor)

    if not first:
        pending_inputs[0].append(run.received(p2p.recv_forward()))
    for k in range(warmup):
        output = forward_step(k)
        next_chunk = chunk_of(k + 1, forward=True)
        recv_prev = not (first and next_chunk == 0) and k != total - 1
        if k == warmup - 1 and not all_warmup:  # also take the first gradient for the steady phase
            received, grad = p2p.communicate(send_next=output, recv_prev=recv_prev, recv_next=not last)
            keep(pending_grads[v - 1], grad)
        else:
            received, _ = p2p.communicate(send_next=output, recv_prev=recv_prev)
        keep(pending_inputs[next_chunk], run.received(received))
        deallocate_output(output)

    for index in range(steady):
        forward_k, backward_k = warmup + index, index
        output = forward_step(forward_k)
        input_grad = backward_step(backward_k)
        # Which chunk the incoming activation / gradient belongs to: on the first (last) stage it was
        # produced by the last (first) stage p - 1 steps earlier, one chunk lower (higher).
        if first:
            sender_chunk = chunk_of(forward_k - (p - 1), forward=True)
            recv_prev, next_forward_chunk = sender_chunk != v - 1, sender_chunk + 1
        else:
            recv_prev, next_forward_chunk = True, chunk_of(forward_k + 1, forward=True)
        if last:
            sender_chunk = chunk_of(backward_k - (p - 1), forward=False)
            recv_next, next_backward_chunk = sender_chunk != 0, sender_chunk - 1
        else:
            recv_next, next_backward_chunk = True, chunk_of(backward_k + 1, forward=False)
        if index == steady - 1:
            recv_prev = False
        received, grad = p2p.communicate(send_next=output, send_prev=input_grad, recv_prev=recv_prev,
                                         recv_next=recv_next)
        deallocate_output(output)
        if recv_prev:
            pending_inputs[next_forward_chunk].append(run.received(received))
        if recv_next:
            pending_grads[next_backward_chunk].append(grad)

    if not spec.forward_only:
        if all_warmup and not last:
            pending_grads[v - 1].append(p2p.recv_backward())
        for k in range(steady, total):  # cooldown
            input_grad = backward_step(k)
            next_chunk = chunk_of(k + 1, forward=False)
            recv_next = not (last and next_chunk == v - 1) and k != total - 1
            _, grad = p2p.communicate(send_prev=input_grad, recv_next=recv_next)
            keep(pending_grads[next_chunk], grad)
    return run.finish()


def get_forward_backward_func(pp_size: int, vpp_size: int) -> Callable[[ScheduleSpec, Iterator[Microbatch]], list]:
    """The schedule for a layout: no pipelining, 1F1B, or interleaved 1F1B."""
    if pp_size == 1:
        if vpp_size != 1:
            raise ValueError(f"virtual_pipeline_stages {vpp_size} needs pipeline_parallel > 1")
        return forward_backward_no_pipelining
    if vpp_size == 1:
        return forward_backward_pipelining
    return forward_backward_pipelining_interleaved
