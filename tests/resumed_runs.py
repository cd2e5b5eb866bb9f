"""What the resume tests share (not a test module): a resumed training run equals one never interrupted, and
a torchrun launch killed with SIGKILL once it has written a given checkpoint."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def csv_columns(run: Path) -> list[tuple[str, str, str, str]]:
    """(step, loss, lr, grad_norm) as written: Python writes floats with repr, so equal text = equal bits."""
    with (run / "metrics.csv").open(newline="") as f:
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in csv.DictReader(f)]


def assert_same_run(straight: Path, resumed: Path, steps: int) -> None:
    """One metrics row per step 1..steps, no duplicate or lost rows, the same bits; final weights bitwise equal."""
    expected = csv_columns(straight)
    assert [int(r[0]) for r in expected] == list(range(1, steps + 1))
    assert csv_columns(resumed) == expected
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def children(pid: int) -> list[int]:
    """The child processes of pid (Linux /proc; every thread's children, torchrun starts workers from one)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return found


def alive(pid: int) -> bool:
    """True while pid runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sigkill_torchrun_after(command: list[str], log: Path, checkpoint: Path, workers: int, env: dict[str, str],
                           timeout: float = 180) -> None:
    """Start the torchrun command (output to log), wait until its run has written the directory checkpoint,
    then SIGKILL its workers and its agent and wait until all are gone. torchrun's agent starts every worker in
    a session of its own, so killing the agent's process group leaves them running: the kill is SIGKILL to each
    worker's process group, then to the agent's."""
    with log.open("w") as out:
        agent = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    found: list[int] = []
    while len(found) < workers or not checkpoint.is_dir():
        assert agent.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {checkpoint.name} after {timeout} s"
        found = found if len(found) == workers else children(agent.pid)
        time.sleep(0.005)
    for pid in found:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    os.killpg(agent.pid, signal.SIGKILL)
    assert agent.wait(timeout=30) == -signal.SIGKILL
    while any(alive(pid) for pid in found):
        assert time.monotonic() < deadline + 30, "the workers outlived SIGKILL"
        time.sleep(0.01)
