"""LoRA (train/lora.py, `vlmkit train --lora`, `vlmkit export --merge`): the adapted layer against the formula by
hand, B = 0 at the start, only adapters learning, merging, the saved run and its merged export, bad --lora text,
and resume.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_lora.py
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from resumed_runs import assert_same_run
from safetensors.torch import load_file
from torch import nn

from vlmkit.cli import main
from vlmkit.data.formats import load_dataset
from vlmkit.data.synth import DATASET_FILE, synthesize
from vlmkit.load import load_model, tiny_random_model
from vlmkit.train.loop import trainable_parameters
from vlmkit.train.lora import (
    ADAPTER_FILE,
    LORA_FILE,
    LoraConfig,
    LoRALinear,
    add_lora,
    lora_layers,
    merge_lora,
    parse_lora,
)
from vlmkit.train.run import conversation_text, fresh_model
from vlmkit.train.stages import Stage

# tiny-random trained with LoRA on the LM's attention and MLP and on the whole vision tower; the projector frozen
LORA = "r=4,alpha=12,dropout=0.1,targets=lm.attn,lm.mlp,vision"
RUN_FLAGS = ["--model", "tiny-random", "--stage", "sft", "--group-lr", "projector=0", "--group-lr", "vision=1e-2",
             "--lr", "1e-2", "--batch-size", "4", "--seed", "3", "--quiet", "--lora", LORA]


def cli(*args: object) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 shape questions on 32x32 images (tiny-random's image size)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, {"shapes": 16}, seed=0, image_size=(32, 32), progress=False)
    return out / DATASET_FILE


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A 4-step LoRA run of tiny-random, checkpointed every 2 steps."""
    out = tmp_path_factory.mktemp("lora") / "run"
    assert cli("train", *RUN_FLAGS, "--data", data, "--steps", 4, "--checkpoint-every", 2, "--out", out) == 0
    return out


class _Toy(nn.Module):
    """A model with one group `lm` holding `attn.q` and `mlp.up`, for the layer-level checks."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = nn.Module()
        self.lm.attn = nn.Module()
        self.lm.attn.q = nn.Linear(6, 5)
        self.lm.mlp = nn.Module()
        self.lm.mlp.up = nn.Linear(6, 7, bias=False)


def test_lora_linear_is_the_formula_by_hand():
    """y = x W^T + b + (x A^T B^T) alpha / r, computed here in float64 from the layer's own tensors."""
    torch.manual_seed(0)
    toy = _Toy()
    assert add_lora(toy, LoraConfig(r=3, alpha=5.0, targets=("lm.attn",))) == ["lm.attn.q"]
    layer = toy.lm.attn.q
    assert isinstance(layer, LoRALinear) and type(toy.lm.mlp.up) is nn.Linear  # only the target is adapted
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (5, 3)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at 0: give it values so the update shows
    x = torch.randn(2, 4, 6)
    W, b, A, B = (t.detach().double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ W.T + b + (x.double() @ A.T @ B.T) * (5.0 / 3)
    torch.testing.assert_close(layer(x).double(), expected, rtol=0, atol=1e-5)
    # merged: the weight becomes W + alpha/r B A, the layer plain nn.Linear with the same output
    merge_lora(toy)
    assert type(toy.lm.attn.q) is nn.Linear and not hasattr(toy, "lora_config")
    torch.testing.assert_close(toy.lm.attn.q.weight.double(), W + (B @ A) * (5.0 / 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(toy.lm.attn.q(x).double(), expected, rtol=0, atol=1e-5)


def test_a_layer_tied_to_an_embedding_is_never_adapted():
    toy = _Toy()
    toy.lm.embed = nn.Embedding(7, 6)
    toy.lm.head = nn.Linear(6, 7, bias=False)
    toy.lm.head.weight = toy.lm.embed.weight
    assert add_lora(toy, LoraConfig(targets=("lm",))) == ["lm.attn.q", "lm.mlp.up"]


def test_dropout_applies_to_the_adapter_input_only_while_training():
    torch.manual_seed(0)
    toy = _Toy()
    add_lora(toy, LoraConfig(r=2, alpha=2.0, dropout=0.5, targets=("lm.mlp",)))
    layer = toy.lm.mlp.up
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    W, A, B = layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    torch.manual_seed(1)
    kept = torch.nn.functional.dropout(x, 0.5, training=True)  # the mask the layer will draw from the same seed
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), x @ W.T + kept @ A.T @ B.T, rtol=0, atol=1e-5)
    toy.eval()
    torch.testing.assert_close(layer(x), x @ W.T + x @ A.T @ B.T, rtol=0, atol=1e-5)


def _image_prompt(loaded, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (1, T), pixel_values) of a one-image prompt "hi" for loaded's model."""
    plans = loaded.plan_images([image])
    ids = loaded.prompt_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], plans)
    return torch.tensor([ids]), loaded.image_inputs(plans)["pixel_values"]


def _image_logits(loaded, image: Image.Image) -> torch.Tensor:
    ids, pixels = _image_prompt(loaded, image)
    with torch.no_grad():
        return loaded.model(input_ids=ids, pixel_values=pixels).logits


def _image(seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy())


def test_b_starts_at_zero_so_the_model_is_unchanged():
    loaded = tiny_random_model()
    before = _image_logits(loaded, _image())
    names = add_lora(loaded.model, parse_lora("r=8,targets=lm,vision,projector"))
    assert {n.split(".")[0] for n in names} == {"lm", "vision", "projector"}
    assert all(torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in lora_layers(loaded.model).values())
    assert torch.equal(_image_logits(loaded, _image()), before)


def test_only_adapters_get_gradients():
    loaded = tiny_random_model()
    add_lora(loaded.model, parse_lora("r=4,targets=lm.attn,vision.mlp"))
    stage = Stage("s", {"vision": 1e-3, "projector": 0.0, "lm": 1e-3})
    trained = trainable_parameters(loaded.model, stage)
    adapters = {n for n, _ in loaded.model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert {n for params in trained.values() for n, _ in params} == adapters
    ids = torch.randint(0, 50, (2, 9))
    loaded.model.train()
    loaded.model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in loaded.model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n in adapters if n.startswith("lm.")}  # no image: the vision adapters get none
    assert all(loaded.model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if n.endswith(".lora_B"))


def test_a_lora_run_changes_only_the_adapters(run, data):
    """The run's saved base weights are bit for bit the fresh model's; every adapter has moved (B off zero)."""
    samples, _ = load_dataset(str(data), policy="fail")
    start = fresh_model("tiny-random", conversation_text(samples), seed=3).model.state_dict()
    saved = _base_only(run).model.state_dict()  # the base weights the run folder holds (transformers layout)
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    adapters = load_file(str(run / ADAPTER_FILE))
    meta = json.loads((run / LORA_FILE).read_text())
    assert parse_lora(LORA) == LoraConfig(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"])})
    assert len(adapters) == 2 * len(meta["layers"]) and {n.split(".")[0] for n in meta["layers"]} == {"lm", "vision"}
    # LLaVA reads the vision features of the second-to-last layer: the last layer (of tiny-random's 2) never runs,
    # so its adapters get no gradient; every other adapter has learned
    unused = {n for n in meta["layers"] if n.startswith("vision.layers.1.")}
    assert len(unused) == 4
    assert all(adapters[f"{n}.lora_B"].abs().sum() > 0 for n in meta["layers"] if n not in unused)
    assert all(adapters[f"{n}.lora_B"].abs().sum() == 0 for n in unused)


def test_merged_logits_equal_unmerged(run):
    loaded = load_model(str(run))
    assert loaded.model.lora_config == parse_lora(LORA) and not loaded.model.training
    before = _image_logits(loaded, _image(1))
    base = load_model(str(run))
    merge_lora(base.model)
    assert not lora_layers(base.model)
    torch.testing.assert_close(_image_logits(base, _image(1)), before, rtol=0, atol=1e-5)
    assert not torch.allclose(before, _image_logits(_base_only(run), _image(1)), atol=1e-3)  # the adapters count


def _base_only(run: Path):
    """The run's base model without its adapters (a copy of the folder with the adapter files left out)."""
    folder = run.parent / "base-only"
    if not folder.exists():
        shutil.copytree(run, folder, ignore=shutil.ignore_patterns(ADAPTER_FILE, LORA_FILE, "step-*"))
    return load_model(str(folder))


def test_export_merge_writes_a_full_model_with_the_same_answer(run, data, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert cli("export", run, "--merge", "--out", merged) == 0
    assert not (merged / ADAPTER_FILE).exists() and not (merged / LORA_FILE).exists()
    # the merged weights are W + alpha/r B A by hand from the run's files
    base, adapters = _base_only(run).model.state_dict(), load_file(str(run / ADAPTER_FILE))
    folded = load_model(str(merged)).model.state_dict()
    assert folded.keys() == base.keys()
    cfg = parse_lora(LORA)
    for layer in json.loads((run / LORA_FILE).read_text())["layers"]:
        w = base[f"{layer}.weight"] + adapters[f"{layer}.lora_B"] @ adapters[f"{layer}.lora_A"] * (cfg.alpha / cfg.r)
        torch.testing.assert_close(folded[f"{layer}.weight"], w, rtol=0, atol=1e-6)
    image = data.parent / "images" / "shapes-000000.png"
    answers = []
    for model in (run, merged):
        capsys.readouterr()
        assert cli("generate", "--model", model, "--image", image, "--prompt", "What shape is this?",
                   "--max-new-tokens", 12, "--json") == 0
        answers.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    assert answers[0] == answers[1]
    # a second export into the now non-empty folder, and an export of a model without adapters, are refused
    assert cli("export", run, "--merge", "--out", merged) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert cli("export", merged, "--merge", "--out", tmp_path / "again") == 2
    assert "has no LoRA adapters" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "message"), [
    ("r=8,rank=4", "unknown key 'rank'; valid keys: r, alpha, dropout, targets"),
    ("r=0", "r must be an integer >= 1"),
    ("r=4,alpha=x", "alpha must be a number"),
    ("dropout=1", "dropout must be in [0, 1)"),
    ("r=4,lm.attn", "'lm.attn' is not KEY=VALUE"),
])
def test_bad_lora_text_is_refused(spec, message, data, tmp_path, capsys):
    assert cli("train", "--model", "tiny-random", "--data", data, "--out", tmp_path / "r", "--lora", spec) == 2
    err = capsys.readouterr().err
    assert message in err and "--lora" in err


@pytest.mark.parametrize("target", ["decoder.attn", "lm.ffn", "lm.attn.q"])
def test_an_unknown_target_lists_the_valid_ones(target, data, tmp_path, capsys):
    assert cli("train", "--model", "tiny-random", "--data", data, "--out", tmp_path / "r",
               "--lora", f"targets=lm.mlp,{target}") == 2
    err = capsys.readouterr().err
    assert f"LoRA target {target!r} names no linear layer" in err
    assert ("valid targets: vision, vision.attn, vision.mlp, projector, projector.mlp, lm, lm.attn, lm.mlp "
            in err)


def test_adapters_in_a_frozen_group_are_refused(data, tmp_path, capsys):
    assert cli("train", "--model", "tiny-random", "--data", data, "--out", tmp_path / "r", "--stage", "sft",
               "--lora", "targets=vision.attn") == 2
    assert "freezes group 'vision' (lr 0), which holds LoRA adapters" in capsys.readouterr().err


def test_resume_equals_an_uninterrupted_run(run, data, tmp_path):
    """The run's step-2 checkpoint, resumed in a copy of the folder with everything written after it removed,
    ends where the uninterrupted run did: the same metrics bits, base weights and adapters."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for name in ("step-000004", "config.json", "model.safetensors", ADAPTER_FILE, LORA_FILE, "loss.png"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert cli("train", *RUN_FLAGS, "--data", data, "--steps", 4, "--checkpoint-every", 2, "--out", resumed,
               "--resume") == 0
    assert_same_run(run, resumed, 4)
    a, b = load_file(str(run / ADAPTER_FILE)), load_file(str(resumed / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another LoRA on --resume is another run: refused
    assert cli("train", *RUN_FLAGS[:-1], "r=8", "--data", data, "--steps", 4, "--out", resumed, "--resume") == 2


# ---- --adapters-only: a PEFT adapter directory that transformers + peft apply to the transformers model

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_peft_adapter_gives_transformers_the_same_logits(family, tmp_path):
    """A tiny random transformers LM (Qwen2: qkv bias; Phi-3: fused qkv_proj / gate_up_proj), loaded by vlmkit,
    adapters on every attention and MLP layer with random B; the exported adapter applied by peft to the
    transformers model gives vlmkit's logits within 1e-4 (and not the base model's)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import vlmkit.weights as vm
    from vlmkit.weights.peft import write_peft_adapter

    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config}[family]
    torch.manual_seed(0)
    config = config_class(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=None, eos_token_id=None, pad_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    model = vm.from_pretrained(tmp_path / "base")
    add_lora(model, parse_lora("r=4,alpha=8,targets=layers.attn,layers.mlp"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    write_peft_adapter(model, tmp_path / "adapter")
    names = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    fused = family == "phi3"
    assert ("model.layers.0.self_attn.qkv_proj" in names) == fused
    assert ("model.layers.0.self_attn.k_proj" in names) == (not fused)
    assert len(names) == 2 * (4 if fused else 7)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        theirs = adapted(input_ids=ids).logits
        ours = model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (ours - base_logits).abs().max() > 0.1


def test_peft_adapter_of_a_llava_run_gives_transformers_the_same_logits(run, tmp_path, capsys):
    """The tiny-random LoRA run (adapters on the LM and the vision tower) exported --adapters-only; peft applies it to
    transformers' LlavaForConditionalGeneration loaded from the run folder: vlmkit's logits within 1e-4 on an image
    prompt."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    assert cli("export", run, "--adapters-only", "--out", tmp_path / "adapter", "--json") == 0
    # vlmkit's 2 x (qkv, out, gate_up, down) + 2 x (qkv, out, fc1, fc2) adapters are transformers' 2 x (q, k, v, o,
    # gate, up, down) + 2 x (q, k, v, out, fc1, fc2) modules
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["adapted_layers"] == 16
    modules = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert len(modules) == 26 and "model.language_model.layers.1.self_attn.v_proj" in modules
    loaded = load_model(str(run))
    ids, pixels = _image_prompt(loaded, _image(2))
    base = transformers.LlavaForConditionalGeneration.from_pretrained(run).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids, pixel_values=pixels).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert not [w for w in caught if "adapter keys" in str(w.message)]  # none missing, none unexpected
        theirs = adapted(input_ids=ids, pixel_values=pixels).logits
        ours = loaded.model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (ours - base_logits).abs().max() > 1e-3


def test_merged_export_loads_in_transformers_with_the_same_logits(run, tmp_path):
    """The --merge folder of the tiny-random LoRA run, loaded by transformers' LlavaForConditionalGeneration, gives
    the logits of vlmkit's run with its adapters (unmerged) within 1e-4."""
    transformers = pytest.importorskip("transformers")
    assert cli("export", run, "--merge", "--out", tmp_path / "merged") == 0
    loaded = load_model(str(run))
    ids, pixels = _image_prompt(loaded, _image(3))
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, pixel_values=pixels).logits,
                                   loaded.model(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=1e-4)


def test_adapters_only_of_an_unchecked_model_type_is_refused():
    """A model type whose transformers module names were not checked (Qwen2-VL) is refused, with --merge offered."""
    from vlmkit.models.image_model import build_model
    from vlmkit.presets import get_preset
    from vlmkit.weights.peft import peft_adapter

    model = build_model(get_preset("qwen2-vl-small"))
    add_lora(model, parse_lora("targets=lm.attn"))
    with pytest.raises(ValueError, match="export it with --merge"):
        peft_adapter(model)


def test_the_built_in_lora_stage_trains_lm_adapters_and_the_projector(data, tmp_path):
    """--stage lora (LLaVA-1.5's LoRA recipe): adapters r 128 on the LM's attention and MLP, the projector trained
    in full, the vision tower and every LM weight unchanged."""
    out = tmp_path / "run"
    assert cli("train", "--model", "tiny-random", "--data", data, "--stage", "lora", "--steps", 2, "--batch-size", 4,
               "--lr", "1e-2", "--quiet", "--out", out) == 0
    samples, _ = load_dataset(str(data), policy="fail")
    start = fresh_model("tiny-random", conversation_text(samples), seed=0).model.state_dict()
    saved = _base_only(out).model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], saved[k])}
    assert changed and all(k.startswith("projector.") for k in changed)
    meta = json.loads((out / LORA_FILE).read_text())
    assert meta["lora"] == {"r": 128, "alpha": 256.0, "dropout": 0.05, "targets": ["lm.attn", "lm.mlp"]}
    assert meta["layers"] and all(n.startswith("lm.layers.") for n in meta["layers"])
