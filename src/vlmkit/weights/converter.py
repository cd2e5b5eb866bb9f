"""The Converter record: how one transformers model_type maps to a vlmkit module and back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Converter:
    """Everything needed to load and save one transformers model_type.

    config_from_hf: transformers config.json dict -> vlmkit config
    build:          vlmkit config -> nn.Module with vlmkit parameter names
    state_from_hf:  (transformers state dict, vlmkit config) -> vlmkit state dict
    config_to_hf:   vlmkit config -> transformers config.json dict (with model_type, architectures)
    state_to_hf:    (vlmkit state dict, vlmkit config) -> transformers state dict
    """

    config_from_hf: Callable[[dict], Any]
    build: Callable[[Any], nn.Module]
    state_from_hf: Callable[[StateDict, Any], StateDict]
    config_to_hf: Callable[[Any], dict]
    state_to_hf: Callable[[StateDict, Any], StateDict]
