"""Batch-size ramp-up (Megatron semantics) as the Aquila2-34B plan uses it."""
from __future__ import annotations

from megatron_aquila.batch_schedule import BatchSchedule


def test_aquila2_34b_rampup_from_32_to_1024():
    # 34B: ramp from 32 by 32 over 2,000,000 samples, micro 1 x DP 32 (TP4 PP4 on 512 GPUs).
    schedule = BatchSchedule(1024, 1, 32, (32, 32, 2_000_000))
    steps = (1024 - 32) // 32                      # 31 increments
    per_step = 2_000_000 / steps                   # samples consumed between increments
    assert schedule.global_batch_at(0) == 32
    assert schedule.global_batch_at(int(per_step) - 1) == 32
    assert schedule.global_batch_at(int(per_step) + 1) == 64
    assert schedule.global_batch_at(2_000_000) == 1024
    assert schedule.global_batch_at(10 ** 9) == 1024
    assert schedule.num_microbatches_at(0) == 1 and schedule.num_microbatches_at(2_000_000) == 32


def test_iterations_for_counts_the_ramp():
    schedule = BatchSchedule(8, 1, 2, (2, 2, 12))
    consumed, iterations = 0, 0
    while consumed < 40:                           # walk the schedule by hand
        consumed += schedule.global_batch_at(consumed)
        iterations += 1
    assert schedule.iterations_for(40) == iterations
    assert BatchSchedule(8, 1, 2).iterations_for(40) == 5


def test_samples_consumed_cover_the_overshooting_last_batch():
    schedule = BatchSchedule(8, 1, 2, (2, 2, 12))
    iterations = schedule.iterations_for(40)
    assert schedule.samples_consumed_by(iterations) >= 40
    assert schedule.samples_consumed_by(iterations - 1) < 40
    assert BatchSchedule(8, 1, 2).samples_consumed_by(3) == 24
