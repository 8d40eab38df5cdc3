import pytest

from megatron_aquila.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler


def test_constant_scaler_never_changes():
    scaler = ConstantGradScaler(128.0)
    for found_inf in (True, False, True):
        scaler.update(found_inf)
    assert scaler.scale == 128.0 and scaler.inv_scale == 1 / 128.0


def test_growth_after_interval_of_clean_steps():
    scaler = DynamicGradScaler(initial_scale=16.0, min_scale=1.0, growth_interval=3, hysteresis=2)
    scales = []
    for _ in range(7):
        scaler.update(False)
        scales.append(scaler.scale)
    assert scales == [16, 16, 32, 32, 32, 64, 64]


def test_hysteresis_delays_backoff_and_overflow_resets_growth():
    scaler = DynamicGradScaler(initial_scale=64.0, min_scale=1.0, growth_interval=3, hysteresis=2)
    scaler.update(False)
    scaler.update(False)
    scaler.update(True)          # first overflow: tolerated, growth counter reset
    assert scaler.scale == 64.0
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 64.0  # only 2 clean steps since the overflow
    scaler.update(True)          # second overflow: hysteresis exhausted -> halve
    assert scaler.scale == 32.0
    scaler.update(True)          # stays exhausted until the next growth: halve again
    assert scaler.scale == 16.0
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 32.0  # grew, hysteresis refilled
    scaler.update(True)
    assert scaler.scale == 32.0


def test_backoff_stops_at_min_scale():
    scaler = DynamicGradScaler(initial_scale=8.0, min_scale=2.0, growth_interval=100, hysteresis=1)
    seen = []
    for _ in range(4):
        scaler.update(True)
        seen.append(scaler.scale)
    assert seen == [4.0, 2.0, 2.0, 2.0]


def test_custom_factors_and_state_roundtrip():
    scaler = DynamicGradScaler(initial_scale=10.0, min_scale=1.0, growth_interval=1, hysteresis=1,
                               growth_factor=4.0, backoff_factor=0.25)
    scaler.update(False)
    assert scaler.scale == 40.0
    scaler.update(True)
    assert scaler.scale == 10.0
    state = scaler.state_dict()
    other = DynamicGradScaler(initial_scale=1.0, min_scale=1.0, growth_interval=1, hysteresis=1,
                              growth_factor=4.0, backoff_factor=0.25)
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.raises(KeyError, match="hysteresis_tracker"):
        other.load_state_dict({"scale": 1.0, "growth_tracker": 0})


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="min_scale"):
        DynamicGradScaler(initial_scale=1.0, min_scale=2.0, growth_interval=1, hysteresis=1)
    with pytest.raises(ValueError, match="hysteresis"):
        DynamicGradScaler(initial_scale=4.0, min_scale=1.0, growth_interval=1, hysteresis=0)
