"""Stop signals through the launchers (examples/aquila2/stop_signals.sh): every rank saves and the job exits 0.

Each test runs a 2-process CPU job of a tiny model on mock data through a launcher script, waits
until it trains, sends SIGUSR1 the way a scheduler would and checks that both ranks received it,
the checkpoint holds the last logged iteration and every process exited 0.
- The Slurm path: ``srun_torchrun.sh`` runs as the batch shell (the one process that
  ``#SBATCH --signal=B:USR1@600`` signals), with a stand-in ``srun`` (it execs its single task,
  as a one-node srun forwards signals to its task) and ``scontrol``.
- The process group of ``launch_torchrun.sh``, which holds the launcher and torchrun (torchrun
  starts each rank in a session of its own), as when a scheduler signals every process of a job
  step: torchrun, which has no SIGUSR1 handler, must survive it; the launcher forwards it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from distributed import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN_ITERS = 1000  # never reached: only the signal stops the run
RECIPE = f"""
model: {{num_layers: 2, hidden_size: 64, num_attention_heads: 4, num_kv_heads: 2, ffn_hidden_size: 128,
         seq_length: 32, vocab_size: 256, make_vocab_size_divisible_by: 64}}
training: {{micro_batch_size: 2, global_batch_size: 4, train_iters: {TRAIN_ITERS}, seed: 3}}
data: {{mock: true, num_workers: 0}}
logging: {{log_interval: 1, peak_tflops: 1.0}}
"""
FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for Slurm's srun with one node and one task: runs the task in --chdir. Signals sent to
# srun reach the task, as srun forwards them, because exec makes the two one process.
while [ $# -gt 0 ]; do
    case $1 in
        --chdir) cd "$2"; shift 2 ;;
        --nodes|--ntasks-per-node) shift 2 ;;
        --*) shift ;;
        *) break ;;
    esac
done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo 127.0.0.1   # scontrol show hostnames: the allocation's first node
"""


@pytest.fixture
def job(tmp_path: Path):
    """The recipe, the stand-in Slurm commands and the environment of a one-node, 2-process job."""
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1", "SLURM_JOB_NODELIST": "node0", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_ID": "4242", "RDZV_PORT": str(free_port())}
    job = {"dir": tmp_path, "recipe": tmp_path / "recipe.yaml", "save": tmp_path / "checkpoints", "env": env,
           "processes": []}
    yield job
    for process in job["processes"]:  # a failed test leaves no launcher, torchrun or rank behind
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(job: dict, command: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start a launcher in a session of its own (its process group holds torchrun and the ranks)."""
    log = job["dir"] / "job.log"
    process = subprocess.Popen(command, cwd=job["dir"], env=job["env"], stdout=open(log, "w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    job["processes"].append(process)
    return process, log


def wait_until_training(process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Until iteration 2 is logged: the training loop, and so the ranks' stop handler, is running."""
    deadline = time.monotonic() + timeout
    while not re.search(r"iter\s+2 \|", log.read_text()):
        assert process.poll() is None, f"the job ended before training:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no iteration 2 after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


def check_stopped_and_saved(process: subprocess.Popen, log: Path, save: Path) -> str:
    code = process.wait(timeout=120)
    text = log.read_text()
    assert code == 0, f"the launcher exited with {code}:\n{text[-4000:]}"
    for rank in (0, 1):  # each rank got the signal itself, not only the agreed flag
        assert f"rank {rank} received SIGUSR1" in text, f"rank {rank} was not signalled:\n{text[-4000:]}"
    logged = [int(i) for i in re.findall(r"iter\s+(\d+) \|", text)]
    saved = int((save / "latest").read_text().strip().split("_")[1])
    assert saved == max(logged) < TRAIN_ITERS, (saved, max(logged))
    return text


def test_usr1_to_the_slurm_batch_shell_reaches_every_rank(job):
    process, log = start(job, ["bash", str(REPO / "examples/aquila2/srun_torchrun.sh"), str(REPO), str(job["recipe"]),
                               f"checkpoint.save={job['save']}"])
    wait_until_training(process, log)
    os.kill(process.pid, signal.SIGUSR1)  # what --signal=B:USR1@<seconds> does: the batch shell only
    text = check_stopped_and_saved(process, log, job["save"])
    assert "SIGUSR1: forwarding to srun" in text and "SIGUSR1: forwarding to the ranks" in text


def test_usr1_to_the_whole_process_group_leaves_torchrun_running(job):
    job["env"].update(NNODES="1", RDZV_ENDPOINT=f"127.0.0.1:{job['env']['RDZV_PORT']}")
    process, log = start(job, ["bash", str(REPO / "examples/aquila2/launch_torchrun.sh"), str(job["recipe"]),
                               f"checkpoint.save={job['save']}"])
    wait_until_training(process, log)
    os.killpg(process.pid, signal.SIGUSR1)  # the launcher and torchrun at once
    check_stopped_and_saved(process, log, job["save"])
