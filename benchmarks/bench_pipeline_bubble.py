"""Measured pipeline bubble of 1F1B and interleaved 1F1B on gloo, beside the theory.

Spawns ``--pp`` CPU processes (gloo), builds a small Aquila model cut into pp x v chunks, runs a
warmup iteration and then ``--iters`` timed iterations of the schedule with a timeline recorder
(``ScheduleSpec.timeline``: start/end of every forward and backward step). Per rank:

    bubble = 1 - (time spent in forward/backward steps) / (iteration wall time)

The iteration wall time is measured from a barrier before the schedule to its return on that
rank. Theory (equal stages, communication free): (p - 1) / (v m + p - 1).

On a machine with fewer cores than processes the stages share cores, so compute steps run slower
and part of the "idle" time of one rank is compute of another: read the figures as a check of the
schedule's shape, not of a GPU cluster's bubble.

    python benchmarks/bench_pipeline_bubble.py --pp 4 --microbatches 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from megatron_aquila.config import ModelConfig
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.pipeline.partition import chunk_has_embedding, chunk_has_head, chunk_layer_ids
from megatron_aquila.parallel.pipeline.schedules import ScheduleSpec, get_forward_backward_func

from gloo_spawn import spawn_gloo  # benchmarks/gloo_spawn.py


def worker(rank: int, args: argparse.Namespace, vpp: int) -> tuple[int, float, str]:
    """(rank, median measured bubble, the schedule's order of forward/backward steps) of this stage."""
    torch.set_num_threads(1)
    ctx = ParallelContext.initialize(1, args.pp)
    model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=8, num_kv_heads=4,
                        ffn_hidden_size=args.hidden * 3, vocab_size=1024, make_vocab_size_divisible_by=64,
                        seq_length=args.seq)
    chunks = [AquilaModel(model, ctx, layer_ids=chunk_layer_ids(args.layers, args.pp, vpp, ctx.pp_rank, c),
                          pre_process=chunk_has_embedding(ctx.pp_rank, c),
                          post_process=chunk_has_head(ctx.pp_rank, c, args.pp, vpp)) for c in range(vpp)]
    schedule = get_forward_backward_func(args.pp, vpp)
    g = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, args.seq)
    batch = dict(tokens=torch.randint(0, 1024, shape, generator=g), labels=torch.randint(0, 1024, shape, generator=g),
                 loss_mask=torch.ones(shape), position_ids=torch.arange(args.seq).expand(shape).contiguous())
    bubbles = []
    for iteration in range(args.iters + 1):
        timeline: list = []
        spec = ScheduleSpec(model_chunks=chunks, grad_buffers=[], ctx=ctx, num_microbatches=args.microbatches,
                            micro_batch_size=args.micro_batch, seq_length=args.seq, hidden_size=args.hidden,
                            sequence_parallel=False, activation_dtype=torch.float32, timeline=timeline)
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        schedule(spec, iter([batch] * args.microbatches))
        wall = time.perf_counter() - start
        busy = sum(end - begin for _, _, _, begin, end in timeline)
        if iteration > 0:  # iteration 0 warms up allocators and gloo connections
            bubbles.append(1.0 - busy / wall)
        order = " ".join(f"{kind}{chunk}.{mb}" for kind, chunk, mb, _, _ in timeline)
    return rank, statistics.median(bubbles), order


def run(args: argparse.Namespace, vpp: int) -> None:
    results = spawn_gloo(args.pp, worker, args, vpp)
    p, m = args.pp, args.microbatches
    theory = (p - 1) / (vpp * m + p - 1)
    name = "1F1B" if vpp == 1 else f"interleaved v={vpp}"
    print(f"\n{name}: pp {p}, micro-batches {m}, theoretical bubble (p-1)/(v*m+p-1) = {theory:.3f}")
    for rank, bubble, order in results:
        print(f"  rank {rank}: measured bubble {bubble:.3f}   order: {order if args.show_order else ''}")
    print(f"  mean measured bubble {statistics.mean(b for _, b, _ in results):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--vpp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--show-order", action="store_true", help="print each rank's F/B step order")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {args.pp} gloo processes, model: "
          f"{args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro batch {args.micro_batch}")
    for vpp in args.vpp:
        run(args, vpp)


if __name__ == "__main__":
    main()
