"""The Converter record: how one model_type (a model family's checkpoint layout) maps to a vlmkit module and back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from vlmkit.weights.safetensors_io import read_state_dict, write_dir

StateDict = dict[str, torch.Tensor]


def read_files(path: Path, config: dict) -> StateDict:
    """A transformers-format directory's tensors (model.safetensors or the shards its index lists)."""
    return read_state_dict(path)


def read_json_config(path: Path, config: dict) -> dict:
    """config.json as it is: what a family whose checkpoints keep everything there reads."""
    return config


def write_files(path: Path, config: dict, state: StateDict, max_shard_bytes: int, tokenizer: Any = None) -> None:
    """When given, the tokenizer's files (Tokenizer.save_pretrained), then the tensors (sharded above
    max_shard_bytes) and config.json last (write_dir), so a folder with a config.json has its other files."""
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    write_dir(path, config, state, max_shard_bytes)


@dataclass(frozen=True)
class Converter:
    """Everything needed to load and save one model_type.

    config_from_hf: config.json dict -> vlmkit config
    build:          vlmkit config -> nn.Module with vlmkit parameter names (the model class)
    state_from_hf:  (checkpoint state dict, vlmkit config) -> vlmkit state dict
    config_to_hf:   vlmkit config -> config.json dict (with model_type, architectures)
    state_to_hf:    (vlmkit state dict, vlmkit config) -> checkpoint state dict
    natural:        whether save_pretrained picks this model_type for a model of class `build` with this
                    config when none is named (None: only when named, e.g. got_ocr2)
    read_config:    (directory, config.json dict) -> the dict config_from_hf reads: config.json with what
                    the family keeps in other files (phi3_v: preprocessor_config.json's num_crops;
                    deepseek_vl_v2: the `<image>` id from tokenizer.json)
    read_state:     (directory, config.json dict) -> the checkpoint's tensors
    write:          (directory, config.json dict, tensors, max_shard_bytes, tokenizer or None) -> the files
    """

    config_from_hf: Callable[[dict], Any]
    build: Callable[[Any], nn.Module]
    state_from_hf: Callable[[StateDict, Any], StateDict]
    config_to_hf: Callable[[Any], dict]
    state_to_hf: Callable[[StateDict, Any], StateDict]
    natural: Callable[[Any], bool] | None = None
    read_config: Callable[[Path, dict], dict] = read_json_config
    read_state: Callable[[Path, dict], StateDict] = read_files
    write: Callable[[Path, dict, StateDict, int, Any], None] = write_files
