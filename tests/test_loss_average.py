"""``training.loss_average`` through the real Trainer, with loss masks that differ between micro-batches.

Every sample keeps its loss on its first L tokens, L = 1 + (7 t_0 + 3 t_1) mod s taken from its own
tokens, so a sample's mask is the same whichever layout reads it, while the micro-batches and the
DP ranks of an iteration count different numbers of loss tokens. References:

- by hand: the first logged loss (before any step) is the untrained model's per-token mean over the
  first global batch (per_token), or the mean of its micro-batches' masked means (per_microbatch);
- the single-process per_token run: DP2 and PP2 (1F1B and interleaved) per_token runs must give the
  same losses and parameters after three steps;
- per_token and per_microbatch must differ measurably here, so the comparisons can tell them apart.
"""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from distributed import run_distributed
from megatron_aquila.checkpoint.full_state import gather_full_state_dict
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.training_state import TrainerParts
from training import train_with

BASE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=64", "model.seq_length=16", "model.vocab_size=120", "model.make_vocab_size_divisible_by=8",
    "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=3", "training.seed=7",
    "optimizer.lr=1e-2", "optimizer.min_lr=1e-3", "optimizer.lr_warmup_iters=1", "optimizer.clip_grad=0.5",
    "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0",
]
MICROBATCHES_ONE_PROCESS = 4  # global 8 / micro 2


def loss_mask_of(tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] token ids -> [b, s] float mask keeping the first 1 + (7 t_0 + 3 t_1) mod s tokens of each sample."""
    seq = tokens.shape[1]
    keep = 1 + (7 * tokens[:, 0] + 3 * tokens[:, 1]) % seq  # [b]
    return (torch.arange(seq, device=tokens.device) < keep[:, None]).float()


def with_varied_masks(parts: TrainerParts, ctx: ParallelContext) -> None:
    """Replace the mock stream's all-ones loss masks with ``loss_mask_of`` the tokens."""
    factory = parts.train_stream

    def train_stream(consumed: int) -> Iterator[dict[str, torch.Tensor]]:
        stream = factory(consumed)
        try:
            for batch in stream:
                yield {**batch, "loss_mask": loss_mask_of(batch["tokens"])}
        finally:
            stream.close()

    parts.train_stream = train_stream


@torch.no_grad()
def hand_first_losses(parts: TrainerParts) -> dict[str, float]:
    """Both averages of the untrained (single-process) model over the first global batch."""
    stream = parts.train_stream(0)
    batches = [next(stream) for _ in range(MICROBATCHES_ONE_PROCESS)]
    stream.close()
    model = parts.model_chunks[0]
    sums, counts = [], []
    for batch in batches:
        token_loss = model(batch["tokens"], batch["position_ids"], batch["labels"], None)  # [b, s]
        sums.append(float((token_loss * batch["loss_mask"]).sum()))
        counts.append(float(batch["loss_mask"].sum()))
    assert len(set(counts)) > 1, f"the micro-batches must count different loss tokens: {counts}"
    return {"per_token": sum(sums) / sum(counts),
            "per_microbatch": sum(s / n for s, n in zip(sums, counts)) / len(sums)}


def train(overrides: list[str], world_size: int):
    hand: dict[str, float] = {}

    def prepare(parts: TrainerParts, ctx: ParallelContext) -> None:
        with_varied_masks(parts, ctx)
        if world_size == 1:
            hand.update(hand_first_losses(parts))

    state, parts, ctx = train_with(BASE + overrides, world_size, prepare=prepare)
    return state.history, gather_full_state_dict(parts.model_chunks, ctx), hand


def worker(rank: int, world_size: int, layouts: list[list[str]]):
    results = [train(overrides, world_size)[:2] for overrides in layouts]
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def single_process():
    torch.set_num_threads(1)
    return {average: train([f"training.loss_average={average}"], 1) for average in ("per_token", "per_microbatch")}


@pytest.mark.parametrize("average", ["per_token", "per_microbatch"])
def test_first_logged_loss_is_the_hand_computed_average(average, single_process):
    history, _, hand = single_process[average]
    assert history[0] == pytest.approx(hand[average], rel=1e-6), f"{average}: logged {history[0]}, by hand {hand}"
    # untrained, every token's loss is near log(vocab): the averages differ little, but 20x the tolerance
    assert abs(hand["per_token"] - hand["per_microbatch"]) > 20e-6 * hand["per_token"], (
        f"the masks must make the two averages differ: {hand}")


def test_per_token_and_per_microbatch_train_differently(single_process):
    (token_history, token_params, _), (micro_history, micro_params, _) = (
        single_process["per_token"], single_process["per_microbatch"])
    assert abs(token_history[-1] - micro_history[-1]) > 1e-3, (token_history, micro_history)
    largest = max((token_params[name] - micro_params[name]).abs().max().item() for name in token_params)
    assert largest > 1e-3, f"parameters after 3 steps differ by at most {largest}"


LAYOUTS = {
    "dp2": [],
    "pp2": ["parallel.pipeline_parallel=2"],
    "pp2-interleaved": ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=2"],
}


def test_per_token_layouts_match_single_process(single_process):
    layouts = [LAYOUTS[name] + ["training.loss_average=per_token"] for name in LAYOUTS]
    results = run_distributed(worker, 2, args=(layouts,))[0]
    ref_history, ref_params, _ = single_process["per_token"]
    assert ref_history[-1] < ref_history[0], f"the reference run did not learn: {ref_history}"
    for name, (history, params) in zip(LAYOUTS, results):
        torch.testing.assert_close(torch.tensor(history), torch.tensor(ref_history), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: losses {history} vs single process {ref_history}\n{m}")
        assert params.keys() == ref_params.keys()
        for key, value in params.items():
            torch.testing.assert_close(value, ref_params[key], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name}: parameter {key} differs after 3 steps\n{m}")
