"""Checkpoint cost on CPU: peak RSS per rank for train-only, train+save and resume; save time sync vs async.

Each phase is a fresh ``torchrun`` job of 2 processes (ZeRO-1 over DP2, fp32, mock data) so that
each process's peak RSS (``ru_maxrss``) belongs to that phase alone:

- ``train``:  build, train ``--iters`` iterations;
- ``save``:   the same, then two synchronous saves one iteration apart (the loop is blocked for
              all of each);
- ``async``:  the same with async saves: the loop is blocked only while the state is staged to
              host memory (the first save allocates the host buffers, the second reuses them);
              each background write is timed until it completes;
- ``resume``: build from the ``save`` phase's checkpoint, then train ``--iters`` iterations.

Prints one line per phase and the ratios against ``train``. Targets (issue): save and resume
within 1.10x of the train-only peak RSS; async blocks the loop for < 25% of the sync save time.

    python benchmarks/bench_checkpoint.py                 # ~300M parameters (hidden 1024, 20 layers)
    python benchmarks/bench_checkpoint.py --layers 2      # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_attention_heads=16",
            f"model.ffn_hidden_size={args.ffn}", f"model.seq_length={args.seq}", "model.vocab_size=32000",
            "parallel.distributed_optimizer=true", "training.micro_batch_size=1", "training.global_batch_size=2",
            f"training.train_iters={2 * args.iters}", "data.mock=true", "data.num_workers=0",
            "logging.log_interval=1000", "logging.peak_tflops=1.0"]


def run_phase(phase: str, overrides: list[str], save: Path) -> dict:
    """(In a torchrun worker) run one phase; rank 0 returns every rank's figures."""
    import torch.distributed as dist

    from megatron_aquila.build import build_trainer_parts
    from megatron_aquila.config import load_config
    from megatron_aquila.parallel.context import ParallelContext
    from megatron_aquila.trainer import Trainer

    dist.init_process_group("gloo")
    iters = int(next(o for o in overrides if o.startswith("training.train_iters=")).split("=")[1]) // 2
    extra = {"resume": [f"checkpoint.load={save}"],   # trains iterations iters+1 .. 2 iters
             "train": [f"training.exit_interval={iters}"],
             "save": [f"checkpoint.save={save}", f"training.exit_interval={iters}"],
             "async": [f"checkpoint.save={save}_async", "checkpoint.async_save=true",
                       f"training.exit_interval={iters}"]}[phase]
    config = load_config(None, [*overrides, *extra])
    config.validate(dist.get_world_size())
    ctx = ParallelContext.initialize(config.parallel.tensor_parallel, config.parallel.pipeline_parallel)
    parts, state = build_trainer_parts(config, ctx)
    trainer = Trainer(config, ctx, parts, None, state)
    config.checkpoint.save = None          # the loop itself saves nothing: the phase times its own save
    trainer.train()
    figures: dict = {}
    if phase in ("save", "async"):
        # two saves with one training iteration between them: the first async save allocates its
        # host buffers, the second (what every later save of a run costs) reuses them
        for attempt in ("first", "second"):
            dist.barrier()
            tick = time.perf_counter()
            trainer.saver.save(parts, trainer.state)
            figures[f"{attempt}_blocked_s"] = time.perf_counter() - tick
            trainer.saver.wait()
            figures[f"{attempt}_complete_s"] = time.perf_counter() - tick
            if attempt == "first":
                trainer.train_iters += 1
                trainer.train()
        trainer.saver.close()
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, figures)
    dist.destroy_process_group()
    return {"phase": phase, "ranks": gathered}


def launch(phase: str, args: argparse.Namespace, save: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", phase, "--save", str(save), "--out", str(out), *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{done.stdout[-8000:]}")
    return json.loads(out.read_text())


def bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(REPO))
        result = run_phase(args.worker, model_overrides(args), Path(args.save))
        if os.environ.get("RANK") == "0":
            Path(args.out).write_text(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        save, results = Path(tmp) / "ckpt", {}
        for phase in ("train", "save", "async", "resume"):
            results[phase] = launch(phase, args, save, Path(tmp) / f"{phase}.json")
        written = bytes_under(save / (save / "latest").read_text().strip())
    from megatron_aquila.config import load_config
    from megatron_aquila.model.flops import num_parameters

    params = num_parameters(load_config(None, model_overrides(args)).model)
    print(f"model: {params / 1e6:.0f}M parameters, fp32, ZeRO-1 over DP2, 2 processes on "
          f"{os.cpu_count()} cores; one checkpoint is {written / 2**20:.0f} MiB")
    base = [r["peak_rss_mib"] for r in results["train"]["ranks"]]
    for phase in ("train", "save", "async", "resume"):
        ranks = results[phase]["ranks"]
        line = " | ".join(f"rank {i}: {r['peak_rss_mib']:7.0f} MiB ({r['peak_rss_mib'] / base[i]:.3f}x)"
                          for i, r in enumerate(ranks))
        if "first_blocked_s" in ranks[0]:
            for attempt in ("first", "second"):
                line += (f" | {attempt} save: loop blocked {max(r[attempt + '_blocked_s'] for r in ranks):6.2f} s, "
                         f"written {max(r[attempt + '_complete_s'] for r in ranks):6.2f} s")
        print(f"{phase:>6}: {line}")
    for attempt in ("first", "second"):
        sync = max(r[f"{attempt}_blocked_s"] for r in results["save"]["ranks"])
        blocked = max(r[f"{attempt}_blocked_s"] for r in results["async"]["ranks"])
        print(f"{attempt} save: async blocks the loop for {blocked:.2f} s = {100 * blocked / sync:.1f}% of the "
              f"sync save's {sync:.2f} s")


if __name__ == "__main__":
    main()
