"""Parity of vlmkit's VisionTower with transformers' CLIPVisionModel and SiglipVisionModel.

Tiny random transformers models are saved to a temporary directory, loaded
through vlmkit's checkpoint dispatcher and compared output by output; vlmkit's
own saves must load back into transformers unchanged.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_vision_parity.py
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from vlmkit.config import VisionConfig  # noqa: E402
from vlmkit.weights import from_pretrained, save_pretrained  # noqa: E402
from vlmkit.models.vit import VisionTower  # noqa: E402
from vlmkit.weights.converter import resolve  # noqa: E402
from vlmkit.weights.vision import vision_state_from_hf, vision_state_to_hf  # noqa: E402

TOL = 1e-4
SIZE, PATCH = 32, 8
COMMON = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              image_size=SIZE, patch_size=PATCH)
KINDS = ("clip", "siglip_head", "siglip")


def hf_model(kind: str) -> torch.nn.Module:
    """A seeded tiny transformers vision model with non-trivial norms and biases."""
    torch.manual_seed(0)
    if kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**COMMON))
    else:
        config = transformers.SiglipVisionConfig(**COMMON, vision_use_head=kind == "siglip_head")
        model = transformers.SiglipVisionModel(config)
    with torch.no_grad():  # default init leaves LayerNorms at (1, 0) and biases at 0: perturb them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=KINDS)
def pair(request, tmp_path):
    """(kind, transformers model, vlmkit tower loaded from its save_pretrained directory)."""
    ref = hf_model(request.param)
    ref.save_pretrained(tmp_path / "hf")
    return request.param, ref, from_pretrained(tmp_path / "hf")


def pixels(size: int = SIZE, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_outputs_match_transformers(pair):
    kind, ref, ours = pair
    x = pixels()
    with torch.no_grad():
        want = ref(x, output_hidden_states=True)
        got = ours(x, output_hidden_states=True)
    assert max_diff(got.last_hidden_state, want.last_hidden_state) <= TOL
    if kind == "siglip":
        assert got.pooler_output is None and want.pooler_output is None
    else:
        assert max_diff(got.pooler_output, want.pooler_output) <= TOL
    assert len(got.hidden_states) == len(want.hidden_states) == COMMON["num_hidden_layers"] + 1
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert max_diff(g, w) <= TOL, f"hidden state {i}"


@pytest.mark.parametrize("size", [24, 48])
def test_interpolated_positions_match_transformers(pair, size):
    kind, ref, ours = pair
    x = pixels(size)
    with torch.no_grad():
        want = ref(x, interpolate_pos_encoding=True)
        got = ours(x, interpolate_pos_encoding=True)
    assert got.last_hidden_state.shape[1] == (size // PATCH) ** 2 + (kind == "clip")
    assert max_diff(got.last_hidden_state, want.last_hidden_state) <= TOL
    if kind != "siglip":
        assert max_diff(got.pooler_output, want.pooler_output) <= TOL
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        ours(x)


def test_clip_features_are_penultimate_patches(tmp_path):
    ref = hf_model("clip")
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert (ours.cfg.select_layer, ours.cfg.select_feature) == (-2, "patch")
    calls = []
    ours.layers[-1].register_forward_hook(lambda *_: calls.append(1))
    x = pixels()
    with torch.no_grad():
        want = ref(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = ours.features(x)
    assert max_diff(got, want) <= TOL
    assert got.shape[1] == ours.cfg.tokens_per_image == (SIZE // PATCH) ** 2
    assert calls == [], "features() ran a layer past select_layer"

    ours.cfg.select_feature = "cls_patch"
    with torch.no_grad():
        assert max_diff(ours.features(x), ref(x, output_hidden_states=True).hidden_states[-2]) <= TOL
    ours.cfg.select_layer = 0
    with torch.no_grad():
        assert max_diff(ours.features(x), ref(x, output_hidden_states=True).hidden_states[0]) <= TOL


def test_siglip_features_are_last_layer_all_tokens(tmp_path):
    ref = hf_model("siglip")
    ref.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    x = pixels(48)
    with torch.no_grad():
        want = ref(x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-1]
        got = ours.features(x, interpolate_pos_encoding=True)
    assert got.shape[1] == 36
    assert max_diff(got, want) <= TOL


def test_save_round_trips_through_transformers(pair, tmp_path):
    kind, ref, ours = pair
    ours.cfg.select_layer = 1  # features() would skip the last layer; the save must still hold it
    save_pretrained(ours, tmp_path / "ours")
    written = load_file(tmp_path / "ours" / "model.safetensors")
    original = ref.state_dict()
    assert set(written) == {f"vision_model.{k}" for k in original}
    for name, tensor in original.items():
        assert torch.equal(written[f"vision_model.{name}"], tensor), name

    cls = transformers.CLIPVisionModel if kind == "clip" else transformers.SiglipVisionModel
    back = cls.from_pretrained(tmp_path / "ours").eval()
    x = pixels()
    with torch.no_grad():
        want, got = ref(x), back(x)
    assert max_diff(got.last_hidden_state, want.last_hidden_state) == 0.0

    reloaded = from_pretrained(tmp_path / "ours")
    assert reloaded.cfg == ours.cfg


def test_config_from_transformers(tmp_path):
    hf_model("clip").save_pretrained(tmp_path / "clip")
    hf_model("siglip_head").save_pretrained(tmp_path / "siglip")
    clip, siglip = from_pretrained(tmp_path / "clip").cfg, from_pretrained(tmp_path / "siglip").cfg
    assert (clip.use_cls_token, clip.pre_layernorm, clip.patch_bias, clip.hidden_act) == (
        True, True, False, "quick_gelu")
    assert clip.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert (siglip.use_cls_token, siglip.pre_layernorm, siglip.patch_bias, siglip.hidden_act, siglip.use_head) == (
        False, False, True, "gelu_pytorch_tanh", True)
    assert (siglip.select_layer, siglip.image_mean, siglip.layer_norm_eps) == (-1, (0.5, 0.5, 0.5), 1e-6)
    assert siglip.tokens_per_image == (SIZE // PATCH) ** 2


def test_prefixed_and_unprefixed_names_load_the_same(tmp_path):
    ref = hf_model("clip")
    ref.save_pretrained(tmp_path)
    cfg = from_pretrained(tmp_path).cfg
    plain = dict(ref.state_dict())
    prefixed = {f"vision_model.{k}": v for k, v in plain.items()}
    a, b = ({k: resolve(v) for k, v in vision_state_from_hf(state, cfg).items()} for state in (plain, prefixed))
    assert a.keys() == b.keys() == VisionTower(cfg).state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert vision_state_to_hf(a, cfg, prefix="").keys() == plain.keys()


def test_unknown_checkpoint_tensor_is_reported(tmp_path):
    hf_model("clip").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.layers.0.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="extra.weight"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 32, 24), r"\(2, 3, 32, 24\).*square"),
    ((2, 1, 32, 32), r"\(2, 1, 32, 32\).*\(batch, 3, height, width\)"),
    ((3, 32, 32), r"\(3, 32, 32\)"),
    ((1, 3, 36, 36), r"\(1, 3, 36, 36\).*multiple of patch_size 8"),
    ((1, 3, 48, 48), r"\(1, 3, 48, 48\).*interpolate_pos_encoding"),
])
def test_bad_pixel_shapes_raise(shape, message):
    tower = VisionTower(VisionConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                     num_layers=2, num_heads=4))
    with pytest.raises(ValueError, match=message):
        tower(torch.zeros(shape))
    with pytest.raises(ValueError, match=message):
        tower.features(torch.zeros(shape))


def test_saving_under_the_wrong_model_type_is_refused(tmp_path):
    tower = VisionTower(VisionConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                     num_layers=2, num_heads=4))
    with pytest.raises(ValueError, match="siglip_vision_model"):
        save_pretrained(tower, tmp_path, model_type="siglip_vision_model")
    save_pretrained(tower, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "clip_vision_model"
