"""The LLaVA-style VLM: vision tower(s) -> projector -> feature layout -> one masked scatter -> language model.

    image --scheme.plan--> ImagePlan (views, token count) --scheme.inputs--> forward tensors
    forward tensors --scheme.encode (tower, projector, layout)--> each image's (T_i, C) rows
    input_ids (B, T) with T_i placeholder ids per image --embed, scatter_rows--> (B, T, C)
    --> language model --> logits (B, T, V)

VLMConfig names the image scheme (pad, anyres, hd, tiles, slices, dual, sam, or any registered scheme
whose model_class is "VLM"); the scheme module (vlmkit.schemes) holds everything that differs between
them: its config rules, plan, forward inputs, encoder, layout and learned vectors. This class only builds
the parts the config asks for (vision tower, projector, LM, the SAM tower and its projector when set, the
scheme's vectors) and runs ImageModel's forward: the count of placeholders and rows is checked where they
meet (models/image_model.scatter_rows), and forward also takes already-encoded rows (`image_embeds`,
what `encode_images` returns) instead of the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vlmkit.config import LMConfig, ProjectorConfig, SamConfig, Serializable, VisionConfig, require
from vlmkit.models.image_model import ImageModel
from vlmkit.models.lm import CausalLM
from vlmkit.models.projectors import build_projector
from vlmkit.models.sam import SamEncoder
from vlmkit.models.vit import VisionTower
from vlmkit.plugins import load_plugins
from vlmkit.schemes import SCHEMES
from vlmkit.schemes.base import Scheme, one_of

# VLMConfig's fields that only some schemes read, with their unset value (the schemes list theirs in
# Scheme.config_fields).
SCHEME_FIELDS = {"grid_pinpoints": (), "max_crops": None, "vision_high": None, "projector_high": None,
                 "slice_size": None}


@dataclass
class VLMConfig(Serializable):
    """A vision-language model: vision tower -> projector -> language model, under an image scheme.
    `vision` is None exactly for image_scheme='sam', whose only tower is vision_high."""

    vision: VisionConfig | None = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    image_token_id: int = 32000  # placeholder id in input_ids that image features replace
    # How an image becomes views and tokens: a scheme of vlmkit.schemes run by this glue (model_class "VLM"),
    # e.g. "pad" (LLaVA-1.5), "anyres" (LLaVA-NeXT), "hd" (Phi-3.5-V), "tiles" (DeepSeek-VL2), "slices"
    # (MiniCPM-V), "dual" (Vary-base), "sam" (Vary-tiny); each scheme's module says what it needs below.
    image_scheme: str = "pad"
    # anyres: candidate canvases as (height, width), multiples of vision.image_size; () otherwise.
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # hd: N of HD-N (Phi-3.5-vision: 16 for one image, 4 for many); tiles: most local tiles m*n
    # (DeepSeek-VL2: 9); slices: max_slices (MiniCPM-V: 9). None = that default.
    max_crops: int | None = None
    # slices: the side a slice is sized to (MiniCPM-V's scale_resolution, 448), when it is not vision.image_size
    # (MiniCPM-V 2.6's tower keeps a 980-px, 70 x 70 position table). None = vision.image_size.
    slice_size: int | None = None
    # dual: the SAM tower (downsample="vary") beside CLIP and its own projector, each image's rows being
    # cat([projector(CLIP tokens), projector_high(SAM tokens)], dim=-1), so projector.out_dim +
    # projector_high.out_dim == lm.hidden_size (Vary: 1024 + 1024); sam: the SAM tower alone, no projector_high.
    vision_high: SamConfig | None = None
    projector_high: ProjectorConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.projector, dict):
            self.projector = ProjectorConfig.from_dict(self.projector)
        if isinstance(self.lm, dict):
            self.lm = LMConfig.from_dict(self.lm)
        if isinstance(self.vision_high, dict):
            self.vision_high = SamConfig.from_dict(self.vision_high)
        if isinstance(self.projector_high, dict):
            self.projector_high = ProjectorConfig.from_dict(self.projector_high)
        self.grid_pinpoints = tuple(tuple(p) for p in self.grid_pinpoints)  # type: ignore[misc]
        scheme = self.scheme
        for name, unset in SCHEME_FIELDS.items():
            if getattr(self, name) != unset and name not in scheme.config_fields:
                owners = [s.name for s in SCHEMES.values() if name in s.config_fields]
                verb = "are" if name == "grid_pinpoints" else "is"
                raise ValueError(f"{name} {verb} only used by image_scheme{one_of(owners)}; remove {name} or set "
                                 f"image_scheme to a scheme that reads it (not {self.image_scheme!r})")
        scheme.check_config(self)
        high = self.projector_high.out_dim if self.projector_high is not None else 0
        require(self.projector.out_dim + high == self.lm.hidden_size,
                f"projector.out_dim {self.projector.out_dim}" + (f" + projector_high.out_dim {high}" if high else "")
                + f" != lm.hidden_size {self.lm.hidden_size}")
        require(0 <= self.image_token_id < self.lm.vocab_size,
                f"image_token_id {self.image_token_id} is outside the LM vocabulary (size {self.lm.vocab_size})")

    @property
    def scheme(self) -> Scheme:
        """The image scheme this config names; ValueError unless it is one the VLM glue runs."""
        if self.image_scheme not in SCHEMES:
            load_plugins()
        own = [name for name, s in SCHEMES.items() if s.model_class == "VLM"]
        if self.image_scheme not in own:
            runner = SCHEMES[self.image_scheme].model_class if self.image_scheme in SCHEMES else None
            where = f" (it runs in {runner}, with that model's own config)" if runner else ""
            raise ValueError(f"image_scheme {self.image_scheme!r} unknown{where}; valid: {', '.join(own)}")
        return SCHEMES[self.image_scheme]


class VLM(ImageModel):
    """A LLaVA-style vision-language model built from a VLMConfig; its scheme encodes the images."""

    config_class = VLMConfig

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__(cfg)
        self.vision = VisionTower(cfg.vision) if cfg.vision is not None else None  # None: sam (Vary-tiny)
        p = cfg.projector
        self.projector = build_projector(p.type, p.in_dim, p.out_dim, p.bias)
        self.lm = CausalLM(cfg.lm)
        if cfg.vision_high is not None:  # Vary's SAM branch: beside CLIP (dual) or alone (sam)
            self.vision_high = SamEncoder(cfg.vision_high)
        if cfg.projector_high is not None:  # dual: the SAM branch's own projector
            q = cfg.projector_high
            self.projector_high = build_projector(q.type, q.in_dim, q.out_dim, q.bias)
        for name, width in self.scheme.vectors(cfg).items():  # e.g. LLaVA-NeXT's image_newline
            self.register_parameter(name, nn.Parameter(torch.randn(width) / math.sqrt(width)))  # (width,)

    def tower_features(self, views: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(V, 3, H, W) views -> (V, P, Dv) vision-tower features, computed in the projector's dtype."""
        dtype = next(self.projector.parameters()).dtype
        return self.vision.features(views.to(dtype), interpolate_pos_encoding=interpolate_pos_encoding)

    def project(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, S, S) views -> (V, P', C) LM-width features: the tower, then the projector."""
        return self.projector(self.tower_features(views))  # (V, P', C)
