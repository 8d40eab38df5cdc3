"""Single-device training throughput: megatron_aquila's trainer step next to Hugging Face's LlamaForCausalLM.

    python benchmarks/bench_gpu_throughput.py                      # a GPU: Aquila2-7B width, seq 2048 and 4096
    python benchmarks/bench_gpu_throughput.py --device cpu --tiny  # smoke test of the script on a CPU
    python benchmarks/bench_gpu_throughput.py --compile            # also ours with model.compile (each block)

Both sides train the same decoder on the same number of tokens per iteration (micro batch =
tokens / seq), one optimizer step per iteration, and time ``--iters`` iterations after ``--warmup``:
- ours: the real training path (``build_trainer_parts`` + ``Trainer.train_step``: forward,
  backward into the fp32 grad buffer, unscale/clip/AdamW on fp32 masters, bf16 weights; mock data),
  with the kernels ``model.kernels=auto`` picks;
- HF: ``LlamaForCausalLM`` with ``attn_implementation="sdpa"``, its own loss (labels=input ids),
  ``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW(fused=True)``. ``--hf-precision autocast``
  (default on a GPU: fp32 weights, grads and Adam state with bf16 matmuls, the mixed precision of
  ours, whose fp32 master weights sit beside bf16 ones) or ``bf16`` (bf16 weights, grads and Adam
  state: less memory, no fp32 master).
Shape (default): hidden 4096, 32 heads (32 kv heads), ffn 11008, vocab 100008 (ours pads it to
100096), the width of Aquila2-7B, with as many layers as fit both runs in ``--memory-fraction`` of
the free device memory: ours from the planner's formulas (``megatron_aquila/memory_model.py``), HF's
as 18 bytes per parameter under autocast (8 with bf16) plus 2.5x our activations (HF keeps an fp32
residual stream under autocast and upcasts the logits). The table also shows the planner's
prediction next to our measured peak. ``--tiny`` is a 2-layer width-128 fp32 model for a CPU.

Reported per run: ms/iteration (median), tokens/s, model TFLOP/s (docs/design.md section 6 formula,
each side with its own vocabulary rows) and MFU against ``peak_flops.gpu_peak_tflops`` of the
device name (on a CPU: its fp32 matmul rate measured now), and peak allocated memory.

Weights: ours draws every weight on the CPU from a per-name seed (the same model under any
layout), a minute of single-threaded RNG at this width; the benchmark draws them on the device
instead (same distributions). Values do not change the speed.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional
from unittest import mock

import torch

from megatron_aquila import memory_model
from megatron_aquila.build import build_trainer_parts
from megatron_aquila.config import Config, load_config
from megatron_aquila.model.aquila import AquilaModel
from megatron_aquila.model.flops import flops_per_iteration
from megatron_aquila.parallel.context import ParallelContext
from megatron_aquila.peak_flops import gpu_peak_tflops, measure_cpu_matmul_tflops
from megatron_aquila.trainer import Trainer

GIB = 1024 ** 3


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    divisible_by: int


AQUILA2_7B_WIDTH = Shape(hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=100008, divisible_by=128)
TINY = Shape(hidden=128, heads=4, kv_heads=4, ffn=352, vocab=1000, divisible_by=64)
HF_ACTIVATION_FACTOR = 2.5  # HF's saved activations per layer vs ours, an over-estimate (module docstring)
# HF's weights + grads + Adam moments per parameter (+ autocast's cached bf16 copies of the weights)
HF_STATIC_BYTES_PER_PARAMETER = {"autocast": 18, "bf16": 8, "fp32": 16}


@dataclass
class Result:
    name: str
    seconds: list[float]
    tokens: int
    flops: float
    peak_bytes: Optional[int]    # max allocated on a GPU; None on a CPU
    predicted_bytes: Optional[float] = None
    note: str = ""

    def row(self, peak_tflops: Optional[float]) -> str:
        median = statistics.median(self.seconds)
        tflops = self.flops / median / 1e12
        mfu = f"{100 * tflops / peak_tflops:5.1f}%" if peak_tflops else "  n/a"
        memory = f"{self.peak_bytes / GIB:7.1f}" if self.peak_bytes is not None else "    n/a"
        planned = f"{self.predicted_bytes / GIB:7.1f}" if self.predicted_bytes is not None else "      -"
        return (f"{self.name:<16} {median * 1e3:9.1f} {self.tokens / median:11.0f} {tflops:9.3g} {mfu:>6} "
                f"{memory} {planned}  {self.note}")


def our_config(shape: Shape, layers: int, seq: int, batch: int, dtype: str, iterations: int,
               compiled: bool = False) -> Config:
    config = load_config(None, [f"model.compile={str(compiled).lower()}",
        f"model.num_layers={layers}", f"model.hidden_size={shape.hidden}",
        f"model.num_attention_heads={shape.heads}", f"model.num_kv_heads={shape.kv_heads}",
        f"model.ffn_hidden_size={shape.ffn}", f"model.vocab_size={shape.vocab}",
        f"model.make_vocab_size_divisible_by={shape.divisible_by}", f"model.seq_length={seq}",
        f"precision.dtype={dtype}", f"training.micro_batch_size={batch}", f"training.global_batch_size={batch}",
        f"training.train_iters={iterations}", "optimizer.lr_warmup_iters=0", "data.mock=true", "data.num_workers=0",
        "logging.peak_tflops=1.0",  # the log line is not used; skips the CPU peak measurement in build
    ])
    config.validate(1)
    return config


def planned_bytes(config: Config) -> float:
    """The planner's memory for this single-device run: weights, grads, optimizer state, activations."""
    rank = memory_model.rank_parameters(config, 1)[0]
    return memory_model.rank_memory(config, 1, rank, memory_model.ActivationShape.from_config(config)).total(False)


def fitting_layers(shape: Shape, seqs: list[int], tokens: int, budget: float, hf_precision: str,
                   max_layers: int) -> tuple[int, str]:
    """The most layers (<= max_layers) for which ours and HF both fit in ``budget`` bytes at every seq."""
    def need(layers: int) -> float:
        worst = 0.0
        for seq in seqs:
            config = our_config(shape, layers, seq, tokens // seq, "bf16", 1)
            rank = memory_model.rank_parameters(config, 1)[0]
            memory = memory_model.rank_memory(config, 1, rank, memory_model.ActivationShape.from_config(config))
            hf = HF_STATIC_BYTES_PER_PARAMETER[hf_precision] * rank.total + HF_ACTIVATION_FACTOR * memory.activations
            worst = max(worst, memory.total(False), hf)
        return worst

    if need(1) > budget:
        raise SystemExit(f"one layer needs {need(1) / GIB:.1f} GiB > budget {budget / GIB:.1f} GiB; "
                         "lower --tokens or set --layers")
    layers = 1
    while layers < max_layers and need(layers + 1) <= budget:
        layers += 1
    return layers, (f"{layers} layers: {need(layers) / GIB:.1f} GiB estimated for the larger run, "
                    f"budget {budget / GIB:.1f} GiB")


def init_on_device(self: AquilaModel, seed: int) -> None:
    """Stands in for AquilaModel.init_weights here: the same distributions, drawn where the weights live."""
    with torch.no_grad():
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(self.config.norm_init)
            else:
                param.normal_(0.0, self.config.init_std)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> tuple[list[float], Optional[int]]:
    """Seconds of each timed iteration and the peak allocated bytes over all of them (GPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak


def run_ours(shape: Shape, layers: int, seq: int, batch: int, dtype: str, device: torch.device,
             warmup: int, iters: int, compiled: bool = False) -> Result:
    """Our trainer step; ``compiled``: model.compile (the warm-up iterations absorb the compilation)."""
    config = our_config(shape, layers, seq, batch, dtype, warmup + iters, compiled)
    ctx = ParallelContext.single_process(device)
    with mock.patch.object(AquilaModel, "init_weights", init_on_device):
        parts, state = build_trainer_parts(config, ctx)
    trainer = Trainer(config, ctx, parts, None, state)
    stream = parts.train_stream(0)
    kernels = parts.model_chunks[0].kernel_description()
    try:
        seconds, peak = timed(lambda: trainer.train_step(stream, 1), device, warmup, iters)
    finally:
        stream.close()
    flops = flops_per_iteration(config.model, batch, config.model.padded_vocab_size(1))
    return Result("ours compiled" if compiled else "megatron_aquila", seconds, batch * seq, flops, peak,
                  planned_bytes(config) if device.type == "cuda" else None, kernels)


def run_hf(shape: Shape, layers: int, seq: int, batch: int, precision: str, device: torch.device,
           warmup: int, iters: int) -> Result:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=seq,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(hf_config)
    if precision == "bf16":
        model.to(torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)  # [b, s]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "autocast" else nullcontext()

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, device, warmup, iters)
    flops = flops_per_iteration(our_config(shape, layers, seq, batch, "bf16", 1).model, batch, shape.vocab)
    return Result(f"HF Llama {precision}", seconds, batch * seq, flops, peak,
                  note=f"attention {model.config._attn_implementation}")


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(run: Callable[[], Result], name: str, device: torch.device) -> Optional[Result]:
    """The run's result, or None after printing that it ran out of device memory."""
    try:
        return run()
    except torch.OutOfMemoryError as error:
        print(f"{name}: out of device memory ({str(error).splitlines()[0]}); set --layers lower")
        return None
    finally:
        release(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="2 layers of width 128, fp32: a CPU smoke test")
    parser.add_argument("--layers", type=int, help="default: as many as fit (see the module docstring)")
    parser.add_argument("--max-layers", type=int, default=32, help="cap on the computed layer count (Aquila2-7B: 32)")
    parser.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default 2048 4096; tiny 64 128)")
    parser.add_argument("--tokens", type=int, help="tokens per iteration (default 8192; tiny 256)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--hf-precision", choices=("autocast", "bf16", "fp32"),
                        help="default: autocast on a GPU, fp32 with --tiny")
    parser.add_argument("--memory-fraction", type=float, default=0.8, help="share of free device memory to plan for")
    parser.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: by device name)")
    parser.add_argument("--compile", action="store_true", help="also time ours with model.compile=true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    shape = TINY if args.tiny else AQUILA2_7B_WIDTH
    seqs = args.seqs or ([64, 128] if args.tiny else [2048, 4096])
    tokens = args.tokens or (256 if args.tiny else 8192)
    dtype = "fp32" if args.tiny else "bf16"
    hf_precision = args.hf_precision or ("fp32" if args.tiny else "autocast")
    bad = [seq for seq in seqs if tokens % seq]
    if bad:
        raise SystemExit(f"--tokens {tokens} is not a multiple of seq {bad}: the micro batch is tokens / seq")

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        free, total = torch.cuda.mem_get_info(device)
        peak = args.peak_tflops or gpu_peak_tflops(name)
        where = f"{name}, {free / GIB:.1f} of {total / GIB:.1f} GiB free"
    else:
        free, peak = None, args.peak_tflops or measure_cpu_matmul_tflops(threads=torch.get_num_threads())
        where = f"CPU, {torch.get_num_threads()} threads"
    if args.layers:
        layers, how = args.layers, f"{args.layers} layers (--layers)"
    elif args.tiny or free is None:
        layers, how = 2, "2 layers"
    else:
        layers, how = fitting_layers(shape, seqs, tokens, args.memory_fraction * free, hf_precision, args.max_layers)
    import transformers

    peak_text = f"{peak:.4g} TFLOP/s" if peak else "unknown (pass --peak-tflops for MFU)"
    print(f"device: {where}; peak {peak_text}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"model: hidden {shape.hidden}, heads {shape.heads} (kv {shape.kv_heads}), ffn {shape.ffn}, vocab "
          f"{shape.vocab}; {how}; ours {dtype}{' with fp32 master weights' if dtype != 'fp32' else ''}, HF "
          f"{hf_precision}; {tokens} tokens per "
          f"iteration; median of {args.iters} iterations after {args.warmup} warm-up")
    header = (f"{'run':<16} {'ms/iter':>9} {'tokens/s':>11} {'TFLOP/s':>9} {'MFU':>6} {'GiB':>7} {'planned':>7}")
    for seq in seqs:
        batch = tokens // seq
        print(f"\nseq {seq}, micro batch {batch}")
        print(header)
        ours = guarded(lambda: run_ours(shape, layers, seq, batch, dtype, device, args.warmup, args.iters),
                       "megatron_aquila", device)
        if ours is not None:
            print(ours.row(peak), flush=True)
        hf = guarded(lambda: run_hf(shape, layers, seq, batch, hf_precision, device, args.warmup, args.iters),
                     "HF", device)
        if hf is not None:
            print(hf.row(peak), flush=True)
        if ours is not None and hf is not None:
            ratio = statistics.median(hf.seconds) / statistics.median(ours.seconds)
            print(f"ours / HF tokens/s: {ratio:.2f}x")
        if args.compile:
            compiled = guarded(lambda: run_ours(shape, layers, seq, batch, dtype, device, args.warmup, args.iters,
                                                compiled=True), "ours compiled", device)
            if compiled is not None:
                print(compiled.row(peak), flush=True)
                if hf is not None:
                    ratio = statistics.median(hf.seconds) / statistics.median(compiled.seconds)
                    print(f"ours compiled / HF tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
