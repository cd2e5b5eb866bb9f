"""Qwen2-VL (ViT with 2-D RoPE + patch merger, Qwen2 LM with M-RoPE) against transformers'
Qwen2VLForConditionalGeneration.

A tiny random transformers model is saved, loaded by vlmkit, and compared on real photos
preprocessed by vlmkit's `plan_dynamic`: the vision tower's merged features, the M-RoPE
positions (get_rope_index), logits (fp32, <= 1e-4) for one prompt and for a left-padded
batch with images of two sizes, 20 greedy tokens with vlmkit.generate vs transformers'
generate, the save round trip, and the placeholder-count errors.
"""

import pytest
import torch
import transformers
from qwen_vl_parity import (
    IMAGE,
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

from vlmkit.generate import GenerationConfig, generate
from vlmkit.models.qwen2_vl import Qwen2VL, mrope_positions
from vlmkit.weights import from_pretrained, save_pretrained
from vlmkit.weights.qwen2_vl import QWEN2_VL
from vlmkit.weights.safetensors_io import read_config

MAX_PIXELS = 28 * 28 * 16  # the photo becomes a few dozen patches: a 4 x 4-ish merged grid


def _hf_qwen2_vl() -> transformers.Qwen2VLForConditionalGeneration:
    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=text_config(), **TOKENS)
    return widen(transformers.Qwen2VLForConditionalGeneration(cfg).eval(), biases=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = _hf_qwen2_vl()
    path = tmp_path_factory.mktemp("qwen2_vl")
    hf.save_pretrained(path)
    return hf, from_pretrained(path)


def _images(*sizes):
    return images(*sizes, max_pixels=MAX_PIXELS)


def test_vision_features_match(models):
    hf, ours = models
    pixels, grid, _ = _images(None, (300, 200))
    with torch.no_grad():
        want = hf.model.visual(pixels, grid_thw=grid).pooler_output
        got = ours.vision(pixels, grid)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


def test_rope_index_matches_get_rope_index(models):
    hf, ours = models
    _, grid, tokens = _images(None, (300, 200))
    a, b = prompt(tokens), prompt(tokens[:1], text_len=2, seed=2)
    ids = torch.zeros(2, len(a), dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, -len(b):], mask[1, -len(b):] = torch.tensor(b), 1
    rows = torch.cat([grid, grid[:1]])  # row 0 has both images, row 1 the first again
    want_pos, want_delta = hf.model.get_rope_index(ids, (ids == IMAGE).int(), rows, None, mask)
    got_pos, got_delta = mrope_positions(ids, rows, IMAGE, 2, mask)
    assert torch.equal(got_pos, want_pos) and torch.equal(got_delta, want_delta)


def test_logits_match(models):
    check_logits(*models, *_images(None))


def test_left_padded_batch_logits_match(models):
    check_left_padded_logits(*models, *_images(None, (300, 200)))


def test_greedy_generation_matches(models):
    check_greedy_generation(*models, *_images(None))


def test_greedy_batch_matches_single_prompts(models):
    """A left-padded batch continues each row from its own M-RoPE offset (the cache's rope_deltas)."""
    _, ours = models
    pixels, grid, tokens = _images(None, (300, 200))
    a, b = prompt(tokens[:1], text_len=9), prompt(tokens[1:], seed=3)
    cfg = GenerationConfig(max_new_tokens=8)
    batch = generate(ours, [a, b], cfg, prefill_inputs={"pixel_values": pixels, "image_grid_thw": grid}).token_ids
    split = tokens[0] * 4  # patch rows of the first image
    alone = [generate(ours, [p], cfg, prefill_inputs={"pixel_values": x, "image_grid_thw": g}).token_ids[0]
             for p, x, g in ((a, pixels[:split], grid[:1]), (b, pixels[split:], grid[1:]))]
    assert batch == alone


def test_save_round_trip(models, tmp_path):
    hf, ours = models
    save_pretrained(ours, tmp_path)
    back = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixels, grid, tokens = _images(None)
    ids = torch.tensor([prompt(tokens)])
    with torch.no_grad():
        want = ours(ids, pixel_values=pixels, image_grid_thw=grid).logits
        got = back(**hf_inputs(ids), pixel_values=pixels, image_grid_thw=grid).logits
    assert (got - want).abs().max().item() <= TOL
    assert QWEN2_VL.config_from_hf(read_config(tmp_path)) == ours.cfg
    assert isinstance(from_pretrained(tmp_path), Qwen2VL)


def test_placeholder_count_mismatch_raises(models):
    _, ours = models
    pixels, grid, tokens = _images(None)
    ids = torch.tensor([prompt([tokens[0] - 1])])
    with pytest.raises(ValueError, match="placeholder"):
        ours(ids, pixel_values=pixels, image_grid_thw=grid)
    with pytest.raises(ValueError, match="image_grid_thw"):
        ours(torch.tensor([prompt(tokens)]), pixel_values=pixels)


def test_reads_flat_transformers4_config():
    """Qwen2-VL-2B-Instruct's own config.json layout: LM keys at the top level, rope_scaling type
    'mrope', the vision input channels as in_chans, vision hidden_size = the LM width."""
    flat = {"model_type": "qwen2_vl", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
            "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "max_position_embeddings": 32768, "tie_word_embeddings": True, "image_token_id": 151655,
            "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                              "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
                              "temporal_patch_size": 2}}
    cfg = QWEN2_VL.config_from_hf(flat)
    assert (cfg.lm.hidden_size, cfg.lm.num_layers, cfg.lm.num_kv_heads, cfg.lm.head_dim) == (1536, 28, 2, 128)
    assert cfg.lm.rope_theta == 1e6 and cfg.lm.rope_scaling["mrope_section"] == [16, 24, 24]
    assert cfg.lm.tie_word_embeddings and cfg.lm.qkv_bias and not cfg.lm.o_bias
    assert (cfg.vision.out_hidden_size, cfg.vision.in_channels, cfg.vision.hidden_act) == (1536, 3, "quick_gelu")
