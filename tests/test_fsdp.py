"""Sharded training (`vlmkit train --fsdp` under torchrun: FSDP2, gloo on CPU).

- A 2-process sharded run equals a 1-process run (no torchrun, no sharding) with the same global batch:
  every step's loss and every final weight within 1e-5 (fp32), the tolerance and the reason of
  test_distributed.py (the ranks' partial gradients are summed in another order than one backward's).
- Each rank held about half of the model: shards.json (the elements of each rank's local shards, written by
  rank 0) is checked against the 1-process run: the ranks' parameters sum to the model's parameter count and
  their optimizer states to the elements of the 1-process checkpoint's optimizer.safetensors, each rank
  within 2 % of half (FSDP2 splits every tensor by rows; a tensor of an odd number of rows gives rank 0 one
  more).
- The final model is one ordinary model folder, which load_model reads; with --lora, the base model and the
  adapters equal a 1-process LoRA run's.
- SIGKILL + --resume (slow): a sharded run killed after a checkpoint and resumed ends with the same metrics
  rows and the same final weights as an uninterrupted sharded run, bit for bit (both have 2 processes).
- --fsdp in a single process is refused before anything is read or written; a step with images on one rank and
  none on another is refused (its vision layers' all-gathers would never meet).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_fsdp.py              (~45 s: two torchrun launches)
     OMP_NUM_THREADS=1 python -m pytest -q -m slow tests/test_fsdp.py      (kill + resume, ~75 s; the mixed-images refusal, ~13 s)
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from resumed_runs import assert_same_run, sigkill_torchrun_after
from safetensors.torch import load_file

from vlmkit.cli import main
from vlmkit.data.synth import DATASET_FILE, synthesize
from vlmkit.load import load_model, tiny_random_model
from vlmkit.train.checkpoint import is_checkpoint, latest_checkpoint
from vlmkit.train.distributed import layer_units
from vlmkit.train.run import RunConfig, run_training
from vlmkit.weights.hf import get_converter

TOLERANCE = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "vlmkit.cli", "train"]


def _losses(run) -> list[float]:
    with (run / "metrics.csv").open(newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _torchrun(flags: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TORCHRUN, *flags], capture_output=True, text=True, timeout=300, env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _data(tmp_path) -> str:
    synthesize(tmp_path / "data", {"shapes": 16}, seed=0, image_size=(32, 32), progress=False)
    return str(tmp_path / "data" / DATASET_FILE)


def _train_in_this_process(flags: list[str]) -> None:
    """vlmkit train in this process (one process, no torchrun), leaving torch's thread count as it was."""
    threads = torch.get_num_threads()
    try:
        assert main(["train", *flags]) == 0
    finally:
        torch.set_num_threads(threads)


def test_two_sharded_processes_equal_one_process(tmp_path):
    flags = ["--model", "tiny-random", "--data", _data(tmp_path), "--stage", "full", "--steps", "4",
             "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3", "--threads", "1", "--json"]
    proc = _torchrun([*flags, "--out", str(tmp_path / "fsdp"), "--fsdp"])
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["processes"] == 2
    _train_in_this_process([*flags, "--out", str(tmp_path / "single")])

    two, one = _losses(tmp_path / "fsdp"), _losses(tmp_path / "single")
    assert len(two) == len(one) == 4
    assert max(abs(a - b) for a, b in zip(two, one)) <= TOLERANCE, (two, one)
    a = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOLERANCE, worst
    start = tiny_random_model().model  # both runs start from these weights; training must have moved them
    start_state = get_converter("llava").state_to_hf(start.state_dict(), start.cfg)
    assert max((a[k] - v).abs().max().item() for k, v in start_state.items()) > 100 * TOLERANCE
    checkpoint = latest_checkpoint(tmp_path / "fsdp")
    assert checkpoint.name == "step-000004" and is_checkpoint(checkpoint)
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()

    # each rank held about half of the parameters and of the optimizer state
    shards = json.loads((tmp_path / "fsdp" / "shards.json").read_text())
    model = load_model(str(tmp_path / "fsdp")).model  # the final model folder loads as any model folder
    params = sum(p.numel() for p in model.parameters())
    single_opt = load_file(str(latest_checkpoint(tmp_path / "single") / "optimizer.safetensors"))
    opt_state = sum(t.numel() for t in single_opt.values() if t.dim() > 0)  # exp_avg + exp_avg_sq, not steps
    ranks = shards["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sum(r["parameters"] for r in ranks) == params
    assert sum(r["optimizer_state"] for r in ranks) == opt_state
    for r in ranks:
        assert abs(r["parameters"] - params / 2) <= 0.02 * params, shards
        assert abs(r["optimizer_state"] - opt_state / 2) <= 0.02 * opt_state, shards


def test_sharded_lora_equals_one_process(tmp_path):
    """LoRA under --fsdp (adapters added before sharding, so each adapter is sharded with its layer): the run
    folder holds the base model and the adapters as a 1-process LoRA run's, within the same tolerance."""
    flags = ["--model", "tiny-random", "--data", _data(tmp_path), "--stage", "full", "--steps", "3",
             "--batch-size", "4", "--lr", "1e-3", "--threads", "1", "--quiet", "--lora", "r=4,alpha=8"]
    _torchrun([*flags, "--out", str(tmp_path / "fsdp"), "--fsdp"])
    _train_in_this_process([*flags, "--out", str(tmp_path / "single")])
    two, one = _losses(tmp_path / "fsdp"), _losses(tmp_path / "single")
    assert len(two) == 3 and max(abs(a - b) for a, b in zip(two, one)) <= TOLERANCE, (two, one)
    assert (tmp_path / "fsdp" / "lora.json").read_text() == (tmp_path / "single" / "lora.json").read_text()
    for name in ("adapter.safetensors", "model.safetensors"):
        a = load_file(str(tmp_path / "fsdp" / name))
        b = load_file(str(tmp_path / "single" / name))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= TOLERANCE
    adapters = load_file(str(tmp_path / "fsdp" / "adapter.safetensors"))
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in adapters.items())  # B starts at 0: trained


def test_the_units_are_every_decoder_and_vision_layer():
    """tiny-random has 2 vision layers and 2 decoder layers: 4 units below the root, in module order."""
    model = tiny_random_model().model
    assert layer_units(model) == [*model.vision.layers, *model.lm.layers]
    assert len(layer_units(model)) == 4


@pytest.mark.slow
def test_a_step_with_images_on_one_rank_only_is_refused(tmp_path):
    """A sharded vision layer runs (and all-gathers its weights) only where a batch has images, so a step with
    images on one rank and none on the other would wait forever: it stops with a message instead."""
    synthesize(tmp_path / "data", {"shapes": 1}, seed=0, image_size=(32, 32), progress=False)
    records = json.loads((tmp_path / "data" / DATASET_FILE).read_text())
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi"},
                                                    {"from": "gpt", "value": "hi"}]})
    (tmp_path / "data" / "mixed.json").write_text(json.dumps(records))
    proc = subprocess.run([*TORCHRUN, "--model", "tiny-random", "--data", str(tmp_path / "data" / "mixed.json"),
                           "--stage", "full", "--steps", "2", "--batch-size", "2", "--threads", "1", "--quiet",
                           "--out", str(tmp_path / "run"), "--fsdp"],
                          capture_output=True, text=True, timeout=120, env=ENV, check=False)
    assert proc.returncode != 0
    assert "every process's micro-batch must have images or none does, but 1 of 2 have them" in proc.stderr


def test_fsdp_in_one_process_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--fsdp shards the model over the processes torchrun starts"):
        run_training(RunConfig(model="tiny-random", data=str(tmp_path / "none.json"), out=str(tmp_path / "run"),
                               fsdp=True))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sharded_resume_after_sigkill_equals_an_uninterrupted_sharded_run(tmp_path):
    steps = 12  # 3 epochs of 16 samples in global batches of 4 (2 per rank)
    flags = ["--model", "tiny-random", "--data", _data(tmp_path), "--stage", "full", "--steps", str(steps),
             "--batch-size", "4", "--lr", "3e-3", "--seed", "1", "--threads", "1", "--quiet", "--fsdp"]
    killed = tmp_path / "killed"
    sigkill_torchrun_after([*TORCHRUN, *flags, "--out", str(killed), "--checkpoint-every", "1"],
                           tmp_path / "killed.log", killed / "step-000004", 2, ENV)
    reached = int(latest_checkpoint(killed).name.split("-")[1])
    assert 4 <= reached < steps and not (killed / "config.json").exists()  # killed mid-run, before the end
    _torchrun([*flags, "--out", str(killed), "--resume"])
    _torchrun([*flags, "--out", str(tmp_path / "straight")])
    assert_same_run(tmp_path / "straight", killed, steps)
    assert sorted(p.name for p in killed.glob(".*")) == []  # writes cut off by the kill were cleaned up
