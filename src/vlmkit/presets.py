"""Named model configurations. A preset is data: a function returning a VLMConfig.

    >>> get_preset("llava-1.5-7b").vision.num_patches
    576
    >>> sorted(PRESETS)[:2]
    ['bench-tiny', 'llava-1.5-7b']
"""

from __future__ import annotations

from typing import Callable

from vlmkit.config import LMConfig, ProjectorConfig, VisionConfig, VLMConfig


def llava_15_7b() -> VLMConfig:
    """LLaVA-1.5-7B (seed 004): CLIP ViT-L/14-336, layer -2 without CLS (576 tokens), mlp2x_gelu, Vicuna-7B."""
    vision = VisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                          num_layers=24, num_heads=16, select_layer=-2, select_feature="patch")
    lm = LMConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                  rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return VLMConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu", 1024, 4096), lm=lm,
                     image_token_id=32000)


def tiny_random(vocab_size: int = 128, image_token_id: int | None = None) -> VLMConfig:
    """A LLaVA-shaped model of about 200k parameters for smoke runs and protocol tests.
    The image placeholder is the last vocabulary id unless image_token_id says otherwise."""
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, select_layer=-2, select_feature="patch")
    lm = LMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=512)
    return VLMConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu", 64, 64), lm=lm,
                     image_token_id=vocab_size - 1 if image_token_id is None else image_token_id)


def bench_tiny() -> VLMConfig:
    """The benchmark model of bench/: ViT 96 px, patch 8, 192 wide, 4 layers; LM 256 wide, 4 layers."""
    vision = VisionConfig(image_size=96, patch_size=8, hidden_size=192, intermediate_size=768, num_layers=4,
                          num_heads=3, select_layer=-2, select_feature="patch")
    lm = LMConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=1024)
    return VLMConfig(vision=vision, projector=ProjectorConfig("mlp2x_gelu", 192, 256), lm=lm,
                     image_token_id=4095)


PRESETS: dict[str, Callable[[], VLMConfig]] = {
    "llava-1.5-7b": llava_15_7b,
    "tiny-random": tiny_random,
    "bench-tiny": bench_tiny,
}


def get_preset(name: str) -> VLMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
