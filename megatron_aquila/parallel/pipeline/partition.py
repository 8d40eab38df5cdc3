"""Which global layer ids each pipeline stage (and virtual chunk) owns.

The model is cut into pp x vpp contiguous parts; part k runs on pipeline rank k mod pp as its
chunk k // pp (round-robin, so interleaving gives every rank vpp chunks spread over the depth).
Parts are equal by default, or sized by an explicit list of pp x vpp layer counts.
"""
from __future__ import annotations

from typing import Optional, Sequence


def part_sizes(num_layers: int, num_parts: int, explicit: Optional[Sequence[int]] = None) -> list[int]:
    if explicit is not None:
        assert len(explicit) == num_parts and sum(explicit) == num_layers, (
            f"pipeline_layers {list(explicit)} must have {num_parts} entries summing to {num_layers}")
        return list(explicit)
    assert num_layers % num_parts == 0, f"num_layers {num_layers} % (pp x vpp = {num_parts}) != 0"
    return [num_layers // num_parts] * num_parts


def chunk_layer_ids(num_layers: int, pp_size: int, vpp_size: int, pp_rank: int, chunk: int,
                    explicit: Optional[Sequence[int]] = None) -> list[int]:
    """Global layer ids of ``chunk`` (0..vpp-1) on pipeline rank ``pp_rank``."""
    sizes = part_sizes(num_layers, pp_size * vpp_size, explicit)
    part = chunk * pp_size + pp_rank
    start = sum(sizes[:part])
    return list(range(start, start + sizes[part]))


def chunk_has_embedding(pp_rank: int, chunk: int) -> bool:
    return pp_rank == 0 and chunk == 0


def chunk_has_head(pp_rank: int, chunk: int, pp_size: int, vpp_size: int) -> bool:
    return pp_rank == pp_size - 1 and chunk == vpp_size - 1
