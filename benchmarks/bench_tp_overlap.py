"""Backward time of one TP2 column + row pair with and without ``parallel.tp_comm_overlap``, on gloo.

Spawns 2 CPU processes (gloo) that build Y = gelu(X W_up^T) W_down^T with W_up column-parallel
[ffn/2, hidden] and W_down row-parallel [hidden, ffn/2] per rank, fp32. Each round runs a forward
(not timed) and times ``backward`` from a barrier to its return, once with the blocking and once with
the overlapped column layer (which goes first alternates), so both see the same machine load; the
figure is the best round of each, the slower rank's. What can overlap (``parallel/layers.py``): the
column layer's grad-input all-reduce ([s, b, hidden]) with its weight-grad GEMM ([ffn/2, s*b] x
[s*b, hidden]); with ``--sp`` its input all-gather with the grad-input GEMM and its grad-input
reduce-scatter with the weight-grad GEMM. The row layer has nothing to overlap (its docstring says
why). The last line times those collectives and the weight-grad GEMM alone.

On a CPU the GEMMs and gloo's communication threads share the cores: with fewer free cores than
2 x (torch threads + 1) the overlap has less to win, and on a shared machine the figures are noisy.

    PYTHONPATH=. python benchmarks/bench_tp_overlap.py --seq 1024 --hidden 1024 --ffn 2816 [--sp] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_aquila.parallel.collectives import all_gather_single, reduce_scatter_single
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.layers import ColumnParallelLinear, RowParallelLinear

from gloo_spawn import spawn_gloo  # benchmarks/gloo_spawn.py

WORLD_SIZE = 2


def worker(rank: int, args: argparse.Namespace) -> dict:
    """This rank's best times (seconds): the backward blocking (False) and overlapped (True), and each part alone."""
    torch.set_num_threads(args.threads)
    ctx = ParallelContext.initialize(tp_size=WORLD_SIZE, pp_size=1, device=torch.device("cpu"))
    torch.manual_seed(0)
    pairs = {}
    for overlap in (False, True):
        up = ColumnParallelLinear(args.hidden, args.ffn, ctx.tp_group, sequence_parallel=args.sp,
                                  tp_comm_overlap=overlap)
        down = RowParallelLinear(args.ffn, args.hidden, ctx.tp_group, sequence_parallel=args.sp)
        with torch.no_grad():
            up.weight.normal_(0.0, 0.02)
            down.weight.normal_(0.0, 0.02)
        pairs[overlap] = (up, down)
    seq = args.seq // WORLD_SIZE if args.sp else args.seq
    x = torch.randn(seq, args.batch, args.hidden, requires_grad=True)  # [s, b, h] ([s/2, b, h] under SP)
    grad = torch.randn(seq, args.batch, args.hidden)  # dL/dY, shaped like x
    # What can overlap, each alone: the column layer's collectives (the grad-input all-reduce; under SP the
    # input all-gather and the grad-input reduce-scatter) and its GEMMs (the dW GEMM; under SP also dX's).
    partial = torch.randn(args.seq, args.batch, args.hidden)  # [s, b, h], the grad-input addend
    hidden_grad = torch.randn(args.seq * args.batch, args.ffn // WORLD_SIZE)  # [s*b, f/2]
    total_input = torch.randn(args.seq, args.batch, args.hidden)  # [s, b, h]
    shard = partial.new_empty((args.seq // WORLD_SIZE, args.batch, args.hidden))  # [s/2, b, h]

    def collectives() -> None:
        if args.sp:
            all_gather_single(total_input, shard, group=ctx.tp_group)
            reduce_scatter_single(shard, partial, group=ctx.tp_group)
        else:
            dist.all_reduce(partial, group=ctx.tp_group)

    parts = {"collective": collectives,
             "dW GEMM": lambda: hidden_grad.t().mm(total_input.view(-1, args.hidden))}  # dW [f/2, h]
    best = {False: float("inf"), True: float("inf"), "collective": float("inf"), "dW GEMM": float("inf")}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for overlap in ((False, True) if round_index % 2 == 0 else (True, False)):
            up, down = pairs[overlap]
            x.grad = up.weight.grad = down.weight.grad = None
            y = down(F.gelu(up(x)))
            dist.barrier()
            start = time.perf_counter()
            y.backward(grad)
            elapsed = time.perf_counter() - start
            if round_index > 0:
                best[overlap] = min(best[overlap], elapsed)
        for name, run in parts.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            if round_index > 0:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism: x and y are sequence shards")
    args = parser.parse_args()
    if args.seq % WORLD_SIZE or args.ffn % WORLD_SIZE:
        parser.error(f"--seq {args.seq} and --ffn {args.ffn} must be multiples of the TP size {WORLD_SIZE}")
    results = spawn_gloo(WORLD_SIZE, worker, args)
    slowest = {key: max(best[key] for best in results) * 1e3 for key in results[0]}
    blocking, overlapped = slowest[False], slowest[True]
    print(f"TP2 gloo, column+row backward, seq {args.seq} x batch {args.batch}, hidden {args.hidden}, "
          f"ffn {args.ffn}, fp32, sp={args.sp}, {args.threads} thread(s)/rank, best of {args.rounds} rounds")
    print(f"tp_comm_overlap=false: {blocking:.2f} ms")
    print(f"tp_comm_overlap=true:  {overlapped:.2f} ms")
    print(f"ratio false/true: {blocking / overlapped:.3f}")
    print(f"alone: {'input all-gather + grad-input reduce-scatter' if args.sp else 'grad-input all-reduce'} "
          f"{slowest['collective']:.2f} ms, "
          f"dW GEMM {slowest['dW GEMM']:.2f} ms (a perfect overlap saves at most the smaller)")


if __name__ == "__main__":
    main()
