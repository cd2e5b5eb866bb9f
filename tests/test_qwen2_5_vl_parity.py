"""Qwen2.5-VL (windowed-attention ViT with RMSNorm and SwiGLU blocks + Qwen2 LM with M-RoPE)
against transformers' Qwen2_5_VLForConditionalGeneration.

A tiny random transformers model (vision depth 4, full attention in blocks 1 and 3, windows
of 2 x 2 merged tokens) is saved, loaded by vlmkit, and compared on grace_hopper preprocessed
by vlmkit's `plan_dynamic`: the window order (get_vision_window_index), the vision features,
logits (fp32, <= 1e-4) for one prompt and a left-padded batch, 20 greedy tokens with
vlmkit.generate vs transformers' generate, the save round trip, and the flat config layout.

The photo's sizes are chosen so both window paths run: at MAX_PIXELS the photo is 5 x 4
merged tokens (rows cut into windows of 2, 2 and a short 1), resized to 300 x 200 it is
4 x 6 (every window full).
"""

import pytest
import torch
import transformers
from qwen_vl_parity import (
    TOKENS,
    TOL,
    check_greedy_generation,
    check_left_padded_logits,
    check_logits,
    hf_inputs,
    images,
    prompt,
    text_config,
    widen,
)
from transformers.vision_utils import get_vision_window_index

from vlmkit.models.qwen2_5_vl import Qwen2_5_VL, window_order
from vlmkit.weights import from_pretrained, save_pretrained
from vlmkit.weights.qwen2_5_vl import QWEN2_5_VL
from vlmkit.weights.safetensors_io import read_config

MAX_PIXELS = 28 * 28 * 24
WINDOW = 56  # pixels: 56 // 14 // 2 = 2 x 2 merged tokens per window
SIZES = (None, (300, 200))  # merged grids 5 x 4 (a short window row) and 4 x 6 (all windows full)


def _hf_qwen2_5_vl() -> transformers.Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(0)
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config={"depth": 4, "hidden_size": 32, "num_heads": 4, "intermediate_size": 48, "out_hidden_size": 64,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": WINDOW,
                       "fullatt_block_indexes": [1, 3]},
        text_config=text_config(), **TOKENS)
    return widen(transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval())  # biases too; RMSNorm weights stay ones


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = _hf_qwen2_5_vl()
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    hf.save_pretrained(path)
    return hf, from_pretrained(path)


def _images(*sizes):
    return images(*sizes, max_pixels=MAX_PIXELS)


def test_sizes_exercise_short_and_full_windows():
    _, grid, _ = _images(*SIZES)
    merged = (grid[:, 1:] // 2).tolist()
    assert merged == [[5, 4], [4, 6]]


def test_window_order_matches_transformers():
    _, grid, _ = _images(*SIZES)
    grid = torch.cat([grid, torch.tensor([[2, 6, 10]])])  # and a two-frame clip with short columns
    want_index, want_cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=WINDOW, patch_size=14)
    order, lengths = window_order(grid.tolist(), 2, WINDOW // 14 // 2)
    assert torch.equal(order, want_index)
    assert [0] + torch.tensor(lengths).cumsum(0).tolist() == want_cu.tolist()
    assert len(lengths) == 6 + 6 + 2 * 6


def test_vision_features_match(models):
    hf, ours = models
    pixels, grid, _ = _images(*SIZES)
    with torch.no_grad():
        want = hf.model.visual(pixels, grid_thw=grid).pooler_output
        got = ours.vision(pixels, grid)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


def test_logits_match(models):
    check_logits(*models, *_images(*SIZES))


def test_left_padded_batch_logits_match(models):
    check_left_padded_logits(*models, *_images(*SIZES))


def test_greedy_generation_matches(models):
    check_greedy_generation(*models, *_images(None))


def test_save_round_trip(models, tmp_path):
    hf, ours = models
    save_pretrained(ours, tmp_path)
    assert read_config(tmp_path)["model_type"] == "qwen2_5_vl"
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixels, grid, tokens = _images(*SIZES)
    ids = torch.tensor([prompt(tokens)])
    with torch.no_grad():
        want = hf(**hf_inputs(ids), pixel_values=pixels, image_grid_thw=grid).logits
        got = back(**hf_inputs(ids), pixel_values=pixels, image_grid_thw=grid).logits
    assert (got - want).abs().max().item() <= TOL
    assert QWEN2_5_VL.config_from_hf(read_config(tmp_path)) == ours.cfg
    again = from_pretrained(tmp_path)
    assert isinstance(again, Qwen2_5_VL)
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in ours.state_dict().items())


def test_placeholder_count_mismatch_raises(models):
    _, ours = models
    pixels, grid, tokens = _images(None)
    with pytest.raises(ValueError, match="placeholder"):
        ours(torch.tensor([prompt([tokens[0] - 1])]), pixel_values=pixels, image_grid_thw=grid)
    with pytest.raises(ValueError, match="pixel_values has shape"):
        ours(torch.tensor([prompt(tokens)]), pixel_values=pixels[:-4], image_grid_thw=grid)


def test_reads_flat_transformers4_config():
    """Qwen2.5-VL-7B-Instruct's own config.json layout: LM keys at the top level, rope_scaling type
    'mrope', the vision input channels as in_chans, the vision width as hidden_size."""
    flat = {"model_type": "qwen2_5_vl", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "max_position_embeddings": 128000, "tie_word_embeddings": False, "image_token_id": 151655,
            "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                              "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                              "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                              "temporal_patch_size": 2}}
    cfg = QWEN2_5_VL.config_from_hf(flat)
    assert (cfg.lm.hidden_size, cfg.lm.num_layers, cfg.lm.num_kv_heads, cfg.lm.head_dim) == (3584, 28, 4, 128)
    assert cfg.lm.rope_scaling["mrope_section"] == [16, 24, 24] and cfg.lm.qkv_bias
    v = cfg.vision
    assert (v.embed_dim, v.intermediate_size, v.window_tokens, v.fullatt_block_indexes) == (1280, 3420, 4,
                                                                                            [7, 15, 23, 31])
    assert (v.in_channels, v.tokens_per_second, v.out_hidden_size) == (3, 2, 3584)


def test_bad_vision_config_raises():
    from vlmkit.models.qwen2_5_vl import Qwen2_5_VLVisionConfig

    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        Qwen2_5_VLVisionConfig(depth=4, fullatt_block_indexes=[4])
    with pytest.raises(ValueError, match="window_size"):
        Qwen2_5_VLVisionConfig(window_size=14)
