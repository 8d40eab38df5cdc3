"""Tensor-parallel-aware random number streams (Megatron's CUDA RNG tracker, without globals).

Dropout draws from the device's default generator (CUDA on GPU, the CPU generator otherwise).
The tracker keeps named generator states and ``fork(name)`` swaps one in for the duration of a
``with`` block, then stores its advanced state back and restores the default one.

Seeding. A model chunk on TP rank t at global virtual pipeline stage p (p = chunk * pp_size +
pp_rank, unique per (pp_rank, chunk); p = pp_rank without virtual stages) starts from the stage seed
    seed_p = seed + 100 * p                      (Megatron's ``seed + 100 * pp_rank``)
and holds two streams:

- ``"model-parallel"``, seeded ``seed_p + 2718 + t``: regions whose activations differ across
  TP ranks (attention dropout on a rank's heads, dropout on sequence-parallel shards), so every
  rank draws an independent mask;
- ``"data-parallel"``, seeded ``seed_p``: regions whose activations are replicated across TP, so
  every TP rank of a stage draws the same mask.

Distinct stages therefore draw distinct masks in both streams, and stage 0 (the whole model under
PP1) keeps the seeds ``seed + 2718 + t`` and ``seed``. All streams of a run have distinct seeds
while tp_size <= 82: two model-parallel seeds coincide only if |t - t'| = 100 |p - p'| >= 100, and a
data-parallel seed equals a model-parallel one only if t = 100 (p - p') - 2718, whose least
non-negative solution is t = 82.

The tracker is owned by the model (one per model chunk); ``get_states``/``set_states`` save and
restore it with checkpoints and let activation recompute replay the same masks.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

MODEL_PARALLEL = "model-parallel"
DATA_PARALLEL = "data-parallel"


def _get_device_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_device_state(state: torch.Tensor, device: torch.device) -> None:
    if type(state) is not torch.Tensor:  # the dry run's fake copy of a state: fake ops draw nothing to replay
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _seeded_state(seed: int, device: torch.device) -> torch.Tensor:
    """The default generator state of ``device`` after ``manual_seed(seed)``, without disturbing it."""
    if device.type == "cuda":
        generator = torch.Generator(device=device)
    else:
        generator = torch.Generator()
    generator.manual_seed(seed)
    return generator.get_state()


class RNGStatesTracker:
    """Named RNG streams of the chunk at global virtual ``pipeline_stage`` on TP rank ``tp_rank``
    on ``device``; seeds as in the module docstring."""

    def __init__(self, seed: int, tp_rank: int, pipeline_stage: int, device: torch.device | str | None = None):
        if pipeline_stage < 0:
            raise ValueError(f"pipeline_stage {pipeline_stage} must be >= 0 (chunk * pp_size + pp_rank)")
        self.device = torch.device(device or "cpu")
        if self.device.type == "meta":
            self.device = torch.device("cpu")
        self.states: dict[str, torch.Tensor] = {}
        stage_seed = seed + 100 * pipeline_stage
        self.add(MODEL_PARALLEL, stage_seed + 2718 + tp_rank)
        self.add(DATA_PARALLEL, stage_seed)

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG stream {name!r} already exists (streams: {sorted(self.states)})")
        self.states[name] = _seeded_state(seed, self.device)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default generator is left untouched."""
        if name not in self.states:
            raise KeyError(f"unknown RNG stream {name!r}; streams: {sorted(self.states)}")
        outside = _get_device_state(self.device)
        _set_device_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_device_state(self.device)
            _set_device_state(outside, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every stream's state (for checkpoints and recompute)."""
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.states) - set(states))
        if missing:
            raise KeyError(f"RNG states lack stream(s) {missing}; got {sorted(states)}")
        self.states = {name: state.clone() for name, state in states.items()}
