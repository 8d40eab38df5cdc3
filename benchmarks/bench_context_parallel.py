"""Context parallelism on CPU: tokens/s, attention time per layer, and K/V bytes against the formula.

For each sequence length (default 2048, 4096, 8192) and CP degree (default 1, 2, 4) it spawns CP
gloo processes, each holding its S / CP tokens (``parallel/context_parallel.py``), and times:

- a training step of a small Aquila model (``--layers`` layers, GQA): forward + backward of the
  per-token loss; tokens/s = S x micro batch / step time (the slowest rank's);
- one layer's attention alone: q, k, v of the layer's shapes through the CP attention (all-gather
  K/V, the chunks against their key prefixes) forward and backward;
- the bytes the CP ranks receive from the collectives during the step (counted at the
  all-gather and reduce-scatter calls: the output minus this rank's input), beside the docstring's
  formula: per layer 2 (CP - 1) (S / CP) b g d e forward and the same backward, e bytes per element.

CP ranks share this machine's cores (2 here): with more processes than cores the figures show the
work per rank and the communication volume, not a GPU cluster's speed-up. The step time is the
median of ``--iters`` timed steps after one warm-up.

    python benchmarks/bench_context_parallel.py [--seq 2048 4096 8192] [--cp 1 2 4]
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
from megatron_aquila.model.kernels import build_attention
from megatron_aquila.parallel import context_parallel
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.parallel.context_parallel import context_parallel_attention, split_batch

from gloo_spawn import spawn_gloo  # benchmarks/gloo_spawn.py


class ReceivedBytes:
    """Wraps the two collectives of ``context_parallel`` and adds up the bytes this rank receives."""

    def __init__(self):
        self.total = 0
        self.gather, self.scatter = context_parallel.all_gather_single, context_parallel.reduce_scatter_single
        context_parallel.all_gather_single = self._all_gather
        context_parallel.reduce_scatter_single = self._reduce_scatter

    def _all_gather(self, output, tensor, *args, **kwargs):
        self.total += (output.numel() - tensor.numel()) * output.element_size()  # the other ranks' pieces
        return self.gather(output, tensor, *args, **kwargs)

    def _reduce_scatter(self, output, tensor, *args, **kwargs):
        self.total += (tensor.numel() - output.numel()) * output.element_size()  # ring: (p - 1) / p of the input
        return self.scatter(output, tensor, *args, **kwargs)


def median_seconds(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        dist.barrier()
        tick = time.perf_counter()
        fn()
        seconds = torch.tensor([time.perf_counter() - tick])
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
        times.append(float(seconds))
    return statistics.median(times)


def worker(rank: int, cp: int, seq: int, args: argparse.Namespace) -> tuple[float, float, int]:
    """This rank's (step seconds, attention seconds, K/V bytes received per step)."""
    torch.set_num_threads(max(1, args.threads // cp))
    ctx = ParallelContext.initialize(1, 1, torch.device("cpu"), cp_size=cp)
    config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                         num_kv_heads=args.kv_heads, ffn_hidden_size=args.hidden * 3, vocab_size=1024,
                         make_vocab_size_divisible_by=64, seq_length=seq, kernels="torch")
    model = AquilaModel(config, ctx, device="cpu")
    g = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, seq)
    batch = split_batch(dict(tokens=torch.randint(0, 1024, shape, generator=g),
                             labels=torch.randint(0, 1024, shape, generator=g),
                             position_ids=torch.arange(seq).expand(shape).contiguous()), ctx.cp_rank, cp)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(batch["tokens"], batch["position_ids"], batch["labels"]).mean().backward()

    step_seconds = median_seconds(step, args.iters)
    counter = ReceivedBytes()
    step()
    step_bytes = counter.total

    local, d = seq // cp, config.head_dim
    q = torch.randn(local, args.micro_batch, args.heads, d, requires_grad=True)
    k, v = (torch.randn(local, args.micro_batch, args.kv_heads, d, requires_grad=True) for _ in range(2))
    kernel = build_attention("torch-sdpa", args.heads, args.kv_heads, d, 0.0)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments=None) -> torch.Tensor:
        return kernel(q, k, v, True, segments)

    def attention() -> None:
        out = context_parallel_attention(attend, q, k, v, ctx.cp_group) if cp > 1 else attend(q, k, v)
        out.sum().backward()

    return step_seconds, median_seconds(attention, args.iters), step_bytes


def formula_bytes(cp: int, seq: int, args: argparse.Namespace) -> int:
    """Per step: layers x (forward all-gather + backward reduce-scatter) of K and V, fp32 (module docstring)."""
    d = args.hidden // args.heads
    per_direction = 2 * (cp - 1) * (seq // cp) * args.micro_batch * args.kv_heads * d * 4
    return args.layers * 2 * per_direction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    args = parser.parse_args()
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv heads, "
          f"micro batch {args.micro_batch}, fp32, torch SDPA; {args.threads} CPU threads shared by the CP ranks")
    print(f"{'seq':>6} {'cp':>3} {'tokens/s':>9} {'step s':>8} {'attn ms/layer':>14} "
          f"{'K/V MiB recv':>13} {'formula MiB':>12}")
    for seq in args.seq:
        for cp in args.cp:
            step_seconds, attention_seconds, step_bytes = spawn_gloo(cp, worker, cp, seq, args)[0]  # rank 0's
            tokens = seq * args.micro_batch / step_seconds
            print(f"{seq:>6} {cp:>3} {tokens:>9.0f} {step_seconds:>8.3f} {attention_seconds * 1e3:>14.1f} "
                  f"{step_bytes / 2**20:>13.2f} {formula_bytes(cp, seq, args) / 2**20:>12.2f}")


if __name__ == "__main__":
    main()
