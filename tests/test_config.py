"""Recipe loading, overrides and validation: bad input fails early with the numbers in the message."""
from __future__ import annotations

import pytest

from megatron_aquila.config import ConfigError, load_config

VALID = ["training.train_iters=10", "data.mock=true"]


def test_preset_fills_fields_and_explicit_keys_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: aquila2-34b, num_layers: 4}\ntraining: {train_iters: 3}\n")
    config = load_config(recipe, ["model.hidden_size=6144", "optimizer.lr=1e-4"])
    assert config.model.num_layers == 4 and config.model.num_kv_heads == 8
    assert config.model.ffn_size == 24576 and config.model.norm_init == 0.3
    assert config.optimizer.lr == 1e-4 and isinstance(config.optimizer.lr, float)


@pytest.mark.parametrize("override, words", [
    (["model.hidden_sise=8"], ["model.hidden_sise", "valid keys"]),
    (["modle.hidden_size=8"], ["modle", "valid"]),
    (["training.micro_batch_size=two"], ["training.micro_batch_size", "integer", "'two'"]),
    (["parallel.sequence_parallel=1"], ["parallel.sequence_parallel", "true or false"]),
    (["model.preset=aquila3"], ["aquila3", "aquila2-7b"]),
    (["training"], ["section.key=value"]),
])
def test_bad_keys_and_values_are_named(override, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, override)
    for word in words:
        assert word in str(error.value)


def test_missing_recipe_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


INTERLEAVED_RAMPUP = ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=2", "training.train_iters=null",
                      "training.train_samples=1000", "training.global_batch_size=8", "training.micro_batch_size=1"]


@pytest.mark.parametrize("overrides, world, words", [
    (["parallel.tensor_parallel=3"], 6, ["num_attention_heads 8", "tensor_parallel 3"]),
    (["parallel.tensor_parallel=2"], 3, ["world size 3", "tensor_parallel 2", "= 2"]),
    (["model.num_kv_heads=2", "parallel.tensor_parallel=4"], 4, ["num_kv_heads 2", "tensor_parallel 4"]),
    (["parallel.pipeline_parallel=3"], 3, ["num_layers 4", "pipeline_parallel 3"]),
    (["training.global_batch_size=6", "training.micro_batch_size=2"], 2, ["global_batch_size 6", "= 4"]),
    (["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=2", "training.global_batch_size=3"], 2,
     ["micro-batches per step (3", "pipeline_parallel 2"]),
    (["parallel.sequence_parallel=true"], 1, ["sequence_parallel needs tensor_parallel > 1"]),
    (["training.train_samples=100"], 1, ["exactly one of training.train_iters and training.train_samples"]),
    (["training.rampup_batch_size=[3, 4, 100]"], 2, ["rampup start 3"]),
    (["data.mock=false"], 1, ["data.data_path is empty"]),
    (["precision.dtype=fp8"], 1, ["precision.dtype 'fp8' is not implemented", "use precision.dtype=bf16"]),
    (["training.train_iters=null", "training.train_samples=1000", "training.rampup_batch_size=[2, 0, 100]"], 1,
     ["increment 0 >= 1"]),
    # every stage but the middle one (batches 2, 5, 8) divides into micro-batches evenly over pp 2
    (INTERLEAVED_RAMPUP + ["training.rampup_batch_size=[2, 3, 100]"], 2,
     ["ramp-up stage 1 (global batch 5", "gives 5 = 5 / (micro 1 x dp 1)", "pipeline_parallel 2"]),
    # the first stage is wrong while the full batch (8) is fine: micro 2 x dp 1, batches 2, 4, 6, 8
    (INTERLEAVED_RAMPUP + ["training.micro_batch_size=2", "training.rampup_batch_size=[2, 2, 100]"], 2,
     ["ramp-up stage 0 (global batch 2", "gives 1 = 2 / (micro 2 x dp 1)", "pipeline_parallel 2"]),
])
def test_invalid_layouts_carry_the_numbers(overrides, world, words):
    config = load_config(None, VALID + overrides)
    with pytest.raises(ConfigError) as error:
        config.validate(world)
    for word in words:
        assert word in str(error.value), f"{word!r} not in {error.value}"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, VALID + ["model.preset=aquila2-7b", "parallel.distributed_optimizer=true"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_interleaved_rampup_with_every_stage_divisible_passes():
    config = load_config(None, VALID + INTERLEAVED_RAMPUP + ["training.rampup_batch_size=[2, 2, 100]"])
    config.validate(2)  # batches 2, 4, 6, 8: 2, 4, 6, 8 micro-batches, all even


def test_an_older_torch_is_refused_at_import_with_the_version_found():
    import subprocess
    import sys
    code = "import torch; torch.__version__ = '2.4.1+cu121'; import megatron_aquila"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "megatron_aquila needs torch >= 2.10, found 2.4.1+cu121" in result.stderr, result.stderr
    import megatron_aquila  # NGC PyTorch 25.12's pre-release passes, the CPU build here too
    assert megatron_aquila._torch_release("2.10.0a0+b4e4ee81d3") == megatron_aquila.MIN_TORCH == (2, 10)
    assert megatron_aquila._torch_release("2.13.0+cpu") == (2, 13)
