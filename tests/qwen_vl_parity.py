"""What the Qwen2-VL and Qwen2.5-VL parity tests (test_qwen2_vl_parity.py, test_qwen2_5_vl_parity.py,
test_qwen2_vl_video.py) share: the tiny transformers models' token ids and LM sizes, the widened random init,
grace_hopper planned by plan_dynamic, the random prompts around its image placeholders, and the checks of
logits (one prompt, a left-padded batch) and 20 greedy tokens against transformers."""

from __future__ import annotations

import matplotlib.cbook
import torch
import transformers
from PIL import Image

from vlmkit.generate import GenerationConfig, generate
from vlmkit.schemes.dynamic import plan_dynamic

VOCAB = 300
IMAGE, VIDEO, START, END = 290, 291, 292, 293
TOKENS = {"image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": START, "vision_end_token_id": END}
TOL = 1e-4


def text_config() -> dict:
    """The tiny Qwen2 LM with M-RoPE sections 2 + 3 + 3 (head_dim 16), no BOS or EOS."""
    return {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": None, "eos_token_id": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}


def widen(model: transformers.PreTrainedModel, biases: bool = True) -> transformers.PreTrainedModel:
    """model with its matrices redrawn at std 0.15 (and, with biases, every 1-D tensor but the all-ones norm
    weights at std 0.05): the default init (std 0.02) leaves near-ties in the logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif biases and not torch.all(p == 1):
                p.normal_(0, 0.05)
    return model.eval()


def photo(size: tuple[int, int] | None = None) -> Image.Image:
    """matplotlib's grace_hopper.jpg (512 x 600), resized to size if given."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    return image.resize(size) if size else image


def images(*sizes, max_pixels: int):
    """(pixel_values, image_grid_thw, tokens per image) of grace_hopper at each size, by plan_dynamic."""
    plans = [plan_dynamic(photo(s), max_pixels=max_pixels) for s in sizes]
    pixels = torch.cat([p.pixel_values for p in plans])
    grid = torch.tensor([p.extra["image_grid_thw"] for p in plans])
    return pixels, grid, [p.num_tokens for p in plans]


def prompt(tokens: list[int], text_len: int = 6, seed: int = 1) -> list[int]:
    """Random text ids with an image of each token count, wrapped in START ... END."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 280, (3,), generator=g).tolist()
    for n in tokens:
        ids += [START] + [IMAGE] * n + [END] + torch.randint(3, 280, (2,), generator=g).tolist()
    return ids + torch.randint(3, 280, (text_len,), generator=g).tolist()


def hf_inputs(ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """transformers' text inputs for ids: mm_token_type_ids marks the image placeholders."""
    inputs = {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE).int()}
    if mask is not None:
        inputs["attention_mask"] = mask
    return inputs


def check_logits(hf, ours, pixels: torch.Tensor, grid: torch.Tensor, tokens: list[int]) -> None:
    """One prompt with the images: logits within TOL of transformers'."""
    ids = torch.tensor([prompt(tokens)])
    with torch.no_grad():
        want = hf(**hf_inputs(ids), pixel_values=pixels, image_grid_thw=grid).logits
        got = ours(ids, pixel_values=pixels, image_grid_thw=grid).logits
    assert (got - want).abs().max().item() <= TOL


def check_left_padded_logits(hf, ours, pixels: torch.Tensor, grid: torch.Tensor, tokens: list[int]) -> None:
    """A batch of two prompts, the first image in one and the second in the other, left-padded: the real
    positions' logits within TOL of transformers'."""
    a, b = prompt(tokens[:1], text_len=9), prompt(tokens[1:], seed=3)
    T = max(len(a), len(b))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate((a, b)):
        ids[row, T - len(p):], mask[row, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        want = hf(**hf_inputs(ids, mask), pixel_values=pixels, image_grid_thw=grid).logits
        got = ours(ids, pixel_values=pixels, image_grid_thw=grid, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= TOL


def check_greedy_generation(hf, ours, pixels: torch.Tensor, grid: torch.Tensor, tokens: list[int]) -> None:
    """20 greedy tokens of vlmkit.generate equal transformers' generate's (and are not one repeated token)."""
    ids = torch.tensor([prompt(tokens)])
    want = hf.generate(**hf_inputs(ids), pixel_values=pixels, image_grid_thw=grid, max_new_tokens=20,
                       do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    got = generate(ours, ids, GenerationConfig(max_new_tokens=20),
                   prefill_inputs={"pixel_values": pixels, "image_grid_thw": grid}).token_ids[0]
    assert len(want) == 20
    assert len(set(want)) > 1  # the check means something only if the output is not one repeated token
    assert got == want
