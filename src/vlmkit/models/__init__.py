"""vlmkit models: the language model, vision towers, projectors, and the models that take images.

Every model that takes images is an ImageModel (models/image_model.py); its image scheme lives in
vlmkit.schemes. Loading and saving checkpoints is vlmkit.weights; `vlmkit.models.from_pretrained` and
`vlmkit.models.save_pretrained` stay available as the entry points the design documents promise, resolved
from vlmkit.weights on first use so that importing the models never imports the layer above them.
"""

from __future__ import annotations

from typing import Any

_FROM_WEIGHTS = ("from_pretrained", "save_pretrained")


def __getattr__(name: str) -> Any:
    if name in _FROM_WEIGHTS:
        from vlmkit import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'vlmkit.models' has no attribute {name!r}")
