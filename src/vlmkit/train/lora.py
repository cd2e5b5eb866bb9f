"""LoRA (Hu et al. 2021): a frozen linear layer plus a trained low-rank update, y = x W^T + b + s x A^T B^T.

    cfg = parse_lora("r=16,alpha=32,dropout=0.05,targets=lm.attn,lm.mlp")    # the --lora flag
    names = add_lora(model, cfg, seed=0)      # the targeted nn.Linear layers gain lora_A (r, in), lora_B (out, r)
    merge_lora(model)                         # W += s B A in place; the layers are plain nn.Linear again

A (r, in_features) starts Kaiming-uniform, B (out_features, r) at zero, so an added adapter leaves the model's
output unchanged until B learns; s = alpha / r; dropout applies to the adapter's input only, in training mode.

Targets name module groups (train/stages.py: `vision`, `projector`, `lm`, or another top-level part), alone
(every linear layer of the group) or with a part: `GROUP.attn` (the layers under a module whose name ends in
`attn`: attention, self_attn, cross_attn) or `GROUP.mlp` (under `mlp`). A linear layer whose weight is shared
with another module (a head tied to the embedding) is never targeted: merging would change the embedding too.

vlmkit stores query/key/value and gate/up fused (`qkv`, `gate_up`); an adapter on a fused layer is one A and one
B over the fused rows, which is exactly the q/k/v (gate/up) adapters of the unfused layout with A shared and B
split by rows. So the adapter is vlmkit's own small module and not peft's: peft's LoRA on the fused layer would
compute the same numbers, but it would add transformers, accelerate and peft as dependencies of training, key
its weights `lora_A.default.weight` (a second state-dict layout beside the checkpoints'), and still need this
file's row split to write transformers-layout adapters. The layer stays an nn.Linear (its class is swapped to
LoRALinear, its weight and bias Parameters kept), so the base weights keep their names in every state dict and
the adapter weights are `<layer>.lora_A` / `<layer>.lora_B` beside them.

A model folder of a LoRA run (LoadedModel.save_pretrained) holds the base model as any model folder does, plus
ADAPTER_FILE (the adapter weights) and LORA_FILE (the LoraConfig and the adapted layers); load_model adds the
adapters back (load_adapters).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vlmkit.decoding import model_device

ADAPTER_FILE = "adapter.safetensors"
LORA_FILE = "lora.json"
PARTS = ("attn", "mlp")  # GROUP.PART targets
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
LORA_EXAMPLE = "r=16,alpha=32,dropout=0.05,targets=lm.attn,lm.mlp"


@dataclass(frozen=True)
class LoraConfig:
    """r: the rank; alpha: the update is scaled by alpha / r; dropout: on the adapter's input while training;
    targets: GROUP or GROUP.attn / GROUP.mlp (see the module docstring)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("lm.attn", "lm.mlp")

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {self.r!r} (e.g. --lora {LORA_EXAMPLE})")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r} (the update is scaled by alpha / r)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets or any(not t for t in self.targets):
            raise ValueError(f"LoRA targets must name module groups, e.g. targets=lm.attn,lm.mlp; got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def spec(self) -> str:
        """The config as --lora text (parse_lora reads it back)."""
        return f"r={self.r},alpha={self.alpha:g},dropout={self.dropout:g},targets={','.join(self.targets)}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


LORA_KEYS = tuple(f.name for f in dataclasses.fields(LoraConfig))


def parse_lora(text: str) -> LoraConfig:
    """A --lora value: KEY=VALUE items separated by commas, keys r, alpha, dropout, targets; targets takes every
    following item without `=` too (targets=lm.attn,lm.mlp). Missing keys keep LoraConfig's defaults. Raises
    ValueError saying what is wrong, with an example."""
    values: dict[str, Any] = {}
    key = None
    for item in (s.strip() for s in text.split(",")):
        name, eq, value = item.partition("=")
        if not eq:
            if key != "targets" or not item:
                raise ValueError(f"--lora {text!r}: {item!r} is not KEY=VALUE (keys: {', '.join(LORA_KEYS)}); "
                                 f"e.g. --lora {LORA_EXAMPLE}")
            values["targets"].append(item)
            continue
        key = name.strip()
        if key not in LORA_KEYS:
            raise ValueError(f"--lora {text!r}: unknown key {key!r}; valid keys: {', '.join(LORA_KEYS)} "
                             f"(e.g. --lora {LORA_EXAMPLE})")
        if key in values:
            raise ValueError(f"--lora {text!r}: {key} is given twice")
        if key == "targets":
            values[key] = [value.strip()] if value.strip() else []
            continue
        try:
            values[key] = int(value) if key == "r" else float(value)
        except ValueError:
            kind = "an integer" if key == "r" else "a number"
            raise ValueError(f"--lora {text!r}: {key} must be {kind}, got {value!r}") from None
    if "targets" in values:
        values["targets"] = tuple(values["targets"])
    try:
        return LoraConfig(**values)
    except ValueError as e:
        raise ValueError(f"--lora {text!r}: {e}") from None


class LoRALinear(nn.Linear):
    """An nn.Linear with a LoRA adapter: forward = x W^T + b + lora_scale * dropout(x) A^T B^T. Made from an
    nn.Linear by add_lora (never constructed directly)."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float
    lora_dropout: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return self.base_linear(x) + update * self.lora_scale

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's x W^T + b (train/qlora.py's QLoRALinear: W stored in NF4)."""
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """W as an ordinary tensor (QLoRALinear: its NF4 weight dequantized)."""
        return self.weight

    def delta_weight(self) -> torch.Tensor:
        """The update folded into the weight: lora_scale * B A (out, in), computed in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.lora_scale


# A layer class add_lora adapts -> the class it becomes. train/qlora.py adds its NF4 layers (NF4Linear becomes
# QLoRALinear, a LoRALinear over an NF4 weight).
ADAPTABLE: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: LoRALinear, LoRALinear: LoRALinear}


def tied_weights(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (e.g. a head tied to the embedding)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _in_part(name: str, part: str) -> bool:
    """Whether module `name` lies under a module of the part: a name component ending in `attn` / equal to `mlp`."""
    components = name.split(".")[1:-1]
    return any(c.endswith("attn") if part == "attn" else c == part for c in components)


def _matches(model: nn.Module, target: str) -> list[str]:
    """The linear layers (full names) target names on model; [] when none or the target is malformed."""
    # imported here, not at the top: stages.py holds LoraConfigs (its built-in `lora` stage)
    from vlmkit.train.stages import group_members

    group, _, part = target.partition(".")
    if part and part not in PARTS:
        return []
    members = set(group_members(model, group))
    tied = tied_weights(model)
    return [name for name, m in model.named_modules()
            if type(m) in ADAPTABLE and name.split(".", 1)[0] in members and id(m.weight) not in tied
            and (not part or _in_part(name, part))]


def valid_targets(model: nn.Module) -> list[str]:
    """Every target that names at least one linear layer of model: its groups, each alone and with .attn/.mlp."""
    from vlmkit.train.stages import available_groups

    found = []
    for group in dict.fromkeys(available_groups(model)):
        found += [t for t in (group, *(f"{group}.{p}" for p in PARTS)) if _matches(model, t)]
    return found


def lora_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The linear layers cfg's targets name on model, in model order. Raises ValueError for a target that names
    none, listing the model's valid targets."""
    chosen: set[str] = set()
    for target in cfg.targets:
        names = _matches(model, target)
        if not names:
            raise ValueError(f"LoRA target {target!r} names no linear layer of {type(model).__name__}; valid targets: "
                             f"{', '.join(valid_targets(model))} (GROUP for all its layers, GROUP.attn, GROUP.mlp)")
        chosen.update(names)
    return [name for name, _ in model.named_modules() if name in chosen]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers of model by full name (empty without LoRA)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter weight (`<layer>.lora_A` / `<layer>.lora_B`)."""
    return name.endswith(ADAPTER_SUFFIXES)


def _adapt(linear: nn.Linear, cfg: LoraConfig, generator: torch.Generator) -> None:
    """Turn linear into a LoRALinear with a fresh adapter: A Kaiming-uniform (as nn.Linear initialises weights,
    drawn on the host from generator so every device gets the same numbers), B zero."""
    w = linear.weight
    a = torch.empty(cfg.r, linear.in_features)
    bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3), bound sqrt(3) gain/sqrt(fan_in)
    a.uniform_(-bound, bound, generator=generator)
    linear.__class__ = ADAPTABLE[type(linear)]
    linear.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
    linear.lora_B = nn.Parameter(torch.zeros(linear.out_features, cfg.r, device=w.device, dtype=w.dtype))
    linear.lora_scale = cfg.scale
    linear.lora_dropout = (nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()).train(linear.training)


def add_lora(model: nn.Module, cfg: LoraConfig, seed: int = 0) -> list[str]:
    """Add a LoRA adapter to every linear layer cfg targets (lora_targets), A drawn from a generator seeded with
    seed; records cfg on the model (model.lora_config). Adding the same cfg again does nothing; a model with
    another LoRA raises. Returns the adapted layers' names."""
    current = getattr(model, "lora_config", None)
    if current is not None:
        if current != cfg:
            raise ValueError(f"the model already has LoRA {current.spec()}; cannot add {cfg.spec()} "
                             "(merge it first: vlmkit export RUN --merge)")
        return list(lora_layers(model))
    names = lora_targets(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for name in names:
        _adapt(modules[name], cfg, generator)
    model.lora_config = cfg
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its weight (W + alpha/r B A, summed in fp32, cast to W's type) and make the layers
    plain nn.Linear again; the model then has no LoRA. Returns the number of layers merged."""
    layers = lora_layers(model)
    for layer in layers.values():
        dense = layer.dense_weight()
        merged = (dense.float() + layer.delta_weight()).to(dense.dtype)
        if dense is layer.weight:
            layer.weight.copy_(merged)
        else:  # an NF4 weight (QLoRALinear): the merge is a new dense weight, the dequantized W + update
            layer.weight = nn.Parameter(merged, requires_grad=layer.weight.requires_grad)
        del layer.lora_A, layer.lora_B, layer.lora_dropout, layer.lora_scale
        layer.__class__ = nn.Linear
    if hasattr(model, "lora_config"):
        del model.lora_config
    return len(layers)


def without_adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without its adapter weights: the base model's."""
    return {k: v for k, v in state.items() if not is_adapter(k)}


def save_adapters(model: nn.Module, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write model's adapters into folder: ADAPTER_FILE (every lora_A / lora_B) and LORA_FILE (the config and the
    adapted layers). state: the weights to take them from, default model.state_dict()."""
    cfg: LoraConfig = model.lora_config
    folder = Path(folder)
    state = model.state_dict() if state is None else state
    tensors = {k: v.detach().contiguous() for k, v in state.items() if is_adapter(k)}
    save_file(tensors, str(folder / ADAPTER_FILE))
    meta = {"lora": cfg.to_dict(), "layers": list(lora_layers(model))}
    (folder / LORA_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def has_adapters(folder: str | Path) -> bool:
    return (Path(folder) / LORA_FILE).is_file()


def load_adapters(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Add the adapters save_adapters wrote in folder to model (the base model of that folder). Raises ValueError
    when the folder's adapted layers or weights do not fit the model."""
    folder = Path(folder)
    meta = json.loads((folder / LORA_FILE).read_text())
    lora = meta["lora"]
    cfg = LoraConfig(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=tuple(lora["targets"]))
    names = add_lora(model, cfg)
    if names != meta["layers"]:
        raise ValueError(f"{folder / LORA_FILE} adapts layers {meta['layers'][:3]}... but its targets name "
                         f"{names[:3]}... on this model; the folder's base model and adapters do not belong together")
    tensors = load_file(str(folder / ADAPTER_FILE), device=str(model_device(model)))
    expected = {f"{n}{s}" for n in names for s in ADAPTER_SUFFIXES}
    if set(tensors) != expected:
        raise ValueError(f"{folder / ADAPTER_FILE} holds other adapter weights than {folder / LORA_FILE} lists "
                         f"(missing {sorted(expected - set(tensors))[:3]}, extra {sorted(set(tensors) - expected)[:3]})")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in tensors.items():
            layer, _, which = key.rpartition(".")
            getattr(modules[layer], which).copy_(value)
    return cfg

