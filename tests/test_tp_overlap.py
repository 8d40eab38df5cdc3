"""``parallel.tp_comm_overlap`` (``_ColumnParallelLinearOverlapped``, parallel/layers.py) on 2 gloo ranks, one spawn.

The overlapped backward launches the grad-input all-reduce (reduce-scatter under SP) asynchronously and
waits for it after the weight-grad GEMM; its grads must be bit-identical (``torch.equal``) to the blocking
path (``F.linear`` + ``copy_to_tp``, ``_SequenceParallelColumnLinear``), with and without SP, for:

- a column + row pair (gelu between): the input grad and both weight grads, which must also equal a
  single-process fp32 reference (plain ``F.linear`` on the full weights) within 1e-5; again with an input
  that needs no grad (the column layer's backward is then its weight-grad GEMM alone);
- the TP2 model (qkv, the stacked gate_up, the output head) through the real grad buffer (``main_grad``);
- the same model with LoRA applied: frozen base weights (no weight-grad GEMM, nothing to overlap), and the
  first block's input needs no grad.

And the key reaches every column-parallel layer through ``build_model_chunks``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed import run_distributed
from megatron_aquila.build import build_model_chunks
from megatron_aquila.config import ModelConfig, load_config
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.lora import LoraSettings, apply_lora, lora_state_names
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.data_parallel import DataParallelGradBuffer
from megatron_aquila.parallel.layers import ColumnParallelLinear, RowParallelLinear, full_shape

ATOL = 1e-5
CONFIG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96,
              vocab_size=210, make_vocab_size_divisible_by=16, seq_length=8)
HIDDEN, FFN, SEQ, BATCH = 16, 24, 8, 2


def _shard(full: torch.Tensor, dim: int, ctx: ParallelContext) -> torch.Tensor:
    return full.chunk(ctx.tp_size, dim)[ctx.tp_rank].clone()


def _check_pair(ctx: ParallelContext, sp: bool, input_grad: bool, results: dict) -> None:
    """Y = gelu(X W_up^T) W_down^T, W_up column-parallel and W_down row-parallel; X requires grad or not
    (then the column layer computes dW only)."""
    generator = torch.Generator().manual_seed(0)
    w_up = 0.3 * torch.randn(FFN, HIDDEN, generator=generator)  # [f, h]
    w_down = 0.3 * torch.randn(HIDDEN, FFN, generator=generator)  # [h, f]
    x_full = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)  # [s, b, h]
    g_full = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)  # dL/dY [s, b, h]
    reference = [t.clone().requires_grad_() for t in (x_full, w_up, w_down)]
    F.linear(F.gelu(F.linear(reference[0], reference[1])), reference[2]).backward(g_full)
    ref_x_grad = _shard(reference[0].grad, 0, ctx) if sp else reference[0].grad  # [s/p | s, b, h]
    expected = (ref_x_grad, _shard(reference[1].grad, 0, ctx), _shard(reference[2].grad, 1, ctx))[1 - input_grad:]
    tag = f"pair_sp{sp}_input_grad{input_grad}"

    grads = {}
    for overlap in (False, True):
        up = ColumnParallelLinear(HIDDEN, FFN, ctx.tp_group, sequence_parallel=sp, tp_comm_overlap=overlap)
        down = RowParallelLinear(FFN, HIDDEN, ctx.tp_group, sequence_parallel=sp)
        with torch.no_grad():
            up.weight.copy_(_shard(w_up, 0, ctx))
            down.weight.copy_(_shard(w_down, 1, ctx))
        x = (_shard(x_full, 0, ctx) if sp else x_full.clone()).requires_grad_(input_grad)  # [s/p | s, b, h]
        hidden = up(x)  # [s, b, f/p]
        results[f"{tag}_overlap{overlap}_grad_fn"] = type(hidden.grad_fn).__name__
        down(F.gelu(hidden)).backward(_shard(g_full, 0, ctx) if sp else g_full)
        grads[overlap] = (x.grad, up.weight.grad, down.weight.grad)[1 - input_grad:]
    results[f"{tag}_bitwise"] = all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))
    results[f"{tag}_vs_single_process"] = max((a - b).abs().max().item()
                                              for a, b in zip(grads[True], expected, strict=True))


def _random_lora_b(model: AquilaModel, ctx: ParallelContext) -> None:
    """Every B drawn over its full shape from a generator seeded by its position, sliced for this rank
    (the init B = 0 would give A no grad)."""
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            if name.endswith("lora_b"):
                full = 0.1 * torch.randn(full_shape(param, ctx.tp_size), generator=torch.Generator().manual_seed(index))
                param.copy_(_shard(full, param.partition_dim, ctx) if param.tensor_model_parallel else full)


def _model_grads(ctx: ParallelContext, sp: bool, overlap: bool, lora: bool) -> dict[str, torch.Tensor]:
    """main_grad of every trainable parameter after one backward through the real grad buffer."""
    config = ModelConfig(**CONFIG)
    model = AquilaModel(config, ctx, sequence_parallel=sp, seed=7, tp_comm_overlap=overlap)
    if lora:
        apply_lora(model, LoraSettings(rank=4, alpha=12.0), seed=11)
        _random_lora_b(model, ctx)
    buffer = DataParallelGradBuffer(model, ctx, overlap_grad_reduce=False)
    generator = torch.Generator().manual_seed(3)
    ids, labels = (torch.randint(0, config.vocab_size, (2, config.seq_length), generator=generator) for _ in range(2))
    model(ids, labels=labels).mean().backward()
    buffer.finish_grad_sync()
    trainable = lora_state_names(model) if lora else [name for name, _ in model.named_parameters()]
    return {name: model.get_parameter(name).main_grad.clone() for name in trainable}


def _check_model(ctx: ParallelContext, sp: bool, lora: bool, results: dict) -> None:
    blocking, overlapped = (_model_grads(ctx, sp, overlap, lora) for overlap in (False, True))
    tag = f"model_sp{sp}_lora{lora}"
    results[f"{tag}_names"] = sorted(blocking) == sorted(overlapped) and len(blocking) > 0
    results[f"{tag}_bitwise"] = [name for name in blocking if not torch.equal(blocking[name], overlapped[name])]
    results[f"{tag}_nonzero"] = all(grad.abs().max() > 0 for grad in overlapped.values())


def _check_plumbing(ctx: ParallelContext, results: dict) -> None:
    model = [f"model.{key}={value}" for key, value in CONFIG.items()]
    for overlap in (False, True):
        config = load_config(None, model + ["parallel.tensor_parallel=2", f"parallel.tp_comm_overlap={overlap}"])
        layers = [module for chunk in build_model_chunks(config, ctx) for module in chunk.modules()
                  if isinstance(module, ColumnParallelLinear)]
        results[f"plumbing_{overlap}"] = (len(layers), sorted({layer.tp_comm_overlap for layer in layers}))


def _worker(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    ctx = ParallelContext.initialize(tp_size=world_size, pp_size=1, device=torch.device("cpu"))
    results: dict = {}
    for sp in (False, True):
        for input_grad in (True, False):
            _check_pair(ctx, sp, input_grad, results)
        for lora in (False, True):
            _check_model(ctx, sp, lora, results)
    _check_plumbing(ctx, results)
    return results


def test_overlapped_backward_is_bit_identical_to_blocking():
    for rank, results in enumerate(run_distributed(_worker, world_size=2)):
        for sp in (False, True):
            for tag in (f"pair_sp{sp}_input_grad{True}", f"pair_sp{sp}_input_grad{False}"):
                assert results[f"{tag}_overlap{True}_grad_fn"] == "_ColumnParallelLinearOverlappedBackward", results
                assert results[f"{tag}_overlap{False}_grad_fn"] != "_ColumnParallelLinearOverlappedBackward", results
                assert results[f"{tag}_bitwise"], f"rank {rank} {tag}: column+row grads differ with overlap"
                assert results[f"{tag}_vs_single_process"] <= ATOL, (
                    f"rank {rank} {tag}: overlapped grads differ from one process by "
                    f"{results[f'{tag}_vs_single_process']} > {ATOL}")
            for lora in (False, True):
                tag = f"model_sp{sp}_lora{lora}"
                assert results[f"{tag}_names"] and results[f"{tag}_nonzero"], f"rank {rank} {tag}: {results}"
                assert results[f"{tag}_bitwise"] == [], (
                    f"rank {rank} {tag}: main_grad differs between tp_comm_overlap true and false for "
                    f"{results[f'{tag}_bitwise']}")
        # qkv and gate_up of 2 layers plus the output head
        assert results["plumbing_False"] == (5, [False]) and results["plumbing_True"] == (5, [True]), results
