"""Single-process training throughput and MFU of a small Aquila-shaped model on this machine.

    python benchmarks/bench_train_throughput.py [--iters 6] [--micro-batch 4] [--compile] [section.key=value ...]

Runs the real training path (build_trainer_parts + Trainer.train_step: forward, backward, grad
buffer, AdamW) on the ``small-512`` preset (hidden 512, 8 layers, 8 heads, seq 512, vocab 32000,
fp32) with synthetic data, after a warm-up iteration, and prints tokens/s, achieved GFLOP/s
(docs/design.md section 6 formula) and MFU against an fp32 matmul peak measured in the same run with
the same thread count. The figure is meaningful only on an otherwise idle machine. ``--compile`` sets
``model.compile=true`` (each transformer block under torch.compile, ``model/compile.py``); the
compilation happens in the warm-up iteration, which is not timed, and its seconds are printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from megatron_aquila.build import build_trainer_parts
from megatron_aquila.config import load_config
from megatron_aquila.cpu_runtime import keep_freed_memory
from megatron_aquila.peak_flops import measure_cpu_matmul_tflops
from megatron_aquila.model.flops import flops_per_iteration
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=6, help="timed iterations after one warm-up")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--default-malloc", action="store_true", help="skip the glibc tuning train.py applies")
    parser.add_argument("--compile", action="store_true", help="model.compile=true: compile each transformer block")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        keep_freed_memory()

    config = load_config(None, [
        "model.preset=small-512", f"training.micro_batch_size={args.micro_batch}",
        f"training.global_batch_size={args.micro_batch}", f"training.train_iters={args.iters + 1}",
        "data.mock=true", "data.num_workers=0", "logging.peak_tflops=1.0", "optimizer.lr_warmup_iters=0",
        *(["model.compile=true"] if args.compile else []), *args.overrides,
    ])
    config.validate(1)
    ctx = ParallelContext.single_process()
    parts, state = build_trainer_parts(config, ctx)
    trainer = Trainer(config, ctx, parts, None, state)
    stream = parts.train_stream(0)
    times = []
    for iteration in range(args.iters + 1):
        start = time.perf_counter()
        trainer.train_step(stream, 1)
        times.append(time.perf_counter() - start)
    warmup = times.pop(0)  # the first iteration warms up allocator and kernels (and compiles)
    seconds = statistics.median(times)
    tokens = args.micro_batch * config.model.seq_length
    flops = flops_per_iteration(config.model, args.micro_batch, config.model.padded_vocab_size(1))
    peak = measure_cpu_matmul_tflops(threads=args.threads)
    achieved = flops / seconds / 1e12
    m = config.model
    print(f"model: hidden {m.hidden_size}, layers {m.num_layers}, heads {m.num_attention_heads}, seq {m.seq_length}, "
          f"vocab {m.vocab_size}, {config.precision.dtype}, micro batch {args.micro_batch}, threads {args.threads}, "
          f"compiled blocks {'on' if m.compile else 'off'}")
    print(f"warm-up iteration: {warmup * 1e3:.1f} ms (not timed)")
    print(f"iteration: median {seconds * 1e3:.1f} ms over {len(times)} (min {min(times) * 1e3:.1f}, "
          f"max {max(times) * 1e3:.1f})")
    print(f"throughput: {tokens / seconds:.1f} tokens/s, {achieved * 1e3:.2f} GFLOP/s (model FLOPs)")
    print(f"matmul peak measured now: {peak * 1e3:.2f} GFLOP/s (fp32, {args.threads} threads)")
    print(f"MFU: {100 * achieved / peak:.1f}%")


if __name__ == "__main__":
    main()
