"""A check the resume tests share (not a test module): a resumed training run equals one never interrupted."""

from __future__ import annotations

import csv
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
