"""What a model spec holds and whether vlmkit can load it, without loading its weights (`vlmkit inspect`).

    report = describe_model("llava-hf/llava-1.5-7b-hf")   # a folder, a .gguf file, a preset or a hub id
    print("\\n".join(report_lines(report)))

A folder (or a hub id's snapshot: vlmkit.hub, fetched without the weights when they are not cached) is read
from its config.json and the headers of its safetensors files (dtype and shape of every tensor, no data);
a .gguf file from its metadata and tensor table; a preset from its config. The model vlmkit would build is
made on the meta device (no memory) to count the parameters of each part. What cannot be loaded says why:
an unsupported model_type, weights only as pickles, a training checkpoint.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit import hub, presets
from vlmkit.models.image_model import build_model
from vlmkit.train.checkpoint import is_checkpoint
from vlmkit.weights.hf import converters, get_converter
from vlmkit.weights.safetensors_io import INDEX_FILE, read_config

GGUF_SPECS = ("smollm2-135m",)


@dataclass
class ModelReport:
    """What describe_model found. parameters counts the stored tensors' elements (a checkpoint's, a GGUF
    file's) or, for a preset, the built model's; part_parameters the built model's top-level modules;
    stored_dtypes the tensors per stored type; loader how vlmkit loads it, or problem why it cannot."""

    spec: str
    source: str
    model_type: str | None = None
    loader: str | None = None
    problem: str | None = None
    parameters: int | None = None
    stored_dtypes: dict[str, int] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)
    part_parameters: dict[str, int] = field(default_factory=dict)

    @property
    def memory(self) -> dict[str, int]:
        """Bytes the weights take in float32 and bfloat16 (weights only: no activations, no KV cache)."""
        return {} if self.parameters is None else {"float32": 4 * self.parameters, "bfloat16": 2 * self.parameters}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "memory": self.memory}


def describe_model(spec: str) -> ModelReport:
    """The ModelReport of a --model spec: a folder, a .gguf file, smollm2-135m, a preset or a hub id (a local
    folder of the hub id's name wins, as in vlmkit.load). FileNotFoundError / ValueError for what is none."""
    path = Path(spec)
    if path.is_dir():
        return _describe_folder(spec, path, f"folder {path}", safetensors_headers(path),
                                lambda: hub.weights_problem(path))
    if spec in GGUF_SPECS or spec.endswith(".gguf"):
        return _describe_gguf(spec)
    if spec in presets.PRESETS:
        return _describe_preset(spec)
    hub_spec = hub.parse_hub_spec(spec)
    if hub_spec is not None and not path.exists():
        folder = hub.hub_folder(hub_spec, weights=False)  # config and tokenizer; the weights' headers alone below
        headers = safetensors_headers(folder)
        if not headers and not hub.hub_offline():
            headers = hub.remote_safetensors_headers(hub_spec)
        where = "cached" if any(folder.glob("*.safetensors")) else "not downloaded"
        return _describe_folder(spec, folder, f"hub {hub_spec} (snapshot {folder}; weights {where})", headers,
                                lambda: hub.weights_problem(folder, hub_spec))
    from vlmkit.load import not_a_model_error

    raise not_a_model_error(spec, "a .gguf file, nor a preset (vlmkit presets lists them)")


def _describe_preset(name: str) -> ModelReport:
    if name == "tiny-random":  # what load_model builds: the preset sized to its character tokenizer
        from vlmkit.load import tiny_random_model

        cfg = tiny_random_model().model.cfg
    else:
        cfg = presets.get_preset(name)
    report = ModelReport(name, "preset (an architecture with random weights, no checkpoint)",
                         model_type=f"preset ({cfg.image_scheme} scheme)", parameters=presets.count_parameters(cfg),
                         stored_dtypes={"not stored (random init in float32)": 0})
    _add_parts(report, cfg, _build_on_meta(build_model, cfg))
    if name == "tiny-random":
        report.loader = "the tiny-random preset (random weights, a character tokenizer): load_model('tiny-random')"
    else:
        small = name if name.endswith("-small") or f"{name}-small" not in presets.PRESETS else f"{name}-small"
        report.problem = (f"a preset has no weights to generate with: `vlmkit train --model {small}` trains a "
                          "small preset from random weights; pass a model folder or hub id for published weights")
    return report


def _describe_gguf(spec: str) -> ModelReport:
    from vlmkit.models.lm import CausalLM
    from vlmkit.weights import gguf as gguf_io
    from vlmkit.weights.llama import lm_config_from_hf

    path = gguf_io.smollm2_gguf_path() if spec in GGUF_SPECS else Path(spec)
    meta, tensors = gguf_io.read_gguf_table(path)
    report = ModelReport(spec, f"GGUF file {path}", parameters=sum(int(t.n_elements) for t in tensors),
                         stored_dtypes=dict(Counter(t.tensor_type.name for t in tensors)))
    try:
        config = gguf_io.hf_config_from_gguf(meta, {t.name for t in tensors})
    except ValueError as e:
        report.model_type = meta.get("general.architecture")
        report.problem = str(e)
        return report
    report.model_type = config["model_type"]
    report.loader = "vlmkit.weights.gguf (a text-only CausalLM, dequantized to float32 on load)"
    cfg = lm_config_from_hf(config)
    _add_parts(report, cfg, _build_on_meta(CausalLM, cfg))
    return report


def _describe_folder(spec: str, folder: Path, source: str, headers: dict[str, dict],
                     no_weights: Callable[[], str | None]) -> ModelReport:
    """A folder's report from its config.json and its weights' headers; no_weights says why there are none."""
    report = ModelReport(spec, source)
    if is_checkpoint(folder):
        report.problem = ("a vlmkit train checkpoint (weights with the optimizer's state, to resume from): pass "
                          "the run folder to use the trained model")
        return report
    config = read_config(folder)
    report.model_type = config.get("model_type")
    if headers:
        tensors = [info for header in headers.values() for name, info in header.items() if name != "__metadata__"]
        report.parameters = sum(_numel(info["shape"]) for info in tensors)
        report.stored_dtypes = dict(Counter(info["dtype"] for info in tensors))
    else:
        report.problem = no_weights()
    try:
        conv = get_converter(report.model_type)
    except ValueError:
        report.problem = (f"model_type {report.model_type!r} is not supported yet; vlmkit loads: "
                          f"{', '.join(sorted(converters()))}") + (f"; also: {report.problem}" if report.problem
                                                                     else "")
        report.parts = _tensor_groups(headers)
        return report
    try:
        cfg = conv.config_from_hf(conv.complete_config(folder, config))
    except (ValueError, KeyError, TypeError) as e:
        report.problem = f"config.json cannot be read as model_type {report.model_type!r}: {e}"
        return report
    model = _build_on_meta(conv.build, cfg)
    _add_parts(report, cfg, model)
    if report.problem is None:
        report.loader = (f"vlmkit.weights, model_type {report.model_type!r} -> {type(model).__name__}"
                         if isinstance(model, nn.Module) else f"vlmkit.weights, model_type {report.model_type!r}")
    return report


def safetensors_headers(folder: Path) -> dict[str, dict]:
    """file name -> the JSON header of each safetensors file the folder loads from (the index's shards, else
    the top-level *.safetensors): tensor name -> {dtype, shape, data_offsets}; no tensor data is read."""
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    headers = {}
    for name in names:
        with open(folder / name, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 1024**2:
                raise ValueError(f"{folder / name}: a header of {size} bytes is not a safetensors file's")
            headers[name] = json.loads(f.read(size))
    return headers


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _tensor_groups(headers: dict[str, dict]) -> dict[str, str]:
    """Parameters per leading tensor-name prefix (two levels under a common `model.`), for a model vlmkit
    cannot build."""
    counts: Counter[str] = Counter()
    for header in headers.values():
        for name, info in header.items():
            if name == "__metadata__":
                continue
            parts = name.split(".")
            key = ".".join(parts[:2] if parts[0] in ("model", "language_model") and len(parts) > 2 else parts[:1])
            counts[key] += _numel(info["shape"])
    return {key: f"{_human(n)} parameters (stored tensors)" for key, n in sorted(counts.items())}


def _build_on_meta(build: Any, cfg: Any) -> nn.Module | str:
    """The model of cfg built on the meta device (no memory), or why it cannot be built there."""
    try:
        with torch.device("meta"):
            return build(cfg)
    except (RuntimeError, NotImplementedError) as e:  # e.g. a plugin's module computing values at build time
        return f"the model could not be built on the meta device to count its parts: {e}"


def _add_parts(report: ModelReport, cfg: Any, model: nn.Module | str) -> None:
    """Each part as text (vision tower(s), image scheme, projector(s), language model with layers and width)
    and the parameters of the built model's top-level modules (model: the built model, or why there is none)."""
    if isinstance(model, str):
        report.parts["note"] = model
        return
    if hasattr(cfg, "image_scheme"):
        try:
            report.parts.update(presets.describe_parts(cfg))
        except KeyError:  # a plugin's model class that presets do not describe: the LM alone
            report.parts["lm"] = presets.describe_lm(cfg.lm)
    elif hasattr(cfg, "num_layers") and hasattr(cfg, "vocab_size"):
        report.parts["lm"] = presets.describe_lm(cfg)
    children = dict(model.named_children())
    if report.parts.get("lm") and "lm" not in children:  # a text-only model is its LM
        children = {"lm": model}
    for name, child in children.items():
        report.part_parameters[name] = sum(p.numel() for p in child.parameters())
    if report.parameters is None:
        report.parameters = sum(p.numel() for p in model.parameters())


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def report_lines(report: ModelReport) -> list[str]:
    """The lines `vlmkit inspect` prints."""
    lines = [f"model:       {report.spec}", f"source:      {report.source}",
             f"model type:  {report.model_type or '(none)'}"]
    if report.parameters is not None:
        memory = report.memory
        lines.append(f"parameters:  {report.parameters:,} ({_human(report.parameters)}); weights need "
                     f"{_bytes(memory['float32'])} in float32, {_bytes(memory['bfloat16'])} in bfloat16")
    if report.stored_dtypes:
        lines.append("stored as:   " + ", ".join(f"{dtype} ({n} tensors)" if n else dtype
                                                 for dtype, n in report.stored_dtypes.items()))
    if report.parts or report.part_parameters:
        lines.append("parts:")
        names = list(dict.fromkeys([*report.parts, *report.part_parameters]))
        width = max(len(n) for n in names)
        for name in names:
            count = report.part_parameters.get(name)
            text = report.parts.get(name, "")
            lines.append(f"  {name.ljust(width)}  {text}" + (f"  [{_human(count)}]" if count is not None else ""))
    lines.append(f"loader:      {report.loader}" if report.loader else f"loader:      none: {report.problem}")
    if report.loader and report.problem:
        lines.append(f"note:        {report.problem}")
    if hub.hub_offline() and hub.parse_hub_spec(report.spec) is not None and not Path(report.spec).exists():
        lines.append("(HF_HUB_OFFLINE is set: read from the hub cache only)")
    return lines
