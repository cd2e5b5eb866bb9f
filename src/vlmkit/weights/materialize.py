"""Build a model without memory and give it its tensors one module at a time, quantizing layers as they come.

    model = build_on_meta(conv.build, cfg)                 # every parameter on the meta device
    check_state(model, state, "path/to/dir")               # same names and shapes as the checkpoint
    materialize(model, from_state(state), dtype=torch.bfloat16, quantize={"lm.layers.0.mlp.up": to_nf4_layer})

A 7B model in fp32 is 28 GB. Built the ordinary way it exists in full in fp32 (nn.Linear initialises its
weights) before the checkpoint is copied in and before any cast or quantization, so loading it quantized would
cost more memory than the float model. Here nothing is allocated at build time; each module's own tensors are
then made in the target dtype and on the target device (taken from the state dict, which gives up its
reference, or drawn by an init function), and a layer named in `quantize` is replaced by its quantized form
right after its weight exists. The float weight of one layer is the only float copy at any time, so the peak
is about the quantized model (plus the state dict the tensors come from: a checkpoint's are pages of the
memory-mapped file, and the tensors its converter fuses, q|k|v and gate|up, are made only when their module is
reached: weights/converter.py Joined).

Load and the trainers use it for every model folder (weights/hf.py from_pretrained), the verbs' `--quantize
int8|int4|nf4` (vlmkit.quantize.quantize_plan) and `vlmkit train --quantize nf4` (train/qlora.py
frozen_linears: the layers the stage freezes) alike; bench/bench_finetune.py builds a random 7B model with it.

Only parameters go to the meta device (as accelerate's init_empty_weights does by default, by the same
means: nn.Module.register_parameter is wrapped while the model is built). Buffers and plain tensor attributes
(rotary frequency tables, sin-cos position tables) are small and often computed at build time from the
config, which a state dict does not hold, so they are built as usual: a persistent buffer then takes the state
dict's value, a non-persistent one keeps its own. nn.Linear still asks for an uninitialised fp32 weight before
it is moved to meta, which costs address space but no resident memory (the pages are never touched).
Tied weights stay tied (the second holder gets the same Parameter).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Mapping

import torch
from torch import nn

from vlmkit.weights.converter import StateDict, resolve

# the value of one tensor: (full name, the tensor as built, in the target dtype: a meta parameter or a real
# buffer) -> its value, or None to keep the built buffer
Values = Callable[[str, torch.Tensor], torch.Tensor | None]
# a materialized layer -> the module that replaces it (a quantized layer)
LayerQuantizer = Callable[[nn.Module], nn.Module]


def build_on_meta(build: Callable[..., nn.Module], *args: object) -> nn.Module:
    """build(*args) with every parameter on the meta device (see the module docstring): the model's structure
    and its buffers, no weights."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        return build(*args)
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose names or shapes differ from model's (any device, meta included), naming the
    first differences; source says where the state came from."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(own[name].shape)}")


def from_state(state: StateDict) -> Values:
    """Values taken out of state (each entry is removed when used, so the state dict lets go of it); a fused
    tensor a converter left unmade (weights/converter.py Joined) is made then."""
    def take(name: str, built: torch.Tensor) -> torch.Tensor:
        return resolve(state.pop(name))
    return take


def random_values(std: float = 0.02, seed: int = 0) -> Values:
    """Cheap random parameters for a model whose numbers do not matter (benchmarks): matrices N(0, std) and
    vectors 1 (norm weights; biases too), drawn in the target dtype; buffers keep their built values."""
    generator = torch.Generator().manual_seed(seed)

    def draw(name: str, built: torch.Tensor) -> torch.Tensor | None:
        if not built.is_meta:
            return None
        out = torch.empty(built.shape, dtype=built.dtype)
        if not out.is_floating_point():
            return out.zero_()
        return out.normal_(0.0, std, generator=generator) if out.dim() >= 2 else out.fill_(1.0)
    return draw


def _target_dtype(meta: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """What Module.to(dtype) would make of the tensor: float tensors take dtype, others keep theirs."""
    return dtype if dtype is not None and meta.is_floating_point() else meta.dtype


@torch.no_grad()
def materialize(model: nn.Module, values: Values, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None,
                quantize: Mapping[str, LayerQuantizer] | None = None) -> nn.Module:
    """Give every parameter and persistent buffer of model its value, module by module, in dtype (float
    tensors, as Module.to(dtype) casts them; default: the built dtype) on device (default: where values makes
    them), replacing each layer named in quantize by quantize[name](layer) as soon as its own tensors exist.
    Non-persistent buffers are cast and moved only. Returns model. values(name, built) is called once per
    tensor (tied ones once); ValueError for a quantize name that is not a module of model."""
    quantize = dict(quantize or {})
    names = [name for name, _ in model.named_modules()]  # names only: a replaced layer must be let go of
    unknown = sorted(set(quantize) - set(names))
    if unknown:
        raise ValueError(f"cannot quantize {unknown[:3]}: model has no such module")
    held: dict[int, int] = {}
    for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        held[id(t)] = held.get(id(t), 0) + 1
    tied: dict[int, torch.Tensor] = {}  # id(built tensor held twice) -> its real tensor or Parameter
    for name in names:
        module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        for key, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            real = tied.get(id(param))
            if real is None:
                real = nn.Parameter(_real(prefix + key, param, values, dtype, device), requires_grad=param.requires_grad)
                if held[id(param)] > 1:
                    tied[id(param)] = real
            module._parameters[key] = real
        for key, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            real = tied.get(id(buffer))
            if real is None:
                if key in module._non_persistent_buffers_set:
                    real = buffer.to(device=device, dtype=_target_dtype(buffer, dtype))
                else:
                    real = _real(prefix + key, buffer, values, dtype, device)
                if held[id(buffer)] > 1:
                    tied[id(buffer)] = real
            module._buffers[key] = real
        del module
        if name in quantize:
            _replace(model, name, quantize[name])
            release_memory()  # the float weight and the quantizer's scratch: else the heap keeps their pages
    return model


@torch.no_grad()
def replace_layers(model: nn.Module, quantize: Mapping[str, LayerQuantizer]) -> int:
    """Replace each layer of an already built model named in quantize by quantize[name](layer), in place (what
    materialize does while it loads); returns how many were replaced."""
    for name, make in quantize.items():
        _replace(model, name, make)
    return len(quantize)


def _replace(model: nn.Module, name: str, make: LayerQuantizer) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, make(parent.get_submodule(child)))


def _real(name: str, built: torch.Tensor, values: Values, dtype: torch.dtype | None,
          device: torch.device | str | None) -> torch.Tensor:
    """The value of one tensor as built: values' answer (or the built buffer), checked, in the target dtype, on
    device."""
    target = _target_dtype(built, dtype)
    like = built.to(target)
    value = values(name, like)
    value = like if value is None else value
    if value.is_meta:
        raise ValueError(f"no value for tensor {name} of the model built on the meta device")
    if tuple(value.shape) != tuple(built.shape):
        raise ValueError(f"tensor {name} has shape {tuple(value.shape)}, the model expects {tuple(built.shape)}")
    return value.to(device=device, dtype=target).contiguous()


def release_memory() -> bool:
    """Hand freed heap memory back to the operating system (glibc's malloc_trim), so the resident size shows
    what is held; False where there is no glibc (the memory stays reusable by this process)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return False
    trim(0)
    return True
