"""SAM / ViTDet encoder: parity with transformers, and the Vary / DeepSeek-VL shapes their papers state.

Oracles: transformers' SamVisionModel (encoder + neck, every hidden state),
SamVisionAttention.get_rel_pos / get_decomposed_rel_pos (relative positions with a
resized table), DeepseekVLHybridModel.get_high_res_image_features (DeepSeek-VL's
resize + stride-2 convs + global branch), and the shapes stated by Vary (Wei et al. 2023, sec. 3.2.1) and
DeepSeek-VL (Lu et al. 2024, sec. 3.1); docs/references.md, Vary and DeepSeek-VL.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_sam.py
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmkit.models.sam import (  # noqa: E402
    SamConfig, SamEncoder, decomposed_rel_pos, rel_pos_table, window_partition, window_unpartition)
from vlmkit.weights.safetensors_io import read_config, read_state_dict, write_dir  # noqa: E402
from vlmkit.weights.sam import (  # noqa: E402
    SAM_VISION, deepseek_sam_config_from_hf, deepseek_sam_state_from_hf, sam_from_pretrained)

TOL = 1e-4
# 96 px / 8 = a 12 x 12 grid; windows of 5 pad it to 15 x 15 (9 windows); layer 1 attends globally.
TINY = dict(image_size=96, patch_size=8, window_size=5, global_attn_indexes=[1], num_hidden_layers=3,
            hidden_size=32, mlp_dim=64, num_attention_heads=4, output_channels=16)
VARIANTS = {
    "padded_windows": {},
    "exact_windows_no_qkv_bias": dict(window_size=4, qkv_bias=False, global_attn_indexes=[0, 2]),
    "no_positions": dict(use_rel_pos=False, use_abs_pos=False),
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """transformers initializes SAM near zero (initializer_range 1e-10, zero positions): draw every tensor."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def pixels(size: int = 96, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_matches_transformers(variant, tmp_path):
    ref = randomize(transformers.SamVisionModel(transformers.SamVisionConfig(**{**TINY, **VARIANTS[variant]})))
    ref.save_pretrained(tmp_path)
    ours = sam_from_pretrained(tmp_path)
    x = pixels()
    with torch.no_grad():
        want = ref(x, output_hidden_states=True)
        got = ours(x, output_hidden_states=True)
    assert got.last_hidden_state.shape == (2, 16, 12, 12)
    assert max_diff(got.last_hidden_state, want.last_hidden_state) <= TOL
    assert len(got.hidden_states) == len(want.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert max_diff(g, w) <= TOL, f"hidden state {i}"
    with torch.no_grad():  # features() with no downsampling is the neck map, flattened row-major
        assert max_diff(ours.features(x), want.last_hidden_state.flatten(2).transpose(1, 2)) <= TOL


def test_rel_pos_with_resized_table_matches_transformers():
    """A table stored for 4 positions (length 7) used on 6 x 6 grids is resized linearly to length 11."""
    ref = transformers.models.sam.modeling_sam.SamVisionAttention(
        transformers.SamVisionConfig(**TINY), window_size=4)
    torch.manual_seed(2)
    table_h, table_w = torch.randn(7, 8), torch.randn(7, 8)
    assert max_diff(rel_pos_table(table_h, 6), ref.get_rel_pos(6, 6, table_h)) <= 1e-6
    q = torch.randn(2, 4, 36, 8)  # (B, nh, h * w, hd)
    want = ref.get_decomposed_rel_pos(q.reshape(8, 36, 8), table_h, table_w, (6, 6), (6, 6))  # (B*nh, 6, 6, 6, 6)
    assert max_diff(decomposed_rel_pos(q, table_h, table_w, 6, 6), want.reshape(2, 4, 36, 36)) <= 1e-5


def test_window_partition_pads_and_inverts():
    x = torch.randn(2, 12, 12, 3)
    windows, padded = window_partition(x, 5)
    assert windows.shape == (2 * 9, 5, 5, 3) and padded == (15, 15)
    assert torch.equal(windows[0], x[0, :5, :5])  # top-left window
    assert torch.equal(windows[8, :2, :2], x[0, 10:, 10:]) and not windows[8, 2:].any()  # corner: 2x2 data, zeros
    assert torch.equal(window_unpartition(windows, 5, padded, (12, 12)), x)


def test_save_loads_into_transformers_and_back(tmp_path):
    torch.manual_seed(3)
    cfg = SAM_VISION.config_from_hf({**TINY, "model_type": "sam_vision_model"})
    ours = randomize(SamEncoder(cfg))
    write_dir(tmp_path / "sam", SAM_VISION.config_to_hf(cfg), SAM_VISION.state_to_hf(ours.state_dict(), cfg))
    ref = transformers.SamVisionModel.from_pretrained(tmp_path / "sam").eval()
    x = pixels()
    with torch.no_grad():
        assert max_diff(ours(x).last_hidden_state, ref(x).last_hidden_state) <= TOL
    vary = SamConfig.from_dict({**cfg.to_dict(), "downsample": "vary", "downsample_channels": (24, 40)})
    ours = randomize(SamEncoder(vary))
    write_dir(tmp_path / "vary", SAM_VISION.config_to_hf(vary), SAM_VISION.state_to_hf(ours.state_dict(), vary))
    back = sam_from_pretrained(tmp_path / "vary")
    assert back.cfg == vary
    with torch.no_grad():
        assert torch.equal(back.features(x), ours.features(x))


def test_deepseek_downsample_matches_transformers_hybrid(tmp_path):
    """DeepSeek-VL: resize the neck map to 4x the SigLIP grid, two stride-2 convs, plus alpha * the global branch."""
    config = transformers.DeepseekVLHybridConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        high_res_vision_config={"model_type": "sam_vision_model", **TINY},
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    ref = randomize(transformers.DeepseekVLHybridForConditionalGeneration(config))
    ref.save_pretrained(tmp_path)
    cfg = deepseek_sam_config_from_hf(read_config(tmp_path))
    assert cfg.downsample == "deepseek" and cfg.global_branch
    assert (cfg.resize_to, cfg.downsample_channels) == (16, (32, 64))  # 4 x the 4x4 SigLIP grid; 2x, 4x channels
    ours = SamEncoder(cfg)
    state = read_state_dict(tmp_path)
    ours.load_state_dict(deepseek_sam_state_from_hf(state, cfg), strict=True)
    assert ours.global_alpha.item() != 0.0
    x = pixels()
    with torch.no_grad():
        want = ref.model.get_high_res_image_features(x).last_hidden_state  # (B, 16, 64): 4 x 4 after the convs
        got = ours.eval().features(x)
    assert got.shape == (2, cfg.tokens_per_image, 64) == (2, 16, 64)
    assert max_diff(got, want) <= TOL


def _shapes_through(encoder: SamEncoder) -> dict[str, tuple[int, ...]]:
    """Run one 1024-px image and record the map shape at every downsampling step."""
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str, input_name: str | None = None):
        def hook(module, inputs, output) -> None:  # returns None: the output is left unchanged
            seen[name] = tuple(output.shape)
            if input_name is not None:
                seen[input_name] = tuple(inputs[0].shape)
        return hook

    hooks = [encoder.neck.register_forward_hook(record("neck")),
             encoder.downsample.conv1.register_forward_hook(record("conv1", "resized")),
             encoder.downsample.conv2.register_forward_hook(record("conv2"))]
    with torch.no_grad():
        seen["tokens"] = tuple(encoder.features(torch.randn(1, 3, 1024, 1024)).shape)
    for h in hooks:
        h.remove()
    return seen


# ViTDet-B geometry (1024 px, patch 16, windows of 14, 256-channel neck), one windowed layer, narrow width.
REAL_GEOMETRY = dict(num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2, global_attn_indexes=())


def test_vary_shapes_at_1024():
    """Vary, sec. 3.2.1: 1024 input -> 64x64x256 -> 32x32x512 -> 16x16x1024 -> 256 x 1024."""
    torch.manual_seed(4)
    shapes = _shapes_through(SamEncoder(SamConfig(**REAL_GEOMETRY, downsample="vary")))
    assert shapes == {"neck": (1, 256, 64, 64), "resized": (1, 256, 64, 64), "conv1": (1, 512, 32, 32),
                      "conv2": (1, 1024, 16, 16), "tokens": (1, 256, 1024)}
    assert SamConfig(downsample="vary").tokens_per_image == 256


def test_deepseek_shapes_at_1024():
    """DeepSeek-VL, sec. 3.1: 64x64x256 -> resized 96x96x256 -> 48x48x512 -> 24x24x1024 -> 576 x 1024."""
    torch.manual_seed(5)
    shapes = _shapes_through(SamEncoder(SamConfig(**REAL_GEOMETRY, downsample="deepseek")))
    assert shapes == {"neck": (1, 256, 64, 64), "resized": (1, 256, 96, 96), "conv1": (1, 512, 48, 48),
                      "conv2": (1, 1024, 24, 24), "tokens": (1, 576, 1024)}
    assert SamConfig(downsample="deepseek").tokens_per_image == 576


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="downsample"):
        SamConfig(downsample="bilinear")
    with pytest.raises(ValueError, match="only used by downsample='deepseek'"):
        SamConfig(downsample="vary", resize_to=96)
    with pytest.raises(ValueError, match="outside layers"):
        SamConfig(num_layers=2, global_attn_indexes=(2,))
    with pytest.raises(ValueError, match=r"\(batch, 3, 96, 96\)"):
        SamEncoder(SAM_VISION.config_from_hf(TINY)).features(torch.randn(1, 3, 64, 64))


def test_sam_vision_model_directories_go_through_the_common_loader(tmp_path):
    from vlmkit.weights import from_pretrained, save_pretrained
    from vlmkit.models.sam import SamEncoder

    torch.manual_seed(0)
    hf_cfg = transformers.SamVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=64, patch_size=16,
                                          output_channels=16, window_size=2, global_attn_indexes=[1])
    hf = transformers.SamVisionModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert isinstance(ours, SamEncoder)
    save_pretrained(ours, tmp_path / "ours")
    back = transformers.SamVisionModel.from_pretrained(tmp_path / "ours").eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state
        assert (ours(pixels).last_hidden_state - expected).abs().max().item() <= 1e-4
        assert torch.equal(back(pixel_values=pixels).last_hidden_state, expected)
