"""bench/bench_finetune.py on a tiny shape (the llava-1.5-small preset: LLaVA-1.5's scheme and 336-px image at
tiny widths): a mode runs in its own process and reports positive sizes and times, and the full
fine-tuning estimate is its printed formula applied to the parameter count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmkit.models.image_model import build_model
from vlmkit.presets import get_preset
from vlmkit.weights.materialize import build_on_meta

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_finetune.py"


def test_bench_finetune_runs_on_a_tiny_shape():
    pytest.importorskip("torchao")
    out = subprocess.run([sys.executable, str(BENCH), "--preset", "llava-1.5-small", "--modes", "qlora",
                          "--steps", "2", "--threads", "1", "--text-tokens", "8"],
                         capture_output=True, text=True, check=True, timeout=300)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    by_mode = {line["mode"]: line for line in lines}
    assert sorted(by_mode) == ["full (estimate)", "qlora"]
    params = sum(p.numel() for p in build_on_meta(build_model, get_preset("llava-1.5-small")).parameters())
    r = by_mode["qlora"]
    assert r["peak_rss_gib"] >= r["ready_rss_gib"] > 0 and r["build_s"] > 0 and r["step_s"] > 0
    assert len(r["steps"]) == 2 and r["positions"] == 576 + 8 and r["quantized_layers"] > 0
    assert 0 < r["trained_params"] < r["params"] and r["base_params"] == params
    full = by_mode["full (estimate)"]
    assert full["params"] == params
    assert full["bf16_gib"] == round(8 * params / 2**30, 1) and full["fp32_master_gib"] == round(16 * params / 2**30, 1)
