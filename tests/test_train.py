"""The trainer: stages freeze what they say, the schedule is the formula, accumulation equals a big batch,
resume continues exactly, metrics and the loss curve are written, bf16 and activation checkpointing run.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_train.py
"""

from __future__ import annotations

import csv
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmkit.data.labels import build_training_example
from vlmkit.load import tiny_random_model
from vlmkit.train.checkpoint import latest_checkpoint
from vlmkit.train.loop import ShuffledBatches, build_optimizer, lr_multiplier, train
from vlmkit.train.stages import Stage, get_stage, module_groups

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "black": (0, 0, 0), "white": (255, 255, 255)}
ALL = Stage("all", {"vision": 1e-3, "projector": 1e-3, "lm": 1e-3}, weight_decay=0.1, warmup_steps=2)


def _examples(loaded, names=tuple(COLOURS)):
    """One conversation per colour: a solid image, a question of varying length, the colour's name."""
    out = []
    for i, name in enumerate(names):
        image = Image.new("RGB", (32, 32), COLOURS[name])
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?" + "?" * i}]},
                    {"role": "assistant", "content": name}]
        plans = loaded.plan_images([image])
        out.append(build_training_example(loaded.tokenizer, loaded.chat_template, messages,
                                          loaded.model.cfg.image_token_id, plans))
    return out


@pytest.fixture(scope="module")
def examples():
    return _examples(tiny_random_model())


def _batches(examples, batch_size=2, seed=0):
    return ShuffledBatches(examples, batch_size=batch_size, pad_id=0, seed=seed)


def _csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_stages_by_name_and_bad_groups():
    assert get_stage("align").lrs == {"vision": 0.0, "projector": 2e-3, "lm": 0.0}
    assert get_stage("sft").lrs == {"vision": 0.0, "projector": 2e-5, "lm": 2e-5}
    with pytest.raises(ValueError, match="unknown stage 'pretrain'; valid: align, full, lora, sft"):
        get_stage("pretrain")
    model = tiny_random_model().model
    with pytest.raises(ValueError, match="group 'ctc', which this model .* does not have"):
        module_groups(model, Stage("x", {"vision": 0, "projector": 1e-3, "lm": 0, "ctc": 1e-3}))
    with pytest.raises(ValueError, match=r"says nothing about parameters \['vision"):
        module_groups(model, Stage("x", {"projector": 1e-3}))
    with pytest.raises(ValueError, match="freezes every group"):
        Stage("x", {"projector": 0})


def test_frozen_groups_do_not_change_and_have_no_optimizer_state(examples, tmp_path):
    model = tiny_random_model().model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, _batches(examples), get_stage("align"), steps=3, out_dir=tmp_path, progress=False)
    after = model.state_dict()
    for name, value in after.items():
        if name.startswith("projector."):
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.lm.parameters())
    meta = json.loads((result.checkpoint / "state.json").read_text())
    names = [n for g in meta["optimizer"]["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.projector.named_parameters(prefix="projector"))
    state = load_file(str(result.checkpoint / "optimizer.safetensors"))
    assert len(state) == 3 * len(names)  # step, exp_avg, exp_avg_sq per trained parameter, nothing else


def test_weight_decay_rule():
    optimizer = build_optimizer(tiny_random_model().model, ALL)
    for group in optimizer.param_groups:
        dims = {p.dim() for p in group["params"]}
        if group["name"].endswith(".decay"):
            assert min(dims) >= 2 and group["weight_decay"] == 0.1
        else:
            assert dims == {1} and group["weight_decay"] == 0.0
    no_decay = {n for g in optimizer.param_groups if g["name"].endswith("no_decay") for n in g["param_names"]}
    assert "lm.norm.weight" in no_decay and "lm.embed.weight" not in no_decay


def test_lr_schedule_is_warmup_then_cosine(examples, tmp_path):
    # 10 steps, 2 warmup: (s + 1) / 2 during warmup, then 0.5 * (1 + cos(pi * (s - 2) / 8)).
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5,
                9: 0.5 * (1 + math.cos(7 * math.pi / 8))}
    for s, value in expected.items():
        assert lr_multiplier(s, 10, 2) == pytest.approx(value, abs=1e-12)
    assert lr_multiplier(6, 10, 2, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    stage = Stage("s", {"vision": 0, "projector": 2e-3, "lm": 0}, warmup_steps=2)
    train(tiny_random_model().model, _batches(examples), stage, steps=10, out_dir=tmp_path, progress=False)
    lrs = [float(r["lr"]) for r in _csv(tmp_path / "metrics.csv")]
    for s, value in expected.items():
        assert lrs[s] == pytest.approx(2e-3 * value, rel=1e-12)


def test_loss_goes_down_on_a_memorisation_task(examples):
    stage = Stage("mem", {"vision": 3e-3, "projector": 3e-3, "lm": 3e-3}, warmup_steps=3)
    result = train(tiny_random_model().model, _batches(examples[:4], batch_size=4), stage, steps=30, progress=False)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.25 * first, result.losses


def test_grad_accumulation_equals_the_big_batch(examples):
    big, small = tiny_random_model().model, tiny_random_model().model
    a = train(big, _batches(examples, batch_size=4), ALL, steps=1, progress=False)
    b = train(small, _batches(examples, batch_size=2), ALL, steps=1, grad_accum=2, progress=False)
    assert a.losses[0] == pytest.approx(b.losses[0], abs=1e-6)  # token-weighted, not a mean of means
    for (name, x), y in zip(big.state_dict().items(), small.state_dict().values()):
        assert (x - y).abs().max() <= 1e-6, name


def test_resume_continues_exactly(examples, tmp_path):
    straight = tiny_random_model().model
    train(straight, _batches(examples), ALL, steps=6, out_dir=tmp_path / "a", progress=False)

    first = tiny_random_model().model
    train(first, _batches(examples), ALL, steps=6, out_dir=tmp_path / "b", save_every=3, stop_after=3,
          progress=False)
    del first
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # a fresh process: other RNG states
    fresh = tiny_random_model(seed=7).model  # other weights, replaced by the checkpoint's
    batches = _batches(examples)
    result = train(fresh, batches, ALL, steps=6, out_dir=tmp_path / "b",
                   resume=latest_checkpoint(tmp_path / "b"), progress=False)
    assert result.steps == [4, 5, 6]
    assert batches.sample_index == 6 * 2
    for (name, x), y in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(x, y), name
    curve_a = [(r["step"], r["loss"]) for r in _csv(tmp_path / "a" / "metrics.csv")]
    curve_b = [(r["step"], r["loss"]) for r in _csv(tmp_path / "b" / "metrics.csv")]
    assert len(curve_a) == 6 and curve_a == curve_b


def test_resume_from_a_plain_list_of_batches_skips_what_was_consumed(examples, tmp_path):
    stream = iter(_batches(examples))
    batches = [next(stream) for _ in range(4)]
    straight = tiny_random_model().model
    train(straight, batches, ALL, steps=4, progress=False)
    train(tiny_random_model().model, batches, ALL, steps=4, out_dir=tmp_path, stop_after=2, progress=False)
    resumed = tiny_random_model(seed=3).model
    train(resumed, batches, ALL, steps=4, out_dir=tmp_path, resume=latest_checkpoint(tmp_path), progress=False)
    for (name, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="the batches ran out at step 5 of 6"):
        train(tiny_random_model().model, batches, ALL, steps=6, progress=False)


def test_metrics_csv_and_loss_png_written(examples, tmp_path):
    result = train(tiny_random_model().model, _batches(examples), ALL, steps=4, out_dir=tmp_path, progress=False)
    rows = _csv(result.metrics_csv)
    assert list(rows[0]) == ["step", "loss", "lr", "samples_per_s", "grad_norm"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["grad_norm"]) > 0 and float(r["samples_per_s"]) > 0 for r in rows)
    assert result.loss_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result.checkpoint / "config.json").is_file() and result.checkpoint.name == "step-000004"


def test_bf16_autocast_and_activation_checkpointing_run(examples):
    loaded = tiny_random_model()
    half = train(loaded.model, _batches(examples), ALL, steps=2, bf16=True, progress=False)
    assert all(math.isfinite(x) for x in half.losses)
    plain = train(tiny_random_model().model, _batches(examples), ALL, steps=2, progress=False)
    ckpt_model = tiny_random_model().model
    ckpt = train(ckpt_model, _batches(examples), ALL, steps=2, activation_checkpointing=True, progress=False)
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-6)
    assert not ckpt_model.lm.gradient_checkpointing  # the flags are put back


class _Crash(Exception):
    pass


def _crash_at(step):
    def on_step(done, loss):
        if done == step:
            raise _Crash(f"crashed after step {done}")
    return on_step


def test_a_crash_between_checkpoints_loses_no_metrics_rows(examples, tmp_path):
    """metrics.csv is written with every checkpoint (not only every log_every steps), so rows the checkpoint
    covers survive a crash; rows after it are dropped on resume and redone, each step once."""
    straight = train(tiny_random_model().model, _batches(examples), ALL, steps=6, out_dir=tmp_path / "a",
                     progress=False)
    with pytest.raises(_Crash):
        train(tiny_random_model().model, _batches(examples), ALL, steps=6, out_dir=tmp_path / "b", save_every=3,
              log_every=100, on_step=_crash_at(5), progress=False)
    assert [int(r["step"]) for r in _csv(tmp_path / "b" / "metrics.csv")] == [1, 2, 3]
    (tmp_path / "b" / ".step-000004.tmp-999").mkdir()  # a checkpoint whose writing was cut off
    resumed = train(tiny_random_model(seed=5).model, _batches(examples), ALL, steps=6, out_dir=tmp_path / "b",
                    resume=latest_checkpoint(tmp_path / "b"), log_every=100, progress=False)
    assert resumed.steps == [4, 5, 6] and not (tmp_path / "b" / ".step-000004.tmp-999").exists()
    rows = [(r["step"], r["loss"], r["lr"]) for r in _csv(tmp_path / "b" / "metrics.csv")]
    assert rows == [(r["step"], r["loss"], r["lr"]) for r in _csv(straight.metrics_csv)]


def test_resume_refuses_a_metrics_file_without_the_checkpoints_rows(examples, tmp_path):
    train(tiny_random_model().model, _batches(examples), ALL, steps=4, out_dir=tmp_path, save_every=2,
          stop_after=2, progress=False)
    (tmp_path / "metrics.csv").unlink()
    with pytest.raises(ValueError, match=r"should hold one row per step 1\.\.2"):
        train(tiny_random_model().model, _batches(examples), ALL, steps=4, out_dir=tmp_path,
              resume=latest_checkpoint(tmp_path), progress=False)


def test_keep_checkpoints_keeps_the_newest(examples, tmp_path):
    train(tiny_random_model().model, _batches(examples), ALL, steps=5, out_dir=tmp_path, save_every=1,
          keep_checkpoints=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000004", "step-000005"]
