"""Resampler projectors: the Q-Former against transformers' Blip2QFormerModel, Qwen-VL's resampler
against its `visual.py` forward written out with torch.nn.MultiheadAttention, the MAE sin-cos
table against the formula evaluated by hand, and the key-position resize."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2QFormerModel

from vlmkit.models.resampler import (PerceiverResampler, QwenResampler, build_perceiver, build_qwen_resampler,
                                     get_2d_sincos_pos_embed, load_qformer_state, resize_pos_embed)

VISION_WIDTH = 40


def _tiny_qformer(freq: int = 1) -> Blip2QFormerModel:
    cfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             cross_attention_frequency=freq, encoder_hidden_size=VISION_WIDTH)
    return Blip2QFormerModel(cfg).eval()


@pytest.mark.parametrize("freq", [1, 2])
def test_qformer_matches_transformers(freq):
    torch.manual_seed(0)
    ref = _tiny_qformer(freq)
    ours = PerceiverResampler(VISION_WIDTH, 48, num_queries=8, hidden_size=32, num_layers=2, num_heads=4,
                              intermediate_size=64, cross_attention_frequency=freq)
    load_qformer_state(ours, ref.state_dict())
    queries = torch.randn(2, 8, 32)  # (B, Q, H)
    image = torch.randn(2, 25, VISION_WIDTH)  # (B, N, Dv)
    with torch.no_grad():
        expected = ref(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        got = ours.qformer(queries, image)
    assert got.shape == (2, 8, 32)
    assert (got - expected).abs().max().item() <= 1e-4


def test_qformer_full_blip2_state_dict_gives_queries_and_projection(tmp_path):
    torch.manual_seed(0)
    qcfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                cross_attention_frequency=1)
    vcfg = dict(hidden_size=VISION_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                image_size=16, patch_size=8)
    tcfg = dict(model_type="opt", hidden_size=48, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=100, word_embed_proj_dim=48, max_position_embeddings=64)
    cfg = Blip2Config(vision_config=vcfg, qformer_config=qcfg, text_config=tcfg, num_query_tokens=8)
    Blip2ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    ref = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ours = PerceiverResampler(VISION_WIDTH, 48, num_queries=8, hidden_size=32, num_layers=2, num_heads=4,
                              intermediate_size=64, cross_attention_frequency=1)
    load_qformer_state(ours, ref.state_dict())
    image = torch.randn(2, 5, VISION_WIDTH)  # (B, N, Dv): the vision tower's output
    with torch.no_grad():
        q = ref.qformer(query_embeds=ref.query_tokens.expand(2, -1, -1),
                              encoder_hidden_states=image).last_hidden_state  # (B, Q, H)
        expected = ref.language_projection(q)  # (B, Q, C)
        got = ours(image)
    assert got.shape == (2, 8, 48)
    assert (got - expected).abs().max().item() <= 1e-4


def test_qformer_load_rejects_mismatched_layers():
    torch.manual_seed(0)
    ref = _tiny_qformer(1)
    three = PerceiverResampler(VISION_WIDTH, 48, 8, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                               cross_attention_frequency=1)
    with pytest.raises(ValueError, match="missing"):
        load_qformer_state(three, ref.state_dict())
    wide = PerceiverResampler(VISION_WIDTH, 48, 8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=64,
                              cross_attention_frequency=1)
    with pytest.raises(ValueError, match="does not fit"):
        load_qformer_state(wide, ref.state_dict())


def test_sincos_table_by_hand():
    table = get_2d_sincos_pos_embed(8, 3)  # D/4 = 2 frequencies: 1 and 10000^(-1/2) = 0.01
    assert table.shape == (9, 8)

    def row(i, j):  # grid row i, column j; column first, as MAE
        return [math.sin(j), math.sin(0.01 * j), math.cos(j), math.cos(0.01 * j),
                math.sin(i), math.sin(0.01 * i), math.cos(i), math.cos(0.01 * i)]

    for k, (i, j) in {0: (0, 0), 5: (1, 2), 7: (2, 1), 8: (2, 2)}.items():
        torch.testing.assert_close(table[k], torch.tensor(row(i, j)), atol=1e-6, rtol=0)
    wide = get_2d_sincos_pos_embed(16, 4)  # frequencies 10000^(-d/4), d = 0..3
    assert wide[6, 1].item() == pytest.approx(math.sin(2 * 10000 ** -0.25), abs=1e-6)  # k=6: row 1, col 2
    assert wide[6, 8 + 4 + 3].item() == pytest.approx(math.cos(1 * 10000 ** -0.75), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(6, 3)


def test_resize_pos_embed():
    table = get_2d_sincos_pos_embed(16, 32)  # (1024, 16) stored on a 32x32 grid
    assert resize_pos_embed(table, 1024) is table  # same grid: the stored table itself
    small = resize_pos_embed(table, 576)
    assert small.shape == (576, 16) and torch.isfinite(small).all()
    # a table that varies only along columns still does after the resize (rows and columns not swapped)
    cols_only = torch.arange(32.0).repeat(32)[:, None].expand(-1, 3)  # (1024, 3), value = column index
    resized = resize_pos_embed(cols_only, 576).view(24, 24, 3)
    torch.testing.assert_close(resized, resized[:1].expand(24, -1, -1))
    assert resized[0, 0, 0] < resized[0, 23, 0]
    constant = torch.full((1024, 4), 2.5)
    torch.testing.assert_close(resize_pos_embed(constant, 576), torch.full((576, 4), 2.5))
    with pytest.raises(ValueError, match="square grid"):
        resize_pos_embed(table, 500)


def _qwen_vl_oracle(m: QwenResampler, x: torch.Tensor) -> torch.Tensor:
    """Qwen-VL's Resampler.forward + ln_post + proj (visual.py), with torch.nn.MultiheadAttention."""
    mha = torch.nn.MultiheadAttention(m.out_dim, m.attn.num_heads)
    mha.load_state_dict(m.attn.state_dict())
    side = math.isqrt(x.shape[1])
    g = math.isqrt(m.num_queries)
    pos_k = F.interpolate(m.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(side, side),
                          mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
    kv = m.ln_kv(m.kv_proj(x)).permute(1, 0, 2)  # (N, B, C)
    q = m.ln_q(m.query)[:, None].repeat(1, x.shape[0], 1)  # (Q, B, C)
    out = mha(q + m.pos_embed[:, None], kv + pos_k[:, None], kv)[0].permute(1, 0, 2)  # (B, Q, C)
    return m.ln_post(out) @ m.proj


@pytest.mark.parametrize("patches", [1024, 576, 256])
def test_qwen_resampler_matches_qwen_vl_forward(patches):
    torch.manual_seed(0)
    m = QwenResampler(VISION_WIDTH, 64, num_queries=256, num_heads=4).eval()
    x = torch.randn(2, patches, VISION_WIDTH)  # (B, N, Dv)
    with torch.no_grad():
        got, expected = m(x), _qwen_vl_oracle(m, x)
    assert got.shape == (2, 256, 64)  # Qwen-VL: 1024 patches of 1664 -> 256 tokens of 4096
    assert (got - expected).abs().max().item() <= 1e-4


def test_qwen_resampler_rejects_bad_inputs():
    m = QwenResampler(VISION_WIDTH, 32, num_queries=16, num_heads=2)
    with pytest.raises(ValueError, match=r"\(batch, patches, 40\)"):
        m(torch.randn(2, 16, 32))
    with pytest.raises(ValueError, match=r"\(batch, patches, 40\)"):
        m(torch.randn(16, VISION_WIDTH))
    with pytest.raises(ValueError, match="square grid"):
        m(torch.randn(1, 15, VISION_WIDTH))
    with pytest.raises(ValueError, match="num_queries"):
        QwenResampler(VISION_WIDTH, 32, num_queries=60)
    with pytest.raises(ValueError, match="divisible"):
        QwenResampler(VISION_WIDTH, 32, num_queries=16, num_heads=3)
    p = PerceiverResampler(VISION_WIDTH, 32, 4, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    with pytest.raises(ValueError, match=r"\(batch, patches, 40\)"):
        p(torch.randn(1, 9, 16))


def test_registry_builders():
    qwen = build_qwen_resampler(SimpleNamespace(queries=256, depth=1, width=0), VISION_WIDTH, 64)
    assert qwen(torch.randn(1, 1024, VISION_WIDTH)).shape == (1, 256, 64)
    tiny = build_perceiver(SimpleNamespace(queries=64, depth=2, width=32), VISION_WIDTH, 48)
    assert len(tiny.layers) == 2 and tiny.layers[0].cross_attn is not None and tiny.layers[1].cross_attn is None
    assert tiny(torch.randn(1, 257, VISION_WIDTH)).shape == (1, 64, 48)  # XComposer: 257 -> 64 queries
    base = build_perceiver(SimpleNamespace(queries=64, depth=1, width=0), VISION_WIDTH, 48)
    assert len(base.layers) == 12 and base.query.shape == (64, 768)
