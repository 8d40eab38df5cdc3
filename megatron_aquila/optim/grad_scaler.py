"""Loss scalers for fp16 training (Megatron semantics).

The loss is multiplied by ``scale`` before backward so that small fp16 gradients do not flush to
zero; the optimizer divides the fp32 gradients by ``scale`` before using them. When any rank finds
an inf/nan gradient the step is skipped and the dynamic scaler is told so through ``update``.
"""
from __future__ import annotations

from typing import Any


class ConstantGradScaler:
    """A fixed loss scale; ``update`` never changes it."""

    def __init__(self, scale: float):
        if not scale > 0:
            raise ValueError(f"loss scale must be > 0, got {scale}")
        self.scale = float(scale)

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        """Nothing to adapt: a constant scaler ignores overflows (the step is still skipped)."""

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])


class DynamicGradScaler:
    """Loss scale that backs off on overflow and grows after a run of clean steps.

    Per call of ``update(found_inf)``:

    - overflow: the clean-step counter resets to 0 and the hysteresis counter drops by one; once it
      is <= 0 the scale becomes ``max(scale * backoff_factor, min_scale)`` (and stays liable to
      back off on every further overflow until the next growth);
    - clean step: the counter grows; after ``growth_interval`` consecutive clean steps the scale is
      multiplied by ``growth_factor``, the counter resets and the hysteresis counter refills.

    So with ``hysteresis = h`` the first ``h - 1`` overflows since the last growth (or start) only
    skip their step, and the ``h``-th and later ones also halve the scale.
    """

    def __init__(self, initial_scale: float, min_scale: float, growth_interval: int, hysteresis: int,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5):
        if not (initial_scale > 0 and min_scale > 0 and initial_scale >= min_scale):
            raise ValueError(f"need initial_scale {initial_scale} >= min_scale {min_scale} > 0")
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(f"growth_interval {growth_interval} and hysteresis {hysteresis} must be >= 1")
        if not (growth_factor > 1 and 0 < backoff_factor < 1):
            raise ValueError(f"need growth_factor {growth_factor} > 1 and 0 < backoff_factor {backoff_factor} < 1")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_tracker = 0                 # consecutive clean steps since the last growth/overflow
        self.hysteresis_tracker = hysteresis    # overflows left before the next back-off

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"scale", "growth_tracker", "hysteresis_tracker"} - set(state)
        if missing:
            raise KeyError(f"grad scaler state lacks {sorted(missing)}; it must come from DynamicGradScaler.state_dict()")
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])
