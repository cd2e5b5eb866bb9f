"""Every `-small` preset trains through the common loop, saves, reloads and generates.

For each `-small` twin in presets.PRESETS (new presets are picked up automatically): four synthetic
shape questions from vlmkit.data.synth (one-word answers) on images of the preset's own input size,
30 optimizer steps of the last stage of its recipe (train/recipes.py) through train/loop.train, with
the stage's frozen groups kept frozen and its learning rates scaled to a 1e-3 peak so a random tiny
model moves in 30 steps; the loss must go down (mean of the last 5 steps < 0.8 x the mean of the
first 5; about 6.2 -> 3.6 for every preset) and the frozen groups must not change. Then vlmkit's
save_pretrained / from_pretrained round trip must give identical logits, and the reloaded model
greedily generates 3 tokens from an image prompt.
Batches of one example keep each step cheap. The presets whose SAM branch reads 1024 x 1024 images
(vary-tiny, vary-base, deepseek-vl) are marked slow: that branch's global attention over 4096 tokens
costs about 0.5 s forward (1 s with backward) per image at one thread, 15-30 s for 30 steps.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_presets_train.py --durations=0   (add -m slow for the
three SAM presets)
"""

from __future__ import annotations

import dataclasses
import string

import pytest
import torch
from PIL import Image

from vlmkit.data.labels import TrainingExample
from vlmkit.data.synth import generate_item
from vlmkit.generate import GenerationConfig, generate
from vlmkit.image.plan import ImagePlan
from vlmkit.schemes.dynamic import plan_dynamic
from vlmkit.weights import from_pretrained, save_pretrained
from vlmkit.models.lm import IGNORE_INDEX
from vlmkit.models.qwen2_vl import Qwen2VLConfig
from vlmkit.schemes import image_inputs, plan_image
from vlmkit.presets import PRESETS, build_model, get_preset
from vlmkit.text.tokenizer import CharTokenizer
from vlmkit.train.loop import ShuffledBatches, train
from vlmkit.train.recipes import recipe
from vlmkit.train.stages import Stage, module_groups

SMALL = [name for name in PRESETS if name.endswith("-small")]
SLOW_SAM_SIZE = 1024  # a SAM branch at 1024 px runs a 4096-token global attention layer: ~1 s a step at 1 thread
STEPS, PEAK_LR = 30, 1e-3
DYNAMIC_SIZE = (112, 112)  # Qwen2-VL has no fixed input size: 8 x 8 patches, 16 merged tokens
TOKENIZER = CharTokenizer(string.printable)  # 107 ids, inside every small preset's 512-token vocabulary


def _image_size(cfg) -> tuple[int, int]:
    """(width, height) the preset's tower reads: its ViT's size, else its SAM branch's (Vary-tiny)."""
    if isinstance(cfg, Qwen2VLConfig):
        return DYNAMIC_SIZE
    side = cfg.vision.image_size if cfg.vision is not None else cfg.vision_high.image_size
    return side, side


def _plan(cfg, image: Image.Image) -> ImagePlan:
    return plan_dynamic(image) if isinstance(cfg, Qwen2VLConfig) else plan_image(cfg, image)


def _image_run(cfg, plan: ImagePlan) -> list[int]:
    """The placeholder ids of one image; Qwen2-VL wraps them in <|vision_start|> ... <|vision_end|>."""
    run = [cfg.image_token_id] * plan.num_tokens
    if isinstance(cfg, Qwen2VLConfig):
        return [cfg.vision_start_token_id, *run, cfg.vision_end_token_id]
    return run


def _examples(cfg, count: int = 4) -> list[TrainingExample]:
    """Shape questions: [<s>] image run, "Q: question A:", then the labelled " answer</s>"."""
    out = []
    for i in range(count):
        item = generate_item("shapes", seed=0, index=i, image_size=_image_size(cfg))
        plan = _plan(cfg, item.image)
        prompt = [TOKENIZER.token_to_id("<s>"), *_image_run(cfg, plan), *TOKENIZER.encode(f"Q: {item.question} A:")]
        answer = TOKENIZER.encode(" " + item.answer) + [TOKENIZER.token_to_id("</s>")]
        out.append(TrainingExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, [plan]))
    return out


def _params(name: str) -> pytest.param:
    """The preset as a test case, marked slow when its SAM branch reads SLOW_SAM_SIZE images (Vary, DeepSeek-VL)."""
    high = getattr(get_preset(name), "vision_high", None)
    slow = high is not None and high.image_size >= SLOW_SAM_SIZE
    return pytest.param(name, marks=[pytest.mark.slow] if slow else [])


def _scaled(stage: Stage) -> Stage:
    """The stage's groups and frozen parts with its learning rates scaled to a PEAK_LR peak, 3 warmup steps."""
    scale = PEAK_LR / max(stage.lrs.values())
    return dataclasses.replace(stage, lrs={g: lr * scale for g, lr in stage.lrs.items()}, warmup_steps=3)


@pytest.mark.parametrize("name", [_params(name) for name in SMALL])
def test_small_preset_trains_saves_reloads_generates(name, tmp_path):
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg)
    stage = _scaled(recipe(name)[-1])
    frozen = {n: p.detach().clone() for g, params in module_groups(model, stage).items() if stage.lrs[g] == 0
              for n, p in params}
    examples = _examples(cfg)
    batches = ShuffledBatches(examples, batch_size=1, pad_id=0, seed=0)
    result = train(model, batches, stage, steps=STEPS, progress=False)

    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, f"{name}: loss did not go down ({first:.3f} -> {last:.3f}) under stage {stage.name}"
    state = model.state_dict()
    assert all(torch.equal(state[n], before) for n, before in frozen.items()), f"{name}: a frozen group moved"

    model.eval()
    save_pretrained(model, tmp_path)
    reloaded = from_pretrained(tmp_path)
    batch = next(iter(ShuffledBatches(examples, batch_size=2, pad_id=0)))
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits), f"{name}: reloaded logits differ"

    prompt = examples[0].input_ids[:-3]  # up to "A:", before the answer
    out = generate(reloaded, [prompt], GenerationConfig(max_new_tokens=3),
                   prefill_inputs=image_inputs(examples[0].plans))
    assert len(out.token_ids[0]) == 3 and all(0 <= t < cfg.lm.vocab_size for t in out.token_ids[0])
