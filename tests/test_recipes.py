"""Training recipes (train/recipes.py): every preset has its stages, every stage fits its model's parameters,
and the frozen / trained groups and learning rates are the ones the papers state (docs/references.md; written
here from the papers, not read back from the code).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_recipes.py
"""

from __future__ import annotations

import pytest
import torch

from vlmkit.presets import PRESETS, PUBLISHED, build_model, get_preset
from vlmkit.train.recipes import describe_recipe, recipe
from vlmkit.train.stages import module_groups


def _trained(stage) -> set[str]:
    return {g for g, lr in stage.lrs.items() if lr > 0}


def _frozen(stage) -> set[str]:
    return {g for g, lr in stage.lrs.items() if lr == 0}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_a_recipe_that_fits_its_model(name):
    stages = recipe(name)
    assert stages and len({s.name for s in stages}) == len(stages)
    small = f"{name}-small" if name in PUBLISHED else name  # the same parts as the published size, built fast
    with torch.device("meta"):
        model = build_model(get_preset(small))
    for stage in stages:
        groups = module_groups(model, stage)  # raises if a group is missing or a parameter is unclaimed
        assert sum(len(params) for params in groups.values()) == len(list(model.parameters()))
        assert stage.description


def test_small_twins_train_like_their_published_preset():
    for name in PUBLISHED:
        assert recipe(f"{name}-small") == recipe(name)


def test_unknown_preset_raises_listing_the_recipes():
    with pytest.raises(ValueError, match="no training recipe for preset 'llava-2'; recipes exist for llava-1.5"):
        recipe("llava-2")


def test_llava_align_then_sft():
    # LLaVA, sec. 4.2 / 5: stage 1 encoder + LLM frozen, projector at 2e-3;
    # stage 2 encoder frozen, projector + LLM at 2e-5.
    align, sft = recipe("llava-1.5")
    assert align.lrs == {"vision": 0.0, "projector": 2e-3, "lm": 0.0}
    assert sft.lrs == {"vision": 0.0, "projector": 2e-5, "lm": 2e-5}
    assert recipe("llava-next") == [align, sft]


def test_vary_stages():
    # Vary, sec. 4.2: Vary-tiny trains everything (AdamW, cosine, lr 5e-5); Vary-base freezes both vision networks
    # and trains the input embeddings + LLM, pretraining at 5e-5 and SFT at 1e-5.
    (tiny,) = recipe("vary-tiny")
    assert _frozen(tiny) == set() and set(tiny.lrs.values()) == {5e-5}
    pretrain, sft = recipe("vary-base")
    assert pretrain.lrs == {"vision": 0.0, "projector": 5e-5, "lm": 5e-5}
    assert sft.lrs == {"vision": 0.0, "projector": 1e-5, "lm": 1e-5}


def test_qwen_vl_three_stages():
    # Qwen-VL, sec. 3: 1. LLM frozen, ViT + adapter trained, peak lr 2e-4; 2. everything trained;
    # 3. ViT frozen, LLM + adapter trained; AdamW, weight decay 0.05, gradient clip 1.0 throughout.
    pretrain, multitask, sft = recipe("qwen-vl")
    assert _frozen(pretrain) == {"lm"} and pretrain.lrs["vision"] == pretrain.lrs["projector"] == 2e-4
    assert _frozen(multitask) == set()
    assert _frozen(sft) == {"vision"} and _trained(sft) == {"projector", "lm"}
    assert all(s.weight_decay == 0.05 and s.grad_clip == 1.0 for s in (pretrain, multitask, sft))


def test_qwen2_vl_stages():
    # Qwen2-VL: ViT first (LLM frozen), then everything, then the LLM alone with the ViT locked.
    for name in ("qwen2-vl", "qwen2.5-vl"):
        first, second, third = recipe(name)
        assert (_trained(first), _frozen(first)) == ({"vision"}, {"lm"})
        assert _frozen(second) == set() and _trained(second) == {"vision", "lm"}
        assert (_trained(third), _frozen(third)) == ({"lm"}, {"vision"})


def test_deepseek_vl2_minicpm_phi_stages():
    # DeepSeek-VL2: adaptor warm-up with the LLM frozen, then pretraining and SFT with everything unlocked.
    alignment, pretrain, sft = recipe("deepseek-vl2")
    assert "projector" in _trained(alignment) and _frozen(alignment) == {"lm"}
    assert _frozen(pretrain) == _frozen(sft) == set()
    # MiniCPM-V: three pretraining steps with the LLM frozen, the resampler first; SFT unlocks everything.
    *pretraining, last = recipe("minicpm-v")
    assert len(pretraining) == 3 and all("lm" in _frozen(s) for s in pretraining)
    assert _trained(pretraining[0]) == {"projector"} and _frozen(last) == set()
    # Phi-3.5-V (Phi-3 report, sec. 7.1): pre-training, then SFT (DPO is not a stage of the loop).
    assert [s.name for s in recipe("phi-3.5-v")] == ["pretrain", "sft"]


def test_describe_recipe_rows_for_the_cli():
    rows = describe_recipe("vary-base-small")
    assert [r["name"] for r in rows] == ["pretrain", "sft"]
    assert rows[0]["lrs"] == {"vision": 0.0, "projector": 5e-5, "lm": 5e-5} and rows[0]["description"]
