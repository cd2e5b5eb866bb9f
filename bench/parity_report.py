"""Print vlmkit's max |logits difference| against transformers for every supported model type.

    python bench/parity_report.py

Each model is a tiny random transformers model (fixed seed) saved to a temporary
directory and loaded with `vlmkit.weights.from_pretrained`; both run the same
random input in fp32. The tests (tests/test_*_parity.py) assert the same
comparisons with a 1e-4 bound; this script prints the numbers themselves.
"""

from __future__ import annotations

import tempfile

import torch
import transformers

from vlmkit.weights import from_pretrained

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


def cases() -> dict[str, transformers.PreTrainedModel]:
    return {
        "llama (GQA)": transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)),
        "mistral (window 8)": transformers.MistralForCausalLM(transformers.MistralConfig(**TEXT, sliding_window=8)),
        "qwen2": transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT)),
        "phi3": transformers.Phi3ForCausalLM(transformers.Phi3Config(**TEXT, pad_token_id=0, eos_token_id=1)),
        "clip_vision_model": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
        "siglip_vision_model": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),
        "llava": transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**VISION), text_config=transformers.LlamaConfig(**TEXT),
            image_token_index=100)),
    }


def max_diff(name: str, hf: torch.nn.Module, ours: torch.nn.Module) -> float:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        if "vision" in name:
            return (hf(pixel_values=pixels).last_hidden_state - ours(pixels).last_hidden_state).abs().max().item()
        ids = torch.randint(3, 90, (2, 24), generator=g)
        if name == "llava":
            ids = torch.cat([ids[:1, :4], torch.full((1, 16), 100), ids[:1, 4:]], dim=1)
            return (hf(input_ids=ids, pixel_values=pixels).logits
                    - ours(input_ids=ids, pixel_values=pixels).logits).abs().max().item()
        return (hf(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()


def main() -> None:
    torch.manual_seed(0)
    print(f"transformers {transformers.__version__}, fp32, max |difference| of logits (hidden states for towers)")
    for name, hf in cases().items():
        with tempfile.TemporaryDirectory() as tmp:
            hf.eval().save_pretrained(tmp)
            ours = from_pretrained(tmp)
        print(f"{name:<22}{max_diff(name, hf, ours):.3g}")


if __name__ == "__main__":
    main()
