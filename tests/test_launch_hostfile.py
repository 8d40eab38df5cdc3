"""``examples/aquila2/launch_hostfile.sh HOSTFILE RECIPE``: one torchrun per hostfile line, over ssh.

A stand-in ``ssh`` (the script's ``SSH``) records the host it is asked for and runs the command
here, so "two hosts" x 2 slots are two torchruns on this machine (``127.0.0.1`` and ``localhost``
both reach it), world 4, rendezvous on the first. The stand-in can also refuse one host (exit 255,
as ssh does), after waiting until a file appears, so that the other node is up by then.
- A run of a tiny mock-data recipe (TP2 x DP2): each node's output comes prefixed with its host and
  is kept, unprefixed, in its own log; SIGUSR1 to the launcher reaches every node's launch_torchrun.sh
  and so the ranks, which save the last iteration, and the job exits 0.
- A node failing stops the other, whose torchrun waits in the rendezvous for ever otherwise: the
  launcher exits non-zero and no process of the job is left.
- A bad hostfile, or a recipe whose layout does not fit nodes x slots, fails before any ssh.
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
LAUNCHER = REPO / "examples/aquila2/launch_hostfile.sh"
RECIPE = """
model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, num_kv_heads: 2, ffn_hidden_size: 128,
        seq_length: 32, vocab_size: 256, make_vocab_size_divisible_by: 64}
parallel: {tensor_parallel: 2}
training: {micro_batch_size: 2, global_batch_size: 4, train_iters: 100000, seed: 5}   # a signal or a failure ends it
optimizer: {lr: 3.0e-3}
data: {mock: true, num_workers: 0}
logging: {log_interval: 1, peak_tflops: 1.0}
"""
HOSTFILE = """# two nodes of this machine
127.0.0.1 slots=2

localhost   slots=2   # the second node
"""
STAND_IN_SSH = """#!/usr/bin/env bash
# Stands in for `ssh HOST COMMAND`: records HOST, then runs COMMAND here (stdin, the launcher's
# control channel, passes through as ssh passes it). For $REFUSED_HOST it waits for $RELEASE, then
# fails as ssh does when it cannot connect.
echo "$1" >> "$SSH_CALLS"
host=$1
shift
if [ "$host" = "${REFUSED_HOST:-}" ]; then
    while [ ! -e "$RELEASE" ]; do sleep 0.05; done
    echo "ssh: connect to host $host port 22: Connection refused" >&2
    exit 255
fi
exec bash -c "$*"
"""


@pytest.fixture
def job(tmp_path: Path):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "hostfile").write_text(HOSTFILE)
    ssh = tmp_path / "ssh"
    ssh.write_text(STAND_IN_SSH)
    ssh.chmod(0o755)
    env = {**os.environ, "SSH": str(ssh), "SSH_CALLS": str(tmp_path / "ssh_calls"), "LOG_DIR": str(tmp_path / "logs"),
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "RELEASE": str(tmp_path / "release")}
    job = {"dir": tmp_path, "env": env, "processes": []}
    yield job
    for process in job["processes"]:   # a failed test leaves no launcher behind
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(job: dict, *overrides: str, hostfile: str = "hostfile") -> subprocess.Popen:
    process = subprocess.Popen(["bash", str(LAUNCHER), str(job["dir"] / hostfile), str(job["dir"] / "recipe.yaml"),
                                *overrides], cwd=job["dir"], env=job["env"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    job["processes"].append(process)
    return process


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def calls(job: dict) -> list[str]:
    path = job["dir"] / "ssh_calls"
    return sorted(path.read_text().split()) if path.exists() else []


def job_processes(job: dict) -> list[str]:
    """Command lines of the processes still running that belong to this test's job (they name its recipe)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and str(job["dir"] / "recipe.yaml") in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_two_nodes_train_log_per_node_and_stop_together_on_usr1(job):
    """Trains until SIGUSR1 to the launcher, which every node's launch_torchrun.sh passes to its ranks:
    they save the last iteration and every process exits 0."""
    save = job["dir"] / "save"
    process = start(job, f"checkpoint.save={save}")
    logs = job["dir"] / "logs"
    wait_for(lambda: (logs / "node0_127.0.0.1.log").exists()
             and re.search(r"iter\s+2 \|", (logs / "node0_127.0.0.1.log").read_text()), "iteration 2")
    os.kill(process.pid, signal.SIGUSR1)
    code, output = finish(process)
    assert code == 0, output[-4000:]
    assert calls(job) == ["127.0.0.1", "localhost"]
    assert "launch_hostfile.sh: SIGUSR1: forwarding to every node" in output
    assert re.search(r"^\[127\.0\.0\.1\] \[.* rank 0\] iter\s+2 \|", output, re.MULTILINE), output[-4000:]
    for node, host in enumerate(("127.0.0.1", "localhost")):
        assert f"[{host}] node {node} on {os.uname().nodename}: bash examples/aquila2/launch_torchrun.sh" in output
        assert re.search(rf"^\[{re.escape(host)}\] \[.*\] SIGUSR1: forwarding to the ranks", output, re.MULTILINE)
        assert f"[{host}] node {node} on {os.uname().nodename}: launch_torchrun.sh exited with status 0" in output
        log = (logs / f"node{node}_{host}.log").read_text()   # the node's own lines, unprefixed
        assert log.startswith(f"node {node} on ") and log.rstrip().endswith("exited with status 0"), log[-2000:]
    assert "received SIGUSR1" in output
    logged = [int(i) for i in re.findall(r"iter\s+(\d+) \|", (logs / "node0_127.0.0.1.log").read_text())]
    assert (save / "latest").read_text().strip() == f"iter_{max(logged):07d}"


def test_a_failing_node_stops_the_other(job):
    job["env"]["REFUSED_HOST"] = "localhost"
    process = start(job)
    # node 0's torchrun is up, waiting in the rendezvous for node 1, which then fails
    wait_for(lambda: any("--node_rank 0" in line for line in job_processes(job)), "node 0's torchrun")
    (job["dir"] / "release").touch()
    code, output = finish(process)
    assert code == 255, output[-4000:]
    assert "launch_hostfile.sh: node 1 (localhost) exited with status 255: stopping every node" in output
    assert "[localhost] ssh: connect to host localhost port 22: Connection refused" in output
    wait_for(lambda: not job_processes(job), "node 0 to stop", timeout=60.0)


@pytest.mark.parametrize("hostfile, expected", [
    ("127.0.0.1 slots=2\n# a comment\nlocalhost slots=4\n",
     r"hostfile line 3: localhost has slots=4, line 1 has slots=2: every node runs the same number of processes"),
    ("127.0.0.1 slots=2\nlocalhost\n", r"hostfile line 2: expected 'HOST slots=N' \(N >= 1\), got 'localhost'"),
    ("# nothing\n\n", r"hostfile lists no host"),
    ("127.0.0.1 slots=1\nlocalhost slots=1\n127.0.0.2 slots=1\n",
     r"configuration error for 3 nodes x 1 slots = 3 processes: world size 3 is not divisible by tensor_parallel 2"),
])
def test_a_bad_hostfile_or_layout_starts_nothing(job, hostfile, expected):
    (job["dir"] / "bad_hostfile").write_text(hostfile)
    code, output = finish(start(job, hostfile="bad_hostfile"))
    assert code == 2 and re.search(expected, output), output
    assert calls(job) == [] and not (job["dir"] / "logs").exists()
