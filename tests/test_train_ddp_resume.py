"""Resume under torchrun: a 2-process DDP run (gloo, CPU) killed with SIGKILL after a checkpoint and resumed
with --resume ends with the same metrics rows and the same final weights as a 2-process run never killed, bit
for bit; and a checkpoint keeps every rank's RNG state, which each rank gets back on resume.

Exact, not within a tolerance: both runs have 2 processes, so every float operation happens in the same order
(gloo's all-reduce of two ranks adds the same two numbers in both runs; a + b == b + a in IEEE floats).

The torchrun test takes 38-45 s here (2 cores shared with other jobs, load average 4-5): three launches of
torchrun, each ~10 s to start Python and torch in three processes and join the gloo group, while the 24
training steps take about a second. It is marked slow.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_train_ddp_resume.py            (the RNG test)
     OMP_NUM_THREADS=1 python -m pytest -q -m slow tests/test_train_ddp_resume.py    (the torchrun test)
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from resumed_runs import assert_same_run, sigkill_torchrun_after
from vlmkit.data.synth import DATASET_FILE, synthesize
from vlmkit.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "vlmkit.cli", "train"]


@pytest.mark.slow
def test_torchrun_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    """torchrun's agent starts every worker in a session of its own, so killing the agent's process group
    leaves them running: the kill is SIGKILL to each worker's process group, then to the agent's."""
    synthesize(tmp_path / "data", {"shapes": 16}, seed=0, image_size=(32, 32), progress=False)
    steps = 24  # 6 epochs of 16 samples in global batches of 4 (2 per rank)
    flags = ["--model", "tiny-random", "--data", str(tmp_path / "data" / DATASET_FILE), "--stage", "full",
             "--steps", str(steps), "--batch-size", "4", "--lr", "3e-3", "--seed", "1", "--threads", "1", "--quiet"]
    killed = tmp_path / "killed"
    sigkill_torchrun_after([*TORCHRUN, *flags, "--out", str(killed), "--checkpoint-every", "1"],
                           tmp_path / "killed.log", killed / "step-000004", 2, ENV)
    reached = int(latest_checkpoint(killed).name.split("-")[1])
    assert 4 <= reached < steps and not (killed / "config.json").exists()  # killed mid-run, before the end

    for out, extra in ((killed, ["--resume"]), (tmp_path / "straight", [])):
        proc = subprocess.run([*TORCHRUN, *flags, "--out", str(out), *extra], capture_output=True, text=True,
                              timeout=300, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]

    assert_same_run(tmp_path / "straight", killed, steps)
    assert sorted(p.name for p in killed.glob(".*")) == []  # writes cut off by the kill were cleaned up


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_a_checkpoint_gives_each_rank_its_own_rng_state(tmp_path):
    """Two ranks' RNG states (seeded 10 and 11) go into one checkpoint; loading it as rank 1 of 2 continues
    rank 1's streams, as rank 0 rank 0's; another number of processes is refused."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    states, expected = [], []
    for seed in (10, 11):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        states.append(rng_state())
        expected.append(_draws())  # what this rank draws right after the checkpoint
    path = save_checkpoint(tmp_path, model, optimizer, TrainState(1, 4), rng_states=states)
    for rank in (1, 0):
        torch.manual_seed(99), random.seed(99), np.random.seed(99)
        load_checkpoint(path, model, optimizer, rank=rank, world_size=2)
        assert _draws() == expected[rank]
    with pytest.raises(ValueError, match="RNG states of 2 process"):
        load_checkpoint(path, model, optimizer, rank=0, world_size=1)
    single = save_checkpoint(tmp_path / "one", model, optimizer, TrainState(1, 4))  # this process's state
    with pytest.raises(ValueError, match="RNG states of 1 process"):
        load_checkpoint(single, model, optimizer, rank=1, world_size=2)
