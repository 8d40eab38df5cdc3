"""ZeRO-1 distributed optimizer: fp32 masters and Adam state sharded over data parallel.

The shards span every rank holding the same weights, DP x CP (``ctx.dp_cp_group``, as Megatron's
distributed optimizer with context parallelism); d below is that group's size.
Each grad-buffer bucket ``B`` (padded so d | |B| for DP size d) is split into d contiguous shards
``B = [B_0, ..., B_{d-1}]``; DP rank r owns ``B_r``. After the buffer's reduce-scatter, rank r
holds the DP-averaged grads of its shard, keeps fp32 masters and Adam moments for exactly the
parameter pieces inside ``B_r``, and steps them. AdamW is elementwise, so stepping pieces gives
the same numbers as stepping whole parameters. Then each rank writes its updated pieces, cast to
the model dtype, into its own shard of the bucket's parameter storage (the parameters are views of
one contiguous tensor per bucket, laid out like its grads) and the buckets are all-gathered:

    P_B = [P_B_0; ...; P_B_{d-1}],  P_B_r = cast(master pieces in B_r)

by one in-place ``all_gather_single`` per bucket (``optim/param_gather.py``), on NCCL and gloo alike.
With ``overlap_param_gather`` the step returns with the gathers in flight and the next forward
waits for each bucket just before its first use; ``finish_param_gather`` waits for all of them
(the next step calls it before touching the shards).
The global grad norm sums the squares of each rank's pieces (TP counting as in the plain
optimizer) and all-reduces over the world: the shards partition every parameter, so each
element is counted exactly once.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from megatron_aquila.config import OptimizerConfig
from megatron_aquila.optim.optimizer import GradScaler, MasterPiece, MixedPrecisionOptimizer
from megatron_aquila.optim.param_gather import ParamGather
from megatron_aquila.parallel.context import ParallelContext, ProcessGroup
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer


class DistributedOptimizer(MixedPrecisionOptimizer):
    """``overlap_param_gather``: leave the parameter all-gathers in flight after ``step`` (module docstring)."""

    kind = "distributed"

    def __init__(self, grad_buffers: list[DataParallelGradBuffer], config: OptimizerConfig,
                 ctx: ParallelContext, grad_scaler: Optional[GradScaler] = None, fused: Optional[bool] = None,
                 overlap_param_gather: bool = False):
        super().__init__(grad_buffers, config, ctx, grad_scaler, fused)
        self.param_gather = ParamGather(grad_buffers, ctx, overlap_param_gather) if ctx.dp_cp_size > 1 else None

    def _param_ranges(self, buffer: DataParallelGradBuffer) -> list[tuple[nn.Parameter, int, int]]:
        return buffer.owned_pieces()

    def _make_piece(self, chunk: int, buffer: DataParallelGradBuffer, param: nn.Parameter,
                    lo: int, hi: int) -> MasterPiece:
        master = param.detach().reshape(-1)[lo:hi].float().clone()   # [hi - lo]
        grad = param.main_grad.view(-1)[lo:hi]                          # [hi - lo] view into the buffer
        return MasterPiece(chunk, buffer.name_of(param), param, lo, hi, master, grad,
                           self._counts_in_norm(param), param.dim() > 1)

    @property
    def _norm_group(self) -> ProcessGroup:
        return self.ctx.world_group

    def _publish(self) -> None:
        """Write the updated pieces into this rank's shards of the parameters and all-gather every bucket."""
        for piece in self.pieces:
            piece.param.data.view(-1)[piece.lo:piece.hi].copy_(piece.master)
        if self.param_gather is not None:
            self.param_gather.start()

    def finish_param_gather(self) -> None:
        if self.param_gather is not None:
            self.param_gather.finish()

    @property
    def param_gather_seconds(self) -> float:
        return self.param_gather.blocked_seconds if self.param_gather is not None else 0.0
