import math

import pytest

from megatron_aquila.config import OptimizerConfig, TrainingConfig
from megatron_aquila.optim.lr_schedule import LRScheduler


def lr_at(scheduler: LRScheduler, steps: int) -> float:
    scheduler.num_steps = 0
    return scheduler.step(steps)


def test_linear_warmup_from_zero():
    s = LRScheduler(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110, decay_style="cosine")
    assert s.lr == 0.0
    assert lr_at(s, 1) == pytest.approx(1e-4)
    assert lr_at(s, 5) == pytest.approx(5e-4)
    assert lr_at(s, 10) == pytest.approx(1e-3)


def test_cosine_decay_points():
    s = LRScheduler(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110, decay_style="cosine")
    # halfway through the decay: cos(pi/2) = 0 -> midpoint; a quarter: 0.5*(cos(pi/4)+1)
    assert lr_at(s, 60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(s, 35) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (math.cos(math.pi / 4) + 1))
    assert lr_at(s, 110) == pytest.approx(1e-4)
    assert lr_at(s, 500) == pytest.approx(1e-4)


def test_linear_decay_points():
    s = LRScheduler(max_lr=2.0, min_lr=0.0, warmup_steps=0, decay_steps=100, decay_style="linear")
    assert s.lr == pytest.approx(2.0)
    assert lr_at(s, 25) == pytest.approx(1.5)
    assert lr_at(s, 100) == pytest.approx(0.0)
    assert lr_at(s, 101) == 0.0


def test_constant_after_warmup_and_increments_accumulate():
    s = LRScheduler(max_lr=3.0, min_lr=1.0, warmup_steps=4, decay_steps=None, decay_style="constant")
    assert [s.step(2) for _ in range(4)] == pytest.approx([1.5, 3.0, 3.0, 3.0])
    assert s.num_steps == 8


def test_from_config_units_and_state():
    opt = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_samples=64, lr_warmup_iters=2)
    by_samples = LRScheduler.from_config(opt, TrainingConfig(train_samples=1024))
    assert (by_samples.unit, by_samples.warmup_steps, by_samples.decay_steps) == ("samples", 64, 1024)
    by_iters = LRScheduler.from_config(opt, TrainingConfig(train_iters=50))
    assert (by_iters.unit, by_iters.warmup_steps, by_iters.decay_steps) == ("iterations", 2, 50)
    by_iters.step(7)
    fresh = LRScheduler.from_config(opt, TrainingConfig(train_iters=50))
    fresh.load_state_dict(by_iters.state_dict())
    assert fresh.lr == by_iters.lr and fresh.num_steps == 7
    with pytest.raises(ValueError, match="counts samples"):
        fresh.load_state_dict(by_samples.state_dict())


def test_bad_schedule_raises():
    with pytest.raises(ValueError, match="decay steps"):
        LRScheduler(max_lr=1.0, min_lr=0.0, warmup_steps=10, decay_steps=10, decay_style="cosine")
    with pytest.raises(ValueError, match="decay style"):
        LRScheduler(max_lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=10, decay_style="step")
