"""Pipeline schedules (1F1B, interleaved) against one process running the whole model.

Each distributed test spawns gloo workers that build their chunks from partition.py, train a few
iterations (schedule -> finish_grad_sync -> optimizer step) and return their per-micro-batch
[loss sum, loss tokens] pairs and grads; the parent runs the TP1 PP1 DP1 reference and compares:
the same losses every iteration and the same grads (TP shards compared with the matching slice
of the reference grad; under the distributed optimizer only the pieces each DP rank owns).

The reference of ``loss_average = per_microbatch`` is the no-pipelining schedule over all
data-parallel micro-batches; that of ``per_token`` is one forward-backward of the whole
iteration's data as a single micro-batch (its masked mean is the per-token mean by definition),
so the per-token path is checked against a computation that does not use it. Loss masks drop
about a fifth of the tokens at random, so micro-batches and DP ranks count different tokens.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from distributed import run_distributed
from megatron_aquila.config import ModelConfig, OptimizerConfig, PrecisionConfig
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.optim.build import build_optimizer
from megatron_aquila.parallel.context import DescribedGroup, ParallelContext
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer
from megatron_aquila.parallel.pipeline.partition import chunk_has_embedding, chunk_has_head, chunk_layer_ids
from megatron_aquila.parallel.pipeline.schedules import (
    ScheduleSpec,
    backward_from,
    deallocate_output,
    forward_backward_no_pipelining,
    get_forward_backward_func,
    global_loss_tokens,
)

MODEL = ModelConfig(num_layers=8, hidden_size=32, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                    vocab_size=120, make_vocab_size_divisible_by=32, seq_length=16)
MICRO_BATCH = 2
SEED = 1234
LR = 1e-2
ITERATIONS = 3


def microbatch(iteration: int, index: int) -> dict[str, torch.Tensor]:
    """Global micro-batch ``index`` of ``iteration``: random tokens/labels, a partly zero loss mask."""
    g = torch.Generator().manual_seed(1000 * iteration + index)
    shape = (MICRO_BATCH, MODEL.seq_length)
    mask = (torch.rand(shape, generator=g) > 0.2).float()
    return dict(tokens=torch.randint(0, MODEL.vocab_size, shape, generator=g),
                labels=torch.randint(0, MODEL.vocab_size, shape, generator=g), loss_mask=mask,
                position_ids=torch.arange(MODEL.seq_length).expand(shape).contiguous())


def whole_iteration(iteration: int, num_microbatches: int) -> dict[str, torch.Tensor]:
    """Micro-batches 0..num_microbatches-1 of ``iteration`` as one batch [num_microbatches x b, s]."""
    batches = [microbatch(iteration, j) for j in range(num_microbatches)]
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


def make_spec(chunks, buffers, ctx, num_microbatches, sequence_parallel, forward_only=False,
              loss_average="per_microbatch") -> ScheduleSpec:
    return ScheduleSpec(model_chunks=chunks, grad_buffers=buffers, ctx=ctx, num_microbatches=num_microbatches,
                        micro_batch_size=MICRO_BATCH, seq_length=MODEL.seq_length, hidden_size=MODEL.hidden_size,
                        sequence_parallel=sequence_parallel, activation_dtype=torch.float32,
                        forward_only=forward_only, loss_average=loss_average)


def grad_records(buffers, ctx, distributed: bool) -> list[tuple]:
    """(name, partition_dim, tp_rank, lo, hi, flat grad piece) for every grad this rank holds validly."""
    records = []
    for buffer in buffers:
        pieces = buffer.owned_pieces() if distributed else [(p, 0, p.numel()) for p in buffer.params]
        for param, lo, hi in pieces:
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else -1
            records.append((buffer.name_of(param), dim, ctx.tp_rank, lo, hi,
                            param.main_grad.reshape(-1)[lo:hi].numpy().copy()))  # numpy: plain pickling
    return records


def pipeline_worker(rank: int, world_size: int, layouts: list[dict]) -> list[dict]:
    torch.set_num_threads(1)
    results = []
    for layout in layouts:
        tp, pp, vpp, m = layout["tp"], layout["pp"], layout["vpp"], layout["m"]
        sp, distributed = layout.get("sp", False), layout.get("distopt", False)
        loss_average = layout.get("loss", "per_microbatch")
        ctx = ParallelContext.initialize(tp, pp)
        chunks = [AquilaModel(MODEL, ctx, sequence_parallel=sp, seed=SEED,
                              layer_ids=chunk_layer_ids(MODEL.num_layers, pp, vpp, ctx.pp_rank, c),
                              pre_process=chunk_has_embedding(ctx.pp_rank, c),
                              post_process=chunk_has_head(ctx.pp_rank, c, pp, vpp)) for c in range(vpp)]
        buffers = [DataParallelGradBuffer(c, ctx, bucket_size_mb=0.01, distributed_optimizer=distributed)
                   for c in chunks]
        optimizer = build_optimizer(chunks, buffers, OptimizerConfig(lr=LR), PrecisionConfig(), ctx, distributed)
        schedule = get_forward_backward_func(pp, vpp)
        out = dict(dp_rank=ctx.dp_rank, is_last=ctx.is_last_stage, losses=[], grads=[], eval_losses=None)
        for iteration in range(ITERATIONS):
            data = iter([microbatch(iteration, ctx.dp_rank * m + j) for j in range(m)])
            optimizer.zero_grad()
            losses = schedule(make_spec(chunks, buffers, ctx, m, sp, loss_average=loss_average), data)
            assert next(data, None) is None, "the schedule must draw exactly num_microbatches micro-batches"
            for buffer in buffers:
                buffer.finish_grad_sync()
            out["losses"].append([x.tolist() for x in losses])
            if iteration in (0, ITERATIONS - 1):
                out["grads"].append(grad_records(buffers, ctx, distributed))
            optimizer.set_lr(LR)
            optimizer.step()
        with torch.no_grad():  # forward-only (evaluation) on the trained model
            data = iter([microbatch(ITERATIONS, ctx.dp_rank * m + j) for j in range(m)])
            out["eval_losses"] = [x.tolist() for x in schedule(make_spec(chunks, buffers, ctx, m, sp, True), data)]
        results.append(out)
    return results


def reference(num_microbatches: int, loss_average: str) -> dict:
    """TP1 PP1 DP1: the whole model; all data-parallel micro-batches in one accumulation
    (per_microbatch) or as one micro-batch (per_token: its masked mean is the per-token mean)."""
    ctx = ParallelContext.single_process()
    model = AquilaModel(MODEL, ctx, seed=SEED)
    buffers = [DataParallelGradBuffer(model, ctx, bucket_size_mb=0.01)]
    optimizer = build_optimizer([model], buffers, OptimizerConfig(lr=LR), PrecisionConfig(), ctx, False)
    losses, grads = [], []
    for iteration in range(ITERATIONS):
        if loss_average == "per_token":
            data, count = iter([whole_iteration(iteration, num_microbatches)]), 1
        else:
            data, count = iter([microbatch(iteration, j) for j in range(num_microbatches)]), num_microbatches
        optimizer.zero_grad()
        losses.append([x.tolist() for x in forward_backward_no_pipelining(
            make_spec([model], buffers, ctx, count, False), data)])
        buffers[0].finish_grad_sync()
        if iteration in (0, ITERATIONS - 1):
            grads.append({name: p.main_grad.clone() for name, p in model.named_parameters()})
        optimizer.set_lr(LR)
        optimizer.step()
    data = iter([microbatch(ITERATIONS, j) for j in range(num_microbatches)])
    with torch.no_grad():
        eval_losses = [x.tolist() for x in forward_backward_no_pipelining(
            make_spec([model], buffers, ctx, num_microbatches, False, forward_only=True), data)]
    return dict(losses=losses, grads=grads, eval_losses=eval_losses)


def per_token_mean(pairs: list[list[float]]) -> float:
    return sum(total for total, _ in pairs) / sum(count for _, count in pairs)


def check_against_reference(layout: dict, rank_results: list[dict]) -> None:
    dp = len({r["dp_rank"] for r in rank_results})
    m, loss_average = layout["m"], layout.get("loss", "per_microbatch")
    ref = reference(dp * m, loss_average)
    if loss_average == "per_token":  # sum S / sum n over the micro-batches of every DP rank
        last = {r["dp_rank"]: r["losses"] for r in rank_results if r["is_last"]}
        for iteration in range(ITERATIONS):
            pairs = [pair for dp_rank in range(dp) for pair in last[dp_rank][iteration]]
            assert per_token_mean(pairs) == pytest.approx(per_token_mean(ref["losses"][iteration]), rel=1e-5), (
                f"{layout} iteration {iteration}: per-token mean {per_token_mean(pairs)} vs reference {ref['losses']}")
    seen: dict[str, int] = {}
    for result in rank_results:
        window = slice(result["dp_rank"] * m, (result["dp_rank"] + 1) * m)
        if result["is_last"]:
            if loss_average == "per_microbatch":  # per_token: the reference has one pair per iteration (above)
                for iteration in range(ITERATIONS):
                    torch.testing.assert_close(result["losses"][iteration], ref["losses"][iteration][window],
                                               rtol=1e-5, atol=1e-6,
                                               msg=lambda s: f"{layout} iteration {iteration}: {s}")
            torch.testing.assert_close(result["eval_losses"], ref["eval_losses"][window], rtol=1e-5, atol=1e-6)
        else:
            assert result["losses"] == [[]] * ITERATIONS and result["eval_losses"] == []
        # iteration 0: grads agree to fp32 rounding of differently ordered sums; after two AdamW steps
        # (which turn rounding-level differences of tiny grads into lr-sized updates) less tightly.
        for (ref_grads, records), tolerance in zip(zip(ref["grads"], result["grads"]), (1e-5, 1e-3)):
            for name, dim, tp_rank, lo, hi, piece in records:
                full = ref_grads[name]
                if dim >= 0:
                    local = full.shape[dim] // layout["tp"]
                    full = full.narrow(dim, tp_rank * local, local)
                expected = full.reshape(-1)[lo:hi]
                torch.testing.assert_close(torch.from_numpy(piece), expected, rtol=10 * tolerance,
                                           atol=tolerance * ref_grads[name].abs().max().item(),
                                           msg=lambda s: f"{layout} grad of {name}: {s}")
                seen[name] = seen.get(name, 0) + hi - lo
    # every parameter of the model was compared somewhere
    assert set(seen) == set(ref["grads"][0]), sorted(set(ref["grads"][0]) - set(seen))


def run_layouts(world_size: int, layouts: list[dict]) -> None:
    per_rank = run_distributed(pipeline_worker, world_size, args=(layouts,))
    for index, layout in enumerate(layouts):
        check_against_reference(layout, [results[index] for results in per_rank])


def test_two_stages_1f1b_and_interleaved():
    run_layouts(2, [
        dict(tp=1, pp=2, vpp=1, m=3),   # 1F1B, warmup 1 on stage 0
        dict(tp=1, pp=2, vpp=2, m=4),   # interleaved with a steady phase
        dict(tp=1, pp=2, vpp=4, m=2),   # interleaved, m == pp: all-warmup path, 8 chunks of 1 layer
        dict(tp=1, pp=2, vpp=1, m=3, loss="per_token"),
    ])


def test_four_stages_and_tensor_parallel():
    run_layouts(4, [
        dict(tp=1, pp=4, vpp=1, m=6),
        dict(tp=1, pp=4, vpp=2, m=8),
        dict(tp=2, pp=2, vpp=1, m=4),
        dict(tp=1, pp=2, vpp=2, m=4, loss="per_token"),   # DP 2: masks count different tokens per rank
    ])


def test_tp2_pp2_dp2_sequence_parallel_distributed_optimizer():
    run_layouts(8, [dict(tp=2, pp=2, vpp=1, m=4, sp=True, distopt=True)])


def test_freed_output_backward_matches_plain_backward():
    torch.manual_seed(0)
    weight = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4)
    grad = torch.randn(3, 4)
    (x @ weight).tanh().add(1.0).backward(grad)
    expected, weight.grad = weight.grad.clone(), None
    output = (x @ weight).tanh().add(1.0)  # [3, 4]
    deallocate_output(output)
    assert output.numel() == 1, "the sent output's storage must be freed"
    backward_from(output, grad)
    torch.testing.assert_close(weight.grad, expected)


def test_per_token_count_is_all_reduced_over_dp_on_the_context_device(monkeypatch):
    """N = sum of loss masks over DP x CP, reduced on ctx.device (NCCL has no CPU tensors; "meta" stands in)."""
    ctx = dataclasses.replace(ParallelContext.single_process(), dp_size=2, cp_size=2,
                              dp_cp_group=DescribedGroup(size=4, rank=0), device=torch.device("meta"))
    reduced = []

    class Reached(Exception):
        pass

    def recording_all_reduce(tensor, *args, group=None, **kwargs):
        reduced.append((tensor.device, tensor.dtype, group))
        raise Reached

    monkeypatch.setattr(torch.distributed, "all_reduce", recording_all_reduce)
    with pytest.raises(Reached):
        global_loss_tokens([microbatch(0, 0), microbatch(0, 1)], ctx)
    assert reduced == [(torch.device("meta"), torch.float64, ctx.dp_cp_group)]


def test_schedule_selection_and_bad_layouts():
    assert get_forward_backward_func(1, 1) is forward_backward_no_pipelining
    assert get_forward_backward_func(2, 1).__name__ == "forward_backward_pipelining"
    assert get_forward_backward_func(2, 2).__name__ == "forward_backward_pipelining_interleaved"
    with pytest.raises(ValueError, match="virtual_pipeline_stages 2 needs pipeline_parallel > 1"):
        get_forward_backward_func(1, 2)


# ---------------------------------------------------------------------------- through the real Trainer
TRAINER_BASE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=120", "model.make_vocab_size_divisible_by=8",
    "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=3", "training.seed=7",
    "optimizer.lr=1e-2", "optimizer.min_lr=1e-3", "optimizer.lr_warmup_iters=1", "optimizer.clip_grad=0.5",
    "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0",
]


def trainer_history(overrides: list[str], world_size: int) -> list[float]:
    from training import train_with

    return train_with(TRAINER_BASE + overrides, world_size)[0].history


def trainer_worker(rank: int, world_size: int, layouts: list[list[str]]) -> list[list[float]]:
    return [trainer_history(overrides, world_size) for overrides in layouts]


def test_trainer_iterations_pp2_and_interleaved_match_single_process():
    layouts = [["parallel.pipeline_parallel=2"],
               ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=2"]]
    histories = run_distributed(trainer_worker, 2, args=(layouts,))
    reference_history = trainer_history([], 1)
    assert reference_history[-1] < reference_history[0], f"the reference did not learn: {reference_history}"
    for overrides, history in zip(layouts, histories[0]):
        assert histories[1][layouts.index(overrides)] == history, "every rank logs the same reduced loss"
        torch.testing.assert_close(torch.tensor(history), torch.tensor(reference_history), rtol=1e-5, atol=1e-5,
                                   msg=lambda s: f"{overrides}: {history} vs single process {reference_history}\n{s}")
