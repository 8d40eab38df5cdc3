"""Learning-rate schedule: linear warmup, then cosine / linear decay or constant (Megatron semantics).

Steps are counted in whatever unit the caller increments by (samples or iterations). With step
count ``n``, warmup ``W`` and decay end ``D``:

    n <= W (W > 0):   lr = max_lr * n / W                      (0 at n = 0)
    constant style:   lr = max_lr                              (after warmup)
    n > D:            lr = min_lr
    otherwise:        r = (n - W) / (D - W)
                      linear: lr = min_lr + (max_lr - min_lr) * (1 - r)
                      cosine: lr = min_lr + (max_lr - min_lr) * 0.5 * (cos(pi * r) + 1)
"""
from __future__ import annotations

import math
from typing import Any, Optional

from megatron_aquila.config import OptimizerConfig, TrainingConfig

DECAY_STYLES = ("cosine", "linear", "constant")


class LRScheduler:
    def __init__(self, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: Optional[int],
                 decay_style: str = "cosine", unit: str = "iterations"):
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"lr decay style {decay_style!r} must be one of {DECAY_STYLES}")
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= min_lr {min_lr} <= max_lr {max_lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup steps {warmup_steps} must be >= 0")
        if decay_style != "constant" and (decay_steps is None or decay_steps <= warmup_steps):
            raise ValueError(f"{decay_style} decay needs decay steps ({decay_steps}) > warmup steps ({warmup_steps}) "
                             f"(both in {unit}); lengthen the decay or shorten the warmup")
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.decay_style = decay_style
        self.unit = unit             # "samples" or "iterations": what one step(increment) counts
        self.num_steps = 0

    @classmethod
    def from_config(cls, optimizer: OptimizerConfig, training: TrainingConfig) -> "LRScheduler":
        """Samples when ``training.train_samples`` is set (step by the global batch), else iterations (step by 1).

        The decay runs over the whole run (``train_samples`` / ``train_iters``) unless
        ``lr_decay_samples`` / ``lr_decay_iters`` is given.
        """
        if training.train_samples is not None:
            warmup, decay, unit = optimizer.lr_warmup_samples, optimizer.lr_decay_samples, "samples"
            decay = training.train_samples if decay is None else decay
        else:
            warmup, decay, unit = optimizer.lr_warmup_iters, optimizer.lr_decay_iters, "iterations"
            decay = training.train_iters if decay is None else decay
        return cls(optimizer.lr, optimizer.min_lr, warmup, decay, optimizer.lr_decay_style, unit)

    @property
    def lr(self) -> float:
        """The learning rate at the current step count."""
        n = self.num_steps
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.max_lr * n / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if n > self.decay_steps:
            return self.min_lr
        ratio = (n - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + (self.max_lr - self.min_lr) * coeff

    def step(self, increment: int = 1) -> float:
        """Advance by ``increment`` (samples or iterations) and return the new learning rate."""
        if increment < 0:
            raise ValueError(f"lr schedule increment {increment} must be >= 0")
        self.num_steps += increment
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                "decay_style": self.decay_style, "unit": self.unit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count; the shape of the schedule stays the one configured now.

        A checkpoint counted in another unit cannot continue this schedule: that is an error.
        """
        if state.get("unit", self.unit) != self.unit:
            raise ValueError(f"lr schedule checkpoint counts {state['unit']} but this run counts {self.unit}; "
                             "set training.train_samples / train_iters as in the run that saved it")
        self.num_steps = int(state["num_steps"])
