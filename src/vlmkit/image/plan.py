"""ImagePlan: what an image scheme decides for one image, the single source of its token count.

Every scheme of vlmkit.schemes returns one ImagePlan. The prompt builder puts
`num_tokens` placeholder ids for the image; the scheme's encoder lays out the features
from `grid`/`parts` and checks that it produced exactly `num_tokens` vectors, and the
model checks the placeholders against the rows (models/image_model.scatter_rows).
No code outside the scheme's module computes how many tokens an image costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmkit.image.load import ImageLoadError


class ImagePlanError(ImageLoadError):
    """An image that was read but that its scheme cannot plan within the bound on what planning allocates
    (vlmkit.schemes.base.check_work); the message says its size, the scheme, the estimate and to crop or resize.
    An ImageLoadError (and so a ValueError), so everything that reports an unreadable image reports it too."""


@dataclass
class ImagePlan:
    """One image's preprocessing result.

    scheme:        the name of the scheme that made it (vlmkit.schemes: "pad", "anyres", "hd", ...)
    pixel_values:  the tensors the vision tower(s) take for this image, e.g. (views, 3, S, S) for
                   tiling schemes or (patches, C * T * P * P) for Qwen2-VL's dynamic scheme
    original_size: (width, height) of the input image
    resized_size:  (width, height) the image was resized to before cutting into views
    grid:          (rows, cols) of the local tiles / crops / slices, or of the patch grid
    parts:         positions the MODEL fills, per named part in prompt order, e.g. {"base": 576,
                   "tiles": 2304, "newlines": 48} (features and learned newline/separator
                   embeddings); their sum is num_tokens, the placeholder count
    text_parts:    ordinary text tokens the chat template writes around the image, e.g.
                   {"<|vision_start|>": 1, "<|vision_end|>": 1}; counted in context_tokens only
    extra:         scheme-specific values the model side needs (e.g. {"image_grid_thw": (1, 16, 16)})
    """

    scheme: str
    pixel_values: torch.Tensor
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    grid: tuple[int, int]
    parts: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)
    text_parts: dict[str, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens for this image: the positions the model fills with image embeddings."""
        return sum(self.parts.values())

    @property
    def context_tokens(self) -> int:
        """Everything this image costs in the context: placeholders plus its text wrapper tokens."""
        return self.num_tokens + sum(self.text_parts.values())

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description (no tensors), for `vlmkit tokens --json` and logs."""
        return {"scheme": self.scheme, "original_size": list(self.original_size),
                "resized_size": list(self.resized_size), "grid": list(self.grid), "parts": dict(self.parts),
                "num_tokens": self.num_tokens, "text_parts": dict(self.text_parts),
                "context_tokens": self.context_tokens, "pixel_values_shape": list(self.pixel_values.shape),
                **{k: v for k, v in self.extra.items() if isinstance(v, (int, float, str, list, tuple))}}


MediaPlans = ImagePlan | Sequence[ImagePlan]  # an image's plan, or a video's plans (one per frame, or the clip's)
