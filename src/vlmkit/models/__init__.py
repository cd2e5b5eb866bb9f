"""vlmkit models: language model, vision tower, projectors, VLM glue; and loading/saving."""

from vlmkit.weights.hf import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
