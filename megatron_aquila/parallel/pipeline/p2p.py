"""Point-to-point transfers between adjacent pipeline stages.

Stage ``r`` of a pipeline with ``p`` stages and global ranks ``pp_ranks = [g_0, ..., g_{p-1}]``
talks only to its neighbours (indices mod ``p``: interleaving wraps the last stage's chunk ``c``
to the first stage's chunk ``c + 1``):

    forward  (activations X):     stage r  --X-->  stage r+1      (tag ACTIVATION_TAG)
    backward (grads dL/dX):       stage r  <--G--  stage r+1      (tag GRADIENT_TAG)

Every message has one fixed shape ``[s', b, h]`` with ``s' = s / tp`` under sequence parallelism
(each TP rank sends its own sequence shard to the same TP rank of the next stage) and ``s' = s``
otherwise, in the activation dtype, so receivers pre-allocate without a shape handshake.

One call of ``PipelineP2P.communicate`` posts all its sends and receives as one
``dist.batch_isend_irecv`` and waits for all of them (one NCCL group call on GPU; separate
isend/irecv on gloo). Protocol that keeps both backends deadlock free and unambiguous:

1. A send in a call is matched by a receive in a call of the peer that is in flight at the same
   time; the schedules pair calls like Megatron-LM's (send_forward_recv_backward on stage r meets
   send_backward_recv_forward on stage r+1, ...).
2. Inside a call, activation operations are posted before gradient operations on every rank.
   With two stages the previous and next stage are the same process, so a pair may carry an
   activation and a gradient in one call; both sides then post them in the same order (NCCL
   matches by order), and the two tags keep them apart on gloo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_aquila.parallel.context import ParallelContext, ProcessGroup

ACTIVATION_TAG = 1
GRADIENT_TAG = 2


@dataclass
class PipelineP2P:
    """Sends and receives of one pipeline stage: peers, group and the fixed message shape."""

    group: ProcessGroup           # this process's pipeline group
    prev_rank: int                # global rank of the previous stage (wraps around)
    next_rank: int                # global rank of the next stage (wraps around)
    shape: tuple[int, int, int]   # [s', b, h] of every activation and gradient message
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_context(cls, ctx: ParallelContext, seq_length: int, micro_batch_size: int, hidden_size: int,
                     sequence_parallel: bool, dtype: torch.dtype) -> "PipelineP2P":
        """Peers from ``ctx.pp_ranks``; ``s' = seq_length / tp`` when sequence parallel with tp > 1."""
        if ctx.pp_size < 2:
            raise ValueError(f"point-to-point pipeline transfers need pipeline_parallel >= 2, got {ctx.pp_size}")
        seq = seq_length
        if sequence_parallel and ctx.tp_size > 1:
            if seq_length % ctx.tp_size != 0:
                raise ValueError(f"seq_length {seq_length} is not divisible by tensor_parallel {ctx.tp_size} "
                                 "(sequence parallel); choose a multiple of the TP size")
            seq = seq_length // ctx.tp_size
        return cls(ctx.pp_group, ctx.prev_stage_rank, ctx.next_stage_rank, (seq, micro_batch_size, hidden_size),
                   dtype, ctx.device)

    def _check(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(f"pipeline {what} has shape {tuple(tensor.shape)} dtype {tensor.dtype}, expected "
                             f"{self.shape} {self.dtype} ([seq (/tp under sequence parallel), micro batch, hidden] "
                             "in the activation dtype); check seq_length, micro_batch_size and precision")
        return tensor.contiguous()

    def communicate(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                    recv_prev: bool = False, recv_next: bool = False
                    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One batched exchange; returns (tensor from prev stage | None, tensor from next stage | None).

        ``send_next`` is an activation for the next stage, ``send_prev`` a gradient for the previous
        stage; ``recv_prev`` receives an activation, ``recv_next`` a gradient. Received tensors are
        fresh buffers of ``self.shape`` (callers set ``requires_grad`` as they need).
        """
        from_prev = torch.empty(self.shape, dtype=self.dtype, device=self.device) if recv_prev else None
        from_next = torch.empty(self.shape, dtype=self.dtype, device=self.device) if recv_next else None
        ops: list[dist.P2POp] = []
        # activations first, then gradients (module docstring, rule 2)
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, self._check(send_next, "activation"), self.next_rank, self.group,
                                  ACTIVATION_TAG))
        if from_prev is not None:
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank, self.group, ACTIVATION_TAG))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, self._check(send_prev, "gradient"), self.prev_rank, self.group,
                                  GRADIENT_TAG))
        if from_next is not None:
            ops.append(dist.P2POp(dist.irecv, from_next, self.next_rank, self.group, GRADIENT_TAG))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return from_prev, from_next

    # Named combinations used by the schedules (each is one ``communicate`` call).
    def recv_forward(self) -> torch.Tensor:
        return self.communicate(recv_prev=True)[0]

    def recv_backward(self) -> torch.Tensor:
        return self.communicate(recv_next=True)[1]

    def send_forward(self, output: torch.Tensor) -> None:
        self.communicate(send_next=output)

    def send_backward(self, input_grad: torch.Tensor) -> None:
        self.communicate(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor) -> torch.Tensor:
        return self.communicate(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor) -> torch.Tensor:
        return self.communicate(send_prev=input_grad, recv_prev=True)[0]
