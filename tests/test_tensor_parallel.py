"""Tensor and sequence parallelism on 2 gloo processes against single-process references.

One spawn runs every check (each spawn costs seconds): the sequence-parallel collectives vs
their hand formulas, vocab-parallel cross entropy vs ``F.cross_entropy``, vocab-parallel embedding vs ``nn.Embedding``, sharded init vs the TP1 init,
and TP2 / TP2+SP models vs the TP1 model built from the same seed: losses, and every rank's
grads vs the matching slice of the TP1 grads, over two steps (SGD in between).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_distributed
from megatron_aquila.config import ModelConfig
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_aquila.parallel.layers import VocabParallelEmbedding
from megatron_aquila.parallel.mappings import _all_gather_dim0, reduce_scatter_to_sequence_parallel

ATOL = 1e-5
CONFIG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=96,
              vocab_size=210, make_vocab_size_divisible_by=16, seq_length=8)
# 210 pads to 224 under both TP1 (multiple of 16) and TP2 (multiple of 32): same logical model.


def _local_slice(full: torch.Tensor, param: torch.Tensor, tp_rank: int) -> torch.Tensor:
    if not param.tensor_model_parallel:
        return full
    size = param.shape[param.partition_dim]
    return full.narrow(param.partition_dim, tp_rank * size, size)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _check_sequence_parallel_collectives(ctx: ParallelContext, errors: dict) -> None:
    """Y_r = chunk r of sum_q X_q and dL/dX_r = [G_1; ...; G_p]; [X_1; ...; X_p] from the all-gather.

    Every rank's X_q and G_q are drawn from seed q, so each rank builds the expected values itself.
    """
    for dtype in (torch.float32, torch.bfloat16):
        xs = [torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(q)).to(dtype) for q in range(ctx.tp_size)]
        gs = [torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(50 + q)).to(dtype)
              for q in range(ctx.tp_size)]
        x = xs[ctx.tp_rank].clone().requires_grad_()
        y = reduce_scatter_to_sequence_parallel(x, ctx.tp_group)  # [4 / p, 3, 2]
        y.backward(gs[ctx.tp_rank])
        expected = torch.stack(xs).float().sum(0).to(dtype).chunk(ctx.tp_size, 0)[ctx.tp_rank]
        tag = str(dtype).removeprefix("torch.")
        errors[f"reduce_scatter_{tag}"] = _max_err(y.float(), expected.float())
        errors[f"reduce_scatter_grad_{tag}"] = _max_err(x.grad, torch.cat(gs))
        # the shard owns its storage: nothing of the [s, ...] input or sum stays alive through it
        errors[f"reduce_scatter_owns_{tag}"] = float(y.untyped_storage().nbytes() != y.numel() * y.element_size())
        errors[f"all_gather_{tag}"] = _max_err(_all_gather_dim0(xs[ctx.tp_rank], ctx.tp_group), torch.cat(xs))


def _check_cross_entropy(ctx: ParallelContext, errors: dict) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 64) * 3  # full vocab 64
    target = torch.randint(0, 64, (3, 5))
    weight = torch.rand(3, 5)  # a non-uniform upstream gradient
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.view(-1, 64), target.view(-1), reduction="none").view(3, 5)
    (ref * weight).sum().backward()
    local = logits.chunk(ctx.tp_size, -1)[ctx.tp_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, ctx.tp_group, 64)
    (loss * weight).sum().backward()
    errors["ce_loss"] = _max_err(loss, ref)
    errors["ce_grad"] = _max_err(local.grad, full.grad.chunk(ctx.tp_size, -1)[ctx.tp_rank])
    errors["ce_dtype_fp32"] = 0.0 if loss.dtype == torch.float32 else 1.0


def _check_embedding(ctx: ParallelContext, errors: dict) -> None:
    torch.manual_seed(1)
    table = torch.randn(32, 8)
    ids = torch.randint(0, 32, (6, 2))  # [s, b]
    upstream = torch.randn(6, 2, 8)
    ref = torch.nn.Embedding(32, 8)
    ref.weight.data.copy_(table)
    out_ref = ref(ids)
    (out_ref * upstream).sum().backward()
    for sp in (False, True):
        emb = VocabParallelEmbedding(32, 8, ctx.tp_group, sequence_parallel=sp)
        emb.weight.data.copy_(table.chunk(ctx.tp_size, 0)[ctx.tp_rank])
        out = emb(ids)
        rows = slice(ctx.tp_rank * 3, ctx.tp_rank * 3 + 3) if sp else slice(None)  # SP: this rank's 3 positions
        (out * upstream[rows]).sum().backward()
        errors[f"emb_out_sp{sp}"] = _max_err(out, out_ref[rows])
        errors[f"emb_grad_sp{sp}"] = _max_err(emb.weight.grad, ref.weight.grad.chunk(ctx.tp_size, 0)[ctx.tp_rank])


def _check_sharded_init(ctx: ParallelContext, config: ModelConfig, reference: AquilaModel, errors: dict) -> None:
    # A PP-like chunk: layer 1 only, no embedding, with the head.
    chunk = AquilaModel(config, ctx, layer_ids=[1], pre_process=False, post_process=True, seed=7)
    full = dict(reference.named_parameters())
    worst = 0.0
    for name, param in chunk.named_parameters():
        worst = max(worst, _max_err(param, _local_slice(full[name], param, ctx.tp_rank)))
    errors["init_chunk"] = worst
    errors["init_chunk_names"] = 0.0 if sorted(n for n, _ in chunk.named_parameters()) == sorted(
        n for n in full if n.startswith(("layers.1.", "final_norm", "output_layer"))) else 1.0


def _check_model(ctx: ParallelContext, config: ModelConfig, sp: bool, errors: dict) -> None:
    reference = AquilaModel(config, ParallelContext.single_process(), seed=7)
    model = AquilaModel(config, ctx, sequence_parallel=sp, seed=7)
    if not sp:
        worst = max(_max_err(p, _local_slice(dict(reference.named_parameters())[n], p, ctx.tp_rank))
                    for n, p in model.named_parameters())
        errors["init_full"] = worst
        _check_sharded_init(ctx, config, reference, errors)
    ref_params = dict(reference.named_parameters())
    generator = torch.Generator().manual_seed(3)
    for step in range(2):
        ids = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=generator)
        labels = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=generator)
        ref_loss = reference(ids, labels=labels)
        ref_loss.mean().backward()
        loss = model(ids, labels=labels)
        loss.mean().backward()
        tag = f"sp{sp}_step{step}"
        errors[f"loss_{tag}"] = _max_err(loss, ref_loss)
        worst_grad, worst_norm_grad_before = 0.0, 0.0
        for name, param in model.named_parameters():
            grad = param.grad
            if getattr(param, "sequence_parallel", False):
                # Each rank saw only its sequence shard: the grad is partial until summed over TP.
                worst_norm_grad_before = max(worst_norm_grad_before, _max_err(grad, ref_params[name].grad))
                grad = grad.clone()
                dist.all_reduce(grad, group=ctx.tp_group)
            worst_grad = max(worst_grad, _max_err(grad, _local_slice(ref_params[name].grad, param, ctx.tp_rank)))
            param.grad = grad
        errors[f"grads_{tag}"] = worst_grad
        if sp:  # proves the SP norm grads really need the all-reduce (they differ before it)
            errors[f"sp_norm_grads_partial_{tag}"] = 0.0 if worst_norm_grad_before > 1e-4 else 1.0
        with torch.no_grad():  # one SGD step on both, so step 1 runs from updated weights
            for params in (reference.parameters(), model.parameters()):
                for param in params:
                    param -= 0.5 * param.grad
                    param.grad = None


def _worker(rank: int, world_size: int) -> dict:
    ctx = ParallelContext.initialize(tp_size=world_size, pp_size=1, device=torch.device("cpu"))
    errors: dict[str, float] = {}
    _check_sequence_parallel_collectives(ctx, errors)
    _check_cross_entropy(ctx, errors)
    _check_embedding(ctx, errors)
    config = ModelConfig(**CONFIG)
    for sp in (False, True):
        _check_model(ctx, config, sp, errors)
    return errors


def test_tensor_and_sequence_parallel_match_single_process():
    results = run_distributed(_worker, world_size=2)
    for rank, errors in enumerate(results):
        assert len(errors) > 15, errors
        bad = {key: value for key, value in errors.items() if not value <= ATOL}
        assert not bad, f"rank {rank}: mismatches beyond {ATOL}: {bad}"
