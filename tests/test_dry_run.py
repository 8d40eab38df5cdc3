"""The dry run (megatron_aquila/dryrun) against real runs, and the planner against the dry run.

1. The dry run measures what a real run allocates: the same layouts run for real on gloo with the
   same observers (``measure_step(fake=False)``, the CPU kernels) and each rank is then impersonated
   by the dry run on fake tensors; the peak and each category of it agree within 2% of the peak on
   every rank (gloo stages one reduce-scatter buffer of its own that the fake backend, like NCCL,
   does not: a few KiB here), and the collectives (op, group, calls, bytes) are identical.
2. Host syncs are per iteration, never per micro-batch: doubling the micro-batches leaves every
   call site's count unchanged, but for the varlen kernel's document layout of packed SFT
   (model/packed_attention.py: the host must know the documents), which doubles.
3. Every shipped recipe dry-runs at full size on the cluster its header names (``plan`` there), fits
   its GPU, and the planner agrees with it within 5% on the total and on every term; the
   communication model agrees with the logged collectives.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from megatron_aquila import plan
from megatron_aquila.config import load_config
from megatron_aquila.dryrun.memory import CATEGORIES
from megatron_aquila.dryrun.report import memory_terms, planned_rank
from megatron_aquila.dryrun.runner import DryRunError, DryRunSettings, dry_run, measure_step
from megatron_aquila.memory_model import ActivationShape, rank_memory
from megatron_aquila.comm_model import communication_per_iteration
from megatron_aquila.parallel.context import ParallelContext

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
         "model.ffn_hidden_size=96", "model.seq_length=32", "model.vocab_size=1000",
         "model.make_vocab_size_divisible_by=16", "training.train_iters=2", "optimizer.lr=1e-3"]
LAYOUTS = {
    "tp2-pp2-dp2-sp-zero1": (8, ["data.mock=true", "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
                                 "parallel.sequence_parallel=true", "parallel.distributed_optimizer=true",
                                 "training.micro_batch_size=2", "training.global_batch_size=8"]),
    "cp2-sft-lora": (2, ["data.sft=true", "data.data_path=[unused]", "parallel.context_parallel=2",
                         "training.micro_batch_size=2", "training.global_batch_size=4",
                         "finetune.lora={rank: 4, alpha: 8.0, dropout: 0.1, targets: [qkv, dense, gate_up, down]}",
                         "checkpoint.init_weights=unused"]),
}


def _config(overrides: list[str]):
    return load_config(None, SMALL + overrides)


def _real_worker(rank: int, world_size: int, overrides: list[str]) -> dict:
    config = _config(overrides)
    p = config.parallel
    ctx = ParallelContext.initialize(p.tensor_parallel, p.pipeline_parallel, torch.device("cpu"),
                                     cp_size=p.context_parallel)
    report = measure_step(config, ctx, DryRunSettings(world_size=world_size, rank=rank, attention="cpu"), fake=False)
    ctx.release_groups()
    return {"peak": report.peak.by_category, "collectives": report.collectives, "syncs": report.host_syncs}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dry_run_measures_what_the_real_run_allocates(layout):
    world, overrides = LAYOUTS[layout]
    real = run_distributed(_real_worker, world, (overrides,))
    config = _config(overrides)
    for rank, measured in enumerate(real):
        dry = dry_run(config, DryRunSettings(world_size=world, rank=rank, attention="cpu"))
        real_total = sum(measured["peak"].values())
        for category in CATEGORIES:
            got, want = dry.peak.by_category[category], measured["peak"][category]
            assert abs(got - want) <= 0.02 * real_total, (layout, rank, category, got, want, real_total)
        assert real_total > 0 and abs(dry.peak.total - real_total) <= 0.02 * real_total, (dry.peak, measured)
        assert dry.collectives == measured["collectives"], (layout, rank)
        assert set(dry.host_syncs) == set(measured["syncs"]), (layout, rank)


def test_host_syncs_do_not_grow_with_micro_batches():
    """Per-token loss averaging and varlen packed attention (SFT), ZeRO-1 over PP2: every host sync is once per
    iteration."""
    config = _config(["data.sft=true", "data.data_path=[unused]", "parallel.pipeline_parallel=2",
                      "parallel.distributed_optimizer=true", "precision.dtype=fp16", "training.micro_batch_size=1",
                      "training.global_batch_size=8"])
    counts = [dry_run(config, DryRunSettings(world_size=4, rank=rank, microbatches=m)).host_syncs
              for m in (2, 4) for rank in (0, 2)]
    for few, many in ((counts[0], counts[2]), (counts[1], counts[3])):
        # the varlen layout comes from the documents the loader found on the host: no read per micro-batch
        assert not [site for site in many if "packed_attention.py" in site], many
        assert few == many and few, (few, many)
        assert all(count == 1 for count in many.values()), many
    sites = " ".join(counts[3])
    assert "grad_norm" in sites and "_found_inf" in sites, sites  # fp16: the inf check, on every rank


def test_dry_run_refuses_what_it_cannot_impersonate():
    config = _config(["data.mock=true", "parallel.tensor_parallel=2"])
    with pytest.raises(DryRunError, match="--rank 4 is outside the world of 4 ranks"):
        dry_run(config, DryRunSettings(world_size=4, rank=4))
    with pytest.raises(DryRunError, match="must be one of"):
        dry_run(config, DryRunSettings(world_size=4, attention="triton"))


# ---------------------------------------------------------------------------------- the shipped recipes
RECIPES = plan.SHIPPED_RECIPES


def test_every_recipe_is_planned_for_its_cluster():
    examples = ROOT / "examples/aquila2"
    shipped = sorted(str(path.relative_to(examples)) for path in examples.glob("*/*.yaml"))
    assert shipped == sorted(RECIPES), "add the recipe and the cluster it plans for to plan.SHIPPED_RECIPES"


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_dry_runs_at_full_size_fits_and_the_planner_agrees(name, capsys):
    nodes, gpus_per_node, gpu_name = RECIPES[name]
    gpu = plan.gpu_spec(gpu_name)
    recipe = ROOT / "examples/aquila2" / name
    config = load_config(recipe)
    pp = config.parallel.pipeline_parallel
    # The first stage holds pp micro-batches in flight under 1F1B, the last one: pp micro-batches reach
    # every stage's peak (more only repeat the steady state and cost time).
    argv = [str(recipe), "--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node), "--gpu", gpu_name,
            "--dry-run", "--ranks", "first-last-stage", "--microbatches", str(pp)]
    assert plan.main(argv) == 0, capsys.readouterr()
    if config.finetune.qlora is not None:  # the fake run left bitsandbytes' cached code table real
        import bitsandbytes.functional
        assert type(bitsandbytes.functional.name2qmap["dynamic"]) is torch.Tensor
    out = capsys.readouterr().out
    assert out.count(f"FITS on {gpu.name}") == len({0, pp - 1}) and "PER MICRO-BATCH" not in out, out
    for line in out.splitlines():
        if line.strip().startswith(("parameters ", "gradients ", "optimizer ", "activations ", "total ")):
            assert abs(float(line.split()[-1].rstrip("%"))) <= 5.0, (name, line)


def test_planner_terms_and_communication_agree_with_the_dry_run_of_the_34b_first_stage():
    """The same comparison through the API, with the communication model checked too."""
    config = load_config(ROOT / "examples/aquila2/34b/aquila2_34b.yaml")
    report = dry_run(config, DryRunSettings(world_size=512, rank=0, microbatches=4))
    rank = planned_rank(config, 512, report)
    planned = rank_memory(config, 512, rank, ActivationShape.from_config(config))
    for term in memory_terms(report, planned, distributed_optimizer=True):
        if term.name == "temporaries":  # not modelled off the last stage: a small share of the total
            assert term.measured < 0.02 * report.peak.total, term
        else:
            assert abs(term.relative_difference) <= 0.05, term
    model = communication_per_iteration(config, 512, 0, 15, rank.trainable, 4)
    for key, nbytes in model.items():
        assert report.collectives[key][1] == pytest.approx(nbytes, rel=0.001), key


def test_a_layout_that_does_not_fit_names_rank_stage_gpu_and_largest_terms(capsys):
    """Aquila2-7B on one node of A100-40G (DP8): the dry run says which rank does not fit, and why."""
    argv = [str(ROOT / "examples/aquila2/7b/aquila2_7b.yaml"), "--nodes", "1", "--gpus-per-node", "8", "--gpu",
            "A100-40G", "--dry-run", "--microbatches", "1"]
    assert plan.main(argv) == 1
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if "DOES NOT FIT" in line)
    assert "rank 0 (pipeline stage 0)" in verdict and "A100-40G" in verdict, verdict
    assert "largest: gradients 27.18 GiB" in verdict and verdict.count("GiB,") == 2, verdict


def test_an_op_fake_tensors_cannot_run_is_named_with_where(monkeypatch):
    """An op with a value-dependent output shape (not a host sync the dry run answers) fails with its
    exception's name and the innermost frame of ours, not a bare traceback."""
    from megatron_aquila.model import transformer

    real_forward = transformer.MLP.forward
    monkeypatch.setattr(transformer.MLP, "forward", lambda self, x: real_forward(self, x) + torch.unique(x).sum())
    config = _config(["data.mock=true"])
    with pytest.raises(DryRunError, match=r"rank 0: DynamicOutputShapeException at .*megatron_aquila/model/transformer"):
        dry_run(config, DryRunSettings(world_size=1, rank=0, microbatches=1))
