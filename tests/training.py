"""Build a run from a recipe and overrides in this process (one of a gloo job, or alone) and train it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from megatron_aquila.build import build_trainer_parts
from megatron_aquila.config import load_config
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.trainer import Trainer
from megatron_aquila.training_state import TrainerParts, TrainingState


def train_with(overrides: list[str], world_size: int, recipe: Optional[Path] = None,
               prepare: Optional[Callable[[TrainerParts, ParallelContext], None]] = None,
               ) -> tuple[TrainingState, TrainerParts, ParallelContext]:
    """Train without metric sinks; returns the final state, the built parts and the context.

    ``prepare(parts, ctx)``, if given, runs after the build and before training (to swap a data
    stream, say).
    """
    config = load_config(recipe, overrides)
    config.validate(world_size)
    p = config.parallel
    ctx = (ParallelContext.single_process() if world_size == 1 else
           ParallelContext.initialize(p.tensor_parallel, p.pipeline_parallel, cp_size=p.context_parallel))
    parts, state = build_trainer_parts(config, ctx)
    if prepare is not None:
        prepare(parts, ctx)
    return Trainer(config, ctx, parts, None, state).train(), parts, ctx
