"""Read and write transformers-format directories: config.json + safetensors (sharded or not).

Only safetensors is deserialized here: a directory holding nothing but
pytorch_model.bin (a pickle) is refused with a message saying how to convert it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmkit.files import remove_temporaries, write_atomically, write_text_atomically

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(path: str | Path) -> dict:
    """Parse path/config.json, with errors that name the file."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a model directory needs config.json beside its safetensors")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a directory's model.safetensors or of the shards its index lists."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(path / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{index} lists tensors no shard holds: {missing[:5]}")
        return state
    if (path / SINGLE_FILE).is_file():
        return load_file(path / SINGLE_FILE)
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return load_file(files[0])
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ValueError(f"{path} holds only pickle checkpoints (.bin/.pt), which vlmkit never loads; "
                         "convert them to safetensors with transformers' save_pretrained(safe_serialization=True)")
    raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or single *.safetensors file in {path}")


def shard_tensors(state: dict[str, torch.Tensor], max_shard_bytes: int = 2 * 1024**3
                  ) -> tuple[dict[str, Callable[[Path], None]], dict | None]:
    """The safetensors files that hold state, split into shards of at most max_shard_bytes: {file name: a
    function writing that file to the path it is given}, and the index transformers reads (None for one file)."""
    # safetensors refuses shared storage (tied weights): store contiguous copies.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(1, len(shards) + 1)]
    writers = {name: partial(save_file, shard, metadata={"format": "pt"}) for name, shard in zip(names, shards)}
    if len(shards) == 1:
        return writers, None
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
    return writers, {"metadata": {"total_size": total}, "weight_map": weight_map}


def write_dir(path: str | Path, config: dict, state: dict[str, torch.Tensor],
              max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write the tensors, split into shards of at most max_shard_bytes with an index, and config.json last,
    each file atomically (vlmkit.files), after deleting the temporaries an interrupted save left there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path)
    writers, index = shard_tensors(state, max_shard_bytes)
    for name, save in writers.items():
        write_atomically(path / name, save)
    if index is not None:
        write_text_atomically(path / INDEX_FILE, json.dumps(index, indent=2))
    write_text_atomically(path / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
