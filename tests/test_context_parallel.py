"""Context parallelism (parallel/context_parallel.py) equals one process.

- The load-balanced split and its inverse, by hand.
- The attention primitive on 2 and 4 gloo ranks against full causal attention in one process:
  outputs and the gradients of q, k and v, with GQA; the bytes handed to the collectives are the
  kv heads of the rank's own tokens (the docstring's formula), never the query heads.
- Training through the real Trainer, CP2 and CP4 alone and with TP2 + SP, PP2 (1F1B and
  interleaved), DP2 + ZeRO-1 and selective recompute: every iteration's loss and global grad norm,
  the first step's gradients (where rank 0 holds whole parameters) and the parameters after four
  steps match the single-process run in fp32. The samples are made of short documents (3-12
  tokens, an EOD between them) so every chunk crosses documents, and the loss mask drops the EOD
  tokens, so micro-batches count different loss tokens (``per_token`` is used, the SFT default).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from megatron_aquila.checkpoint.full_state import gather_full_state_dict
from megatron_aquila.config import ConfigError, load_config
from megatron_aquila.data.loader import micro_batch_stream
from megatron_aquila.model.kernels import build_attention, choose_kernels
from megatron_aquila.parallel import context_parallel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.context_parallel import (
    _to_rank_order,
    _to_sequence_order,
    context_parallel_attention,
    local_token_indices,
    split_batch,
)
from megatron_aquila.training_state import TrainerParts
from training import train_with

# ----------------------------------------------------------------------------- the split


def test_load_balanced_split_by_hand():
    assert local_token_indices(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert local_token_indices(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert local_token_indices(16, 1, 4).tolist() == [2, 3, 12, 13]
    batch = {"tokens": torch.arange(16).view(2, 8), "loss_mask": torch.ones(2, 8)}
    local = split_batch(batch, 1, 2)
    assert local["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert local["loss_mask"].shape == (2, 4)
    with pytest.raises(ValueError, match=r"sequence length 12 is not divisible by 2 x context_parallel 4 = 8"):
        local_token_indices(12, 0, 4)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_sequence_order_round_trip(cp):
    seq = 4 * cp
    rank_order = torch.cat([local_token_indices(seq, r, cp) for r in range(cp)])  # what an all-gather returns
    assert _to_sequence_order(rank_order, cp).tolist() == list(range(seq))
    assert torch.equal(_to_rank_order(torch.arange(seq), cp), rank_order)


# ----------------------------------------------------------------------------- the attention primitive
SEQ, BATCH, HEADS, KV_HEADS, HEAD_DIM = 16, 2, 4, 2, 8


def attention_inputs():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(SEQ, BATCH, KV_HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
    v = torch.randn(SEQ, BATCH, KV_HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
    grad = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM, generator=generator, dtype=torch.float64)
    return q, k, v, grad


def reference_attention():
    """Full causal attention in one process (SDPA, GQA) and the grads of q, k, v for the output grad."""
    q, k, v, grad = (t.clone().requires_grad_(i < 3) for i, t in enumerate(attention_inputs()))
    out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                         is_causal=True, enable_gqa=True)  # [b, n, s, d]
    out = out.permute(2, 0, 1, 3).reshape(SEQ, BATCH, HEADS * HEAD_DIM)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def attention_worker(rank: int, world_size: int):
    ctx = ParallelContext.initialize(1, 1, torch.device("cpu"), cp_size=world_size)
    handed = []  # (collective, elements of its input) for every call

    def counting(name, collective):
        def call(output, tensor, *args, **kwargs):
            handed.append((name, tensor.numel()))
            return collective(output, tensor, *args, **kwargs)
        return call

    originals = context_parallel.all_gather_single, context_parallel.reduce_scatter_single
    context_parallel.all_gather_single = counting("all_gather", originals[0])
    context_parallel.reduce_scatter_single = counting("reduce_scatter", originals[1])
    try:  # the worker process runs other tests' tasks afterwards (tests/distributed.py)
        index = local_token_indices(SEQ, rank, world_size)
        q, k, v, grad = (t.index_select(0, index).clone().requires_grad_(i < 3)
                         for i, t in enumerate(attention_inputs()))
        kernel = build_attention("torch-sdpa", HEADS, KV_HEADS, HEAD_DIM, 0.0)
        out = context_parallel_attention(lambda q, k, v, segments: kernel(q, k, v, True, segments), q, k, v,
                                         ctx.cp_group)
        out.backward(grad)
    finally:
        context_parallel.all_gather_single, context_parallel.reduce_scatter_single = originals
    return index, out.detach(), q.grad, k.grad, v.grad, handed


@pytest.mark.parametrize("cp", [2, 4])
def test_attention_equals_full_causal_attention(cp):
    reference = reference_attention()
    for rank, (index, *local, handed) in enumerate(run_distributed(attention_worker, cp)):
        for name, mine, full in zip(("output", "dq", "dk", "dv"), local, reference):
            torch.testing.assert_close(mine, full.index_select(0, index), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"cp {cp} rank {rank}: {name} differs\n{m}")
        # K and V of this rank's S/cp tokens (kv heads only) forward, their grads backward: the docstring's volume
        kv_elements = (SEQ // cp) * BATCH * KV_HEADS * HEAD_DIM
        assert handed == [("all_gather", kv_elements)] * 2 + [("reduce_scatter", cp * kv_elements)] * 2, (
            f"cp {cp} rank {rank}: collectives handed {handed}; expected K and V of {SEQ // cp} tokens x "
            f"{KV_HEADS} kv heads ({kv_elements} elements) gathered, and their grads reduce-scattered")


def test_transformer_engine_attention_is_refused_under_context_parallelism():
    with pytest.raises(ValueError, match="bottom-right causal mask"):
        choose_kernels("transformer-engine", "cpu", torch.float32, context_parallel=True)


# ----------------------------------------------------------------------------- training
BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=2",
    "model.ffn_hidden_size=96", "model.seq_length=32", "model.vocab_size=250", "model.make_vocab_size_divisible_by=8",
    "training.micro_batch_size=2", "training.global_batch_size=8", "training.train_iters=4", "training.seed=7",
    "training.loss_average=per_token",
    "optimizer.lr=1e-2", "optimizer.min_lr=1e-3", "optimizer.lr_warmup_iters=1", "optimizer.clip_grad=0.5",
    "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0",
]
EOD = 0


class DocumentSamples(torch.utils.data.Dataset):
    """Samples of short documents (arithmetic progressions of 3-12 tokens, EOD after each), a pure
    function of the index; the loss mask drops the EOD inputs."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int):
        self.num_samples, self.seq_length, self.vocab_size = num_samples, seq_length, vocab_size

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 + index)
        pieces, length = [], 0
        while length < self.seq_length + 1:
            size = int(torch.randint(3, 13, (1,), generator=generator))
            start, stride = (int(x) for x in torch.randint(1, self.vocab_size, (2,), generator=generator))
            document = (start + stride * torch.arange(size)) % (self.vocab_size - 1) + 1  # ids 1..V-1
            pieces += [document, torch.tensor([EOD])]
            length += size + 1
        text = torch.cat(pieces)[:self.seq_length + 1]
        tokens = text[:-1]
        return {"tokens": tokens, "labels": text[1:], "loss_mask": (tokens != EOD).float(),
                "position_ids": torch.arange(self.seq_length)}


def with_documents(overrides: list[str], record: dict):
    """A ``prepare`` hook: train on DocumentSamples, record each step's grad norm and the first step's grads."""
    config = load_config(None, BASE + overrides)

    def prepare(parts: TrainerParts, ctx: ParallelContext) -> None:
        dataset = DocumentSamples(64, config.model.seq_length, config.model.vocab_size)
        parts.train_stream = lambda consumed: micro_batch_stream(dataset, consumed, config, ctx, 0)
        step = parts.optimizer.step

        def recording_step():
            if "grads" not in record:
                record["grads"] = {name: param.main_grad.clone() for model in parts.model_chunks
                                   for name, param in model.named_parameters()}
            result = step()
            record.setdefault("grad_norms", []).append(result.grad_norm)
            return result

        parts.optimizer.step = recording_step
    return prepare


def train(overrides: list[str], world_size: int):
    record: dict = {}
    state, parts, ctx = train_with(BASE + overrides, world_size, prepare=with_documents(overrides, record))
    return state.history, record["grad_norms"], record["grads"], gather_full_state_dict(parts.model_chunks, ctx)


def training_worker(rank: int, world_size: int, overrides: list[str]):
    result = train(overrides, world_size)
    return result if rank == 0 else None


@pytest.fixture(scope="module")
def references():
    """The single-process run for each ``training.loss_average``, made when first asked for."""
    torch.set_num_threads(1)
    cache: dict = {}

    def get(loss_average: str):
        if loss_average not in cache:
            cache[loss_average] = train([f"training.loss_average={loss_average}"], 1)
        return cache[loss_average]
    return get


LAYOUTS = {
    # name: (world size, overrides, rank 0 holds whole, unsharded grads)
    "cp2": (2, ["parallel.context_parallel=2"], True),
    "cp4": (4, ["parallel.context_parallel=4"], True),
    "cp2-dp2-recompute": (4, ["parallel.context_parallel=2", "training.recompute=selective"], True),
    "cp2-tp2-sp": (4, ["parallel.context_parallel=2", "parallel.tensor_parallel=2",
                       "parallel.sequence_parallel=true"], False),
    "cp2-pp2": (4, ["parallel.context_parallel=2", "parallel.pipeline_parallel=2"], False),
    "cp2-pp2-interleaved": (4, ["parallel.context_parallel=2", "parallel.pipeline_parallel=2",
                                "parallel.virtual_pipeline_stages=2"], False),
    "cp2-dp2-zero1": (4, ["parallel.context_parallel=2", "parallel.distributed_optimizer=true"], False),
    "cp2-per-microbatch": (2, ["parallel.context_parallel=2", "training.loss_average=per_microbatch"], True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_matches_single_process(layout, references):
    world_size, overrides, whole_grads = LAYOUTS[layout]
    history, grad_norms, grads, params = run_distributed(training_worker, world_size, args=(overrides,))[0]
    loss_average = "per_microbatch" if "training.loss_average=per_microbatch" in overrides else "per_token"
    ref_history, ref_norms, ref_grads, ref_params = references(loss_average)
    assert ref_history[-1] < ref_history[0], f"the reference run did not learn: {ref_history}"
    torch.testing.assert_close(torch.tensor(history), torch.tensor(ref_history), rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{layout}: losses {history} vs single process {ref_history}\n{m}")
    torch.testing.assert_close(torch.tensor(grad_norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{layout}: grad norms {grad_norms} vs single process {ref_norms}\n{m}")
    if whole_grads:
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{layout}: first-step grad of {name} differs\n{m}")
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{layout}: parameter {name} differs after 4 steps\n{m}")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, world_size, message", [
    (["parallel.context_parallel=4", "model.seq_length=36"], 4,
     r"model.seq_length 36 is not divisible by 2 x context_parallel 4 = 8"),
    (["parallel.context_parallel=4"], 6, r"world size 6 is not divisible by tensor_parallel 1 x context_parallel 4"),
    (["parallel.context_parallel=2", "parallel.tensor_parallel=4", "parallel.sequence_parallel=true",
      "model.num_kv_heads=4", "model.seq_length=12"], 8,
     r"seq_length 12 / context_parallel 2 = 6 is not divisible by tensor_parallel 4"),
    (["parallel.context_parallel=0"], 4, r"parallel sizes must be >= 1: tp 1, cp 0"),
])
def test_bad_layout_fails_before_any_process_group(overrides, world_size, message):
    config = load_config(None, BASE + overrides)
    with pytest.raises(ConfigError, match=message):
        config.validate(world_size)


def precision_worker(rank: int, world_size: int, overrides: list[str]):
    history = train_with(BASE + overrides, world_size)[0].history
    return history if rank == 0 else None


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_matches_single_process(dtype):
    """bf16 / fp16 parameters (fp32 masters; fp16 with its loss scaler): the K/V all-gather and the
    reduce-scatter of their grads run in the model dtype. The losses follow one process to within the
    dtype's rounding of different summation orders."""
    overrides = [f"precision.dtype={dtype}", "model.num_layers=2"]
    reference = train_with(BASE + overrides, 1)[0].history
    history = run_distributed(precision_worker, 2, args=(overrides + ["parallel.context_parallel=2"],))[0]
    torch.testing.assert_close(torch.tensor(history), torch.tensor(reference), rtol=1e-3, atol=0,
                               msg=lambda m: f"{dtype}: CP2 losses {history} vs one process {reference}\n{m}")
