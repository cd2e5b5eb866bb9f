"""vlmkit's own saved-model format: one format for every model vlmkit writes that transformers has no class for.

A saved folder holds

    config.json        {"model_type": "vlmkit" (the VLM) or a registered native type ("vlmkit-demo"),
                        "format_version": 2, "vlmkit_config": the config's to_dict(),
                        "tied": {parameter: the parameter it shares its tensor with},
                        "files": {file name: sha256 of its bytes}}
    model.safetensors  the module's own parameter names (shards with an index above max_shard_bytes),
                       each tied tensor once
    tokenizer.json     the tokenizer (and the other files its save_pretrained writes), when it was saved with the
                       model

Writing is atomic in the way that matters: config.json is first replaced by a stub that marks the save as
unfinished, every file is written under a temporary name, flushed and renamed into place (vlmkit.files), and
the full config.json (with the sha256 of every file) comes last. A folder whose save was interrupted is
refused as "holds no saved model", never loaded half-written; loading checks every file against its sha256,
so a truncated, edited or mismatched file is refused by name. A save first deletes the temporaries an
interrupted save left in the folder (a model-sized one for the weights). Any config round-trips exactly.

Folders of format 1 (written before the demo's folder and this format were one) load too: the VLM's
without sha256s, the demo's ("vlmkit-demo", its config under "demo_config") with them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn
from safetensors import SafetensorError

from vlmkit.files import remove_temporaries, write_atomically, write_text_atomically
from vlmkit.models.vlm import VLM, VLMConfig
from vlmkit.weights.converter import Converter, StateDict
from vlmkit.weights.safetensors_io import INDEX_FILE, SINGLE_FILE, read_state_dict, shard_tensors

MODEL_TYPE = "vlmkit"
FORMAT_VERSION = 2
CONFIG_FILE, TOKENIZER_FILE = "config.json", "tokenizer.json"
WEIGHTS_FILE = SINGLE_FILE
LEGACY_CONFIG_KEYS = ("vlmkit_config", "demo_config")  # where format 1 kept the config


def sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ties(state: StateDict) -> dict[str, str]:
    """{name: earlier name} for every tensor that shares its storage and layout with an earlier one."""
    seen: dict[tuple, str] = {}
    ties = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            ties[name] = seen[key]
        else:
            seen[key] = name
    return ties


def write_native(path: Path, config: dict, state: StateDict, max_shard_bytes: int, tokenizer: Any = None) -> None:
    """Write a native folder (module docstring): weights (tied tensors once), tokenizer, config.json last."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    remove_temporaries(folder)
    write_text_atomically(folder / CONFIG_FILE, json.dumps(
        {"model_type": config["model_type"], "format_version": FORMAT_VERSION, "files": None}) + "\n")
    ties = _ties(state)
    shards, index = shard_tensors({k: v for k, v in state.items() if k not in ties}, max_shard_bytes)
    for name, save in shards.items():
        write_atomically(folder / name, save)
    if index is not None:
        write_text_atomically(folder / INDEX_FILE, json.dumps(index, indent=2))
    tokenizer_files = tokenizer.save_pretrained(folder) if tokenizer is not None else []  # atomic file by file
    files = [*shards, *([INDEX_FILE] if index is not None else []), *tokenizer_files]
    full = {**config, "format_version": FORMAT_VERSION, "tied": ties,
            "files": {name: sha256(folder / name) for name in files}}
    write_text_atomically(folder / CONFIG_FILE, json.dumps(full, indent=1) + "\n")


def read_native(path: Path, config: dict) -> StateDict:
    """The tensors of a native folder after checking every file against its sha256, tied names restored."""
    folder = Path(path)
    redo = "save the model again (for a demo report folder: re-run `vlmkit demo --out DIR`)"
    hashes = config.get("files", {})
    if not isinstance(hashes, dict):
        raise ValueError(f"{folder / CONFIG_FILE} must list the sha256 of its files under 'files'; {redo}")
    for name, expected in hashes.items():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; {redo}")
        if sha256(folder / name) != expected:
            raise ValueError(f"{folder / name} does not match the sha256 config.json records for it: the file is "
                             f"truncated, edited or from another run; {redo}")
    try:
        state = read_state_dict(folder)
    except SafetensorError as e:
        raise ValueError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file ({e}); {redo}") from e
    ties = config.get("tied")
    if ties is None and "lm.lm_head.weight" not in state and "lm.embed.weight" in state:
        ties = {"lm.lm_head.weight": "lm.embed.weight"}  # format 1 left the tied LM head out
    for name, source in (ties or {}).items():
        state[name] = state[source]
    return state


def native_converter(model_type: str, config_from_dict: Callable[[dict], Any], build: Callable[[Any], nn.Module],
                     kind: str) -> Converter:
    """The Converter of a native model_type: config_from_dict rebuilds the config from its to_dict(), build the
    module; kind names the model in messages ("demo" for "holds no saved demo model")."""

    def config_from_hf(data: dict) -> Any:
        if data.get("files", ()) is None:
            raise FileNotFoundError(f"config.json marks an unfinished save: this folder holds no saved {kind} model "
                                    "(its save was interrupted); save it again (for a demo report folder: re-run "
                                    "`vlmkit demo --out DIR`)")
        key = next((k for k in LEGACY_CONFIG_KEYS if k in data), None)
        if key is None:
            raise ValueError(f"a model_type {model_type!r} config.json needs a 'vlmkit_config' entry")
        return config_from_dict(data[key])

    def config_to_hf(cfg: Any) -> dict:
        return {"model_type": model_type, "vlmkit_config": cfg.to_dict()}

    return Converter(config_from_hf=config_from_hf, build=build, state_from_hf=lambda state, cfg: dict(state),
                     config_to_hf=config_to_hf, state_to_hf=lambda state, cfg: dict(state),
                     natural=lambda cfg: True, read_state=read_native, write=write_native)


# The VLM in vlmkit's own format: any VLMConfig (hd, tiles, slices, dual, sam, a registered scheme ...).
NATIVE = native_converter(MODEL_TYPE, VLMConfig.from_dict, VLM, "vlmkit")
