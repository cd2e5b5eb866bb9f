"""QLoRA (Dettmers et al. 2023): the frozen linear weights stored in 4-bit NormalFloat (NF4) with double
quantization, dequantized for each matmul; the LoRA adapters (train/lora.py) stay in the model's dtype.

    vlmkit train --model DIR --data data.json --lora r=16,alpha=32 --quantize nf4 --out run

    add_lora(model, cfg)                 # the adapters first: they decide which weights train
    names = quantize_frozen(model)       # every frozen nn.Linear / LoRALinear weight -> NF4 (torchao's NF4Tensor)

NF4 (the paper's section 3): a weight is cut into blocks of 64 consecutive values; each block is divided by its
absmax and every value rounded to the nearest of 16 levels (the quantiles of a standard normal scaled to
[-1, 1], with an exact 0); the absmaxes themselves are quantized again ("double quantization"): their mean
subtracted, then 8-bit absmax quantization in blocks of 256 absmaxes. That is 4.127 bits per weight. The
implementation is torchao's `NF4Tensor` (its format runs on CPU; to_nf4 here makes what torchao's to_nf4
makes, field for field, ~4x faster), an optional dependency (`pip install vlmkit[qlora]`). A layer whose block count is not a multiple of 256 (only in small test
models: a 7B model's are all multiples) gets the largest scaler block that divides it (gcd(blocks, 256));
a weight whose size is not a multiple of 64 stays unquantized (quantize_frozen returns the layers it
quantized).

Only frozen weights are quantized: a group the stage trains in full keeps its weights, and so do adapters,
biases, norms and embeddings (as in the paper, which quantizes the linear layers only). A weight tied to
another module (a head tied to the embedding) is left alone.

State dicts: a quantized layer writes its weight dequantized (in the weight's dtype), so checkpoints and the
final model folder hold ordinary tensors under the ordinary names. Loading a weight into a quantized layer
keeps the NF4 weight when the value equals its dequantization (a checkpoint of the same run, so --resume is
exact) and quantizes the value otherwise. A QLoRA run's folder therefore holds the dequantized base model plus
the adapters: `vlmkit generate --model RUN` computes what training computed, in full precision, and
`vlmkit export RUN --merge` folds the adapters into the dequantized weights (the base the adapters were
trained against).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.train.lora import ADAPTABLE, LoRALinear, lora_targets, tied_weights
from vlmkit.train.stages import Stage, module_groups

TORCHAO_VERSION = "0.18.0"  # the version verified here, pinned in the `qlora` extra
QUANTIZE_CHOICES = ("nf4",)
BLOCK_SIZE = 64  # values per absmax block (the paper's)
SCALER_BLOCK_SIZE = 256  # absmaxes per 8-bit block of the double quantization (the paper's)
CODE_CHUNK = 1 << 22  # values scaled and coded at a time by to_nf4 (bounds its scratch to ~80 MB)
_NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"


def torchao_nf4() -> Any:
    """torchao's NF4 module (to_nf4, NF4Tensor); raises ImportError saying what to install."""
    try:
        return importlib.import_module(_NF4_MODULE)
    except ImportError as e:
        raise ImportError(f"--quantize nf4 needs torchao's NF4 tensor ({e}); install it with "
                          f"`pip install torchao=={TORCHAO_VERSION} --no-deps` (or pip install 'vlmkit[qlora]')") from None


def is_nf4(t: torch.Tensor) -> bool:
    """Whether t is a torchao NF4Tensor (without importing torchao when it is not loaded)."""
    return type(t).__name__ == "NF4Tensor"


def scaler_block_size(numel: int) -> int | None:
    """The double quantization's block of absmaxes for a weight of numel values: 256 when the block count is a
    multiple of it, else gcd(blocks, 256); None when numel is no multiple of BLOCK_SIZE (not quantizable)."""
    if numel % BLOCK_SIZE:
        return None
    return math.gcd(numel // BLOCK_SIZE, SCALER_BLOCK_SIZE)


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) as torchao's NF4Tensor: blocks of BLOCK_SIZE, scalers double-quantized in blocks of
    scaler_block_size; field for field what torchao's to_nf4 makes (its scalers, its level table, its scaling),
    with the nearest level of each value found faster (code_table, nearest_levels; torchao compares every value with all 16
    levels: ~60 bytes of scratch and ~0.4 us a value on this CPU, 40 minutes for a 7B model). A weight with an
    all-zero block (which torchao's scaling divides by 0) goes through torchao's to_nf4 itself. Raises
    ValueError for a weight that cannot be cut into blocks of BLOCK_SIZE."""
    scalers = scaler_block_size(weight.numel())
    if scalers is None:
        raise ValueError(f"a weight of {tuple(weight.shape)} ({weight.numel()} values) cannot be stored in NF4: "
                         f"its size must be a multiple of the block size {BLOCK_SIZE}")
    ao = torchao_nf4()
    w = weight.detach().contiguous()
    absmax = ao.get_block_absmax(w.flatten(), BLOCK_SIZE)  # (blocks,)
    if not bool((absmax > 0).all()):
        return ao.to_nf4(w, BLOCK_SIZE, scalers)
    levels = nf4_levels(w.dtype, w.device)
    # torchao's double quantization of these absmaxes (as blocks of 1 value, whose absmax is the value itself)
    quantized_scalers, factor, mean = ao.NF4Tensor.double_quantize_scalers(absmax, 1, scalers)
    table = code_table(levels) if w.element_size() == 2 and sys.byteorder == "little" else None
    blocks = w.view(-1, BLOCK_SIZE)  # (blocks, 64)
    packed = torch.empty(w.numel() // 2, dtype=torch.uint8, device=w.device)  # two codes a byte, the first high
    rows = CODE_CHUNK // BLOCK_SIZE
    for start in range(0, blocks.shape[0], rows):  # torchao's scaling (blocks / absmax, in w's dtype) per chunk
        scaled = (blocks[start:start + rows] / absmax[start:start + rows, None]).flatten()
        out = packed[start * BLOCK_SIZE // 2:(start + rows) * BLOCK_SIZE // 2]
        if table is None:
            codes = nearest_levels(scaled, levels)
            torch.bitwise_or(codes[::2] << 4, codes[1::2], out=out)
        else:  # each int32 holds two consecutive 16-bit values, the first in its low half (little-endian)
            pairs = scaled.view(torch.int32)
            first, second = pairs & 0xFFFF, (pairs >> 16) & 0xFFFF
            torch.bitwise_or(table.index_select(0, first) << 4, table.index_select(0, second), out=out)
    meta = ao.SubclassTensorArgs(w.size(), w.stride(), w.storage_offset(), w.dtype, w.device, w.requires_grad)
    return ao.NF4Tensor(meta, BLOCK_SIZE, w.numel() // BLOCK_SIZE, scalers, quantized_scalers, factor, mean,
                        packed, levels)


def nf4_levels(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torchao's 16 NF4 levels (ascending, in dtype: the table its to_nf4 stores), taken from torchao."""
    return torchao_nf4().to_nf4(torch.ones(BLOCK_SIZE, dtype=dtype, device=device), BLOCK_SIZE, 1).nf4


def code_table(levels: torch.Tensor) -> torch.Tensor:
    """For a 16-bit float type (levels' dtype: bf16, fp16), the code torchao's quantize_tensor_nearest gives
    each of its 65536 values, indexed by the value's bits: coding a weight is then one lookup a value."""
    values = torch.arange(1 << 16, dtype=torch.int32, device=levels.device).to(torch.uint16).view(levels.dtype)
    return torchao_nf4().NF4Tensor.quantize_tensor_nearest(values, levels).to(torch.uint8)


def nearest_levels(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index (uint8) of the level nearest each value, the lower one on a tie, for fp32 values (code_table
    serves 16-bit types): torchao's quantize_tensor_nearest (the first minimum of |value - level| over all 16
    levels, in the values' dtype) with 2 differences a value instead of 16.
    Only the two levels around a value can be nearest: another is further by at least the gap between two
    levels (>= 0.079), far more than the rounding of a difference below 2 (<= 2^-23 in fp32), so comparing
    the same rounded differences for those two gives torchao's answer."""
    hi = torch.searchsorted(levels, values, out_int32=True).clamp_(max=len(levels) - 1)  # first level >= value
    lo = (hi - 1).clamp_(min=0)
    d_lo = (values - levels[lo]).abs_()
    d_hi = (values - levels[hi]).abs_()
    return torch.where(d_hi < d_lo, hi, lo).to(torch.uint8)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """An NF4Tensor's values as an ordinary tensor of its dtype, bit for bit torchao's get_original_weight (an
    ordinary tensor is returned as it is). Leaner than it: each byte (two 4-bit codes) is looked up in a 256 x 2
    table of level pairs through int32 indices, so the transient is 2 bytes a value beside the result where
    torchao builds two int64 code tensors (8 bytes a value) and three more copies; the absmaxes are torchao's
    own dequantize_scalers, so the products are the same operations on the same numbers."""
    if not is_nf4(weight):
        return weight
    levels = weight.nf4.to(weight.dtype)
    codes = torch.arange(256, device=levels.device)
    pairs = torch.stack([levels[codes >> 4], levels[codes & 15]], dim=1)  # (256, 2): byte -> its two values
    values = F.embedding(weight.quantized_data.to(torch.int32), pairs)  # (numel / 2, 2)
    scalers = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                        weight.scaler_block_size)
    values = values.view(-1, weight.block_size).mul_(scalers.unsqueeze(-1))
    return values.view(weight.shape)


class _NF4Matmul(torch.autograd.Function):
    """x dequant(W)^T with W in NF4, never trained: the backward returns x's gradient only and dequantizes W
    again (nothing but the NF4 weight is kept between forward and backward)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize(weight).to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ dequantize(weight).to(grad.dtype), None


class _NF4Base:
    """What a linear layer with an NF4 weight does differently: its matmul (_NF4Matmul dequantizes the weight
    for it, in forward and backward) and its state dict (the weight dequantized; see the module
    docstring for loading)."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self.weight)
        return y if self.bias is None else y + self.bias

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        destination[prefix + "weight"] = dequantize(self.weight.detach())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        value = state_dict.get(key)
        if value is not None:
            value = value.to(device=self.weight.device, dtype=self.weight.dtype)
            if not torch.equal(value, dequantize(self.weight.detach())):
                self.weight = nn.Parameter(to_nf4(value), requires_grad=False)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
            weight, self._parameters["weight"] = self._parameters["weight"], None
            try:
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,  # type: ignore[misc]
                                              missing_keys, unexpected_keys, error_msgs)
            finally:
                self._parameters["weight"] = weight
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,  # type: ignore[misc]
                                      missing_keys, unexpected_keys, error_msgs)


class NF4Linear(_NF4Base, nn.Linear):
    """A frozen nn.Linear whose weight is NF4 (made by quantize_frozen; add_lora adapts it to a QLoRALinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_linear(x)


class QLoRALinear(_NF4Base, LoRALinear):
    """A LoRALinear whose frozen weight is NF4: forward = dequant(W) x + b + lora_scale * B A x."""

    def dense_weight(self) -> torch.Tensor:
        return dequantize(self.weight.detach())


QUANTIZED = {nn.Linear: NF4Linear, LoRALinear: QLoRALinear}  # layer class -> its class with an NF4 weight
ADAPTABLE.update({NF4Linear: QLoRALinear, QLoRALinear: QLoRALinear})  # add_lora adapts a quantized layer too


def nf4_layer(module: nn.Module) -> nn.Module:
    """module (an nn.Linear or LoRALinear) with its weight stored in NF4, in place: its class becomes the
    QUANTIZED one; returns it. Its weight is frozen (requires_grad False)."""
    module.weight = nn.Parameter(to_nf4(module.weight), requires_grad=False)
    module.__class__ = QUANTIZED[type(module)]
    return module


def frozen_linears(model: nn.Module, stage: Stage) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """The layers quantize_frozen would store in NF4 once the stage has frozen what it freezes (a group at lr 0,
    or one holding LoRA adapters, whose base weights stay frozen: loop.trainable_parameters), by name, each
    with nf4_layer: weights/hf.py from_pretrained quantizes them while it loads them. Reads names and shapes
    only, so model may be on the meta device and need not have its adapters yet."""
    torchao_nf4()
    adapted = set(lora_targets(model, stage.lora)) if stage.lora is not None else set()
    frozen: set[int] = set()
    for group, params in module_groups(model, stage).items():
        if stage.lrs[group] == 0 or any(name.rpartition(".")[0] in adapted for name, _ in params):
            frozen.update(id(p) for _, p in params)
    tied = tied_weights(model)
    return {name: nf4_layer for name, module in model.named_modules()
            if type(module) in QUANTIZED and id(module.weight) in frozen and id(module.weight) not in tied
            and scaler_block_size(module.weight.numel()) is not None}


def quantize_frozen(model: nn.Module) -> list[str]:
    """Store the weight of every frozen (requires_grad False) nn.Linear and LoRALinear of model in NF4, in
    place; weights tied to another module, trained weights and weights whose size is no multiple of
    BLOCK_SIZE are kept. Call it after the stage froze its parameters (loop.trainable_parameters). Returns
    the names of the layers holding NF4 weights, those quantized when the model was loaded
    (frozen_linears) included."""
    torchao_nf4()  # a missing torchao is reported before anything changes
    tied = tied_weights(model)
    done = []
    for name, module in model.named_modules():
        if isinstance(module, _NF4Base):
            done.append(name)
            continue
        if type(module) not in QUANTIZED or module.weight.requires_grad or id(module.weight) in tied:
            continue
        if scaler_block_size(module.weight.numel()) is None:
            continue
        nf4_layer(module)
        done.append(name)
    return done
