"""Fused tensors made when they are loaded (weights/converter.py Joined): a Joined makes what torch.cat /
torch.stack make, and loading a Llama-layout folder (separate q/k/v and gate/up) quantized to int4 holds one
layer's fused float tensors at a time, not every layer's: its peak anonymous memory, sampled in a child
process, stays below the quantized model plus one layer's fused float tensors plus the quantizer's scratch,
far below the fused float tensors of all layers that fusing up front held at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from vlmkit.config import LMConfig
from vlmkit.models.lm import CausalLM
from vlmkit.weights.converter import Joined, resolve
from vlmkit.weights.hf import save_pretrained
from vlmkit.weights.materialize import build_on_meta, materialize, random_values


def test_joined_makes_what_cat_and_stack_make():
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4, dtype=torch.float64)
    joined = Joined([a, b, c])
    assert joined.shape == (10, 4) and joined.dtype == torch.float64
    assert torch.equal(resolve(joined), torch.cat([a, b, c]))
    experts = [(torch.randn(2, 3), torch.randn(2, 3)) for _ in range(4)]
    stacked = Joined([Joined(pair) for pair in experts], stack=True)
    assert stacked.shape == (4, 4, 3)
    assert torch.equal(resolve(stacked), torch.stack([torch.cat(pair) for pair in experts]))
    assert resolve(a) is a


def test_joined_refuses_parts_that_do_not_fit():
    with pytest.raises(ValueError, match="cannot concatenate"):
        Joined([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="cannot stack"):
        Joined([torch.zeros(2, 3), torch.zeros(3, 3)], stack=True)


# hidden 1024, intermediate 4096, 16 untied layers: 264 M parameters, 530 MB in bf16; fused per layer: q|k|v
# (3072, 1024) and gate|up (8192, 1024), 22 MB
BIG = {"vocab_size": 2048, "hidden_size": 1024, "intermediate_size": 4096, "num_layers": 16, "num_heads": 8}
TINY = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 4}

PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import torch
    from vlmkit.quantize import quantize_plan
    from vlmkit.weights.hf import from_pretrained
    from vlmkit.weights.materialize import release_memory

    def anon():  # bytes of anonymous memory resident now
        lines = Path("/proc/self/status").read_text().splitlines()
        return 1024 * next(int(line.split()[1]) for line in lines if line.startswith("RssAnon:"))

    peak = 0
    def sample():
        global peak
        peak = max(peak, anon())

    def plan(model):  # int4 as load_model plans it, sampled as each layer's float weight is quantized
        def watched(make):
            def run(layer):
                sample()
                out = make(layer)
                sample()
                return out
            return run
        return {name: watched(make) for name, make in quantize_plan(model, "int4").items()}

    torch.set_num_threads(1)
    from_pretrained(sys.argv[1], dtype=torch.bfloat16, quantize=plan)  # warm-up: imports, kernels
    release_memory()
    base = anon()
    peak = base
    done = threading.Event()
    def sampler():
        while not done.is_set():
            sample()
            time.sleep(0.0002)
    thread = threading.Thread(target=sampler)
    thread.start()
    model = from_pretrained(sys.argv[2], dtype=torch.bfloat16, quantize=plan)
    done.set()
    thread.join()
    quantized = sum(t.numel() * t.element_size() for name, m in model.named_modules() if "Int4" in type(m).__name__
                    for t in [*m.buffers(), *m.parameters()])
    print(json.dumps({"peak": peak - base, "quantized": quantized}))
""")


def _save(cfg: LMConfig, path) -> None:
    model = materialize(build_on_meta(CausalLM, cfg), random_values(), dtype=torch.bfloat16)
    save_pretrained(model, path, model_type="llama")


@pytest.mark.slow
def test_int4_load_holds_one_layers_fused_tensors_at_a_time(tmp_path):
    """Measured: peak 273 MiB of anonymous memory, bound 311 MiB (int4 layers 161 MiB); with every layer fused
    before loading (the converters' torch.cat) the same load peaked at 451 MiB."""
    big, tiny = LMConfig(**BIG), LMConfig(**TINY)
    _save(tiny, tmp_path / "tiny")
    _save(big, tmp_path / "big")
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "tiny"), str(tmp_path / "big")],
                         capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    width, inter = big.hidden_size, big.intermediate_size
    qkv = (big.num_heads + 2 * big.num_kv_heads) * big.head_dim * width
    layer = 2 * (qkv + 2 * inter * width)  # one layer's fused float tensors, bf16 bytes
    scratch = 4 * 4 * 2 * inter * width  # int4 quantizing gate|up: a few fp32 copies of it
    bound = measured["quantized"] + layer + scratch
    print(f"peak {measured['peak'] / 2**20:.0f} MiB, int4 layers {measured['quantized'] / 2**20:.0f} MiB, "
          f"bound {bound / 2**20:.0f} MiB, all layers fused {big.num_layers * layer / 2**20:.0f} MiB")
    assert bound < big.num_layers * layer  # the bound tells the two apart
    assert measured["peak"] < bound
