"""Loading on the meta device, module by module (weights/materialize.py): the model equals the ordinary build
(torch.manual_seed, build_model, load_state_dict, .to(dtype)) tensor for tensor and in its logits; layers
quantized while loading equal the same layers quantized after an ordinary load (int8) and torchao's own
to_nf4 of the same weights (nf4); `train --quantize nf4` quantizes exactly the layers quantize_frozen would;
and the peak resident memory of a quantized load stays below the float model's size."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from vlmkit.load import load_model
from vlmkit.models.image_model import build_model
from vlmkit.presets import get_preset
from vlmkit.quantize import Int8Linear, quantize_model
from vlmkit.train.loop import trainable_parameters
from vlmkit.train.lora import add_lora, parse_lora, tied_weights
from vlmkit.train.stages import Stage
from vlmkit.weights.materialize import build_on_meta, check_state, from_state, materialize

PRESETS = ["tiny-random", "llava-1.5-small", "qwen2-vl-small", "deepseek-vl2-small", "minicpm-v-small"]


def _config(preset: str, tie: bool = False):  # noqa: ANN202
    cfg = get_preset(preset)
    return dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, tie_word_embeddings=True)) if tie else cfg


def _inputs(model: nn.Module, cfg) -> dict:  # noqa: ANN001
    from PIL import Image

    from vlmkit.prompt import flat_plans

    plans = flat_plans(model.plan_images([Image.new("RGB", (40, 30), (200, 30, 90))]))
    n = sum(p.num_tokens for p in plans)
    text = torch.tensor([[i for i in range(3, 12) if i != cfg.image_token_id][:8]])
    ids = torch.cat([torch.full((1, n), cfg.image_token_id), text], dim=1)
    return {"input_ids": ids, **model.image_inputs(plans)}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("preset", PRESETS)
def test_meta_build_and_materialize_equal_the_ordinary_build(preset, dtype):
    cfg = _config(preset, tie=preset == "tiny-random")
    torch.manual_seed(0)
    ordinary = build_model(cfg).eval()
    state = {k: v.clone() for k, v in ordinary.state_dict().items()}
    if dtype is not None:
        ordinary.to(dtype)
    model = build_on_meta(build_model, cfg)
    assert all(p.is_meta for p in model.parameters())
    check_state(model, state, preset)
    materialize(model, from_state(state), dtype=dtype)
    model.eval()
    expected, got = ordinary.state_dict(), model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    assert len(tied_weights(model)) == len(tied_weights(ordinary))
    if preset == "tiny-random":
        assert model.lm.lm_head.weight is model.lm.embed.weight
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(model, cfg)).logits, ordinary(**_inputs(ordinary, cfg)).logits,
                                   rtol=0, atol=0)


def test_check_state_names_the_mismatch():
    model = build_on_meta(build_model, _config("tiny-random"))
    state = dict(model.state_dict())
    state.pop("lm.norm.weight")
    with pytest.raises(ValueError, match=r"missing \['lm.norm.weight'\]"):
        check_state(model, state, "here")
    state["lm.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"lm.norm.weight has shape \(3,\)"):
        check_state(model, state, "here")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    loaded = load_model("tiny-random")
    path = tmp_path_factory.mktemp("tiny") / "model"
    loaded.save_pretrained(path)
    return path


def _ordinary_load(folder) -> nn.Module:  # noqa: ANN001
    """What from_pretrained did before the meta build: an fp32 build, load_state_dict, then cast."""
    from vlmkit.weights.hf import get_converter, load_state
    from vlmkit.weights.safetensors_io import read_config

    config = read_config(folder)
    conv = get_converter(config["model_type"])
    cfg = conv.config_from_hf(conv.read_config(folder, config))
    model = conv.build(cfg)
    load_state(model, conv.state_from_hf(conv.read_state(folder, config), cfg), str(folder))
    return model.eval()


def test_int8_while_loading_equals_int8_after_an_ordinary_load(folder):
    ordinary = _ordinary_load(folder).to(torch.bfloat16)
    count = quantize_model(ordinary, "int8")
    loaded = load_model(str(folder), quantize="int8")
    layers = [m for m in loaded.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == count > 0 and loaded.quantization == "int8"
    expected, got = ordinary.state_dict(), loaded.model.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_nf4_while_loading_is_torchaos_to_nf4_of_the_same_weights(folder):
    """Each quantized layer holds what torchao's to_nf4 makes of the bf16 weight (blocks of 64, scalers in
    blocks of gcd(blocks, 256)), and the model computes what the bf16 model with those layers' weights replaced
    by torchao's dequantization (get_original_weight) computes."""
    torchao_nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    import math

    reference = _ordinary_load(folder).to(torch.bfloat16)
    loaded = load_model(str(folder), quantize="nf4")
    assert loaded.quantization == "nf4" and loaded.dtype == torch.bfloat16
    quantized = {n: m for n, m in loaded.model.named_modules() if type(m.__dict__.get("_parameters", {}).get(
        "weight")).__name__ == "NF4Tensor"}
    lm_linears = [n for n, m in reference.lm.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(quantized) == sorted(f"lm.{n}" for n in lm_linears)
    for name, module in quantized.items():
        weight = reference.get_submodule(name).weight.detach()
        ours = module.weight
        theirs = torchao_nf4.to_nf4(weight.contiguous(), 64, math.gcd(weight.numel() // 64, 256))
        for field in NF4_FIELDS:
            assert torch.equal(getattr(ours, field), getattr(theirs, field)), (name, field)
        with torch.no_grad():
            reference.get_submodule(name).weight = nn.Parameter(theirs.get_original_weight())
    with torch.no_grad():
        inputs = _inputs(reference, reference.cfg)
        torch.testing.assert_close(loaded.model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)


NF4_FIELDS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_to_nf4_is_torchaos_to_nf4_field_for_field(dtype):
    """qlora.to_nf4 (a code table for 16-bit types, the two nearest levels for fp32) against torchao's to_nf4 on
    the same tensors: random weights of several shapes (scaler blocks of 256 and smaller), every value of the
    type in [-1, 1] and the midpoints between levels (the ties) in blocks whose absmax is 1, a block of zeros."""
    qlora = pytest.importorskip("vlmkit.train.qlora")
    ao = qlora.torchao_nf4()
    torch.manual_seed(0)
    weights = [(torch.randn(*shape) * 3).to(dtype) for shape in [(128, 64), (1408, 512), (3, 320), (4096, 1100)]]
    levels = ao.to_nf4(torch.ones(64, dtype=dtype), 64, 1).nf4.float()
    special = torch.cat([levels, (levels[1:] + levels[:-1]) / 2, torch.linspace(-1, 1, 20000)]).to(dtype)
    if dtype != torch.float32:  # every value of the type in [-1, 1]
        every = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(dtype)
        special = torch.cat([special, every[every.float().abs() <= 1]])
    rows = special[: special.numel() // 63 * 63].view(-1, 63)
    rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=dtype)], dim=1)  # absmax 1: the values are the scaled ones
    weights.append(rows[: len(rows) // 4 * 4].contiguous())
    zero_block = torch.randn(128, 64).to(dtype)
    zero_block[5] = 0
    weights.append(zero_block)
    for w in weights:
        ours, theirs = qlora.to_nf4(w), ao.to_nf4(w, 64, qlora.scaler_block_size(w.numel()))
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        for field in NF4_FIELDS:
            assert torch.equal(getattr(ours, field), getattr(theirs, field)), (tuple(w.shape), field)


def test_train_quantizes_at_load_exactly_the_layers_quantize_frozen_picks(folder):
    """frozen_linears on the meta build (what train --quantize nf4 quantizes while loading) names the layers
    quantize_frozen stores in NF4 on an ordinarily loaded model after add_lora and the stage's freezing, and
    the loaded model holds them in NF4."""
    qlora = pytest.importorskip("vlmkit.train.qlora")
    stage = Stage("lora", {"vision": 0.0, "projector": 1e-4, "lm": 2e-4}, lora=parse_lora("r=4,alpha=8,targets=lm.attn"))
    ordinary = _ordinary_load(folder)
    add_lora(ordinary, stage.lora)
    trainable_parameters(ordinary, stage)
    expected = qlora.quantize_frozen(ordinary)
    meta = build_on_meta(build_model, ordinary.cfg)
    assert sorted(qlora.frozen_linears(meta, stage)) == sorted(expected)
    loaded = load_model(str(folder), quantize_layers=lambda m: qlora.frozen_linears(m, stage))
    assert loaded.quantization is None
    add_lora(loaded.model, stage.lora)
    trainable_parameters(loaded.model, stage)
    assert qlora.quantize_frozen(loaded.model) == expected  # all of them already NF4: nothing new
    assert sorted(n for n, m in loaded.model.named_modules() if isinstance(m, qlora._NF4Base)) == sorted(expected)
    assert any(n.startswith("vision.") for n in expected) and not any(n.startswith("projector.") for n in expected)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from vlmkit.config import LMConfig
    from vlmkit.models.lm import CausalLM
    from vlmkit.quantize import quantize_plan
    from vlmkit.weights.materialize import build_on_meta, materialize, random_values, release_memory

    def kib(field):
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))

    def load(cfg):
        model = build_on_meta(CausalLM, cfg)
        return materialize(model, random_values(), dtype=torch.bfloat16, quantize=quantize_plan(model, sys.argv[1]))

    torch.set_num_threads(1)
    load(LMConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4))  # warm-up
    release_memory()
    base = kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    cfg = LMConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_layers=int(sys.argv[2]), num_heads=8)
    model = load(cfg)
    meta = build_on_meta(CausalLM, cfg)
    print(json.dumps({"peak": (kib("VmHWM") - base) * 1024,
                      "bf16": 2 * sum(p.numel() for p in meta.parameters())}))
""")


def _peak(quantize: str, layers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, quantize, str(layers)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quantized_load_peaks_below_the_float_models_size():
    """A 32-layer LM of 105 M parameters (bf16: 200 MiB) loaded with int8 layers: the resident memory grows by
    less than 3/4 of its bf16 size at its peak (its int8 weights are half of it; loaded in full, then quantized,
    it would peak above the bf16 size, and above twice that built in fp32)."""
    measured = _peak("int8", 32)
    print(f"peak {measured['peak'] / 2**20:.0f} MiB, bf16 model {measured['bf16'] / 2**20:.0f} MiB")
    assert measured["peak"] < 0.75 * measured["bf16"]


@pytest.mark.slow
def test_nf4_load_peaks_below_half_the_float_models_size():
    """The same with NF4 layers (4.13 bits a weight, ~55 MiB here; measured peak 77 MiB): below half the bf16
    size."""
    measured = _peak("nf4", 32)
    print(f"peak {measured['peak'] / 2**20:.0f} MiB, bf16 model {measured['bf16'] / 2**20:.0f} MiB")
    assert measured["peak"] < 0.5 * measured["bf16"]


def test_train_quantize_nf4_from_a_folder(folder, tmp_path, capsys):
    """`vlmkit train --model FOLDER --lora ... --quantize nf4` quantizes the frozen layers while loading and
    trains: the layers it reports are those frozen_linears names."""
    qlora = pytest.importorskip("vlmkit.train.qlora")
    from vlmkit.cli import main
    from vlmkit.data.synth import DATASET_FILE, synthesize

    synthesize(tmp_path / "data", {"shapes": 4}, seed=0, image_size=(32, 32), progress=False)
    stage = Stage("s", {"vision": 0.0, "projector": 0.0, "lm": 1e-3}, lora=parse_lora("r=4,alpha=8,targets=lm.attn"))
    expected = qlora.frozen_linears(build_on_meta(build_model, load_model(str(folder)).model.cfg), stage)
    assert main(["train", "--model", str(folder), "--data", str(tmp_path / "data" / DATASET_FILE), "--out",
                 str(tmp_path / "run"), "--lora", "r=4,alpha=8,targets=lm.attn", "--group-lr", "vision=0",
                 "--group-lr", "projector=0", "--group-lr", "lm=1e-3", "--quantize", "nf4", "--steps", "2"]) == 0
    assert f"--quantize nf4: {len(expected)} frozen linear layers stored in NF4" in capsys.readouterr().err
