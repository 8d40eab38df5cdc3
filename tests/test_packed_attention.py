"""Per-document attention of packed sequences (model/packed_attention.py) on the CPU.

1. ``packed_attention_path`` for every combination of device, dtype, flash-attn varlen, FlexAttention and
   attention dropout; ``choose_kernels`` maps it to kernels, and a forced flash-attn without the varlen
   kernel is a one-line error naming ``model.kernels`` and the way out.
2. cu_seqlens by hand, whole rows and context-parallel chunks. The documents' host form
   (``find_documents``, what the loader hands the model) by hand; the varlen layout built from it equals the
   one derived on the device from the position ids, over whole rows and every CP chunk, and reads nothing
   from the device (mask tensors on ``meta``; on CUDA, ``torch.cuda`` sync debug mode "error").
3. The dense-mask SDPA path equals attention computed per document with plain torch maths; the varlen
   path, with the derived cu_seqlens fed to a pure-torch emulation of ``flash_attn_varlen_func`` (one
   causal SDPA per segment, aligned to the bottom right), equals the dense path in forward and backward,
   over whole rows and over every context-parallel chunk (cp 2 and 4, documents crossing chunks, GQA);
   FlexAttention (eager, forward only on the CPU) equals it too.
4. The dry run's stand-ins: the varlen and flex paths save no s x s tensor (the dense path does), the
   varlen path's two host syncs per micro-batch without the host form (the fallback) are named, and the
   FlexAttention block mask is small.
5. End to end: every packed SFT micro-batch from the real data path reaches every model chunk with the
   host form of its whole rows, which agrees with its position ids and is what the layers' document mask
   builds its varlen layouts from (equal to the derived ones), under each schedule (no pipelining, 1F1B
   with CP 2, interleaved) on gloo.
"""
from __future__ import annotations

import math
import sys
import types
from typing import Callable

import numpy as np
import pytest
import torch
from distributed import run_distributed
from test_sft_training import BASE as SFT_BASE, SEQ, write_conversations
from training import train_with
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_aquila.dryrun import cuda_kernels
from megatron_aquila.dryrun.memory import ALLOCATION_BLOCK
from megatron_aquila.dryrun.syncs import HostSyncCounter
from megatron_aquila.model import kernels
from megatron_aquila.model.packed_attention import (DocumentMask, PackedDocuments, find_documents,
                                                    flash_varlen_attention, flex_document_attention,
                                                    packed_attention_path)
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.context_parallel import (chunk_ids, context_parallel_attention, gather_positions,
                                                       local_token_indices)
from megatron_aquila.training_state import TrainerParts

# ------------------------------------------------------------------------------------------------ selection
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("device, dtype, varlen, flex, dropout, path", [
    ("cpu", BF16, True, True, 0.0, "dense"),     # the CPU path, whatever is installed
    ("cpu", FP32, False, False, 0.0, "dense"),
    ("cuda", BF16, True, True, 0.0, "varlen"),
    ("cuda", FP16, True, False, 0.1, "varlen"),  # the varlen kernel drops out
    ("cuda", FP32, True, True, 0.0, "flex"),     # flash-attn has no fp32
    ("cuda", BF16, False, True, 0.0, "flex"),    # flash-attn missing, or without flash_attn_varlen_func
    ("cuda", BF16, False, True, 0.1, "dense"),   # FlexAttention has no dropout
    ("cuda", FP32, True, False, 0.0, "dense"),
    ("cuda", BF16, False, False, 0.0, "dense"),
])
def test_path_for_each_combination(device, dtype, varlen, flex, dropout, path):
    assert packed_attention_path(device, dtype, varlen, flex, dropout) == path


def _pretend(monkeypatch, flash_attn: types.SimpleNamespace | None, flex: bool) -> None:
    """flash_attn as importable (a stand-in module) or not, and FlexAttention available or not."""
    monkeypatch.setattr(kernels, "_importable", lambda name: flash_attn is not None and name == "flash_attn")
    monkeypatch.setattr(kernels, "flex_available", lambda: flex)
    if flash_attn is None:
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    else:
        monkeypatch.setitem(sys.modules, "flash_attn", flash_attn)


WITH_VARLEN = types.SimpleNamespace(__version__="2.5.8", flash_attn_func=None, flash_attn_varlen_func=None)
WITHOUT_VARLEN = types.SimpleNamespace(__version__="2.0.0", flash_attn_func=None)


@pytest.mark.parametrize("backend, device, dtype, module, flex, attention", [
    ("auto", "cuda", BF16, WITH_VARLEN, True, "flash-attn-varlen"),
    ("auto", "cuda", BF16, WITHOUT_VARLEN, True, "flex-attention"),
    ("auto", "cuda", BF16, None, False, "torch-sdpa"),
    ("auto", "cpu", BF16, WITH_VARLEN, True, "torch-sdpa"),
    ("torch", "cuda", BF16, WITH_VARLEN, True, "flex-attention"),
    ("flash-attn", "cuda", BF16, WITH_VARLEN, True, "flash-attn-varlen"),
])
def test_kernel_choice_for_documents(monkeypatch, backend, device, dtype, module, flex, attention):
    _pretend(monkeypatch, module, flex)
    choice = kernels.choose_kernels(backend, device, dtype, document_attention=True)
    assert choice.attention == attention and attention in choice.describe()


def test_forced_flash_attn_without_varlen_is_a_one_line_error(monkeypatch):
    _pretend(monkeypatch, WITHOUT_VARLEN, True)
    with pytest.raises(ValueError) as error:
        kernels.choose_kernels("flash-attn", "cuda", BF16, document_attention=True)
    message = str(error.value)
    assert "\n" not in message and "model.kernels" in message and "2.0.0" in message, message
    assert "upgrade flash-attn >= 2.1" in message and "model.kernels: torch" in message, message


# ------------------------------------------------------------------------------------------------ cu_seqlens
def _positions(rows: list[list[int]]) -> torch.Tensor:
    """[b, s] position ids of rows of documents with the given lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])


def _root_mask(positions: torch.Tensor, cp: int = 1, rank: int = 0, host: bool = False,
               device: torch.device | str | None = None) -> DocumentMask:
    """What the model builds (model/aquila.py ``_documents``) from the whole sequence's position ids, on
    ``device`` (default: theirs); ``host``: with the documents' host form the loader gives it (from the
    position ids on the CPU), else deriving them on the mask's device (the fallback)."""
    s, device = positions.shape[1], device or positions.device
    key_documents = (positions == 0).cumsum(dim=1)  # [b, S]
    local = (local_token_indices(s, rank, cp) if cp > 1 else torch.arange(s)).to(positions.device)  # [S / cp]
    query_documents = key_documents.index_select(1, local)  # [b, S / cp]
    return DocumentMask(query_documents.to(device), key_documents.to(device), local.to(device),
                        find_documents(positions.cpu()) if host else None)


def _views(root: DocumentMask, cp: int, rank: int) -> list[DocumentMask]:
    """The views the attention of CP rank ``rank`` reads: the root itself without CP, else its two chunks."""
    if cp == 1:
        return [root]
    c = root.key_documents.shape[1] // (2 * cp)
    return [root.chunk(slice(half * c, (half + 1) * c), (chunk + 1) * c)
            for half, chunk in enumerate(chunk_ids(rank, cp))]


def test_cu_seqlens_by_hand():
    positions = _positions([[3, 5], [8]])  # s = 8
    layout = _root_mask(positions).varlen_layout()
    assert layout.cu_seqlens_q.tolist() == layout.cu_seqlens_k.tolist() == [0, 3, 8, 16]
    assert layout.cu_seqlens_q.dtype == torch.int32 and (layout.max_seqlen_q, layout.max_seqlen_k) == (8, 8)
    # cp 2, c = 2; rank 0 holds chunks 0 ([0, 2)) and 3 ([6, 8))
    root = _root_mask(positions, cp=2, rank=0)
    first = root.chunk(slice(0, 2), 2).varlen_layout()  # queries [0, 2) against keys [0, 2)
    assert first.cu_seqlens_q.tolist() == [0, 2, 2, 4] and first.cu_seqlens_k.tolist() == [0, 2, 2, 4]
    last = root.chunk(slice(2, 4), 8).varlen_layout()  # queries [6, 8) against keys [0, 8)
    # row 0: document [0, 3) has no query here, [3, 8) has 2; row 1: one document, 2 queries
    assert last.cu_seqlens_q.tolist() == [0, 0, 2, 4] and last.cu_seqlens_k.tolist() == [0, 3, 8, 16]
    assert (last.max_seqlen_q, last.max_seqlen_k) == (2, 8)


ROWS = [[5, 9, 2, 16], [1, 20, 11]]  # two rows of 32 tokens, documents crossing every chunk boundary


def test_host_documents_by_hand():
    documents = find_documents(_positions([[3, 5], [8]]))  # s = 8
    assert documents.starts.tolist() == [0, 3, 0] and documents.ends.tolist() == [3, 8, 8]
    assert (documents.longest, documents.shape) == (8, (2, 8))
    # a row whose first position id is not 0 still starts a document there (as the device derivation has it)
    documents = find_documents(torch.tensor([[4, 5, 0, 1, 0, 1, 2, 3]]))
    assert documents.starts.tolist() == [0, 2, 4] and documents.ends.tolist() == [2, 4, 8] and documents.longest == 4


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("rows", [ROWS, [[1] * 32, [32]], [[7, 1, 1, 23], [16, 16]]])
def test_varlen_layout_from_host_documents_equals_the_one_derived_on_the_device(cp, rows):
    positions = _positions(rows)
    for rank in range(cp):
        host, derived = _root_mask(positions, cp, rank, host=True), _root_mask(positions, cp, rank)
        for got, want in zip(_views(host, cp, rank), _views(derived, cp, rank)):
            got, want = got.varlen_layout(), want.varlen_layout()
            assert got.cu_seqlens_q.dtype == got.cu_seqlens_k.dtype == torch.int32
            assert got.cu_seqlens_q.tolist() == want.cu_seqlens_q.tolist()
            assert got.cu_seqlens_k.tolist() == want.cu_seqlens_k.tolist()
            assert (got.max_seqlen_q, got.max_seqlen_k) == (want.max_seqlen_q, want.max_seqlen_k)


def test_host_documents_must_describe_the_whole_sequence():
    """The host form of one CP rank's tokens (taken after the CP split) is refused: it must be the whole rows'."""
    positions = _positions(ROWS)
    key_documents = (positions == 0).cumsum(dim=1)  # [b, S]
    local = local_token_indices(32, 0, 2)
    with pytest.raises(ValueError, match=r"rows of shape \(2, 16\), the keys are \(2, 32\)"):
        DocumentMask(key_documents[:, local], key_documents, local, find_documents(positions[:, local]))


def _zero_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, causal=False):
    """A varlen kernel that reads nothing: zeros [total_q, n, d] on q's device (``meta`` here)."""
    assert cu_seqlens_q.device == cu_seqlens_k.device == q.device and cu_seqlens_q.dtype == torch.int32
    return torch.zeros_like(q)


@pytest.mark.parametrize("cp", [1, 2])
def test_varlen_path_with_host_documents_reads_nothing_from_the_device(cp):
    """The mask's tensors (and q, k, v) on ``meta``, where any .item() or nonzero raises: with the host form the
    layout of every view builds, its cu_seqlens on ``meta``; without it the device derivation raises."""
    positions = _positions(ROWS)
    varlen = flash_varlen_attention(0.0, kernel=_zero_attention, version="2.5.8")
    for rank in range(cp):
        on_host = _views(_root_mask(positions, cp, rank, host=True), cp, rank)
        on_meta = _views(_root_mask(positions, cp, rank, host=True, device="meta"), cp, rank)
        for view, reference in zip(on_meta, on_host):
            layout, want = view.varlen_layout(), reference.varlen_layout()
            assert layout.cu_seqlens_q.device.type == layout.cu_seqlens_k.device.type == "meta"
            assert layout.cu_seqlens_q.shape == want.cu_seqlens_q.shape and layout.cu_seqlens_q.dtype == torch.int32
            assert (layout.max_seqlen_q, layout.max_seqlen_k) == (want.max_seqlen_q, want.max_seqlen_k)
            sq, sk = view.query_documents.shape[1], view.key_documents.shape[1]
            q, k, v = (torch.empty(s, 2, heads, 8, device="meta") for s, heads in ((sq, 4), (sk, 2), (sk, 2)))
            assert varlen(q, k, v, True, view).shape == (sq, 2, 32)
        with pytest.raises((RuntimeError, NotImplementedError)):  # the fallback reads the device
            _views(_root_mask(positions, cp, rank, device="meta"), cp, rank)[0].varlen_layout()


@pytest.mark.gpu
def test_cuda_varlen_layout_from_host_documents_has_no_sync():
    """On CUDA under ``torch.cuda.set_sync_debug_mode("error")`` (a synchronizing op raises): the layouts of
    the whole rows and of both chunks of each CP 2 rank, from the host form, equal the derived ones."""
    positions = _positions(ROWS)
    for cp in (1, 2):
        for rank in range(cp):
            want = [view.varlen_layout() for view in _views(_root_mask(positions, cp, rank), cp, rank)]
            views = _views(_root_mask(positions, cp, rank, host=True, device="cuda"), cp, rank)  # blocking copies
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = [view.varlen_layout() for view in views]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            for layout, expected in zip(got, want):
                assert layout.cu_seqlens_q.is_cuda and layout.cu_seqlens_k.is_cuda
                assert layout.cu_seqlens_q.cpu().tolist() == expected.cu_seqlens_q.tolist()
                assert layout.cu_seqlens_k.cpu().tolist() == expected.cu_seqlens_k.tolist()
                assert (layout.max_seqlen_q, layout.max_seqlen_k) == (expected.max_seqlen_q, expected.max_seqlen_k)


# ------------------------------------------------------------------------------------------------ numerics
def _per_document_reference(q, k, v, positions):
    """Causal attention within each document, one document at a time, plain torch maths (fp64).
    q [s, b, n, d], k and v [s, b, g, d] -> [s, b, n*d]."""
    s, b, n, d = q.shape
    repeat = n // k.shape[2]
    out = torch.zeros(s, b, n, d, dtype=q.dtype)
    for row in range(b):
        starts = torch.nonzero(positions[row] == 0).flatten().tolist() + [s]
        for lo, hi in zip(starts[:-1], starts[1:]):
            qd = q[lo:hi, row].transpose(0, 1)  # [n, l, d]
            kd, vd = (x[lo:hi, row].transpose(0, 1).repeat_interleave(repeat, dim=0) for x in (k, v))
            scores = qd @ kd.transpose(1, 2) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(hi - lo, hi - lo, dtype=torch.bool).triu(1), float("-inf"))
            out[lo:hi, row] = (scores.softmax(-1) @ vd).transpose(0, 1)
    return out.reshape(s, b, n * d)


def varlen_emulation(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, causal=False):
    """``flash_attn_varlen_func`` in plain torch: q [total_q, n, d], k and v [total_k, g, d]; segment i is
    q[cu_q[i]:cu_q[i+1]] against k[cu_k[i]:cu_k[i+1]], causal aligned to the bottom right."""
    assert causal and dropout_p == 0.0 and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    repeat = q.shape[1] // k.shape[1]
    pieces = []
    for i in range(len(cu_seqlens_q) - 1):
        q_lo, q_hi, k_lo, k_hi = (int(x) for x in (cu_seqlens_q[i], cu_seqlens_q[i + 1],
                                                    cu_seqlens_k[i], cu_seqlens_k[i + 1]))
        assert 0 <= q_hi - q_lo <= min(k_hi - k_lo, max_seqlen_q) and k_hi - k_lo <= max_seqlen_k
        if q_hi == q_lo:
            continue
        queries = q[q_lo:q_hi].transpose(0, 1)  # [n, lq, d]
        keys, values = (x[k_lo:k_hi].transpose(0, 1).repeat_interleave(repeat, dim=0) for x in (k, v))
        allowed = torch.ones(q_hi - q_lo, k_hi - k_lo, dtype=torch.bool).tril(k_hi - k_lo - (q_hi - q_lo))
        pieces.append(F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed).transpose(0, 1))
    return torch.cat(pieces)  # [total_q, n, d]


def _inputs(s: int = 32, b: int = 2, n: int = 4, g: int = 2, d: int = 8):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(s, b, heads, d, generator=generator, dtype=torch.float64, requires_grad=True)
            for heads in (n, g, g)]


def _forward_backward(attend, q, k, v, segments, weight):
    """Output and (dq, dk, dv) of sum(attend(...) * weight)."""
    for x in (q, k, v):
        x.grad = None
    out = attend(q, k, v, True, segments)
    (out * weight).sum().backward()
    return out.detach(), [x.grad.clone() for x in (q, k, v)]


def test_dense_mask_path_equals_attention_per_document():
    q, k, v = _inputs()
    positions = _positions(ROWS)
    dense = kernels.build_attention("torch-sdpa", 4, 2, 8, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(dense(q, k, v, False, _root_mask(positions)),
                                   _per_document_reference(q, k, v, positions))


def test_varlen_path_equals_dense_path_forward_and_backward():
    q, k, v = _inputs()
    positions = _positions(ROWS)
    weight = torch.randn(32, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    varlen = flash_varlen_attention(0.0, kernel=varlen_emulation, version="2.5.8")
    dense = kernels.build_attention("torch-sdpa", 4, 2, 8, 0.0)
    out, grads = _forward_backward(varlen, q, k, v, _root_mask(positions), weight)
    want, want_grads = _forward_backward(dense, q, k, v, _root_mask(positions), weight)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out, _per_document_reference(q, k, v, positions).detach())
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("cp", [2, 4])
def test_varlen_path_equals_dense_path_on_every_context_parallel_chunk(cp):
    """Each CP rank's two chunks attend to their key prefixes (parallel/context_parallel.py) through views
    of the rank's mask; both chunks of every rank, forward and backward, against the dense path."""
    q, k, v = _inputs()
    positions = _positions(ROWS)
    s, c = 32, 32 // (2 * cp)
    varlen = flash_varlen_attention(0.0, kernel=varlen_emulation, version="2.5.8")
    dense = kernels.build_attention("torch-sdpa", 4, 2, 8, 0.0)
    reference = _per_document_reference(q, k, v, positions).detach()
    for rank in range(cp):
        root_varlen, root_dense = _root_mask(positions, cp, rank), _root_mask(positions, cp, rank)
        local = local_token_indices(s, rank, cp)
        for half, chunk in enumerate(chunk_ids(rank, cp)):
            rows, end = slice(half * c, (half + 1) * c), (chunk + 1) * c
            weight = torch.randn(c, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(chunk))

            def on_chunk(attend, root):
                return lambda q_, k_, v_, training, _: attend(q_[local][rows], k_[:end], v_[:end], training,
                                                              root.chunk(rows, end))
            out, grads = _forward_backward(on_chunk(varlen, root_varlen), q, k, v, None, weight)
            want, want_grads = _forward_backward(on_chunk(dense, root_dense), q, k, v, None, weight)
            torch.testing.assert_close(out, want)
            torch.testing.assert_close(out, reference[chunk * c:(chunk + 1) * c])
            for got, expected in zip(grads, want_grads):
                torch.testing.assert_close(got, expected)


def context_parallel_worker(rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """``context_parallel_attention`` over the CP group with the varlen path, the mask built as the model does
    (position ids gathered over the group): this rank's token indices, output and grads of q, k, v."""
    ctx = ParallelContext.initialize(1, 1, torch.device("cpu"), cp_size=world_size)
    torch.set_num_threads(1)
    index = local_token_indices(32, rank, world_size)
    q, k, v = (x.detach().index_select(0, index).requires_grad_() for x in _inputs())
    weight = torch.randn(32, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full = gather_positions(_positions(ROWS).index_select(1, index), ctx.cp_group)  # [b, S]
    documents = (full == 0).cumsum(dim=1)
    segments = DocumentMask(documents.index_select(1, index), documents, index)
    varlen = flash_varlen_attention(0.0, kernel=varlen_emulation, version="2.5.8")
    out = context_parallel_attention(lambda q_, k_, v_, chunk: varlen(q_, k_, v_, True, chunk), q, k, v,
                                     ctx.cp_group, segments)
    (out * weight.index_select(0, index)).sum().backward()
    ctx.release_groups()
    return index, out.detach(), q.grad, k.grad, v.grad


def test_varlen_path_under_context_parallelism_equals_the_dense_path_in_one_process():
    q, k, v = _inputs()
    weight = torch.randn(32, 2, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense = kernels.build_attention("torch-sdpa", 4, 2, 8, 0.0)
    reference = _forward_backward(dense, q, k, v, _root_mask(_positions(ROWS)), weight)
    for index, out, *grads in run_distributed(context_parallel_worker, 2):
        torch.testing.assert_close(out, reference[0].index_select(0, index))
        for got, full in zip(grads, reference[1]):
            torch.testing.assert_close(got, full.index_select(0, index))


def test_flex_path_equals_dense_path_forward():
    q, k, v = (x.detach().float() for x in _inputs())
    positions = _positions(ROWS)
    flex = flex_document_attention(0.0)
    dense = kernels.build_attention("torch-sdpa", 4, 2, 8, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(flex(q, k, v, False, _root_mask(positions)),
                                   dense(q, k, v, False, _root_mask(positions)))
        root = _root_mask(positions, cp=2, rank=1)  # chunks 1 and 2 of 4, c = 8
        local = local_token_indices(32, 1, 2)
        for half, chunk in enumerate(chunk_ids(1, 2)):
            rows, end = slice(half * 8, (half + 1) * 8), (chunk + 1) * 8
            torch.testing.assert_close(flex(q[local][rows], k[:end], v[:end], False, root.chunk(rows, end)),
                                       dense(q[local][rows], k[:end], v[:end], False, root.chunk(rows, end)))


# ------------------------------------------------------------------------------------------------ dry run
def _saved_by(attend, s: int = 512, b: int = 2, n: int = 4, g: int = 2, d: int = 16):
    """(saved tensors, host syncs) of one forward of ``attend`` on fake bf16 tensors, as the dry run runs it."""
    saved = []
    with FakeTensorMode(), HostSyncCounter(fake=True) as syncs:
        q, k, v = (torch.empty(s, b, heads, d, dtype=BF16, requires_grad=True) for heads in (n, g, g))
        positions = torch.zeros(b, s, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            attend(q, k, v, True, _root_mask(positions))
    return saved, syncs.per_iteration(1)


def test_dry_run_stand_ins_save_no_s_by_s_tensor():
    s, b, n, d = 512, 2, 4, 16
    varlen, syncs = _saved_by(flash_varlen_attention(0.0, kernel=cuda_kernels.flash_attn_varlen_func,
                                                     version=cuda_kernels.FLASH_ATTN_VERSION))
    shapes = {(tuple(t.shape), t.dtype) for t in varlen}
    assert ((b * s, n, d), BF16) in shapes and ((n, b * s), torch.float32) in shapes, shapes  # out, logsumexp
    assert max(t.numel() for t in varlen) < s * s, shapes
    # the host learns the documents once per micro-batch: the longest (item) and the starts (nonzero)
    assert sorted(site.split(" at ")[0] for site in syncs) == ["_local_scalar_dense", "nonzero"], syncs
    assert all("packed_attention.py" in site for site in syncs), syncs

    flex, syncs = _saved_by(flex_document_attention(0.0, kernel=cuda_kernels.flex_attention))
    assert not syncs and max(t.numel() for t in flex) < s * s, [t.shape for t in flex]
    mask_bytes = sum(t.numel() * t.element_size() for t in flex if t.dtype == torch.int32)
    assert 0 < mask_bytes < 1024, mask_bytes  # s = 512: 4 x 4 blocks of 128 per row

    dense, _ = _saved_by(kernels._torch_sdpa(0.0, on_cuda=True, sdpa=cuda_kernels.cuda_sdpa))
    assert ((b, 1, s, s), BF16) in {(tuple(t.shape), t.dtype) for t in dense}  # what the dense path keeps


def test_sft_dry_run_activations_lose_exactly_the_dense_mask(monkeypatch):
    """A bf16 SFT step in the dry run (flash-attn on the GPU: the varlen path) against the same step on the
    dense-mask path: the activations at the peak differ by the [b, 1, s, s] bf16 mask, less the varlen
    kernel's cu_seqlens_q and cu_seqlens_k (int32, one 512-byte allocator block each), and nothing else."""
    from megatron_aquila.config import load_config
    from megatron_aquila.dryrun import runner

    b, s = 2, 256
    config = load_config(None, [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_heads=4",
        "model.ffn_hidden_size=96", f"model.seq_length={s}", "model.vocab_size=1000",
        "model.make_vocab_size_divisible_by=16", "training.train_iters=2", "optimizer.lr=1e-3", "data.sft=true",
        "data.data_path=[unused]", "precision.dtype=bf16", f"training.micro_batch_size={b}",
        f"training.global_batch_size={b}"])
    settings = runner.DryRunSettings(world_size=1, rank=0, microbatches=1)
    varlen = runner.dry_run(config, settings)
    monkeypatch.setattr(runner, "_choose_attention", lambda config, attention: "sdpa")  # the dense mask path
    dense = runner.dry_run(config, settings)
    assert varlen.notes == ["attention kernel: flash-attn-varlen"] and dense.notes == ["attention kernel: sdpa"]
    saved = dense.peak.by_category["activations"] - varlen.peak.by_category["activations"]
    assert saved == 2 * b * s * s - 2 * ALLOCATION_BLOCK, (saved, varlen.peak, dense.peak)


@pytest.mark.gpu
def test_cuda_packed_paths_match_the_dense_mask_on_cpu():
    """On CUDA in bf16: FlexAttention (compiled) and the path this machine picks (flash-attn's varlen kernel when
    installed) against the dense mask in fp32 on the CPU, whole rows and a CP chunk (queries 64..127 against
    keys 0..127), forward and q/k/v grads within 3% (relative norm)."""
    chosen = kernels.choose_kernels("auto", "cuda", BF16, document_attention=True).attention
    s, b, n, g, d = 256, 2, 8, 2, 64
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, b, heads, d, generator=generator) for heads in (n, g, g)]
    positions = _positions([[100, 90, 66], [30, 200, 26]])

    def run(attend, device, dtype, rows, end):
        q, k, v = (x.to(device, dtype, copy=True).requires_grad_() for x in inputs)
        root = _root_mask(positions.to(device))
        out = attend(q[rows], k[:end], v[:end], True, root if end == s else root.chunk(rows, end))
        out.float().square().sum().backward()
        return [x.detach().float().cpu() for x in (out, q.grad, k.grad, v.grad)]

    dense = kernels.build_attention("torch-sdpa", n, g, d, 0.0)
    errors = {}
    for name in sorted({chosen, "flex-attention"}):
        attend = kernels.build_attention(name, n, g, d, 0.0)
        for rows, end in ((slice(0, s), s), (slice(64, 128), 128)):
            want = run(dense, "cpu", FP32, rows, end)
            got = run(attend, "cuda", BF16, rows, end)
            for part, x, y in zip(("out", "dq", "dk", "dv"), got, want):
                errors[f"{name} {end} {part}"] = float((x - y).norm() / y.norm())
    print("\nbf16 CUDA vs fp32 CPU dense mask: " + ", ".join(f"{k} {e:.4f}" for k, e in errors.items()))
    assert max(errors.values()) <= 0.03, errors


# ------------------------------------------------------------------------------------------------ end to end
def _record_forwards(records: list) -> Callable[[TrainerParts, ParallelContext], None]:
    """A ``prepare`` hook: every forward of a model chunk appends [chunk, position ids [b, s/cp], the documents
    given to the chunk, the ``DocumentMask`` its first layer gets]."""
    def prepare(parts: TrainerParts, ctx: ParallelContext) -> None:
        for index, chunk in enumerate(parts.model_chunks):
            layer = next(iter(chunk.layers.values()))

            def chunk_forward(*args, forward=chunk.forward, index=index, **kwargs):
                records.append([index, args[1].clone(), kwargs.get("documents")])  # args: tokens, position_ids, ...
                return forward(*args, **kwargs)

            def layer_forward(x, cos, sin, segments, forward=layer.forward):
                records[-1].append(segments)
                return forward(x, cos, sin, segments)
            chunk.forward, layer.forward = chunk_forward, layer_forward
    return prepare


def documents_worker(rank: int, world_size: int, data: str, overrides: list[str]):
    """One packed SFT iteration through the real loader, trainer and schedule: (CP rank, PP rank, the records of
    ``_record_forwards``)."""
    records: list = []
    _, _, ctx = train_with(SFT_BASE + [f"data.data_path=[{data}]", "training.train_iters=1",
                                       "optimizer.lr_warmup_iters=0"] + overrides, world_size,
                           prepare=_record_forwards(records))
    return ctx.cp_rank, ctx.pp_rank, records


def _documents_by_hand(positions: torch.Tensor) -> tuple[list[int], list[int], int]:
    """(starts, ends, longest) of the documents of rows [b, S]: a new one wherever the position id is 0."""
    starts, ends = [], []
    for row in positions.tolist():
        row_starts = [0] + [j for j in range(1, len(row)) if row[j] == 0]
        starts += row_starts
        ends += row_starts[1:] + [len(row)]
    return starts, ends, max(end - start for start, end in zip(starts, ends))


SCHEDULES = {  # world size, chunks per stage, overrides; 8 samples a step in micro-batches of 2: 4 micro-batches
    "no-pipelining": (1, 1, []),
    "1f1b-cp2": (4, 1, ["parallel.pipeline_parallel=2", "parallel.context_parallel=2"]),
    "interleaved": (2, 2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=2"]),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_packed_sft_microbatches_reach_every_chunk_with_their_documents(schedule, tmp_path):
    """Every forward of every chunk gets the host form of its micro-batch's whole rows [b, S], on the CPU, equal on
    the CP ranks and agreeing with the position ids the CP ranks got (their chunks put back in sequence order);
    the layers' document mask holds it, and its varlen layouts equal those derived from the mask's device tensors."""
    world_size, chunks_per_stage, overrides = SCHEDULES[schedule]
    write_conversations(tmp_path / "chat", np.random.RandomState(5).randint(3, 20, size=40).tolist(), seed=2)
    args = (str(tmp_path / "chat"), overrides)
    results = run_distributed(documents_worker, world_size, args=args) if world_size > 1 else \
        [documents_worker(0, 1, *args)]
    cp = 1 + max(cp_rank for cp_rank, _, _ in results)
    stages: dict[int, dict[int, list]] = {}
    for cp_rank, pp_rank, records in results:
        stages.setdefault(pp_rank, {})[cp_rank] = records
    assert cp * len(stages) == world_size and ("cp2" in schedule) == (cp == 2), (schedule, cp, len(stages))
    for pp_rank, ranks in stages.items():
        chunks = [record[0] for record in ranks[0]]
        assert sorted(chunks) == [c for c in range(chunks_per_stage) for _ in range(4)], (schedule, pp_rank, chunks)
        for forwards in zip(*(ranks[r] for r in range(cp))):  # one forward, as each CP rank ran it
            full = torch.empty(2, SEQ, dtype=torch.long)
            for cp_rank, (_, positions, *_) in enumerate(forwards):
                full[:, local_token_indices(SEQ, cp_rank, cp) if cp > 1 else slice(None)] = positions
            want = _documents_by_hand(full)
            assert len(want[0]) >= 4, want  # every row holds a conversation and another one or the padding
            assert len({record[0] for record in forwards}) == 1, forwards  # the same chunk on every CP rank
            for cp_rank, (index, _, documents, mask) in enumerate(forwards):
                assert isinstance(documents, PackedDocuments), (schedule, pp_rank, index, documents)
                assert documents.starts.device.type == "cpu" and documents.shape == (2, SEQ)
                assert (documents.starts.tolist(), documents.ends.tolist(), documents.longest) == want
                assert mask.documents is documents
                derived = DocumentMask(mask.query_documents, mask.key_documents, mask.query_positions)
                for got, expected in zip(_views(mask, cp, cp_rank), _views(derived, cp, cp_rank)):
                    got, expected = got.varlen_layout(), expected.varlen_layout()
                    assert got.cu_seqlens_q.tolist() == expected.cu_seqlens_q.tolist()
                    assert got.cu_seqlens_k.tolist() == expected.cu_seqlens_k.tolist()
