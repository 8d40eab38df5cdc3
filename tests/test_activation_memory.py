"""The planner's activation formula (memory_model.py) against the tensors autograd really saves.

A forward runs under ``torch.autograd.graph.saved_tensors_hooks``; every saved tensor's storage is
counted once (views of one storage share it: gate and up are halves of the gate_up output) and
parameters are left out. The bytes of a 2-layer model minus those of a 1-layer model are one layer's; the 1-layer model's rest is the embedding, the
final norm + output layer + cross entropy, and the rotary tables. Measured on CPU, where
torch SDPA takes its flash kernel (q, k, v, out and a logsumexp saved, no s x s scores), the
case the formula models; the test checks that no s x s tensor is saved. Exact equality: the
formula counts every saved tensor down to the int64 targets and the bool masks.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from megatron_aquila import memory_model
from megatron_aquila.config import ModelConfig
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext

# s=16 is not d=16 to keep shapes apart: d = 64 / 4 = 16, so s = 24; n=4 query heads over g=2 kv heads.
SEQ, BATCH, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 24, 3, 64, 4, 2, 96, 1000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model_config(layers: int) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=HIDDEN, num_attention_heads=HEADS, num_kv_heads=KV_HEADS,
                       ffn_hidden_size=FFN, seq_length=SEQ, vocab_size=VOCAB, make_vocab_size_divisible_by=16,
                       kernels="torch")


def _saved_bytes(model: AquilaModel, ids: torch.Tensor, labels: torch.Tensor,
                 positions: torch.Tensor | None = None) -> tuple[int, int]:
    """(bytes of distinct non-parameter storages saved for backward, largest trailing s x s count)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    square = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        if tensor.dim() >= 2 and tensor.shape[-1] == tensor.shape[-2] == SEQ:
            square[0] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, positions, labels=labels)
    loss.sum().backward()  # the graph is sound: everything it needed was kept
    return sum(storages.values()), square[0]


def _measure(ctx: ParallelContext, dtype: str, recompute: str, sequence_parallel: bool) -> dict[str, int]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    measured = {}
    for layers in (1, 2):
        model = AquilaModel(_model_config(layers), ctx, sequence_parallel=sequence_parallel, recompute=recompute,
                            params_dtype=DTYPES[dtype], device="cpu")
        measured[layers], square = _saved_bytes(model, ids, labels)
        assert square == 0, f"{square} saved tensors end in [{SEQ}, {SEQ}]: attention scores stored (math path)"
    layer = measured[2] - measured[1]
    return {"layer": layer, "rest": measured[1] - layer}


def _formula(tp: int, dtype: str, recompute: str, sequence_parallel: bool) -> dict[str, int]:
    config = _model_config(1)
    shape = memory_model.ActivationShape(
        seq_length=SEQ, micro_batch=BATCH, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
        ffn=FFN, padded_vocab=config.padded_vocab_size(tp), tp=tp, sequence_parallel=sequence_parallel and tp > 1,
        recompute=recompute, dtype_bytes=4 if dtype == "fp32" else 2)
    rest = (memory_model.embedding_activation_bytes(shape) + memory_model.head_activation_bytes(shape)
            + memory_model.rotary_table_bytes(shape))
    return {"layer": memory_model.activation_bytes_per_layer(shape), "rest": rest}


CASES = [(dtype, recompute) for dtype in DTYPES for recompute in ("none", "selective", "full")]


@pytest.mark.parametrize("dtype, recompute", CASES)
def test_saved_activations_equal_formula_tp1(dtype, recompute):
    measured = _measure(ParallelContext.single_process(), dtype, recompute, sequence_parallel=False)
    assert measured == _formula(1, dtype, recompute, False), (dtype, recompute)


def _tp_worker(rank: int, world_size: int) -> dict:
    ctx = ParallelContext.initialize(world_size, 1)
    return {(dtype, recompute, sp): _measure(ctx, dtype, recompute, sp)
            for dtype, recompute in CASES for sp in (False, True)}


def test_saved_activations_equal_formula_tp2_with_and_without_sequence_parallel():
    per_rank = run_distributed(_tp_worker, world_size=2)
    assert per_rank[0] == per_rank[1]
    wrong = {case: (got, _formula(2, *case)) for case, got in per_rank[0].items() if got != _formula(2, *case)}
    assert not wrong, f"(dtype, recompute, sequence parallel): (measured, formula) {wrong}"


def test_formula_against_hand_count_for_aquila2_34b_layer():
    """An independent hand count of one 34B layer (TP4, SP, bf16, micro batch 1, torch RMSNorm)."""
    s, b, h, n, g, d, f, t = 4096, 1, 6144, 48, 8, 128, 24576, 4
    shape = memory_model.ActivationShape(seq_length=s, micro_batch=b, hidden=h, heads=n, kv_heads=g, head_dim=d, ffn=f,
                                 padded_vocab=100096, tp=t, sequence_parallel=True, recompute="none", dtype_bytes=2)
    norm = (s // t) * b * h * 2 + (s // t) * b * 4                 # bf16 input + fp32 rstd
    shard = (s // t) * b * h * 2                                    # sequence shard input of QKV / gate_up
    q, k, v, out = [s * b * width * 2 for width in (n * d // t, g * d // t, g * d // t, n * d // t)]
    lse = b * (n // t) * s * 4
    mlp = s * b * (2 * f // t) * 2 + s * b * (f // t) * 2           # gate_up output, silu(gate) * up
    assert memory_model.activation_bytes_per_layer(shape) == 2 * norm + 2 * shard + q + k + v + out + lse + mlp


def _cp_worker(rank: int, world_size: int) -> dict:
    """One layer's saved bytes on each CP rank (its S / cp tokens, global position ids)."""
    from megatron_aquila.parallel.context_parallel import split_batch

    ctx = ParallelContext.initialize(1, 1, cp_size=world_size)
    generator = torch.Generator().manual_seed(0)
    batch = {"ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator),
             "labels": torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator),
             "positions": torch.arange(SEQ).expand(BATCH, SEQ)}
    local = split_batch(batch, ctx.cp_rank, ctx.cp_size)
    measured = {}
    for dtype, recompute in CASES:
        saved = {}
        for layers in (1, 2):
            model = AquilaModel(_model_config(layers), ctx, recompute=recompute, params_dtype=DTYPES[dtype],
                                device="cpu")
            saved[layers] = _saved_bytes(model, local["ids"], local["labels"], local["positions"])[0]
        measured[(dtype, recompute)] = saved[2] - saved[1]
    return measured


def cpu_mask_bytes(rank: int, cp: int, dtype_bytes: int) -> int:
    """CPU SDPA materialises the lower-right causal mask [c, (k + 1) c] of each chunk k > 0 in the
    activation dtype and saves it; CUDA kernels take the causal mask without materialising it
    (flash-attn's causal=True, SDPA's fused kernels given the CausalBias), so the planner leaves it out."""
    chunk = SEQ // (2 * cp)
    return sum(dtype_bytes * chunk * (k + 1) * chunk for k in (rank, 2 * cp - 1 - rank) if k > 0)


def test_saved_activations_per_layer_equal_formula_cp2():
    """Under CP2 a layer saves the local tensors of S/2 tokens, plus (without recompute) the gathered
    K and V of the whole sequence and a second copy of the attention output (memory_model.py docstring)."""
    per_rank = run_distributed(_cp_worker, world_size=2)
    for rank, measured in enumerate(per_rank):
        for (dtype, recompute), got in measured.items():
            dtype_bytes = 4 if dtype == "fp32" else 2
            shape = memory_model.ActivationShape(
                seq_length=SEQ // 2, micro_batch=BATCH, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS,
                head_dim=HIDDEN // HEADS, ffn=FFN, padded_vocab=_model_config(1).padded_vocab_size(1), tp=1,
                sequence_parallel=False, recompute=recompute, dtype_bytes=dtype_bytes, cp=2)
            mask = cpu_mask_bytes(rank, 2, dtype_bytes) if recompute == "none" else 0
            assert got == memory_model.activation_bytes_per_layer(shape) + mask, (rank, dtype, recompute, got)
