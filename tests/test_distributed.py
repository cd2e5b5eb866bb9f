"""Data-parallel training under torchrun (DDP, gloo on CPU) equals single-process training with the same
global batch, and the ranks split each global batch without overlap.

Tolerance: 1e-5 (fp32) on every step's loss and on every final weight. The two runs differ only in the
order float additions happen: each rank's backward sums its half of the batch, then the all-reduce sums
the halves; padding also differs (a rank pads to its own longest sample). Measured here (4 steps, lr 1e-3):
losses within 4.3e-7, weights within 3.1e-6. The largest weight differences sit where gradients are nearly 0
(the LM head rows of characters the data never uses; attention key biases, whose true gradient is 0 since
softmax ignores a constant added to every score): AdamW divides a gradient by its own running RMS, so
rounding differences of a tiny gradient become differences of the order of the step, lr. At lr 3e-3 the
same run differs by 9e-6, which is why the test trains at 1e-3.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_distributed.py
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.cli import main
from vlmkit.data.synth import DATASET_FILE, synthesize
from vlmkit.load import tiny_random_model
from vlmkit.train.distributed import World, shard_bounds
from vlmkit.train.loop import ShuffledBatches
from vlmkit.weights.hf import get_converter

TOLERANCE = 1e-5


def _losses(run) -> list[float]:
    with (run / "metrics.csv").open(newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_ranks_take_disjoint_slices_of_the_single_process_batch():
    examples = list(range(10))  # ShuffledBatches only indexes them; the collate step is not reached here
    single = ShuffledBatches(examples, batch_size=4, pad_id=0, seed=3)
    ranks = [ShuffledBatches(examples, batch_size=4, pad_id=0, seed=3, rank=r, world_size=2) for r in range(2)]
    for start in range(0, 24, 4):  # across two epoch ends
        whole = [single._example(i) for i in range(start, start + 4)]
        parts = [[b._example(i) for i in range(start + shard_bounds(4, World(b.rank, 2))[0],
                                                start + shard_bounds(4, World(b.rank, 2))[1])] for b in ranks]
        assert parts[0] + parts[1] == whole
    assert shard_bounds(6, World(2, 3)) == (4, 6)
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        ShuffledBatches(examples, batch_size=4, pad_id=0, rank=0, world_size=3)


def test_torchrun_two_processes_equal_one_process(tmp_path):
    synthesize(tmp_path / "data", {"shapes": 16}, seed=0, image_size=(32, 32), progress=False)
    flags = ["train", "--model", "tiny-random", "--data", str(tmp_path / "data" / DATASET_FILE), "--stage", "full",
             "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3", "--threads", "1", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vlmkit.cli", *flags, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    summaries = [json.loads(line) for line in ddp.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["processes"] == 2  # rank 0 alone reports and writes
    threads = torch.get_num_threads()
    try:
        assert main([*flags, "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)

    two, one = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert len(two) == len(one) == 4
    assert max(abs(a - b) for a, b in zip(two, one)) <= TOLERANCE, (two, one)
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model.safetensors"))
    start = tiny_random_model().model  # both runs start from these weights; training must have moved them
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOLERANCE, worst
    moved = max((a[k] - v).abs().max().item() for k, v in _hf_state(start).items())
    assert moved > 100 * TOLERANCE
    assert sorted(p.name for p in (tmp_path / "ddp").glob("step-*")) == ["step-000004"]


def _hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the names of the saved (transformers llava) file."""
    return get_converter("llava").state_to_hf(model.state_dict(), model.cfg)
