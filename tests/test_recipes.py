"""Aquila2 recipes against docs/design.md section 7, and the dry-run planner against real models."""
from __future__ import annotations

from pathlib import Path

import pytest

from distributed import run_distributed
from megatron_aquila import memory_model, plan
from megatron_aquila.config import ConfigError, load_config
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.pipeline.partition import chunk_has_embedding, chunk_has_head, chunk_layer_ids

ROOT = Path(__file__).resolve().parent.parent
RECIPE_7B = ROOT / "examples/aquila2/7b/aquila2_7b.yaml"
RECIPE_34B = ROOT / "examples/aquila2/34b/aquila2_34b.yaml"

# docs/design.md section 7, written out here independently of the recipes.
EXPECTED_7B = {
    "model.num_layers": 32, "model.hidden_size": 4096, "model.num_attention_heads": 32, "model.kv_heads": 32,
    "model.ffn_size": 11008, "model.seq_length": 2048, "model.vocab_size": 100008,
    "model.make_vocab_size_divisible_by": 128, "model.norm_eps": 1e-5, "model.norm_init": 1.0,
    "model.rope_base": 10000.0, "model.rope_interleaved": False, "model.init_std": 0.02,
    "model.attention_dropout": 0.0, "model.hidden_dropout": 0.0,
    "parallel.tensor_parallel": 1, "parallel.pipeline_parallel": 1, "parallel.virtual_pipeline_stages": 1,
    "parallel.sequence_parallel": False, "parallel.distributed_optimizer": True,
    "training.micro_batch_size": 2, "training.global_batch_size": 1728, "training.rampup_batch_size": None,
    "training.train_samples": 1_002_539_063, "training.train_iters": None, "training.recompute": "none",
    "training.seed": 1234,
    "precision.dtype": "fp16", "precision.initial_loss_scale": 522893.0, "precision.min_loss_scale": 1.0,
    "optimizer.adam_beta1": 0.9, "optimizer.adam_beta2": 0.95, "optimizer.adam_eps": 1e-8,
    "optimizer.weight_decay": 0.1, "optimizer.clip_grad": 1.0, "optimizer.lr": 2e-5, "optimizer.min_lr": 2e-6,
    "optimizer.lr_decay_style": "cosine", "optimizer.lr_warmup_samples": 3_076_172,
}
EXPECTED_34B = {
    "model.num_layers": 60, "model.hidden_size": 6144, "model.num_attention_heads": 48, "model.kv_heads": 8,
    "model.ffn_size": 24576, "model.seq_length": 4096, "model.vocab_size": 100008,
    "model.make_vocab_size_divisible_by": 64, "model.norm_eps": 1e-5, "model.norm_init": 0.3,
    "model.rope_base": 10000.0, "model.rope_interleaved": False, "model.init_std": 0.0165,
    "model.attention_dropout": 0.0, "model.hidden_dropout": 0.0,
    "parallel.tensor_parallel": 4, "parallel.pipeline_parallel": 4, "parallel.virtual_pipeline_stages": 1,
    "parallel.sequence_parallel": True, "parallel.distributed_optimizer": True,
    "training.micro_batch_size": 1, "training.global_batch_size": 1024,
    "training.rampup_batch_size": [32, 32, 2_000_000],
    "training.train_samples": 488_281_250, "training.train_iters": None, "training.recompute": "none",
    "training.seed": 42,
    "precision.dtype": "bf16",
    "optimizer.adam_beta1": 0.9, "optimizer.adam_beta2": 0.95, "optimizer.adam_eps": 1e-8,
    "optimizer.weight_decay": 0.1, "optimizer.clip_grad": 1.0, "optimizer.lr": 1.5e-4, "optimizer.min_lr": 1.5e-5,
    "optimizer.lr_decay_style": "cosine", "optimizer.lr_warmup_samples": 500_000,
}
AQUILA2_PARAMETERS = {"7b": 7_295_537_152, "34b": 33_693_554_688}


def _lookup(config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


@pytest.mark.parametrize("recipe, expected, padded_vocab, tp", [
    (RECIPE_7B, EXPECTED_7B, 100096, 1), (RECIPE_34B, EXPECTED_34B, 100096, 4)])
def test_recipe_values_match_design(recipe, expected, padded_vocab, tp):
    config = load_config(recipe)
    wrong = {k: (_lookup(config, k), v) for k, v in expected.items() if _lookup(config, k) != v}
    assert not wrong, f"recipe {recipe.name} differs from docs/design.md section 7 (got, expected): {wrong}"
    assert config.model.padded_vocab_size(tp) == padded_vocab
    assert config.data.data_path and not config.data.mock


def test_recipes_validate_at_their_world_size_only():
    seven, thirty_four = load_config(RECIPE_7B), load_config(RECIPE_34B)
    seven.validate(96)   # 12 nodes x 8 A800
    thirty_four.validate(512)  # 64 nodes x 8 A100-40G
    assert seven.data_parallel_size(96) == 96 and thirty_four.data_parallel_size(512) == 32
    with pytest.raises(ConfigError, match="global_batch_size 1728"):
        seven.validate(80)  # DP 80: 1728 % (2 x 80) != 0
    with pytest.raises(ConfigError, match="tensor_parallel 4 x context_parallel 1 x pipeline_parallel 4"):
        thirty_four.validate(500)


def _small_config(tp: int, pp: int, vpp: int, **model):
    shape = dict(num_layers=8, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                 seq_length=16, vocab_size=1000, make_vocab_size_divisible_by=16)
    shape.update(model)
    overrides = [f"model.{k}={v}" for k, v in shape.items()] + [
        f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
        f"parallel.virtual_pipeline_stages={vpp}", "training.micro_batch_size=1",
        f"training.global_batch_size={4 * pp}", "training.train_iters=1", "data.mock=true"]
    return load_config(None, overrides)


def _real_counts(config, ctx: ParallelContext) -> dict[int, int]:
    """Parameters per pipeline rank of real CPU models (initialised weights) for this TP rank."""
    p = config.parallel
    counts = {}
    for pp_rank in range(p.pipeline_parallel):
        total = 0
        for chunk in range(p.virtual_pipeline_stages):
            ids = chunk_layer_ids(config.model.num_layers, p.pipeline_parallel, p.virtual_pipeline_stages,
                                  pp_rank, chunk, p.pipeline_layers)
            model = AquilaModel(config.model, ctx, layer_ids=ids, pre_process=chunk_has_embedding(pp_rank, chunk),
                                post_process=chunk_has_head(pp_rank, chunk, p.pipeline_parallel,
                                                            p.virtual_pipeline_stages), device="cpu")
            assert all(param.device.type == "cpu" for param in model.parameters())
            total += sum(param.numel() for param in model.parameters())
        counts[pp_rank] = total
    return counts


def _planned(config, world: int) -> dict[tuple[int, int], int]:
    return {(r.tp_rank, r.pp_rank): r.total for r in memory_model.rank_parameters(config, world)}


@pytest.mark.parametrize("pp, vpp, pipeline_layers", [(2, 1, None), (2, 2, None), (2, 1, [3, 5])])
def test_planner_counts_equal_real_models_tp1(pp, vpp, pipeline_layers):
    config = _small_config(1, pp, vpp)
    config.parallel.pipeline_layers = pipeline_layers
    real = _real_counts(config, ParallelContext.single_process())
    assert _planned(config, pp) == {(0, r): n for r, n in real.items()}


def _tp_worker(rank: int, world_size: int, pp: int, vpp: int) -> dict[int, int]:
    config = _small_config(world_size, pp, vpp)
    ctx = ParallelContext.initialize(world_size, 1)  # the real TP group over gloo
    return _real_counts(config, ctx)


def test_planner_counts_equal_real_models_tp2_with_pipeline_chunks():
    tp, pp, vpp = 2, 2, 2
    real = run_distributed(_tp_worker, world_size=tp, args=(pp, vpp))
    planned = _planned(_small_config(tp, pp, vpp), tp * pp)
    assert planned == {(t, r): n for t, counts in enumerate(real) for r, n in counts.items()}
    # Independent total: sharded tensors summed over TP, RMSNorm weights counted once.
    h, n, g, d, f, layers, vocab = 64, 4, 2, 16, 96, 8, 1024  # 1000 padded to a multiple of 16 x 2
    per_layer = h * (n + 2 * g) * d + n * d * h + 3 * h * f
    replicated = 2 * h * layers + h
    assert sum(planned.values()) == layers * per_layer + 2 * vocab * h + tp * replicated


@pytest.mark.parametrize("size, recipe, world", [("7b", RECIPE_7B, 96), ("34b", RECIPE_34B, 512)])
def test_planner_total_parameters_equal_design(size, recipe, world):
    config = load_config(recipe)
    ranks = memory_model.rank_parameters(config, world)
    padded_total = sum(r.sharded for r in ranks) + sum(r.replicated for r in ranks if r.tp_rank == 0)
    h = config.model.hidden_size
    padding = config.model.padded_vocab_size(config.parallel.tensor_parallel) - 100008
    assert padded_total - 2 * padding * h == AQUILA2_PARAMETERS[size]


def test_planner_cli_on_both_recipes(capsys):
    assert plan.main([str(RECIPE_7B), "--nodes", "12", "--gpus-per-node", "8", "--gpu", "A800-80G"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 7,295,537,152" in out and "FITS on A800-80G" in out
    assert plan.main([str(RECIPE_34B), "--nodes", "64", "--gpus-per-node", "8", "--gpu", "A100-40G"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 33,693,554,688" in out and "FITS on A100-40G" in out and "margin:" in out
    # 16 GPUs: DP1, so the distributed optimizer shards nothing and the fp32 state alone is ~24 GiB per GPU.
    assert plan.main([str(RECIPE_34B), "--nodes", "2", "--gpus-per-node", "8", "--gpu", "A100-40G"]) == 1
    assert "DOES NOT FIT on A100-40G" in capsys.readouterr().out


def test_planner_clear_errors(capsys):
    assert plan.main([str(RECIPE_7B), "--nodes", "12", "--gpus-per-node", "8", "--gpu", "V100"]) == 2
    assert "unknown GPU 'V100'" in capsys.readouterr().err
    argv = [str(RECIPE_34B), "--nodes", "1", "--gpus-per-node", "8", "--gpu", "H100"]
    assert plan.main(argv) == 2  # 8 GPUs cannot hold TP4 x PP4
    assert "world size 8 is not divisible by tensor_parallel 4 x context_parallel 1 x pipeline_parallel 4" in capsys.readouterr().err
    assert plan.main(argv + ["parallel.tensor_parallel=3"]) == 2
    assert "configuration error" in capsys.readouterr().err


@pytest.mark.parametrize("name, memory_gib, peak", [("H200", 141.0, 989.0), ("b200", 180.0, 2250.0)])
def test_planner_knows_h200_and_b200(name, memory_gib, peak, capsys):
    # Nominal memory and dense bf16 peak from NVIDIA's data sheets; "H200" must not read as "H20" (96 GiB, 148).
    spec = plan.gpu_spec(name)
    assert (spec.name, spec.memory_gib, spec.peak_tflops) == (name.upper(), memory_gib, peak)
    assert plan.main([str(RECIPE_7B), "--nodes", "12", "--gpus-per-node", "8", "--gpu", name]) == 0
    out = capsys.readouterr().out
    assert f"{memory_gib:g} GiB {name.upper()}" in out and f"of {peak:g} TFLOP/s" in out, out


LONG_CONTEXT = [
    # recipe, its base, nodes x GPU, (seq, PI factor, CP), tokens per global batch of the base
    ("7b/aquila2_7b_8k.yaml", RECIPE_7B, 12, "A800-80G", (8192, 4.0, 2)),
    ("7b/aquila2_7b_16k.yaml", RECIPE_7B, 12, "A800-80G", (16384, 8.0, 4)),
    ("34b/aquila2_34b_8k.yaml", RECIPE_34B, 64, "A100-40G", (8192, 2.0, 2)),
    ("34b/aquila2_34b_16k.yaml", RECIPE_34B, 64, "A100-40G", (16384, 4.0, 4)),
]


@pytest.mark.parametrize("name, base_path, nodes, gpu, extension", LONG_CONTEXT)
def test_long_context_recipes_extend_the_base_and_fit(name, base_path, nodes, gpu, extension, capsys):
    """Same model shape as the base, PI factor = new length / trained length, global tokens kept
    within 1%, a CP degree without which the planner says it does not fit, and init from the base run."""
    seq, factor, cp = extension
    recipe, base = load_config(ROOT / "examples/aquila2" / name), load_config(base_path)
    assert (recipe.model.seq_length, recipe.model.rope_scaling, recipe.model.rope_scaling_factor,
            recipe.parallel.context_parallel) == (seq, "linear", factor, cp)
    assert factor == seq / base.model.seq_length
    for key in ("num_layers", "hidden_size", "num_attention_heads", "kv_heads", "ffn_size", "vocab_size"):
        assert getattr(recipe.model, key) == getattr(base.model, key), key
    tokens, base_tokens = (c.training.global_batch_size * c.model.seq_length for c in (recipe, base))
    assert abs(tokens / base_tokens - 1) < 0.01, (tokens, base_tokens)
    assert recipe.checkpoint.init_weights == base.checkpoint.save
    assert plan.main([str(ROOT / "examples/aquila2" / name), "--nodes", str(nodes), "--gpus-per-node", "8",
                      "--gpu", gpu]) == 0, capsys.readouterr().out
    p, world = recipe.parallel, nodes * 8
    dp_without_cp = world // (p.tensor_parallel * p.pipeline_parallel)
    without_cp = ["parallel.context_parallel=1", "training.global_batch_size="
                  f"{recipe.training.micro_batch_size * dp_without_cp * p.pipeline_parallel}"]
    assert plan.main([str(ROOT / "examples/aquila2" / name), *without_cp, "--nodes", str(nodes), "--gpus-per-node",
                      "8", "--gpu", gpu]) == 1, "the recipe should not fit without context parallelism"
