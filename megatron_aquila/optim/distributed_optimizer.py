"""ZeRO-1 distributed optimizer: fp32 masters and Adam state sharded over data parallel.

The shards span every rank holding the same weights, DP x CP (``ctx.dp_cp_group``, as Megatron's
distributed optimizer with context parallelism); d below is that group's size.
Each grad-buffer bucket ``B`` (padded so d | |B| for DP size d) is split into d contiguous shards
``B = [B_0, ..., B_{d-1}]``; DP rank r owns ``B_r``. After the buffer's reduce-scatter, rank r
holds the DP-averaged grads of its shard, keeps fp32 masters and Adam moments for exactly the
parameter pieces inside ``B_r``, and steps them. AdamW is elementwise, so stepping pieces gives
the same numbers as stepping whole parameters. Then the updated pieces are all-gathered per
bucket in the model dtype:

    P_B = [P_B_0; ...; P_B_{d-1}],  P_B_r = cast(master pieces in B_r)   (then each parameter is copied out)

by one ``all_gather_single`` per bucket, in place (rank r's input is the view ``P_B_r`` of
the output ``P_B``), on NCCL and gloo alike.
The global grad norm sums the squares of each rank's pieces (TP counting as in the plain
optimizer) and all-reduces over the world: the shards partition every parameter, so each
element is counted exactly once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_aquila.optim.optimizer import MasterPiece, MixedPrecisionOptimizer
from megatron_aquila.parallel.collectives import all_gather_single
from megatron_aquila.parallel.context import ProcessGroup
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer


# All-gathers of updated buckets in flight at once in ``_publish``: one runs while the previous bucket is
# copied into the parameters, and at most this many bucket-sized buffers exist (not a copy of the model).
GATHERS_IN_FLIGHT = 2


class DistributedOptimizer(MixedPrecisionOptimizer):
    kind = "distributed"

    def _param_ranges(self, buffer: DataParallelGradBuffer) -> list[tuple[nn.Parameter, int, int]]:
        return buffer.owned_pieces()

    def _make_piece(self, chunk: int, buffer: DataParallelGradBuffer, param: nn.Parameter,
                    lo: int, hi: int) -> MasterPiece:
        master = param.detach().reshape(-1)[lo:hi].float().clone()   # [hi - lo]
        grad = param.main_grad.view(-1)[lo:hi]                          # [hi - lo] view into the buffer
        return MasterPiece(chunk, buffer.name_of(param), param, lo, hi, master, grad,
                           buffer.range_of(param)[0] + lo, self._counts_in_norm(param), param.dim() > 1)

    @property
    def _norm_group(self) -> ProcessGroup:
        return self.ctx.world_group

    def _publish(self) -> None:
        """All-gather the updated shards of every bucket and copy them into the parameters."""
        dp_group = self.ctx.dp_cp_group   # ZeRO-1 shards over every rank holding the same weights (DP x CP)
        dp_size = self.ctx.dp_cp_size
        if dp_size == 1:
            for piece in self.pieces:
                piece.param.data.view(-1)[piece.lo:piece.hi].copy_(piece.master)
            return
        pieces_by_chunk: list[list[MasterPiece]] = [[] for _ in self.grad_buffers]
        for piece in self.pieces:
            pieces_by_chunk[piece.chunk].append(piece)
        pending: list = []
        for buffer, pieces in zip(self.grad_buffers, pieces_by_chunk):
            for bucket in buffer.buckets:
                if len(pending) == GATHERS_IN_FLIGHT:  # bound the gathered copies alive at once
                    self._copy_gathered(*pending.pop(0))
                dtypes = {p.dtype for p in bucket.params}
                if len(dtypes) != 1:
                    raise TypeError(f"grad bucket {bucket.index} mixes parameter dtypes {sorted(map(str, dtypes))}; "
                                    "the distributed optimizer gathers one dtype per bucket: keep a chunk in one dtype")
                gathered = torch.zeros(bucket.numel, dtype=dtypes.pop(), device=buffer.buffer.device)  # [bucket]
                shard_start, shard_end = bucket.shard_range(buffer.dp_rank, dp_size)
                for piece in pieces:
                    if shard_start <= piece.buffer_offset < shard_end:
                        at = piece.buffer_offset - bucket.start
                        gathered[at:at + piece.hi - piece.lo].copy_(piece.master)
                local = gathered[shard_start - bucket.start:shard_end - bucket.start]  # [bucket / dp], a view
                work = all_gather_single(gathered, local, group=dp_group, async_op=True)
                pending.append((work, buffer, bucket, gathered))
        for entry in pending:
            self._copy_gathered(*entry)

    @staticmethod
    def _copy_gathered(work, buffer: DataParallelGradBuffer, bucket, gathered: torch.Tensor) -> None:
        """Wait for one bucket's all-gather and copy it into the parameters."""
        work.wait()
        for param in bucket.params:
            start, end = buffer.range_of(param)
            param.data.copy_(gathered[start - bucket.start:end - bucket.start].view_as(param))
