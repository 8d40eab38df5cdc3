"""Dropout follows the module's training flag, and its RNG streams are seeded per TP rank and pipeline stage."""
from __future__ import annotations

import pytest
import torch

from megatron_aquila.config import ModelConfig
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.random import DATA_PARALLEL, MODEL_PARALLEL, RNGStatesTracker

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96,
             vocab_size=250, make_vocab_size_divisible_by=64, seq_length=12)


def _model(attention_dropout: float, hidden_dropout: float, **kwargs) -> AquilaModel:
    config = ModelConfig(**SHAPE, attention_dropout=attention_dropout, hidden_dropout=hidden_dropout)
    return AquilaModel(config, ParallelContext.single_process(), seed=5, **kwargs)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randint(0, SHAPE["vocab_size"], (2, SHAPE["seq_length"]), generator=generator)
                 for _ in range(2))


def test_eval_switches_every_dropout_off_and_train_switches_it_on():
    ids, labels = _batch()
    reference = _model(0.0, 0.0)(ids, labels=labels)  # same seed, so the same weights, and no dropout
    model = _model(attention_dropout=0.5, hidden_dropout=0.3)
    model.eval()
    first, second = model(ids, labels=labels), model(ids, labels=labels)
    torch.testing.assert_close(first, reference, atol=0, rtol=0)
    torch.testing.assert_close(second, reference, atol=0, rtol=0)
    model.train()
    first, second = model(ids, labels=labels), model(ids, labels=labels)
    assert (first - second).abs().max() > 0.1
    assert (first - reference).abs().max() > 0.1


@pytest.mark.parametrize("seed, tp_rank, stage", [(1234, 0, 0), (1234, 1, 0), (1234, 0, 3), (7, 3, 5)])
def test_stream_seeds_are_the_documented_formula(seed, tp_rank, stage):
    """model-parallel: seed + 100 * stage + 2718 + tp_rank; data-parallel: seed + 100 * stage."""
    tracker = RNGStatesTracker(seed, tp_rank, stage)
    for stream, stream_seed in ((MODEL_PARALLEL, seed + 100 * stage + 2718 + tp_rank),
                                (DATA_PARALLEL, seed + 100 * stage)):
        with tracker.fork(stream):
            drawn = torch.rand(64)
        torch.testing.assert_close(drawn, torch.rand(64, generator=torch.Generator().manual_seed(stream_seed)),
                                   atol=0, rtol=0)


def test_tp_ranks_differ_in_the_model_parallel_stream_and_agree_in_the_data_parallel_one():
    for stage in (0, 2):
        draws = []
        for tp_rank in (0, 1):
            tracker = RNGStatesTracker(1234, tp_rank, stage)
            with tracker.fork(MODEL_PARALLEL):
                model_parallel = torch.rand(64)
            with tracker.fork(DATA_PARALLEL):
                data_parallel = torch.rand(64)
            draws.append((model_parallel, data_parallel))
        (mp0, dp0), (mp1, dp1) = draws
        assert not torch.equal(mp0, mp1)
        assert torch.equal(dp0, dp1)


def test_a_negative_pipeline_stage_is_an_error():
    with pytest.raises(ValueError, match="pipeline_stage -1 must be >= 0"):
        RNGStatesTracker(1234, 0, -1)


@pytest.mark.parametrize("attention_dropout, hidden_dropout", [(0.5, 0.0), (0.0, 0.5)])
def test_chunks_at_different_pipeline_stages_draw_different_masks(attention_dropout, hidden_dropout):
    """Attention dropout draws from the model-parallel stream, hidden dropout (no SP) from the data-parallel one.

    The chunks hold the same layer with the same weights, so their outputs differ only through the masks.
    """
    hidden = torch.randn(12, 2, 64, generator=torch.Generator().manual_seed(1))  # [s, b, h]
    outputs = {}
    for name, stage in (("stage 0", 0), ("stage 0 again", 0), ("stage 1", 1), ("stage 5", 5)):
        chunk = _model(attention_dropout, hidden_dropout, layer_ids=[1], pre_process=False, post_process=False,
                       pipeline_stage=stage)
        torch.manual_seed(stage)  # the default generator must not matter: every mask comes from the tracker
        outputs[name] = chunk(hidden_states=hidden)
    torch.testing.assert_close(outputs["stage 0 again"], outputs["stage 0"], atol=0, rtol=0)
    for first, second in (("stage 0", "stage 1"), ("stage 0", "stage 5"), ("stage 1", "stage 5")):
        assert (outputs[first] - outputs[second]).abs().max() > 1e-3, (first, second)  # equal masks: exactly 0
