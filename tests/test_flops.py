"""Analytic parameter count and FLOPs (docs/design.md sections 6 and 7)."""
from __future__ import annotations

import pytest

from megatron_aquila.config import ModelConfig
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.flops import flops_per_iteration, num_parameters
from megatron_aquila.model.presets import MODEL_PRESETS
from megatron_aquila.parallel.context import ParallelContext


@pytest.mark.parametrize("preset, expected", [("aquila2-7b", 7_295_537_152), ("aquila2-34b", 33_693_554_688)])
def test_published_parameter_counts(preset, expected):
    assert num_parameters(ModelConfig(**MODEL_PRESETS[preset])) == expected


@pytest.mark.parametrize("shape", [
    dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96, vocab_size=250),
    dict(num_layers=3, hidden_size=48, num_attention_heads=6, num_kv_heads=6, vocab_size=100),
])
def test_count_equals_real_model(shape):
    config = ModelConfig(**shape, make_vocab_size_divisible_by=64)
    model = AquilaModel(config, ParallelContext.single_process(), device="meta")
    real = sum(p.numel() for p in model.parameters())
    assert num_parameters(config, padded_vocab=config.padded_vocab_size(1)) == real


def test_flops_formula_by_hand():
    config = ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, num_kv_heads=1, ffn_hidden_size=16,
                         seq_length=4)
    # d = 4, n = 2, g = 1: per layer h(2dn + 2dg) = 8 * 24 = 192, 3hf = 384, s d n = 32; head h V = 80
    assert flops_per_iteration(config, global_batch=3, padded_vocab=10) == 6 * 3 * 4 * (2 * (192 + 384 + 32) + 80)
    # LoRA, 100 adapter parameters: weights 2 * (192 + 384) + 80 = 1232 at 4, attention 2 * 32 and adapters at 6
    assert flops_per_iteration(config, 3, 10, adapter_parameters=100) == 3 * 4 * (4 * 1232 + 6 * 64 + 6 * 100)
