"""Causal attention within the documents of packed sequences (data.sft), without a dense s x s mask on GPU.

A packed row holds documents back to back; a document starts where the position id is 0
(data/sft_dataset.py). Query i sees key j when both lie in the same document and j <= i.
``packed_attention_path`` picks one of three ways to run it (``model/kernels.py`` turns the path into
a kernel name):

    varlen  CUDA, fp16/bf16, flash-attn providing ``flash_attn_varlen_func``: every document is one
            sequence of the varlen kernel. q, k, v are flattened batch-major to [b s, heads, d] and
            cut by ``cu_seqlens`` (int32 [documents + 1], the cumulative document lengths over the
            flattened batch); causal=True. No s x s tensor exists. Saved for backward: the flattened
            q, k, v, out [b s, n, d] and the logsumexp (fp32, [n, b s] in flash-attn's unpadded
            layout; older releases pad it to [documents, n, longest document]).
    flex    CUDA, torch FlexAttention, no attention dropout (FlexAttention has none): ``create_block_mask``
            with the mask_mod "same document and causal" gives a block-sparse mask (128 x 128 blocks:
            [b, 1, s/128] counts and [b, 1, s/128, s/128] int32 indices, full and partial, for forward
            and backward: a few KiB per row at s = 2048); the kernel skips empty blocks and evaluates
            the mask_mod in partial ones only. Saved: q, k, v, out, logsumexp [b, n, s] fp32 and the
            block mask (one per micro-batch and CP chunk, shared by every layer). Building it evaluates
            the mask_mod over a [b, 1, sq, sk] boolean grid once per micro-batch (a temporary, not saved).
    dense   everywhere else (the CPU path): the [b, 1, sq, sk] mask through torch SDPA (``DocumentMask.dense``).

cu_seqlens, with context parallelism. A ``DocumentMask`` view attends sq queries to the key prefix
[0, sk) with the queries the last sq keys (the bottom-right causal alignment of ``model/kernels.py``):
the whole row without CP (sq = sk = s), a CP chunk k against [0, (k + 1) c) under CP
(``parallel/context_parallel.py``). Each document [start, end) of a row of the full sequence gives one
segment: keys [min(start, sk), min(end, sk)), queries the part of those at or after sk - sq. The query
part is then a suffix of the key part, so causal=True (aligned to the bottom right, flash-attn >= 2.1)
is exactly "same document and j <= i". Documents wholly before the chunk give segments with 0 queries,
documents after it empty segments; flash-attn returns at once for them and writes zero dK, dV. Summed
over a row's segments the key lengths are sk and the query lengths sq, so the cumulative sums index the
batch-major flattened tensors. ``max_seqlen`` is the longest document clipped to sq (queries) and sk
(keys): an upper bound, which flash-attn only uses to size its grid.

Host syncs. The varlen kernel's grid has one entry per document, so the host must know the documents:
their [start, end) in each row and the longest length (``PackedDocuments``). The loader
(``data/loader.py``) finds them with ``find_documents`` from each micro-batch's position ids while those
are still CPU tensors, before the context-parallel split, so they describe the full rows [b, S]; they
travel in the micro-batch as ``documents`` through the pipeline schedules to ``AquilaModel.forward``
and into the ``DocumentMask``. The varlen layout of every view (whole rows, each CP chunk) is then host
arithmetic, and its two cu_seqlens go host -> device (through pinned memory, non_blocking): with the
loader's documents the varlen path reads nothing back from the device. Fallback, for callers that pass
position ids only (generation, the comparisons with transformers, tests): the documents are derived on
the device from the mask's key documents, two host syncs per micro-batch shared by every layer and
both CP chunks: the starts (``nonzero``, waits for the queued GPU work), then the longest length
(``.item()``, finds the device idle). The flex and dense paths read the device documents only and
have no host sync.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Hashable, Optional

import torch
import torch.nn.functional as F

PACKED_PATHS = ("varlen", "flex", "dense")
FLASH_VARLEN_MIN_VERSION = (2, 1)  # causal=True aligned to the bottom right when sq < sk (CP chunks)


def require_flash_attn(version: str, needed: tuple[int, ...], purpose: str) -> None:
    """Raise unless flash-attn ``version`` ("2.5.8", "2.1.0+cu121", "2.6.3.post1") is at least ``needed``."""
    found = []
    for part in version.split("+")[0].split("."):
        if not part.isdigit():
            break
        found.append(int(part))
    if tuple(found) < needed:
        raise RuntimeError(f"{purpose} needs flash-attn >= {'.'.join(map(str, needed))}, but flash-attn {version} is "
                           "installed: upgrade flash-attn, or set model.kernels=torch")


def packed_attention_path(device: torch.device | str, dtype: torch.dtype, flash_varlen_available: bool,
                          flex_available: bool, attention_dropout: float = 0.0) -> str:
    """How per-document attention runs (module docstring): "varlen" on CUDA in fp16/bf16 when flash-attn
    has ``flash_attn_varlen_func``, else "flex" on CUDA when FlexAttention is available and attention
    dropout is off, else "dense"."""
    if torch.device(device).type != "cuda":
        return "dense"
    if flash_varlen_available and dtype in (torch.float16, torch.bfloat16):
        return "varlen"
    if flex_available and attention_dropout == 0:
        return "flex"
    return "dense"


@dataclass(frozen=True)
class VarlenLayout:
    """The varlen kernel's arguments for one ``DocumentMask`` view (module docstring)."""

    cu_seqlens_q: torch.Tensor  # int32 [segments + 1], cumulative query lengths over the flattened [b sq]
    cu_seqlens_k: torch.Tensor  # int32 [segments + 1], cumulative key lengths over the flattened [b sk]
    max_seqlen_q: int           # upper bound of a segment's queries
    max_seqlen_k: int           # upper bound of a segment's keys


@dataclass(frozen=True)
class PackedDocuments:
    """Every document of packed rows [b, S], flattened row by row: document i covers the tokens
    [starts[i], ends[i]) of its row. The rows' documents tile them, so per row the lengths ends - starts
    sum to S; ``longest`` = max_i (ends[i] - starts[i]). On the host (module docstring: "Host syncs")."""

    starts: torch.Tensor     # int64 [D], local to its row, rows in order
    ends: torch.Tensor       # int64 [D]
    longest: int
    shape: tuple[int, int]   # (b, S) of the rows they tile


def find_documents(position_ids: torch.Tensor) -> PackedDocuments:
    """The documents of rows of position ids [b, S]: one starts where the position id is 0 (and at every
    row's first token). On CPU tensors no device is involved (the loader's use)."""
    is_start = position_ids == 0  # [b, S]
    is_start[:, 0] = True
    return _documents_starting_at(is_start)


def _documents_starting_at(is_start: torch.Tensor) -> PackedDocuments:
    """The documents of rows [b, S] whose first tokens are True in ``is_start`` [b, S] (True in column 0).
    On a device, two host syncs: the starts (``nonzero``), then the longest length (``.item()``)."""
    b, length = is_start.shape
    flat_starts = torch.nonzero(is_start.flatten()).squeeze(1)  # [D] in the flattened [b S]
    flat_ends = torch.cat([flat_starts[1:], flat_starts.new_full((1,), b * length)])  # [D]
    row_offset = torch.div(flat_starts, length, rounding_mode="floor") * length  # [D]
    starts, ends = flat_starts - row_offset, flat_ends - row_offset
    return PackedDocuments(starts, ends, int((ends - starts).max()), (b, length))


def _on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: a host tensor bound for CUDA is staged in pinned memory so the copy is queued on
    the stream without the host waiting (host -> device only; nothing is read back)."""
    if x.device == device:
        return x
    return (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)


class DocumentMask:
    """Causal attention within documents of packed sequences, for one micro-batch.

    Query i (global position ``query_positions[i]`` in the key sequence) sees key j when
    j <= query_positions[i] and ``query_documents[:, i] == key_documents[:, j]``. The model makes one
    ``DocumentMask`` per micro-batch; every layer (and every context-parallel chunk, through ``chunk``)
    reads what it derives, built on first use and cached in the root mask: the dense [b, 1, sq, sk] mask
    (``dense``), the varlen layout (``varlen_layout``) or the flex block mask (``block_mask``). So the
    kernels' saved references cost one per micro-batch (and chunk), not one per layer.

    ``documents``: the host form of the key rows (``find_documents`` of the whole sequence's position ids,
    shape (b, sk)), from which the varlen layout is built without reading the device; None derives it from
    ``key_documents`` on the device (module docstring: "Host syncs").
    """

    def __init__(self, query_documents: torch.Tensor, key_documents: torch.Tensor, query_positions: torch.Tensor,
                 documents: Optional[PackedDocuments] = None):
        if documents is not None and documents.shape != tuple(key_documents.shape):
            raise ValueError(f"the documents describe rows of shape {documents.shape}, the keys are "
                             f"{tuple(key_documents.shape)}: find them from the whole sequence's position ids")
        self.query_documents = query_documents  # [b, sq] int64
        self.key_documents = key_documents      # [b, sk] int64
        self.query_positions = query_positions  # [sq] int64, position of each query among the keys
        self.documents = documents
        self._cache: dict[Hashable, object] = {}
        self._rows, self._keys = slice(None), slice(None)
        self._parent: Optional[DocumentMask] = None

    def chunk(self, rows: slice, keys_end: int) -> "DocumentMask":
        """The queries ``rows`` against the key prefix ``[0, keys_end)``, sharing this mask's cache."""
        view = DocumentMask(self.query_documents[:, rows], self.key_documents[:, :keys_end],
                            self.query_positions[rows])
        view._parent, view._rows, view._keys = self, rows, slice(0, keys_end)
        return view

    def _cached(self, kind: str, build: Callable[[], object]) -> object:
        """``build()`` once per (kind, view) in the root's cache."""
        root = self._parent or self
        key = (kind, self._rows.start, self._rows.stop, self._keys.stop)
        if key not in root._cache:
            root._cache[key] = build()
        return root._cache[key]

    def dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """[b, 1, sq, sk]: boolean (True = attend) for ``dtype`` None, else additive (0 or -inf) in ``dtype``."""
        if self._parent is not None:
            return self._parent.dense(dtype)[:, :, self._rows, self._keys]

        def build() -> torch.Tensor:
            keys = torch.arange(self.key_documents.shape[1], device=self.key_documents.device)
            causal = keys[None, :] <= self.query_positions[:, None]  # [sq, sk]
            same = self.query_documents[:, :, None] == self.key_documents[:, None, :]  # [b, sq, sk]
            allowed = (same & causal).unsqueeze(1)  # [b, 1, sq, sk]
            return allowed if dtype is None else torch.zeros(
                allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        return self._cached(f"dense {dtype}", build)

    def _documents(self) -> PackedDocuments:
        """The root's documents: the host form given, else derived from the key documents on the device
        (two host syncs; module docstring)."""
        root = self._parent or self
        if root.documents is not None:
            return root.documents

        def build() -> PackedDocuments:
            documents = root.key_documents  # [b, S]
            is_start = torch.ones_like(documents, dtype=torch.bool)
            is_start[:, 1:] = documents[:, 1:] != documents[:, :-1]  # every row starts a document
            return _documents_starting_at(is_start)
        return root._cached("documents", build)

    def varlen_layout(self) -> VarlenLayout:
        """cu_seqlens (on the keys' device) and max_seqlen of this view's queries (the last sq of its sk keys;
        module docstring): arithmetic on the documents' device, the host when the loader found them."""
        def build() -> VarlenLayout:
            documents = self._documents()
            keys, queries = self.key_documents.shape[1], self.query_documents.shape[1]
            key_lo, key_hi = documents.starts.clamp(max=keys), documents.ends.clamp(max=keys)
            query_lo, query_hi = key_lo.clamp(min=keys - queries), key_hi.clamp(min=keys - queries)
            device = self.key_documents.device
            cumulative = [_on_device(F.pad(torch.cumsum(hi - lo, 0), (1, 0)).to(torch.int32), device)  # [D + 1]
                          for lo, hi in ((query_lo, query_hi), (key_lo, key_hi))]
            return VarlenLayout(cumulative[0], cumulative[1], min(documents.longest, queries),
                                min(documents.longest, keys))
        return self._cached("varlen", build)

    def block_mask(self, create_block_mask: Callable[..., object]) -> object:
        """FlexAttention's ``BlockMask`` of this view, made by ``create_block_mask`` (torch's, or the dry run's)."""
        query_documents, key_documents, positions = self.query_documents, self.key_documents, self.query_positions

        def same_document_causal(b, h, q, kv):
            return (query_documents[b, q] == key_documents[b, kv]) & (kv <= positions[q])

        return self._cached("flex", lambda: create_block_mask(
            same_document_causal, query_documents.shape[0], None, query_documents.shape[1], key_documents.shape[1],
            device=query_documents.device))


Segments = Optional[DocumentMask]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, Segments], torch.Tensor]


def flash_varlen_available() -> bool:
    """Whether the installed flash-attn (imported here, lazily) provides ``flash_attn_varlen_func``."""
    try:
        import flash_attn  # GPU only, imported when asked
    except ImportError:
        return False
    return hasattr(flash_attn, "flash_attn_varlen_func")


def flex_available() -> bool:
    """Whether this torch has FlexAttention and triton (its CUDA kernels are generated by torch.compile)."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("torch.nn.attention.flex_attention", "triton"))
    except (ImportError, ValueError):
        return False


def flash_varlen_attention(dropout_p: float, kernel: Optional[Callable[..., torch.Tensor]] = None,
                           version: Optional[str] = None) -> AttentionFn:
    """Per-document attention through flash-attn's ``flash_attn_varlen_func`` (imported here, GPU only), or
    ``kernel`` of its ``version`` (a pure-torch emulation in the tests, the dry run's stand-in).
    Takes the kernels' signature (``model/kernels.py``) with ``segments`` required."""
    if kernel is None:
        import flash_attn  # GPU only, imported when chosen
        from flash_attn import flash_attn_varlen_func as kernel

        version = str(getattr(flash_attn, "__version__", "unknown"))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool,
               segments: Segments = None) -> torch.Tensor:
        assert segments is not None, "the varlen kernel runs per-document attention only (choose_kernels)"
        sq, b, n, d = q.shape
        if sq < k.shape[0]:
            require_flash_attn(version, FLASH_VARLEN_MIN_VERSION, f"per-document attention of {sq} queries to "
                               f"{k.shape[0]} keys (context parallelism: causal aligned to the bottom right)")
        deterministic = torch.are_deterministic_algorithms_enabled()
        if deterministic:
            require_flash_attn(version, (2, 4, 1), "a deterministic backward (torch.use_deterministic_algorithms)")
        layout = segments.varlen_layout()

        def batch_major(x: torch.Tensor) -> torch.Tensor:  # [s, b, heads, d] -> [b s, heads, d] (a copy if b > 1)
            return x.transpose(0, 1).reshape(b * x.shape[0], x.shape[2], d)

        out = kernel(batch_major(q), batch_major(k), batch_major(v), layout.cu_seqlens_q, layout.cu_seqlens_k,
                     layout.max_seqlen_q, layout.max_seqlen_k, dropout_p=dropout_p if training else 0.0, causal=True,
                     **({"deterministic": True} if deterministic else {}))  # [b sq, n, d], GQA native
        return out.view(b, sq, n * d).transpose(0, 1).reshape(sq, b, n * d)  # [sq, b, n*d]
    return attend


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention)``, one for the process (every layer shares its compiled kernels):
    uncompiled, FlexAttention is a reference implementation that materializes the scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(dropout_p: float, kernel: Optional[Callable[..., torch.Tensor]] = None,
                            create_block_mask: Optional[Callable[..., object]] = None) -> AttentionFn:
    """Per-document attention through FlexAttention with a block-sparse document mask (module docstring):
    ``flex_attention`` compiled on CUDA (eager elsewhere: torch's reference, forward only on the CPU), or
    ``kernel`` and ``create_block_mask`` (the dry run's stand-ins). No attention dropout: FlexAttention has
    none, and ``packed_attention_path`` keeps it out when ``model.attention_dropout`` > 0."""
    if dropout_p > 0:
        raise ValueError(f"FlexAttention has no attention dropout (model.attention_dropout {dropout_p}): set it to 0, "
                         "or install flash-attn >= 2.1 (the varlen kernel), or set model.kernels: torch on the CPU")
    if kernel is None:
        from torch.nn.attention.flex_attention import flex_attention

        def kernel(q, k, v, **kwargs):
            return (_compiled_flex_attention() if q.is_cuda else flex_attention)(q, k, v, **kwargs)
    if create_block_mask is None:
        from torch.nn.attention.flex_attention import create_block_mask

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool,
               segments: Segments = None) -> torch.Tensor:
        assert segments is not None, "the flex kernel runs per-document attention only (choose_kernels)"
        s, b, n, d = q.shape
        out = kernel(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),  # [b, heads, s, d]
                     block_mask=segments.block_mask(create_block_mask), enable_gqa=k.shape[2] != n)
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)  # [s, b, n*d]
    return attend
