"""The two single-tensor collectives under their current names, on every supported torch.

torch 2.13 renamed ``all_gather_into_tensor`` -> ``all_gather_single`` and
``reduce_scatter_tensor`` -> ``reduce_scatter_single`` (same arguments and semantics; the old
names warn as deprecated). Older torch (the NGC 24.x containers, torch 2.11) has only the old
names. Every call site uses the names below, so gloo (CPU tests) and NCCL run the same call:

- ``all_gather_single(out, x, group)``: ``out = [x_0; x_1; ...; x_{p-1}]`` along dim 0;
- ``reduce_scatter_single(out, x, op, group)``: rank r gets chunk r (dim 0) of ``sum_q x_q``.
"""
from __future__ import annotations

import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
