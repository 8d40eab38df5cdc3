"""Context parallelism (CP): the sequence of every sample split over ``cp`` ranks (docs/design.md section 3.10).

Layout (load balancing). A sequence of S tokens is cut into 2 cp chunks of c = S / (2 cp) tokens;
CP rank i holds chunks i and 2 cp - 1 - i, in that order, as one local sequence of 2c tokens. Under
causal attention chunk k attends to (k + 1) c keys, so rank i attends to (i + 1) c + (2 cp - i) c =
(2 cp + 1) c keys whatever i: every rank does the same attention work (a contiguous split would give
the last rank 2 cp - 1 times the first one's).

Attention (all-gather K/V, the Llama 3 paper's choice rather than Megatron's ring). Every rank
all-gathers the K and V of its 2c tokens over the CP group (only the g/tp kv heads, not the n/tp
query heads: GQA divides the traffic by n/g), puts the 2 cp chunks back in sequence order, and
attends each local query chunk k to the key prefix [0, (k + 1) c) with the causal mask aligned to
the bottom right (query row r of the chunk sees keys j <= k c + r). This is exactly the rows of
full causal attention that the rank's queries own, so the result equals attention over the whole
sequence, and every attention kernel that takes a bottom-right causal mask can run it unchanged.

Backward: d(K, V) of the gathered tensors hold contributions from every rank's queries; a
reduce-scatter (sum) returns to each rank the sum for its own 2c tokens, which is the gradient of
the total loss with respect to its local K and V.

Communication per layer and micro-batch, per rank, with e bytes per element, b the micro-batch, g
the kv heads, d the head dim and tp the tensor-parallel size:
    forward all-gather of K and V:  2 x (cp - 1) x (S / cp) x b x (g / tp) x d x e   bytes received,
    backward reduce-scatter:        the same volume again,
plus one more forward all-gather per layer when the attention is recomputed (``recompute``
selective or full). A ring would move the same bytes in cp - 1 steps overlapped with attention;
the all-gather moves them in one collective before it, which costs more exposed time on slow links
but keeps the attention a single kernel call per chunk, lets GQA cut the bytes, and is what
Llama 3 used at 128K with cp 16. Memory: the gathered K and V ([S, b, g/tp, d] each) are saved
for backward unless attention is recomputed; with GQA they are small next to the rank's other
activations (docs/design.md section 3.10 gives the figures).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_aquila.model.packed_attention import DocumentMask

from megatron_aquila.parallel.collectives import all_gather_single, reduce_scatter_single
from megatron_aquila.parallel.context import ProcessGroup, group_rank, group_size

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[DocumentMask]], torch.Tensor]


def chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two sequence chunks (of 2 cp) that CP rank ``cp_rank`` holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_token_indices(seq_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Positions in the full sequence of this rank's 2 S / (2 cp) tokens, local order: int64 [S / cp]."""
    if seq_length % (2 * cp_size) != 0:
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x context_parallel {cp_size} = "
                         f"{2 * cp_size}: choose a sequence length that is a multiple of {2 * cp_size}")
    chunk = seq_length // (2 * cp_size)
    return torch.cat([torch.arange(k * chunk, (k + 1) * chunk) for k in chunk_ids(cp_rank, cp_size)])


def split_batch(batch: dict[str, torch.Tensor], cp_rank: int, cp_size: int) -> dict[str, torch.Tensor]:
    """This rank's tokens of every [b, S] tensor of a micro-batch (tokens, labels, loss_mask,
    position_ids, ...): [b, S] -> [b, S / cp], chunks ``chunk_ids(cp_rank, cp_size)``.

    The position ids keep their global values, so rotary embeddings and (for packed sequences)
    document boundaries stay those of the full sequence.
    """
    if cp_size == 1:
        return batch
    out = {}
    for key, value in batch.items():
        index = local_token_indices(value.shape[1], cp_rank, cp_size).to(value.device)
        out[key] = value.index_select(1, index)
    return out


def _to_sequence_order(gathered: torch.Tensor, cp_size: int) -> torch.Tensor:
    """[cp x 2c, ...] in rank order (rank r: chunks r, 2cp-1-r) -> [S, ...] in sequence order."""
    by_rank = gathered.view(cp_size, 2, gathered.shape[0] // (2 * cp_size), *gathered.shape[1:])  # [cp, 2, c, ...]
    chunks = torch.cat([by_rank[:, 0], by_rank[:, 1].flip(0)])  # [2cp, c, ...]: chunk k at row k
    return chunks.view(gathered.shape)


def _to_rank_order(sequence: torch.Tensor, cp_size: int) -> torch.Tensor:
    """The inverse of ``_to_sequence_order``: [S, ...] -> [cp x 2c, ...] (a new contiguous tensor)."""
    chunks = sequence.view(2 * cp_size, sequence.shape[0] // (2 * cp_size), *sequence.shape[1:])  # [2cp, c, ...]
    by_rank = torch.stack([chunks[:cp_size], chunks[cp_size:].flip(0)], dim=1)  # [cp, 2, c, ...]
    return by_rank.view(sequence.shape)


def _gather_rank_order(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-gather x [2c, ...] over the CP group: [cp x 2c, ...] in rank order."""
    gathered = torch.empty((group_size(group) * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(gathered, x.contiguous(), group=group)
    return gathered


class _GatherSequence(torch.autograd.Function):
    """Forward: all-gather x [2c, ...] over the CP group -> [S, ...] in sequence order.
    Backward: reduce-scatter (sum) of dL/d[S, ...] -> [2c, ...], this rank's chunks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _to_sequence_order(_gather_rank_order(x, group), group_size(group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp = group_size(ctx.group)
        by_rank = _to_rank_order(grad.contiguous(), cp)  # [cp * 2c, ...]
        local = torch.empty((grad.shape[0] // cp, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        reduce_scatter_single(local, by_rank, group=ctx.group)
        return local, None


def gather_sequence(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """x [2c, b, ...] of every CP rank -> the full [S, b, ...] in sequence order (differentiable)."""
    return _GatherSequence.apply(x, group)


def context_parallel_attention(attend: AttendFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               group: ProcessGroup, segments: Optional[DocumentMask] = None) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence (module docstring).

    q [2c, b, n/tp, d], k and v [2c, b, g/tp, d]: this rank's two chunks. ``attend(q, k, v, segments)``
    is an attention kernel with the causal mask aligned to the bottom right (``model/kernels.py``).
    ``segments``: the ``DocumentMask`` of this rank's queries against the whole sequence's keys, for
    per-document attention, or None; each chunk attends through a view of it. Returns [2c, b, n/tp * d].
    """
    cp, rank = group_size(group), group_rank(group)
    chunk = q.shape[0] // 2
    keys, values = gather_sequence(k, group), gather_sequence(v, group)  # [S, b, g/tp, d] each
    outputs = []
    for half, chunk_id in enumerate(chunk_ids(rank, cp)):
        end = (chunk_id + 1) * chunk
        rows = slice(half * chunk, (half + 1) * chunk)
        chunk_segments = None if segments is None else segments.chunk(rows, end)
        outputs.append(attend(q[rows], keys[:end], values[:end], chunk_segments))  # [c, b, n/tp*d]
    return torch.cat(outputs)  # [2c, b, n/tp * d]


def gather_positions(position_ids: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Every CP rank's position ids [b, 2c] (int64, no grad) -> the whole sequence's [b, S], in order."""
    return _to_sequence_order(_gather_rank_order(position_ids.t().contiguous(), group), group_size(group)).t()
