"""QLoRA (`vlmkit train --lora ... --quantize nf4`, train/qlora.py): NF4 against the paper's definition computed
here by hand, the quantized LoRA layer against its formula, and a real run that lowers held-out loss, is saved,
generates, merges and resumes exactly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlmkit.cli import main
from vlmkit.data.collate import collate
from vlmkit.data.formats import load_dataset
from vlmkit.data.synth import DATASET_FILE, synthesize
from vlmkit.load import load_model
from vlmkit.train.loop import trainable_parameters
from vlmkit.train.lora import (
    ADAPTER_FILE,
    LORA_FILE,
    LoraConfig,
    LoRALinear,
    add_lora,
    merge_lora,
    tied_weights,
)
from vlmkit.train.run import build_example, conversation_text, fresh_model
from vlmkit.train.stages import Stage

qlora = pytest.importorskip("vlmkit.train.qlora")
pytest.importorskip("torchao")

# The 16 NF4 levels as bitsandbytes publishes them (bitsandbytes/functional.py, the NF4 code table; QLoRA paper,
# Dettmers et al. 2023, appendix E), copied as numbers.
NF4_LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def test_nf4_levels_are_the_papers_definition():
    """The paper's construction (section 3): 8 positive levels from the normal quantiles at 9 points evenly spaced
    from delta to 1/2, 7 negative ones from 8 points, and 0, scaled to [-1, 1]; delta = 1/2 (1 - 1/30 + 1 - 1/32)
    (bitsandbytes' offset 0.9677). They equal the published table, and torchao's table is it to 4 decimals."""
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    ndtri = torch.special.ndtri
    positive = ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    levels = levels / levels.abs().max()
    torch.testing.assert_close(levels, torch.tensor(NF4_LEVELS, dtype=torch.float64), rtol=0, atol=1e-6)
    torchao_table = qlora.to_nf4(torch.randn(64, 64)).nf4
    torch.testing.assert_close(torchao_table.double(), levels, rtol=0, atol=5e-5 + 1e-7)  # + float32 rounding


def _nf4_by_hand(w: torch.Tensor, block: int = 64, scaler_block: int | None = None) -> torch.Tensor:
    """NF4 with double quantization by hand (float64): each block of 64 values divided by its absmax and rounded
    to the nearest level (the published levels to 4 decimals, as torchao stores them); the absmaxes minus their
    mean quantized to int8 by absmax in blocks of 256 (q = round(c 127.. / a), torchao's 8-bit scheme: 256 / 2a
    per step), dequantized q / (128 / a) + mean; the value is level x dequantized absmax."""
    levels = torch.tensor([round(v, 4) for v in NF4_LEVELS], dtype=torch.float64)
    x = w.double().reshape(-1, block)
    scaler_block = scaler_block or math.gcd(len(x), 256)  # 256, or its largest divisor that divides the blocks
    absmax = x.abs().amax(dim=1)
    codes = (x / absmax[:, None]).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    mean = absmax.mean()
    centred = (absmax - mean).reshape(-1, scaler_block)
    factor = 128 / centred.abs().amax(dim=1, keepdim=True)
    q = (centred * factor).round().clamp(-128, 127)
    scalers = (q / factor).reshape(-1) + mean
    return (levels[codes] * scalers[:, None]).reshape(w.shape)


def test_nf4_quantize_dequantize_equals_the_definition_by_hand():
    """A fixed weight of 2 x 256 blocks: torchao's NF4 round trip equals the by-hand NF4, the storage is 4 bits a
    value plus one int8 per 64 values, and the error is what 4 bits give."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g) * torch.linspace(0.1, 3.0, 128)  # blocks of very different scales
    nf4 = qlora.to_nf4(w)
    assert nf4.quantized_data.dtype == torch.uint8 and nf4.quantized_data.numel() == w.numel() // 2
    assert nf4.quantized_scalers.dtype == torch.int8 and nf4.quantized_scalers.numel() == w.numel() // 64
    back = qlora.dequantize(nf4)
    torch.testing.assert_close(back.double(), _nf4_by_hand(w), rtol=0, atol=1e-5)
    assert 0.05 < ((back - w).norm() / w.norm()).item() < 0.15  # 4-bit precision, not lossless, not garbage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_dequantization_is_torchaos_bit_for_bit(dtype):
    w = torch.randn(384, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    nf4 = qlora.to_nf4(w)
    back = qlora.dequantize(nf4)
    assert back.dtype == dtype and torch.equal(back, nf4.get_original_weight())


def test_a_small_weight_gets_a_smaller_scaler_block_and_a_ragged_one_is_refused():
    """192 blocks (a tiny model's fused qkv) is no multiple of 256: the double quantization uses 64 (gcd)."""
    assert qlora.scaler_block_size(192 * 64) == 64 and qlora.scaler_block_size(4096 * 4096) == 256
    w = torch.randn(192, 64)
    torch.testing.assert_close(qlora.dequantize(qlora.to_nf4(w)).double(), _nf4_by_hand(w, scaler_block=64),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the block size 64"):
        qlora.to_nf4(torch.randn(10, 10))


class _Toy(nn.Module):
    """One group `lm` holding attn.q (adapted), mlp.up (frozen, quantized) and norm (not a linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = nn.Module()
        self.lm.attn = nn.Module()
        self.lm.attn.q = nn.Linear(128, 64)
        self.lm.mlp = nn.Module()
        self.lm.mlp.up = nn.Linear(64, 128, bias=False)
        self.lm.norm = nn.LayerNorm(128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm.norm(self.lm.mlp.up(self.lm.attn.q(x)))


@pytest.mark.parametrize("quantize_first", [False, True])
def test_qlora_linear_is_the_dequantized_matmul_plus_the_adapter_by_hand(quantize_first):
    """y = x dequant(W)^T + b + (x A^T B^T) alpha / r, in float64 by hand; only the adapters get gradients (the
    input's gradient is dequant(W) + the update's); merging folds into the dequantized weight. Adding LoRA to
    an already quantized model (NF4Linear) gives the same layer."""
    torch.manual_seed(0)
    toy = _Toy()
    W = toy.lm.attn.q.weight.detach().clone()
    cfg = LoraConfig(r=4, alpha=8.0, targets=("lm.attn",))
    stage = Stage("s", {"lm": 1e-3})
    if quantize_first:
        for p in toy.parameters():
            p.requires_grad_(False)
        assert qlora.quantize_frozen(toy) == ["lm.attn.q", "lm.mlp.up"]
        assert add_lora(toy, cfg) == ["lm.attn.q"]
    else:
        add_lora(toy, cfg)
        trainable_parameters(toy, stage)
        assert qlora.quantize_frozen(toy) == ["lm.attn.q", "lm.mlp.up"]
    layer = toy.lm.attn.q
    assert type(layer) is qlora.QLoRALinear and isinstance(layer, LoRALinear)
    assert type(toy.lm.mlp.up) is qlora.NF4Linear and qlora.is_nf4(layer.weight)
    with torch.no_grad():
        layer.lora_B.normal_()
    Wq = qlora.dequantize(layer.weight).double()
    torch.testing.assert_close(Wq, _nf4_by_hand(W), rtol=0, atol=1e-5)
    b, A, B = (t.detach().double() for t in (layer.bias, layer.lora_A, layer.lora_B))
    x = torch.randn(3, 128, dtype=torch.float64)
    expected = x @ Wq.T + b + (x @ A.T @ B.T) * 2.0
    xf = x.float().requires_grad_()
    y = layer(xf)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-4)
    y.sum().backward()
    torch.testing.assert_close(xf.grad.double(), (torch.ones(3, 64, dtype=torch.float64) @ (Wq + 2.0 * B @ A)),
                               rtol=0, atol=1e-4)
    toy(torch.randn(2, 128)).sum().backward()
    trainable_parameters(toy, stage)
    assert {n for n, p in toy.named_parameters() if p.grad is not None} == {"lm.attn.q.lora_A", "lm.attn.q.lora_B"}
    merge_lora(toy)
    assert type(toy.lm.attn.q) is nn.Linear and not qlora.is_nf4(toy.lm.attn.q.weight)
    torch.testing.assert_close(toy.lm.attn.q.weight.double(), Wq + 2.0 * B @ A, rtol=0, atol=1e-5)


def test_state_dict_holds_the_dequantized_weight_and_loads_back_exactly():
    torch.manual_seed(0)
    toy = _Toy()
    for p in toy.parameters():
        p.requires_grad_(False)
    qlora.quantize_frozen(toy)
    state = toy.state_dict()
    assert state.keys() == {"lm.attn.q.weight", "lm.attn.q.bias", "lm.mlp.up.weight", "lm.norm.weight",
                            "lm.norm.bias"}
    assert type(state["lm.mlp.up.weight"]) is torch.Tensor
    assert torch.equal(state["lm.mlp.up.weight"], qlora.dequantize(toy.lm.mlp.up.weight))
    data = toy.lm.mlp.up.weight.quantized_data
    toy.load_state_dict(state)  # the same values: the NF4 weight stays as it is
    assert toy.lm.mlp.up.weight.quantized_data is data
    other = {**state, "lm.mlp.up.weight": torch.randn(128, 64)}  # another weight: quantized anew
    toy.load_state_dict(other)
    torch.testing.assert_close(qlora.dequantize(toy.lm.mlp.up.weight).double(),
                               _nf4_by_hand(other["lm.mlp.up.weight"]), rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="Missing key"):
        toy.load_state_dict({k: v for k, v in state.items() if k != "lm.attn.q.bias"})


def test_a_missing_torchao_says_what_to_install(monkeypatch):
    def fail(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(qlora.importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r"pip install torchao==0\.18\.0 --no-deps"):
        qlora.quantize_frozen(_Toy())


# ---- a QLoRA run of tiny-random on 48 shape questions, 16 held out

LORA = "r=8,alpha=16,targets=lm"
RUN_FLAGS = ["--model", "tiny-random", "--lora", LORA, "--quantize", "nf4", "--group-lr", "projector=0", "--lr", "1e-2",
             "--batch-size", "4", "--steps", 40, "--checkpoint-every", 20, "--seed", 1, "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(train.json with 48 records, held.json with 16 others), the images beside them."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, {"shapes": 64}, seed=0, image_size=(32, 32), progress=False)
    records = json.loads((out / DATASET_FILE).read_text())
    (out / "train.json").write_text(json.dumps(records[:48]))
    (out / "held.json").write_text(json.dumps(records[48:]))
    return out / "train.json", out / "held.json"


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora") / "run"
    assert cli("train", *RUN_FLAGS, "--data", data[0], "--out", out) == 0
    return out


def test_quantize_with_nothing_frozen_is_refused(data, tmp_path, capsys):
    assert cli("train", "--model", "tiny-random", "--data", data[0], "--out", tmp_path / "r", "--stage", "full",
               "--quantize", "nf4", "--quiet") == 2
    assert "has no frozen linear layer to quantize" in capsys.readouterr().err


def _base_only(run: Path) -> Path:
    """A copy of the run folder without the adapters: the dequantized base model."""
    folder = run.parent / "base-only"
    if not folder.exists():
        shutil.copytree(run, folder, ignore=shutil.ignore_patterns(ADAPTER_FILE, LORA_FILE, "step-*"))
    return folder


def _loss(model_dir: Path, held: Path) -> float:
    loaded = load_model(str(model_dir))
    samples, _ = load_dataset(str(held), policy="fail")
    batch = collate([build_example(s, loaded) for s in samples], pad_id=0)
    with torch.no_grad():
        return loaded.model(**batch).loss.item()


def test_a_qlora_run_lowers_held_out_loss(run, data):
    """On the 16 held-out questions: the model the run started from (its dequantized NF4 base, adapters at B=0)
    vs the trained one."""
    before, after = _loss(_base_only(run), data[1]), _loss(run, data[1])
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before


def test_the_run_folder_holds_the_dequantized_base_and_only_adapters_trained(run, data):
    """Every quantized layer's saved weight is the NF4 round trip (by hand) of the fresh model's weight, every
    other tensor (norms, embeddings, the head tied or not) the fresh model's bit for bit."""
    samples, _ = load_dataset(str(data[0]), policy="fail")
    fresh = fresh_model("tiny-random", conversation_text(samples), seed=1).model
    start = fresh.state_dict()
    tied = tied_weights(fresh)  # the stage freezes vision and (--group-lr) the projector: every untied linear
    quantized = {f"{n}.weight" for n, m in fresh.named_modules() if type(m) is nn.Linear and id(m.weight) not in tied}
    saved = load_model(str(_base_only(run))).model.state_dict()
    assert saved.keys() == start.keys() and quantized
    for key in start:
        if key in quantized:
            torch.testing.assert_close(saved[key].double(), _nf4_by_hand(start[key]), rtol=0, atol=1e-5, msg=key)
        else:
            assert torch.equal(saved[key], start[key]), key
    meta = json.loads((run / LORA_FILE).read_text())
    assert meta["layers"] and all(n.startswith("lm.") for n in meta["layers"])
    assert json.loads((run / "run.json").read_text())["quantize"] == "nf4"


def test_the_run_generates_and_merges_into_the_dequantized_weights(run, data, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert cli("export", run, "--merge", "--out", merged) == 0
    base, adapters = load_model(str(_base_only(run))).model.state_dict(), load_file(str(run / ADAPTER_FILE))
    folded = load_model(str(merged)).model.state_dict()
    for layer in json.loads((run / LORA_FILE).read_text())["layers"]:
        w = base[f"{layer}.weight"] + adapters[f"{layer}.lora_B"] @ adapters[f"{layer}.lora_A"] * 2.0
        torch.testing.assert_close(folded[f"{layer}.weight"], w, rtol=0, atol=1e-6)
    image = data[1].parent / "images" / "shapes-000050.png"
    answers = []
    for model in (run, merged):
        capsys.readouterr()
        assert cli("generate", "--model", model, "--image", image, "--prompt", "What shape is in the image?",
                   "--max-new-tokens", 12, "--json") == 0
        answers.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    assert answers[0] == answers[1] and answers[0].strip()


def test_resume_equals_an_uninterrupted_run(run, data, tmp_path):
    """Resumed from the step-20 checkpoint (the base re-quantized from the fresh weights, the checkpoint's
    dequantized weights equal to it), the run ends on the same adapters bit for bit."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("step-000040"))
    for name in ("config.json", "model.safetensors", ADAPTER_FILE, LORA_FILE):
        (resumed / name).unlink()
    assert cli("train", *RUN_FLAGS, "--data", data[0], "--out", resumed, "--resume") == 0
    a, b = load_file(str(run / ADAPTER_FILE)), load_file(str(resumed / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(str(run / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
