"""The rank grid and its process groups, passed explicitly to every parallel component.

World = TP x CP x DP x PP with TP fastest, then context parallelism (Megatron's ``tp-cp-dp-pp``
order without expert parallelism), so a tensor-parallel group is a run of adjacent ranks on one
node and a CP group, whose ranks exchange K/V in every layer, is the next closest:

    global_rank = tp_rank + tp_size * (cp_rank + cp_size * (dp_rank + dp_size * pp_rank))

Groups: TP, CP, DP (ranks reading different samples), DP x CP (``dp_cp``: ranks holding the same
weights, over which gradients are averaged and ZeRO-1 shards the optimizer; docs/design.md
section 3.10), PP, and model-parallel (TP x PP ranks sharing one (dp, cp) index: the global grad
norm of a replicated optimizer sums over it).

No module-level state: every layer, schedule and optimizer receives the ``ParallelContext`` (or
one of its groups) it works in. A single process without ``torch.distributed`` is the context
with every group ``None`` and every size 1; the collectives in ``mappings`` are identities there.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Union

import torch
import torch.distributed as dist

@dataclass(frozen=True)
class DescribedGroup:
    """A group that only states its size and this process's rank, and never communicates.

    The planner builds each rank's model on the meta device in one process with these, so that
    layers shard their weights as they would on that rank; running a collective on one fails.
    """

    size: int
    rank: int


ProcessGroup = Optional[Union[dist.ProcessGroup, DescribedGroup]]


def group_size(group: ProcessGroup) -> int:
    """Size of ``group``; a ``None`` group is the trivial group of one process."""
    if group is None:
        return 1
    return group.size if isinstance(group, DescribedGroup) else dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    """This process's rank inside ``group`` (0 for the trivial group)."""
    if group is None:
        return 0
    return group.rank if isinstance(group, DescribedGroup) else dist.get_rank(group)


def grid_rank(tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int, tp_size: int, cp_size: int,
              dp_size: int) -> int:
    """Global rank of grid coordinate (tp_rank, cp_rank, dp_rank, pp_rank) in ``tp-cp-dp-pp`` order."""
    return tp_rank + tp_size * (cp_rank + cp_size * (dp_rank + dp_size * pp_rank))


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def warm_up_groups(groups: list[dist.ProcessGroup], device: torch.device) -> None:
    """Run one 1-element all-reduce on each of ``groups`` (this process's own groups), in order.

    NCCL creates a group's communicator lazily, on the group's first operation, and only the
    ranks taking part in that operation join it: a ``batch_isend_irecv`` between two pipeline
    stages as the first use of a larger pipeline group is undefined behaviour. A collective
    over every member first makes every communicator complete before any point-to-point
    transfer. On gloo it costs microseconds, and it runs there too, so the tests execute it.
    Every rank passes its groups in the same kind order (TP, CP, DP, DP x CP, PP, MP, world) and the groups
    of one kind partition the world, so every all-reduce meets all its members.
    """
    for group in groups:
        dist.all_reduce(torch.ones(1, device=device), group=group)


@dataclass
class ParallelContext:
    """This process's coordinates in the TP x CP x DP x PP grid and the groups it belongs to."""

    rank: int
    world_size: int
    tp_size: int
    dp_size: int
    pp_size: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    tp_group: ProcessGroup
    dp_group: ProcessGroup              # ranks reading different samples (same tp, cp, pp)
    pp_group: ProcessGroup
    model_parallel_group: ProcessGroup  # TP x PP ranks sharing one (dp, cp) index
    world_group: ProcessGroup           # every rank (global grad norm, inf checks, logged loss)
    pp_ranks: tuple[int, ...]           # global ranks of this process's pipeline, stage order
    device: torch.device
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: ProcessGroup = None       # ranks holding the chunks of the same samples (same tp, dp, pp)
    dp_cp_group: ProcessGroup = None    # DP x CP: ranks with the same weights (grad average, ZeRO-1 shards)

    @property
    def dp_cp_size(self) -> int:
        """Ranks holding the same weights: gradients are averaged over them (docs/design.md section 3.10)."""
        return self.dp_size * self.cp_size

    @property
    def dp_cp_rank(self) -> int:
        """This rank's index in ``dp_cp_group`` (the ZeRO-1 shard it owns): cp fastest, as in the rank order."""
        return self.cp_rank + self.cp_size * self.dp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_stage_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around, as interleaving needs)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_stage_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @classmethod
    def single_process(cls, device: torch.device | None = None) -> "ParallelContext":
        """The context of one process with no ``torch.distributed`` (TP = CP = PP = DP = 1)."""
        return cls(
            rank=0, world_size=1, tp_size=1, dp_size=1, pp_size=1, tp_rank=0, dp_rank=0, pp_rank=0,
            tp_group=None, dp_group=None, pp_group=None, model_parallel_group=None, world_group=None,
            pp_ranks=(0,), device=device or torch.device("cpu"),
        )

    @classmethod
    def initialize(cls, tp_size: int, pp_size: int, device: torch.device | None = None,
                   cp_size: int = 1, timeout: Optional[timedelta] = None) -> "ParallelContext":
        """Build every TP, CP, DP, DP x CP, PP and model-parallel group of an initialised default group.

        Every rank must call this with the same sizes: ``new_group`` is collective over the world.
        ``timeout``: how long a collective of these groups may wait (``distributed.nccl_timeout_minutes``;
        None: torch's default for the backend).
        """
        assert dist.is_initialized(), "call torch.distributed.init_process_group before ParallelContext.initialize"
        world_size, rank = dist.get_world_size(), dist.get_rank()
        model_parallel = tp_size * cp_size * pp_size
        if world_size % model_parallel != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor parallel {tp_size} x context parallel "
                f"{cp_size} x pipeline parallel {pp_size} = {model_parallel}; launch a multiple of "
                f"{model_parallel} processes")
        dp_size = world_size // model_parallel
        tp_rank = rank % tp_size
        cp_rank = (rank // tp_size) % cp_size
        dp_rank = (rank // (tp_size * cp_size)) % dp_size
        pp_rank = rank // (tp_size * cp_size * dp_size)
        mine_at = (tp_rank, cp_rank, dp_rank, pp_rank)
        sizes = (tp_size, cp_size, dp_size, pp_size)

        def build(varying: tuple[int, ...]) -> tuple[ProcessGroup, tuple[int, ...]]:
            """Create every group whose members differ only in the ``varying`` grid axes (0 tp, 1 cp,
            2 dp, 3 pp); return this rank's group and its members in axis order."""
            fixed = [axis for axis in range(4) if axis not in varying]
            mine: tuple[ProcessGroup, tuple[int, ...]] = (None, ())
            # new_group is collective: every rank creates every group, in the same order.
            for fixed_at in itertools.product(*(range(sizes[axis]) for axis in fixed)):
                members = []
                for varying_at in itertools.product(*(range(sizes[axis]) for axis in reversed(varying))):
                    at = [0, 0, 0, 0]
                    for axis, value in zip(fixed, fixed_at):
                        at[axis] = value
                    for axis, value in zip(reversed(varying), varying_at):
                        at[axis] = value
                    members.append(grid_rank(*at, tp_size, cp_size, dp_size))
                group = dist.new_group(sorted(members), timeout=timeout)
                if all(mine_at[axis] == value for axis, value in zip(fixed, fixed_at)):
                    mine = (group, tuple(members))
            return mine

        tp_group, _ = build((0,))
        cp_group, _ = build((1,))
        dp_group, _ = build((2,))
        dp_cp_group, _ = build((1, 2))
        pp_group, pp_ranks = build((3,))
        model_parallel_group, _ = build((0, 3))
        device = device or default_device()
        warm_up_groups([tp_group, cp_group, dp_group, dp_cp_group, pp_group, model_parallel_group, dist.group.WORLD],
                       device)
        return cls(
            rank=rank, world_size=world_size, tp_size=tp_size, dp_size=dp_size, pp_size=pp_size,
            tp_rank=tp_rank, dp_rank=dp_rank, pp_rank=pp_rank,
            tp_group=tp_group, dp_group=dp_group, pp_group=pp_group, model_parallel_group=model_parallel_group,
            world_group=dist.group.WORLD, pp_ranks=pp_ranks, device=device,
            cp_size=cp_size, cp_rank=cp_rank, cp_group=cp_group, dp_cp_group=dp_cp_group,
        )

    def release_groups(self) -> None:
        """Drop this context's references to its process groups (before destroy_process_group)."""
        self.tp_group = self.dp_group = self.pp_group = self.cp_group = self.dp_cp_group = None
        self.model_parallel_group = self.world_group = None

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size} "
                f"cp {self.cp_rank}/{self.cp_size} dp {self.dp_rank}/{self.dp_size} pp {self.pp_rank}/{self.pp_size} on {self.device}")
