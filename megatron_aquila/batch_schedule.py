"""Global batch size over the run, with Megatron's linear batch-size ramp-up.

With ``rampup_batch_size = [start, increment, ramp_samples]`` the global batch grows from ``start``
by ``increment`` in (global - start) / increment equal steps spread over ``ramp_samples`` consumed
samples: batch(c) = min(global, start + floor(c / (ramp_samples / steps)) x increment). Aquila2-34B
ramps from 32 to 1024 by 32 over 2,000,000 samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class BatchSchedule:
    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    rampup: Optional[tuple[int, int, int]] = None  # (start, increment, ramp samples)

    def __post_init__(self) -> None:
        step = self.micro_batch_size * self.data_parallel_size
        assert self.global_batch_size % step == 0, (
            f"global batch {self.global_batch_size} % (micro {self.micro_batch_size} x dp {self.data_parallel_size}) != 0")
        if self.rampup is not None:
            start, increment, _ = self.rampup
            assert start % step == 0 and increment % step == 0, (
                f"ramp-up start {start} and increment {increment} must be multiples of micro x dp = {step}")

    def global_batch_at(self, consumed_samples: int) -> int:
        if self.rampup is None:
            return self.global_batch_size
        start, increment, ramp_samples = self.rampup
        steps = (self.global_batch_size - start) // increment
        if steps <= 0 or ramp_samples <= 0:
            return self.global_batch_size
        samples_per_step = ramp_samples / steps
        return min(self.global_batch_size, start + int(consumed_samples / samples_per_step) * increment)

    def num_microbatches_at(self, consumed_samples: int) -> int:
        """Micro-batches each data-parallel rank runs in the iteration starting at ``consumed_samples``."""
        return self.global_batch_at(consumed_samples) // (self.micro_batch_size * self.data_parallel_size)

    def samples_consumed_by(self, iterations: int) -> int:
        """Samples consumed by the first ``iterations`` iterations (what the data must supply)."""
        consumed = 0
        for _ in range(iterations):
            consumed += self.global_batch_at(consumed)
        return consumed

    def iterations_for(self, train_samples: int) -> int:
        """Iterations needed to consume ``train_samples`` (the last one may overshoot, as in Megatron)."""
        consumed, iterations = 0, 0
        if self.rampup is not None:
            while consumed < min(train_samples, self.rampup[2]):
                consumed += self.global_batch_at(consumed)
                iterations += 1
        remaining = max(0, train_samples - consumed)
        return iterations + -(-remaining // self.global_batch_size)
