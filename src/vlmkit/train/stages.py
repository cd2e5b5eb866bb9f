"""Training stages as data: which module groups train, at which learning rate (0 = frozen), and the
optimizer/schedule settings that go with them.

    stage = get_stage("align")                    # projector only, lr 2e-3 (LLaVA stage 1)
    stage = Stage("mine", {"vision": 0, "projector": 1e-3, "lm": 1e-4}, warmup_steps=50)
    stage = get_stage("lora")                     # LoRA adapters on the LM (train/lora.py), projector trained
    groups = module_groups(model, stage)          # {"projector": [(name, param), ...], ...}

A module group names top-level parts of the model. The VLM groups gather related parts so one stage
serves every architecture:
- `vision`:    `vision` (CLIP/SigLIP tower) and `vision_high` (Vary's SAM branch), whichever exist;
- `projector`: `projector`, `projector_high` and the learned layout vectors that live on the VLM
               itself (LLaVA-NeXT's `image_newline`, Phi-3.5-V's `sub_gn`/`glb_gn`, ...);
- `lm`:        the language model.
Any other key names one top-level submodule or parameter directly (e.g. a CTC head). Every parameter
of the model must fall in a group of the stage: an unclaimed parameter raises, so nothing is frozen
or trained by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from vlmkit.train.lora import LoraConfig

# group name -> the top-level attributes it gathers (those the model has)
GROUP_MEMBERS: dict[str, tuple[str, ...]] = {
    "vision": ("vision", "vision_high"),
    "projector": ("projector", "projector_high"),
    "lm": ("lm",),
}
# Parameters registered directly on the model (layout vectors) belong to this group.
DIRECT_PARAMETER_GROUP = "projector"


@dataclass(frozen=True)
class Stage:
    """One training stage.

    lrs:          peak learning rate per module group; 0 freezes the group (requires_grad False, not
                  in the optimizer)
    weight_decay: AdamW decay on 2-D+ weights of the trained groups (never on biases, norms, 1-D vectors)
    warmup_steps: linear warmup length; None = warmup_ratio * total steps
    min_lr_ratio: the cosine decays from lr to lr * min_lr_ratio
    grad_clip:    max global gradient norm (0 = no clipping)
    lora:         LoRA adapters (train/lora.py LoraConfig; `vlmkit train --lora`) or None. A group holding
                  adapters trains only them, at its lr, its own weights frozen; a group without adapters
                  trains in full or is frozen as its lr says (LLaVA's LoRA recipe: adapters on the LM, the
                  projector trained in full). A target in a frozen group (lr 0) is refused.
    """

    name: str
    lrs: dict[str, float]
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lora: LoraConfig | None = None
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.lrs:
            raise ValueError(f"stage {self.name!r} has no module groups; give lrs such as "
                             "{'vision': 0, 'projector': 2e-3, 'lm': 0}")
        bad = {k: v for k, v in self.lrs.items() if not v >= 0}
        if bad:
            raise ValueError(f"stage {self.name!r}: learning rates must be >= 0 (0 = frozen), got {bad}")
        if all(v == 0 for v in self.lrs.values()):
            raise ValueError(f"stage {self.name!r} freezes every group; give at least one a learning rate > 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"stage {self.name!r}: weight_decay and grad_clip must be >= 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"stage {self.name!r}: warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"stage {self.name!r}: warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")

    def warmup(self, total_steps: int) -> int:
        """Warmup length for a run of total_steps optimizer steps."""
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total_steps)


STAGES: dict[str, Stage] = {
    # LLaVA stage 1 (feature alignment): only the projector learns; lr 2e-3, no decay, 3% warmup.
    "align": Stage("align", {"vision": 0.0, "projector": 2e-3, "lm": 0.0},
                   description="encoder and LM frozen, projector trained (LLaVA stage 1)"),
    # LLaVA stage 2 (visual instruction tuning): projector + LM at 2e-5, the encoder stays frozen.
    "sft": Stage("sft", {"vision": 0.0, "projector": 2e-5, "lm": 2e-5},
                 description="encoder frozen, projector and LM trained (LLaVA stage 2)"),
    # Vary-tiny: every part trains (AdamW, cosine, lr 5e-5).
    "full": Stage("full", {"vision": 5e-5, "projector": 5e-5, "lm": 5e-5}, weight_decay=0.05,
                  description="everything trained (Vary-tiny)"),
    # LLaVA-1.5's LoRA fine-tuning (GitHub haotian-liu/LLaVA, scripts/v1_5/finetune_lora.sh): adapters r 128,
    # alpha 256 (dropout 0.05, llava/train/train.py's default) on the LM's linear layers but its head at lr 2e-4,
    # the projector trained in full at 2e-5 (--mm_projector_lr), the encoder frozen, no decay, 3% warmup, cosine.
    "lora": Stage("lora", {"vision": 0.0, "projector": 2e-5, "lm": 2e-4},
                  lora=LoraConfig(r=128, alpha=256.0, dropout=0.05, targets=("lm.attn", "lm.mlp")),
                  description="LoRA adapters on the LM, projector trained, encoder frozen (LLaVA-1.5 LoRA)"),
}


def get_stage(name: str) -> Stage:
    """The built-in stage called name; raises ValueError listing the valid names."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid: {', '.join(sorted(STAGES))} "
                         "(or build a Stage(...) of your own)")
    return STAGES[name]


def group_members(model: nn.Module, group: str) -> list[str]:
    """The top-level attribute names group gathers on this model ([] when it has none of them)."""
    children = {n for n, m in model.named_children() if m is not None}
    direct = set(model._parameters)
    if group in GROUP_MEMBERS:
        found = [m for m in GROUP_MEMBERS[group] if m in children]
        return found + (sorted(direct) if group == DIRECT_PARAMETER_GROUP else [])
    return [group] if group in children or group in direct else []


def available_groups(model: nn.Module) -> list[str]:
    """Group names this model can be trained by: the built-in groups it has, then its top-level parts."""
    top = [n for n, m in model.named_children() if m is not None] + list(model._parameters)
    return [g for g in GROUP_MEMBERS if group_members(model, g)] + top


def module_groups(model: nn.Module, stage: Stage) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of model (shared ones once) sorted into the stage's groups, as (full name, param).

    Raises ValueError when a group of the stage does not exist on the model, or when a parameter falls in
    no group (or in two)."""
    owner: dict[str, str] = {}
    for group in stage.lrs:
        members = group_members(model, group)
        if not members:
            raise ValueError(f"stage {stage.name!r} trains group {group!r}, which this model "
                             f"({type(model).__name__}) does not have; valid groups: "
                             f"{', '.join(available_groups(model))}")
        for member in members:
            if member in owner:
                raise ValueError(f"stage {stage.name!r}: {member!r} is in both groups {owner[member]!r} and "
                                 f"{group!r}; name each part once")
            owner[member] = group
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in stage.lrs}
    unclaimed = []
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        if top in owner:
            groups[owner[top]].append((name, param))
        else:
            unclaimed.append(name)
    if unclaimed:
        raise ValueError(f"stage {stage.name!r} says nothing about parameters {unclaimed[:5]}"
                         f"{' ...' if len(unclaimed) > 5 else ''}; add their group to its lrs "
                         f"(valid groups: {', '.join(available_groups(model))})")
    return groups
