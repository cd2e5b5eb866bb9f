"""The input pipeline: batches built by DataLoader workers are the batches built in-process (bit-exact runs,
resume included), a record that breaks during training stops it with the same clear message with or without
workers, the progress line shows samples/s and tokens/s, and the TensorBoard scalars are metrics.csv's rows.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_data_loader.py
"""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from resumed_runs import assert_same_run

from vlmkit.cli import main
from vlmkit.data.formats import Problem, load_dataset
from vlmkit.data.labels import build_training_example
from vlmkit.data.synth import DATASET_FILE, synthesize
from vlmkit.load import tiny_random_model
from vlmkit.train import loop
from vlmkit.train import run as run_module
from vlmkit.train.batches import BatchesAt, ShuffledBatches
from vlmkit.train.checkpoint import latest_checkpoint
from vlmkit.train.loop import train
from vlmkit.train.run import RunConfig, load_for_training, prepare_data, run_training
from vlmkit.train.runlog import METRICS, Progress
from vlmkit.train.stages import Stage

STEPS = 4
FLAGS = {"model": "tiny-random", "stage": "full", "steps": STEPS, "batch_size": 4, "lr": 3e-3, "checkpoint_every": 2,
         "threads": 1, "progress": False}


@pytest.fixture(autouse=True)
def _keep_threads():
    """run_training sets torch's thread count (--threads 1 here); put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 shape questions on 32x32 PNGs: the workers decode real image files."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, {"shapes": 8}, seed=0, image_size=(32, 32), progress=False)
    return out / DATASET_FILE


def _train(data: Path, out: Path, **changes) -> None:
    threads = torch.get_num_threads()
    try:
        run_training(RunConfig(data=str(data), out=str(out), **{**FLAGS, **changes}))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def in_process(data, tmp_path_factory) -> Path:
    """The run with --workers 0 (the batches built in the training process, as before workers existed)."""
    out = tmp_path_factory.mktemp("runs") / "workers0"
    _train(data, out)
    return out


@pytest.fixture(scope="module")
def with_workers(data, tmp_path_factory) -> Path:
    """The same run with --workers 2 and --tensorboard."""
    out = tmp_path_factory.mktemp("runs") / "workers2"
    _train(data, out, workers=2, tensorboard=str(out / "tb"))
    return out


def test_two_workers_train_bit_for_bit_as_in_process(in_process, with_workers):
    """Same losses, lr, grad norms (csv text = float bits) and final weights, bitwise."""
    assert_same_run(in_process, with_workers, STEPS)


def _stop_after_step_2(run: Path) -> None:
    """Make run what a run killed between its checkpoints 2 and 4 leaves (metrics.csv still holds rows 3, 4)."""
    shutil.rmtree(run / "step-000004")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (run / name).unlink()


def test_resume_with_workers_equals_the_uninterrupted_run(in_process, with_workers, data, tmp_path):
    """A --workers 2 run stopped after step 2 and resumed with --workers 2 ends as the in-process run never
    stopped; resumed with --workers 0 it does too (the worker count is not part of the result)."""
    for workers in (2, 0):
        resumed = tmp_path / f"resumed{workers}"  # as deep as with_workers: run.json's relative --data holds
        shutil.copytree(with_workers, resumed)
        _stop_after_step_2(resumed)
        _train(data, resumed, workers=workers, resume="latest", tensorboard=str(resumed / "tb"))
        assert_same_run(in_process, resumed, STEPS)
        assert _tensorboard_scalars(resumed / "tb") == _csv_as_float32(resumed)  # one value per step, no repeats


def _csv_as_float32(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv's columns as TensorBoard keeps them: (step, the value rounded to float32) per row."""
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {f"train/{c}": [(int(r["step"]), float(np.float32(float(r[c])))) for r in rows] for c in METRICS[1:]}


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in log_dir, read back by TensorBoard's own event reader (which applies purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_are_the_metrics_rows(with_workers):
    scalars = _tensorboard_scalars(with_workers / "tb")
    assert sorted(scalars) == sorted(f"train/{c}" for c in ("loss", "lr", "samples_per_s", "grad_norm"))
    assert scalars == _csv_as_float32(with_workers)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))


def test_without_tensorboard_the_flag_says_what_to_install(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ValueError, match="pip install tensorboard"):
        RunConfig(model="tiny-random", data=str(data), out=str(tmp_path / "a"), tensorboard=str(tmp_path / "tb"))
    assert main(["train", "--model", "tiny-random", "--data", str(data), "--out", str(tmp_path / "b"),
                 "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "error: --tensorboard needs the tensorboard package" in err and "pip install tensorboard" in err
    assert "Traceback" not in err and not (tmp_path / "b").exists()  # refused before the run folder is made


def test_a_record_that_breaks_mid_run_stops_it_alike_with_and_without_workers(data, tmp_path, monkeypatch, capsys):
    """An image rewritten as garbage after the run checked it (so both data policies passed it) stops the run
    at the first step that reads it, with one message naming the record, with or without workers."""
    samples, _ = load_dataset(data, policy="fail")
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))  # epoch 0 under --seed 0
    victim = samples[int(order[4])]  # the first sample of step 2 (batch size 4)
    good = victim.images[0].read_bytes()
    checked = run_module.prepare_data

    def check_then_break(*args, **kwargs):
        prepared = checked(*args, **kwargs)
        victim.images[0].write_bytes(b"not an image any more")
        return prepared

    monkeypatch.setattr(run_module, "prepare_data", check_then_break)
    messages = []
    try:
        for policy in ("fail", "skip"):
            for workers in (0, 2):
                out = tmp_path / f"{policy}{workers}"
                victim.images[0].write_bytes(good)
                assert main(["train", "--model", "tiny-random", "--data", str(data), "--out", str(out),
                             "--stage", "full", "--steps", "4", "--batch-size", "4", "--checkpoint-every", "1",
                             "--threads", "1", "--quiet", "--data-policy", policy, "--workers", str(workers)]) == 2
                assert latest_checkpoint(out).name == "step-000001"  # step 1 trained, step 2 stopped
                messages.append(capsys.readouterr().err)
    finally:
        victim.images[0].write_bytes(good)
    assert len(set(messages)) == 1  # the same text whichever policy and worker count
    message = messages[0]
    assert message.startswith("vlmkit train: error: ")
    assert str(Problem(victim.file, victim.line, victim.id, "CAUSE")).removesuffix("CAUSE") in message  # file:line: id
    assert str(victim.images[0]) in message and "changed since" in message and "--resume" in message
    assert f"sample {4} of the stream" in message
    assert "Traceback" not in message and "worker" not in message.lower()


def _colour_examples(loaded, sizes=(1, 5, 20, 2, 7, 3)):
    """Six conversations of different lengths (a solid image, a question padded with `sizes` marks)."""
    out = []
    for i, n in enumerate(sizes):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?" + "?" * n}]},
                    {"role": "assistant", "content": "red" if i % 2 else "blue"}]
        plans = loaded.plan_images([Image.new("RGB", (32, 32), (40 * i, 0, 0))])
        out.append(build_training_example(loaded.tokenizer, loaded.chat_template, messages,
                                          loaded.model.cfg.image_token_id, plans))
    return out


def test_progress_line_shows_samples_and_tokens_per_second(monkeypatch, capsys):
    """With a clock that advances 1 s per step, samples/s is the batch's samples and tokens/s the sum of its
    examples' lengths (padding not counted: padded and packed batches show the same)."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the printed line (tqdm shows the same text as its postfix)
    loaded = tiny_random_model()
    examples = _colour_examples(loaded)
    ticks = iter(range(1000))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0)).tolist()
    expected = [sum(len(examples[i]) for i in order[:3]), sum(len(examples[i]) for i in order[3:])]
    assert expected[0] != expected[1]
    lines = {}
    for pack_len in (None, 512):
        stage = Stage("all", {"vision": 1e-3, "projector": 1e-3, "lm": 1e-3})
        batches = ShuffledBatches(examples, batch_size=3, pad_id=0, seed=0, pack_len=pack_len, workers=1)
        train(loaded.model, batches, stage, steps=2, log_every=1, progress=True)
        lines[pack_len] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    for pack_len, got in lines.items():
        assert [line.split("  ")[0] for line in got] == ["step 1/2", "step 2/2"], pack_len
        assert [line.split("  ")[3:] for line in got] == [["3.0 samples/s", f"{expected[0]} tokens/s"],
                                                          ["3.0 samples/s", f"{expected[1]} tokens/s"]], pack_len


def test_progress_with_tqdm_shows_both_rates(capsys):
    pytest.importorskip("tqdm")
    with Progress(0, 1, enabled=True, every=1) as bar:
        bar.update(1, 1.5, 1e-3, 12.25, 987.4)
    err = capsys.readouterr().err
    assert "12.2 samples/s" in err and "987 tokens/s" in err


def test_the_batch_dataset_pickles_for_spawned_workers(data):
    """Under the spawn or forkserver start method (Python 3.14's Linux default) a worker gets the dataset
    pickled: it must round-trip to the same batches; and starting the loader draws nothing from torch's
    global RNG (its seed comes from the stream's own generator), so training's random numbers stay put."""
    samples, _ = load_dataset(data, policy="fail")
    loaded = load_for_training("tiny-random", samples, 0)
    examples, problems = prepare_data(samples, loaded)
    assert problems == []
    batches = ShuffledBatches(examples, batch_size=4, pad_id=0, seed=0, workers=2)
    copy = pickle.loads(pickle.dumps(BatchesAt(batches)))
    for start in (0, 4, 12):
        a, b = copy[start], batches.batch_at(start)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for workers in (0, 2):
        torch.manual_seed(123)
        before = torch.get_rng_state()
        stream = iter(ShuffledBatches(examples, batch_size=4, pad_id=0, seed=0, workers=workers))
        first = next(stream)
        stream.close()
        assert torch.equal(torch.get_rng_state(), before), workers
        assert torch.equal(first["input_ids"], batches.batch_at(0)["input_ids"])


def test_workers_must_not_be_negative(data, tmp_path):
    with pytest.raises(ValueError, match="--workers must be >= 0"):
        RunConfig(model="tiny-random", data=str(data), out=str(tmp_path), workers=-1)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        ShuffledBatches([object()], batch_size=1, pad_id=0, workers=-1)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlmkit.cli",
            "train"]


@pytest.mark.slow
def test_torchrun_ranks_with_workers_train_as_without(data, tmp_path):
    """Under 2-process torchrun each rank's workers build its slice of every global batch: --workers 2 equals
    --workers 0 bit for bit (same number of processes, so the same float operations), and a --workers 2 run
    stopped after step 2 resumes with workers to the same end. Three torchrun launches: ~40 s here."""
    flags = ["--model", "tiny-random", "--data", str(data), "--stage", "full", "--steps", str(STEPS), "--batch-size",
             "4", "--lr", "3e-3", "--checkpoint-every", "2", "--threads", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: Path, *extra: str) -> None:
        proc = subprocess.run([*TORCHRUN, *flags, "--out", str(out), *extra], check=False, capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(tmp_path / "w0")
    torchrun(tmp_path / "w2", "--workers", "2")
    assert_same_run(tmp_path / "w0", tmp_path / "w2", STEPS)
    _stop_after_step_2(tmp_path / "w2")
    torchrun(tmp_path / "w2", "--workers", "2", "--resume")
    assert_same_run(tmp_path / "w0", tmp_path / "w2", STEPS)
