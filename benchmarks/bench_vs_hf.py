"""Our training step next to HF transformers' LlamaForCausalLM on a CPU, same shape, alternating runs.

    python benchmarks/bench_vs_hf.py [--rounds 3] [--hf-compile] [--ours-compile]

Shape (issue 18's): hidden 512, 8 layers, 8 heads (8 kv heads), ffn 1536, vocab 32000, seq 512,
micro batch 4, fp32, SDPA attention. Ours is the real trainer step (``Trainer.train_step``: forward,
backward into the fp32 grad buffer, clipping, AdamW; ``benchmarks/bench_gpu_throughput.py``
``run_ours``); HF is ``LlamaForCausalLM`` with its own loss, ``clip_grad_norm_(1.0)`` and
``torch.optim.AdamW(fused=True)`` (``run_hf``), eager or, with ``--hf-compile``, its forward under
``torch.compile`` (inductor's C++ backend; the first steps compile). ``--ours-compile`` adds our step
with ``model.compile=true`` (each transformer block compiled, ``model/compile.py``). Each round runs
ours, then HF (then compiled HF, then ours compiled), each for ``--warmup`` + ``--iters`` steps on a
freshly built model (two more warm-up steps in the first round of a compiled side); the figure per
side is its best step over all rounds, and the ratios are each HF side's best time over ours (eager, and
compiled with ``--ours-compile``).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

_SPEC = importlib.util.spec_from_file_location("bench_gpu_throughput",
                                               Path(__file__).resolve().parent / "bench_gpu_throughput.py")
throughput = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = throughput  # its dataclasses look their module up while it loads
_SPEC.loader.exec_module(throughput)

SHAPE = throughput.Shape(hidden=512, heads=8, kv_heads=8, ffn=1536, vocab=32000, divisible_by=64)
LAYERS, SEQ, BATCH = 8, 512, 4


def compiled_hf(warmup: int, iters: int, device: torch.device):
    """``run_hf`` with the model's forward compiled (``torch.compile``), set as the model is built."""
    from transformers import LlamaForCausalLM

    original_init = LlamaForCausalLM.__init__

    def init_and_compile(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.forward = torch.compile(self.forward)

    LlamaForCausalLM.__init__ = init_and_compile
    try:
        result = throughput.run_hf(SHAPE, LAYERS, SEQ, BATCH, "fp32", device, warmup, iters)
    finally:
        LlamaForCausalLM.__init__ = original_init
    result.name = "HF Llama compiled"
    return result


def compiled_ours(warmup: int, iters: int, device: torch.device):
    """``run_ours`` with ``model.compile=true``."""
    return throughput.run_ours(SHAPE, LAYERS, SEQ, BATCH, "fp32", device, warmup, iters, compiled=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--hf-compile", action="store_true", help="also HF with its forward under torch.compile")
    parser.add_argument("--ours-compile", action="store_true", help="also ours with model.compile=true")
    args = parser.parse_args()
    device = torch.device("cpu")
    best: dict[str, float] = {}
    for round_index in range(args.rounds):
        runs = [lambda: throughput.run_ours(SHAPE, LAYERS, SEQ, BATCH, "fp32", device, args.warmup, args.iters),
                lambda: throughput.run_hf(SHAPE, LAYERS, SEQ, BATCH, "fp32", device, args.warmup, args.iters)]
        if args.hf_compile:
            runs.append(lambda: compiled_hf(args.warmup if round_index else args.warmup + 2, args.iters, device))
        if args.ours_compile:
            runs.append(lambda: compiled_ours(args.warmup if round_index else args.warmup + 2, args.iters, device))
        for run in runs:
            result = run()
            throughput.release(device)
            best[result.name] = min(best.get(result.name, float("inf")), min(result.seconds))
            print(f"round {round_index + 1}: {result.name:<18} best step {min(result.seconds) * 1e3:8.1f} ms "
                  f"({', '.join(f'{s * 1e3:.0f}' for s in result.seconds)} ms)", flush=True)
    ours = best.pop("megatron_aquila")
    tokens = BATCH * SEQ
    print(f"\nbest over {args.rounds} rounds, {tokens} tokens per step, {torch.get_num_threads()} threads:")
    print(f"  megatron_aquila    {ours * 1e3:8.1f} ms  {tokens / ours:8.0f} tokens/s")
    ours_compiled = best.pop("ours compiled", None)
    for name, seconds in best.items():
        print(f"  {name:<18} {seconds * 1e3:8.1f} ms  {tokens / seconds:8.0f} tokens/s   ours is {seconds / ours:.2f}x"
              + ("" if ours_compiled is None else f", ours compiled {seconds / ours_compiled:.2f}x"))
    if ours_compiled is not None:
        print(f"  {'ours compiled':<18} {ours_compiled * 1e3:8.1f} ms  {tokens / ours_compiled:8.0f} tokens/s   "
              f"{ours / ours_compiled:.2f}x ours eager")


if __name__ == "__main__":
    main()
