"""AdamW over fp32 master parameters, with loss-scale handling and global-norm clipping.

One step (after ``finish_grad_sync`` on every grad buffer), with loss scale ``S``:

1. unscale:    g <- main_grad / S                       (fp32, in the grad buffer)
2. overflow:   found = MAX over the world of [any g is inf/nan]; if found, skip the step on every
               rank and tell the scaler (only when a scaler is in use, i.e. fp16)
3. norm:       ||g|| = sqrt( sum over every parameter of the model, counted once, of ||g_p||^2 ).
               A TP-sharded parameter (``tensor_model_parallel``) contributes its shard on each TP
               rank; a replicated parameter only on TP rank 0. The plain optimizer sums over the
               model-parallel group (TP x PP; DP replicas hold equal grads); the distributed
               optimizer sums its DP shard's pieces and reduces over the world, and the shards of
               the DP ranks partition every parameter, so each element still counts once.
   non-finite: if ||g|| is inf or nan, skip the step (in every precision): masters, Adam state
               and parameters stay as they were. The decision is read from the reduced norm, so
               it is the same on every rank: an inf/nan in any rank's local grads reaches every
               DP replica through the DP all-reduce (plain) or reaches the world-reduced norm
               from the shard that owns it (distributed), and every rank of a model-parallel
               group sees the same reduced sum.
4. clip:       g <- g * min(1, clip_grad / (||g|| + 1e-6))     (torch's clip_grad_norm_ rule)
5. AdamW on the fp32 masters (no weight decay on 1-D parameters: norms, biases) with the lr set
   by ``set_lr``, then copy the masters into the model parameters (cast to their dtype).

The distributed optimizer may leave its parameter all-gathers in flight when ``step`` returns
(``parallel.overlap_param_gather``); ``finish_param_gather`` waits for them (a no-op here), and
whatever reads the parameters outside a forward calls it first. ``step`` itself does, before step 1.

Master parameters: an fp32 model parameter is its own master; bf16/fp16 ones get fp32 copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from megatron_aquila.config import OptimizerConfig
from megatron_aquila.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron_aquila.parallel.context import ParallelContext, ProcessGroup, group_size
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer

GradScaler = Union[ConstantGradScaler, DynamicGradScaler]
STATE_FORMAT = "megatron_aquila.optimizer.v1"


@dataclass
class StepResult:
    successful: bool     # False: inf/nan found on some rank, the step was skipped everywhere
    grad_norm: float     # global norm of the unscaled grads before clipping (nan when fp16 found
                         # inf/nan; the non-finite norm itself when that skipped the step)
    loss_scale: float    # the scale this step's gradients were computed with


@dataclass
class MasterPiece:
    """The part ``[lo, hi)`` of a flattened model parameter that this rank updates."""

    chunk: int                 # index of the model chunk / grad buffer
    name: str                  # parameter name inside its chunk
    param: nn.Parameter
    lo: int
    hi: int
    master: torch.Tensor       # fp32; the param itself (fp32, whole) or a copy of the piece
    grad: torch.Tensor         # fp32 view into the grad buffer, shaped like ``master``
    counts_in_norm: bool       # TP-sharded, or replicated and this is TP rank 0
    decays: bool               # weight decay applies (parameters of 2 or more dims)


class MixedPrecisionOptimizer:
    """AdamW on fp32 masters of whole parameters; grads all-reduced over DP beforehand."""

    kind = "mixed_precision"

    def __init__(self, grad_buffers: list[DataParallelGradBuffer], config: OptimizerConfig,
                 ctx: ParallelContext, grad_scaler: Optional[GradScaler] = None, fused: Optional[bool] = None):
        """``fused``: torch's fused AdamW kernel (None: on CUDA and CPU, the devices torch has it for: one pass
        over the masters, where the foreach implementation makes about ten on a CPU; else foreach, whose step
        counter lives on the host). The dry run sets it to run a GPU run's optimizer on CPU tensors."""
        self.grad_buffers, self.config, self.ctx = grad_buffers, config, ctx
        self.grad_scaler = grad_scaler
        self.pieces: list[MasterPiece] = []
        for chunk, buffer in enumerate(grad_buffers):
            for param, lo, hi in self._param_ranges(buffer):
                self.pieces.append(self._make_piece(chunk, buffer, param, lo, hi))
        groups = [{"params": [p.master for p in self.pieces if p.decays], "weight_decay": config.weight_decay},
                  {"params": [p.master for p in self.pieces if not p.decays], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        self._pieces_in_group_order = ([p for p in self.pieces if p.decays] + [p for p in self.pieces if not p.decays])
        self.adamw: Optional[torch.optim.AdamW] = None
        if groups:   # a rank may own nothing (ZeRO-1 with a tiny model on many DP ranks)
            fused = self.pieces[0].master.device.type in ("cuda", "cpu") if fused is None else fused
            self.adamw = torch.optim.AdamW(
                groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                **({"fused": True} if fused else {"foreach": True}))

    # ------------------------------------------------------------------ layout (overridden by ZeRO-1)
    def _param_ranges(self, buffer: DataParallelGradBuffer) -> list[tuple[nn.Parameter, int, int]]:
        return [(param, 0, param.numel()) for param in buffer.params]

    def _make_piece(self, chunk: int, buffer: DataParallelGradBuffer, param: nn.Parameter,
                    lo: int, hi: int) -> MasterPiece:
        master = param if param.dtype == torch.float32 else param.detach().float().clone()
        return MasterPiece(chunk, buffer.name_of(param), param, lo, hi, master, param.main_grad,
                           self._counts_in_norm(param), param.dim() > 1)

    def _counts_in_norm(self, param: nn.Parameter) -> bool:
        return bool(getattr(param, "tensor_model_parallel", False)) or self.ctx.tp_rank == 0

    @property
    def _norm_group(self) -> ProcessGroup:
        return self.ctx.model_parallel_group

    def _publish(self) -> None:
        """Copy updated masters into the model parameters (nothing to do for fp32 parameters)."""
        for piece in self.pieces:
            if piece.master is not piece.param:
                piece.param.data.copy_(piece.master)

    def finish_param_gather(self) -> None:
        """Wait until every parameter is whole and current (module docstring); nothing is in flight here."""

    @property
    def param_gather_seconds(self) -> float:
        """Host seconds spent waiting for parameter all-gathers so far (ZeRO-1 only; 0 here)."""
        return 0.0

    # ------------------------------------------------------------------ the step
    @property
    def loss_scale(self) -> float:
        return 1.0 if self.grad_scaler is None else self.grad_scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale

    def set_lr(self, lr: float) -> None:
        if self.adamw is not None:   # (load_state_dict replaces the group dicts: always go through adamw)
            for group in self.adamw.param_groups:
                group["lr"] = lr

    def zero_grad(self) -> None:
        for buffer in self.grad_buffers:
            buffer.zero_grad()

    def _all_reduce(self, value: torch.Tensor, group: ProcessGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if group_size(group) > 1:
            dist.all_reduce(value, op=op, group=group)
        return value

    def _found_inf(self, grads: list[torch.Tensor]) -> bool:
        local = [torch.logical_not(torch.isfinite(g).all()) for g in grads]
        flag = torch.stack(local).any().float().reshape(1) if local else torch.zeros(1, device=self.ctx.device)
        return bool(self._all_reduce(flag, self.ctx.world_group, dist.ReduceOp.MAX).item() > 0)

    def grad_norm(self) -> float:
        """Global L2 norm of the current (unscaled) grads, each model parameter counted once."""
        counted = [p.grad for p in self.pieces if p.counts_in_norm]
        if counted:
            squares = torch.stack([n.float() ** 2 for n in torch._foreach_norm(counted)]).sum().reshape(1)
        else:
            squares = torch.zeros(1, device=self.ctx.device)
        return math.sqrt(self._all_reduce(squares, self._norm_group).item())

    def step(self) -> StepResult:
        self.finish_param_gather()   # the last step's gathers: its shards are about to be rewritten
        scale = self.loss_scale
        grads = [p.grad for p in self.pieces]
        if scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / scale)
        if self.grad_scaler is not None:
            found_inf = self._found_inf(grads)
            self.grad_scaler.update(found_inf)
            if found_inf:
                return StepResult(successful=False, grad_norm=math.nan, loss_scale=scale)
        norm = self.grad_norm()   # reduced: the same value, hence the same decision, on every rank
        if not math.isfinite(norm):
            return StepResult(successful=False, grad_norm=norm, loss_scale=scale)
        if self.config.clip_grad > 0:
            coeff = self.config.clip_grad / (norm + 1e-6)
            if coeff < 1.0 and grads:
                torch._foreach_mul_(grads, coeff)
        if self.adamw is not None:
            for piece in self.pieces:
                piece.master.grad = piece.grad
            self.adamw.step()
            for piece in self.pieces:
                piece.master.grad = None
        self._publish()
        return StepResult(successful=True, grad_norm=norm, loss_scale=scale)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Per-parameter fp32 state, keyed by chunk index then parameter name.

        ``params[chunk][name] = {"shape", "range": [lo, hi), "master", "exp_avg", "exp_avg_sq", "step"}``
        where the tensors are the flattened elements ``[lo, hi)`` of the parameter that this rank
        updates (the whole parameter for the plain optimizer, the DP shard's piece under ZeRO-1;
        Adam moments are absent before the first step).
        """
        params: list[dict[str, Any]] = [{} for _ in self.grad_buffers]
        for piece in self.pieces:
            entry = {"shape": tuple(piece.param.shape), "range": (piece.lo, piece.hi),
                     "master": piece.master.detach().reshape(-1).clone()}
            adam = self.adamw.state.get(piece.master, {}) if self.adamw is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in adam:
                    entry[key] = adam[key].detach().reshape(-1).clone()
            if "step" in adam:
                entry["step"] = float(adam["step"])
            params[piece.chunk][piece.name] = entry
        return {"format": STATE_FORMAT, "kind": self.kind, "dp_rank": self.ctx.dp_cp_rank,
                "dp_size": self.ctx.dp_cp_size,
                "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
                "params": params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masters, Adam moments and the scaler saved by ``state_dict`` with the same layout.

        Model parameters are not touched: they come from the model checkpoint.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"optimizer state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        if len(state["params"]) != len(self.grad_buffers):
            raise ValueError(f"optimizer state has {len(state['params'])} model chunks, this model has "
                             f"{len(self.grad_buffers)}; load with the same pipeline layout")
        torch_state = self.adamw.state_dict() if self.adamw is not None else None
        for index, piece in enumerate(self._pieces_in_group_order):
            entry = state["params"][piece.chunk].get(piece.name)
            if entry is None:
                raise KeyError(f"optimizer state lacks parameter {piece.name!r} of chunk {piece.chunk}")
            if tuple(entry["range"]) != (piece.lo, piece.hi) or tuple(entry["shape"]) != tuple(piece.param.shape):
                raise ValueError(
                    f"optimizer state of {piece.name!r} covers range {tuple(entry['range'])} of shape "
                    f"{tuple(entry['shape'])}, this rank needs {(piece.lo, piece.hi)} of {tuple(piece.param.shape)}; "
                    f"it was saved with another data-parallel layout (saved dp {state['dp_rank']}/"
                    f"{state['dp_size']}, now {self.ctx.dp_cp_rank}/{self.ctx.dp_cp_size})")
            with torch.no_grad():
                piece.master.copy_(entry["master"].view_as(piece.master))
            if "exp_avg" in entry:
                torch_state["state"][index] = {
                    "step": torch.tensor(entry["step"], dtype=torch.float32),
                    "exp_avg": entry["exp_avg"].view_as(piece.master).clone(),
                    "exp_avg_sq": entry["exp_avg_sq"].view_as(piece.master).clone()}
        if self.adamw is not None:
            self.adamw.load_state_dict(torch_state)
        if (state["grad_scaler"] is None) != (self.grad_scaler is None):
            raise ValueError("optimizer state and this run disagree on using a loss scaler (fp16 vs bf16/fp32); "
                             "resume with the same precision.dtype")
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])

