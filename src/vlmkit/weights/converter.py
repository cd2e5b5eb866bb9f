"""The Converter record: how one model_type (a model family's checkpoint layout) maps to a vlmkit module and back;
Joined, the fused tensor (qkv, gate_up) a converter hands over unmade."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from vlmkit.weights.safetensors_io import read_state_dict, write_dir


class Joined:
    """A tensor made only when it is needed (resolve): its parts concatenated along dim 0, or with stack=True
    stacked along a new dim 0, as torch.cat / torch.stack would make it (dtypes promoted alike). A part may
    itself be a Joined. shape and dtype are known up front, which is all the shape checks read.

    state_from_hf returns fused tensors (q|k|v, gate|up, stacked experts) in this form, so that loading module
    by module (weights/materialize.py from_state) makes each when its module is reached and lets go of it with
    the layer, instead of holding every layer's fused copy before the first is used (for a 7B model, 9 GB in
    bf16 beside the memory-mapped checkpoint)."""

    def __init__(self, parts: Sequence[torch.Tensor | Joined], stack: bool = False) -> None:
        if not parts:
            raise ValueError("Joined needs at least one part")
        shapes = [tuple(part.shape) for part in parts]
        if stack and any(shape != shapes[0] for shape in shapes):
            raise ValueError(f"cannot stack tensors of different shapes {shapes[:4]}")
        if not stack and any(len(shape) == 0 or shape[1:] != shapes[0][1:] for shape in shapes):
            raise ValueError(f"cannot concatenate tensors of shapes {shapes[:4]} along dim 0")
        self.parts, self.stack = list(parts), stack
        rows = len(parts) if stack else sum(shape[0] for shape in shapes)
        self.shape = torch.Size((rows, *(shapes[0] if stack else shapes[0][1:])))
        self.dtype: torch.dtype = reduce(torch.promote_types, (part.dtype for part in parts))
        self.device: torch.device = parts[0].device

    def tensor(self) -> torch.Tensor:
        """The joined tensor, made now (each call makes a new one)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self._write(out)
        return out

    def _write(self, out: torch.Tensor) -> None:
        start = 0
        for part in self.parts:
            rows = 1 if self.stack else part.shape[0]
            piece = out[start] if self.stack else out[start:start + rows]
            if isinstance(part, Joined):
                part._write(piece)  # straight into its place: no copy of the part on its own
            else:
                piece.copy_(part)
            start += rows


def resolve(value: torch.Tensor | Joined) -> torch.Tensor:
    """The tensor a state dict entry stands for: a Joined made now, a tensor as it is."""
    return value.tensor() if isinstance(value, Joined) else value


StateDict = dict[str, torch.Tensor | Joined]  # a converter's tensors; resolve() gives each as a tensor


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
