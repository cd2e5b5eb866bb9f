"""Projectors: the registry, shapes, and the 2x2 merge against the element order of Phi-3.5-vision's
`reshape_hd_patches_2x2merge` (image_embedding_phi3_v.py on the Hugging Face Hub; docs/references.md,
Phi-3.5-vision), written out block by block as the oracle."""

import pytest
import torch

from vlmkit.config import ProjectorConfig
from vlmkit.schemes.pad import pad_token_count
from vlmkit.models.projectors import build_projector, merge_2x2, parse_projector_type


def test_registry_rejects_unknown_names_and_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown projector type 'qformer'.*linear.*mlp\{N\}x_gelu"):
        parse_projector_type("qformer")
    with pytest.raises(ValueError, match="unknown projector type"):
        ProjectorConfig(type="mlp0x_gelu")
    with pytest.raises(ValueError, match="only a 2x2 merge"):
        parse_projector_type("merge3x3_mlp2x_gelu")


@pytest.mark.parametrize("name, linears", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3),
                                           ("merge2x2_mlp2x_gelu", 2)])
def test_layer_structure(name, linears):
    spec = parse_projector_type(name)
    proj = build_projector(name, 16 * spec.merge**2, 24)
    kinds = [type(m).__name__ for m in proj.mlp]
    assert kinds.count("Linear") == linears
    assert kinds.count("GELU") == linears - 1


def test_mlp2x_gelu_formula():
    torch.manual_seed(0)
    proj = build_projector("mlp2x_gelu", 8, 12)
    x = torch.randn(2, 5, 8)
    l1, l2 = proj.mlp[0], proj.mlp[2]
    expected = torch.nn.functional.gelu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(proj(x), expected)


def test_merge_2x2_matches_block_by_block_oracle():
    torch.manual_seed(0)
    B, side, D = 2, 6, 3
    x = torch.randn(B, side * side, D)
    grid = x.view(B, side, side, D)
    expected = torch.stack([
        torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1],
                   grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], dim=-1)
        for i in range(side // 2) for j in range(side // 2)], dim=1)
    assert torch.equal(merge_2x2(x), expected)


def test_merge_projector_token_count():
    proj = build_projector("merge2x2_mlp2x_gelu", 4 * 16, 32)
    out = proj(torch.randn(1, 24 * 24, 16))
    assert out.shape == (1, 144, 32)  # Phi-3.5-V: 24x24 patches -> 12x12 tokens
    assert pad_token_count(336, 14, merge=parse_projector_type("merge2x2_mlp2x_gelu").merge) == 144
    assert pad_token_count(336, 14, merge=parse_projector_type("mlp2x_gelu").merge) == 576


def test_merge_rejects_odd_grid():
    with pytest.raises(ValueError, match="even square grid"):
        merge_2x2(torch.randn(1, 25, 4))


@pytest.mark.parametrize("projector", ["perceiver4q_1x32", "qwen_resampler4q"])
def test_resampler_projector_in_a_vlm_sets_the_placeholder_count(projector):
    from PIL import Image

    from vlmkit.config import LMConfig, VisionConfig
    from vlmkit.models.vlm import VLMConfig
    from vlmkit.models.vlm import VLM
    from vlmkit.schemes import image_inputs, plan_image

    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4)
    lm = LMConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4)
    cfg = VLMConfig(vision=vision, projector=ProjectorConfig(projector, 32, 64), lm=lm, image_token_id=49)
    torch.manual_seed(0)
    model = VLM(cfg).eval()
    plan = plan_image(cfg, Image.new("RGB", (40, 30), (200, 10, 10)))
    assert plan.num_tokens == 4  # the resampler's queries, not the 16 patches
    ids = torch.tensor([[1, 2] + [49] * 4 + [3]])
    with torch.no_grad():
        assert model(input_ids=ids, **image_inputs([plan])).logits.shape == (1, 7, 50)
        with pytest.raises(ValueError, match="5 image placeholder tokens"):
            model(input_ids=torch.tensor([[1] + [49] * 5]), **image_inputs([plan]))
