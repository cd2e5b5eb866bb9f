"""Weight-only quantized linear layers for inference (`--quantize int8|int4`, load_model's `quantize=`).

On a CPU, decoding one token reads every weight once, so tokens/s follows the bytes of the weights. These
layers keep the weights as small integers and the activations in the model's float type:

- int8: per output channel, symmetric: scale_n = max_k |W[n, k]| / 127, q = round(W / scale) in [-127, 127],
  W ~ q * scale.
- int4: per group of `group_size` inputs (32, 64 or 128) of each output row, asymmetric with a float zero point:
  scale = (max - min) / 15, zero = -min / scale, q = round(W / scale + zero) in [0, 15], W ~ (q - zero) * scale.
  A float zero maps a group's min exactly, as a GGUF Q4_1 block's min does.

The matmul runs in PyTorch's CPU kernels where they apply (`aten._weight_int8pack_mm`;
`aten._convert_weight_to_int4pack_for_cpu` + `aten._weight_int4pack_mm_for_cpu`, whose weights are
(q - 8) * scale + offset: offset = (8 - zero) * scale is computed once, in the activations' type), else as a
plain dequantize-then-matmul (another device, or an int4 layer with out_features not a multiple of 16, which
the CPU packing needs). The kernels take fp32, bf16 and fp16 activations with scales of the same type.

Measured on the 2-core AVX-512 CPU (one thread, SmolLM2-135M's matrices, one token, the minimum of 30 repeats,
so with warm caches): the kernels with bf16 activations take 6.1 ms (int8) and 1.9 ms (int4) against 19.5 ms
for bf16 weights; with fp32 activations they are slower than fp32 weights (40.6 ms int8, 101 ms int4, against
17.6 ms): their fp32 path is not vectorised. In a real decoding step, with the weights coming from memory, the
int4 matmuls take ~16.7 of ~22.8 ms per token and bf16 weights' ~55.7 of ~61.7 ms
(`python bench/bench_decode_overhead.py [--quantize none]`). So a quantized model computes in bfloat16 unless a dtype is asked for (load_model). With 32
prompt rows the kernels are 2-4x slower than bf16 weights: prefill pays for the faster decode.

What is quantized: every nn.Linear of the language model (a VLM's `.lm`), the head included (a tied head gets
its own quantized copy; the embedding stays float, read one row per token). MoE experts (stacked parameters,
not nn.Linear) and the router (read as a float matrix) stay float. The vision tower and projector stay float:
they run once per image over hundreds of rows, where the kernels are slower than float weights.

`--quantize gguf` does not quantize: it keeps a GGUF file's blocks (weights/gguf.py load_native): Q4_0 / Q4_1 /
Q4_K as Int4Linear.from_codes (groups of 32: Q4_K's sub-blocks), Q5_0 / Q5_1 / Q5_K / Q8_0 as an Int8GroupLinear
(two exact int4 planes), and the token embedding (those types or Q6_K) as a QuantizedEmbedding (only looked-up
rows dequantized; a tied head gets its own layer). Q6_K matrices are dequantized: their 16-value sub-blocks are
finer than the kernel's groups. A fused matrix whose parts differ in type (q/k/v with a Q6_K v) is a StackedLinear
of each part's own layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZES = (32, 64, 128)
# --quantize choices: int4 is group 32 (the most accurate; the kernel is as fast at 32 as at 64 or 128)
# nf4: train/qlora.py's NF4 layers; gguf: a GGUF file's Q4_x / Q5_x / Q8_0 blocks loaded as they are
# (weights/gguf.py load_gguf(native=True))
GGUF_NATIVE = "gguf"
QUANTIZE_CHOICES = ("int8", "int4", "int4-g64", "int4-g128", "nf4", GGUF_NATIVE)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Linear layers read as plain matrices elsewhere (moe.py's router: F.linear on router.weight in fp32)
KEEP_FLOAT = ("router",)


@dataclass(frozen=True)
class Quantization:
    """A weight format: bits (8 or 4) and, for int4, the group size; nf4: QLoRA's 4-bit NormalFloat
    (train/qlora.py, torchao's NF4 tensor) instead of int4."""

    bits: int
    group_size: int | None = None
    nf4: bool = False

    def __str__(self) -> str:
        if self.nf4:
            return "nf4"
        if self.bits == 8:
            return "int8"
        return "int4" if self.group_size == 32 else f"int4-g{self.group_size}"

    @classmethod
    def parse(cls, spec: str | Quantization) -> Quantization:
        """'int8', 'int4' (group 32) or 'int4-gN' (N in GROUP_SIZES); ValueError naming the choices."""
        if isinstance(spec, Quantization):
            return spec
        if spec == "int8":
            return cls(8)
        if spec == "nf4":
            return cls(4, nf4=True)
        if spec == "int4":
            return cls(4, 32)
        if spec.startswith("int4-g") and spec[6:].isdigit() and int(spec[6:]) in GROUP_SIZES:
            return cls(4, int(spec[6:]))
        raise ValueError(f"unknown quantization {spec!r}: use int8, int4 (groups of 32), int4-g64 / int4-g128 "
                         f"or nf4")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> q (N, K) int8 in [-127, 127] and scale (N,) fp32, W ~ q * scale[:, None]. A zero
    row gets scale 1 (and q 0)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)  # (N,)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> q (N, K) uint8 in [0, 15], scale and zero (N, K / group_size) fp32, with
    W[n, k] ~ (q[n, k] - zero[n, g]) * scale[n, g], g = k // group_size. A constant group c gets scale 1 and
    zero -c (exact). ValueError when K is not a multiple of group_size."""
    N, K = weight.shape
    if group_size not in GROUP_SIZES or K % group_size:
        raise ValueError(f"int4 groups of {group_size} need in_features a multiple of it (one of {GROUP_SIZES}); "
                         f"this layer has {K}")
    w = weight.detach().float().view(N, K // group_size, group_size)
    lo, hi = w.amin(dim=2), w.amax(dim=2)  # (N, G)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))
    zero = -lo / scale
    q = torch.round(w / scale[..., None] + zero[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.view(N, K), scale, zero


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale as a (N, K) float matrix of dtype."""
    return q.to(dtype) * scale.to(dtype)[:, None]


# Rows packed per call: the kernel wants int32 codes, 4x the bytes of the result; packing a large matrix (a 49152-row
# head) in row blocks bounds that temporary. The CPU layout packs blocks of 64 rows on their own (tests/
# test_gguf_native.py checks that blocks give the whole matrix's layout).
PACK_ROWS = 4096


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> the CPU kernel's packed layout, PACK_ROWS rows at a time when N is a multiple
    of 64 (the layout's row block)."""
    def pack(rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows.to(torch.int32), 1)  # innerKTiles: unused
    if q.shape[0] % 64 or q.shape[0] <= PACK_ROWS:
        return pack(q)
    return torch.cat([pack(q[i:i + PACK_ROWS]) for i in range(0, q.shape[0], PACK_ROWS)])


def _uses_cpu_kernel(x: torch.Tensor, scale: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and x.dtype == scale.dtype


class Int8Linear(nn.Module):
    """A linear layer with int8 per-output-channel weights (quantize_int8). The weights stay int8 under
    .to(dtype); the scale follows the activations' type. The CPU kernel's int8 matrix is the plain (N, K) one,
    so the dequantizing path works on any device."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight)
        self.register_buffer("qweight", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(device=linear.weight.device, dtype=dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.scale.dtype:
            raise TypeError(f"Int8Linear got {x.dtype} inputs for {self.scale.dtype} scales: cast the model "
                            f"before quantizing it (load_model(..., dtype=..., quantize=...))")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if _uses_cpu_kernel(x2, self.scale):
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale)
        else:  # x W^T with W = q * scale per row: (x q^T) * scale, the same numbers in exact arithmetic
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """A linear layer with int4 group-wise weights (quantize_int4). On a CPU with out_features a multiple of 16
    the weights are kept only in the kernel's packed layout (`packed`, two weights a byte) with
    `scale_offset` (G, N, 2): scale and offset = (8 - zero) * scale in the activations' type; elsewhere as the
    plain codes (`codes` (N, K) uint8, two a byte) with fp32 scale and offset, dequantized at each call as
    (q - 8) * scale + offset."""

    def __init__(self, linear: nn.Linear, group_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        q, scale, zero = quantize_int4(linear.weight, group_size)
        bias = None if linear.bias is None else linear.bias.detach()
        self._store(q, scale, (8 - zero) * scale, group_size, dtype, linear.weight.device, bias)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                   dtype: torch.dtype, device: torch.device | str | None = None,
                   bias: torch.Tensor | None = None) -> Int4Linear:
        """A layer whose weights are already int4 codes: q (N, K) in [0, 15], scale and offset (N, K / group_size)
        with W = (q - 8) * scale + offset per group, the kernel's own form (a GGUF Q4_0 / Q4_1 / Q4_K block maps onto it
        exactly: weights/gguf.py). Nothing is rounded but scale and offset to dtype on the kernel path. device:
        where the layer lives (None: torch's default device)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        device = torch.device(device) if device is not None else torch.get_default_device()
        layer._store(q, scale.float(), offset.float(), group_size, dtype, device, bias)
        return layer

    def _store(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int, dtype: torch.dtype,
               device: torch.device, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.kernel = device.type == "cpu" and dtype in KERNEL_DTYPES and self.out_features % 16 == 0
        if self.kernel:
            self.register_buffer("packed", pack_int4(q))
            self.register_buffer("scale_offset", torch.stack([scale.T, offset.T], dim=-1).to(dtype).contiguous())
        else:
            q = q.to(device=device, dtype=torch.uint8)
            self.register_buffer("codes", q[:, 0::2] | (q[:, 1::2] << 4))  # (N, K / 2)
            self.register_buffer("scale", scale.to(device))
            self.register_buffer("offset", offset.to(device))
        self.bias = None if bias is None else nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)

    def unpacked_codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes of the dequantizing layout."""
        low, high = self.codes & 15, self.codes >> 4
        return torch.stack([low, high], dim=-1).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel:
            if not _uses_cpu_kernel(x2, self.scale_offset):
                raise TypeError(f"this int4 layer was packed for the CPU kernel with {self.scale_offset.dtype} "
                                f"activations and got {x.dtype} inputs on {x.device}: move and cast the model "
                                f"before quantizing it (load_model(..., device=..., dtype=..., quantize=...))")
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                           self.scale_offset)
        else:
            N, K, g = self.out_features, self.in_features, self.group_size
            w = (self.unpacked_codes().view(N, K // g, g).float() - 8) * self.scale[..., None] + self.offset[..., None]
            y = F.linear(x2, w.view(N, K).to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class Int8GroupLinear(nn.Module):
    """A linear layer with int8 weights and one scale (and optionally one offset) per group of `group_size` inputs:
    W = q * d + offset, q in [-128, 127] (a GGUF Q8_0 tensor; a 5-bit Q5_x one, whose codes fit in int8), which
    `_weight_int8pack_mm` cannot take (its scales are per output channel). It is split exactly into two int4
    planes: with u = q + 128 = 16 h + l (h, l in [0, 15]), q * d + offset = (h - 8) * 16d + ((l - 8) * d + 8d +
    offset). Both planes sit side by side in one Int4Linear over 2K inputs (`planes`: groups of h with scale 16d,
    offset 0, then groups of l with scale d, offset 8d + offset) fed [x, x], so one int4 kernel call sums them in
    its fp32 accumulator. 8 bits a weight, as int8; 16d and d are exact in any float type that holds d (8d +
    offset is rounded once, as a Q4_1 offset). Chosen by measurement against a dequantized bf16 / fp32 matrix and
    int4 re-quantization on SmolLM2's tied head (49152 x 576): bench/bench_gguf_q8.py."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, bias: torch.Tensor | None = None,
                 offset: torch.Tensor | None = None) -> None:
        super().__init__()
        u = q.to(torch.int8).view(torch.uint8) ^ 128  # q + 128 as a byte
        scale = scale.float()
        low_offset = 8 * scale if offset is None else 8 * scale + offset.float()
        codes = torch.cat([u >> 4, u & 15], dim=1)
        del u
        self.planes = Int4Linear.from_codes(codes, torch.cat([16 * scale, scale], dim=1),
                                            torch.cat([torch.zeros_like(scale), low_offset], dim=1), group_size,
                                            dtype, device, bias)
        self.in_features, self.out_features, self.group_size = q.shape[1], q.shape[0], group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.planes(torch.cat([x, x], dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class StackedLinear(nn.Module):
    """A linear layer made of row blocks that are layers of their own (any of the above, or nn.Linear), all over the
    same inputs: its output is theirs concatenated along the last dim, in order, as one linear layer over the
    stacked matrix would give. A GGUF matrix fused from parts of different block types (q/k/v with a Q6_K v) keeps
    each part native where its type allows it (weights/gguf.py stacked_linear)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        widths = {part.in_features for part in parts}
        if len(widths) != 1:
            raise ValueError(f"row blocks must share in_features; got {sorted(widths)}")
        self.parts = nn.ModuleList(parts)
        self.in_features = widths.pop()
        self.out_features = sum(part.out_features for part in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)  # (..., sum of the parts' out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QuantizedEmbedding(nn.Module):
    """A token embedding kept in group-quantized form: row v is codes[v] * scale[v, g] + low[v, g] per group of
    `group_size` (int8 codes; low zero when absent), dequantized only for the rows looked up, in fp32 and then
    cast to `dtype`, the model's float type (a GGUF token_embd: weights/gguf.py native_embedding)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, group_size: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.group_size, self.dtype = group_size, dtype
        self.register_buffer("codes", codes.to(device=device, dtype=torch.int8))
        self.register_buffer("scale", scale.to(device=device, dtype=torch.float32))
        self.register_buffer("low", None if low is None else low.to(device=device, dtype=torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        g = self.group_size
        rows = self.codes[ids].float().unflatten(-1, (-1, g)) * self.scale[ids][..., None]  # (..., G, g)
        if self.low is not None:
            rows = rows + self.low[ids][..., None]
        return rows.flatten(-2).to(self.dtype)

    def row_bytes(self) -> int:
        """Bytes one looked-up row reads (codes, scales and lows)."""
        return sum(t[0].nbytes for t in (self.codes, self.scale, self.low) if t is not None)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}, dtype={self.dtype}"


def language_model(model: nn.Module) -> nn.Module:
    """The part of a model that decodes: a VLM's `.lm`, else the model itself."""
    return getattr(model, "lm", model)


def quantize_plan(model: nn.Module, quantization: str | Quantization) -> dict[str, Callable[[nn.Module], nn.Module]]:
    """Which layers quantization replaces and how: every nn.Linear of the model's language model (but those in
    KEEP_FLOAT; for nf4 also those whose size train/qlora.py cannot cut into blocks) by full name, each with
    the function making its quantized layer from the loaded one (in the device and type of its weight). Reads
    shapes only, so it works on a model built on the meta device (weights/materialize.py: load_model
    quantizes each layer as it is loaded). ValueError when there is nothing to quantize or an int4 group does
    not divide a layer's in_features."""
    spec = Quantization.parse(quantization)
    lm = language_model(model)
    prefix = next((f"{name}." for name, m in model.named_modules() if m is lm and name), "")
    targets = [(name, module) for name, module in lm.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_FLOAT]
    if spec.nf4:
        from vlmkit.train.qlora import nf4_layer, scaler_block_size, torchao_nf4

        torchao_nf4()  # a missing torchao is reported before anything is loaded
        targets = [(name, m) for name, m in targets if scaler_block_size(m.weight.numel()) is not None]
    if not targets:
        raise ValueError(f"--quantize {spec}: {type(model).__name__} has no linear layers in its language model")
    if spec.bits == 4 and not spec.nf4:
        bad = [f"{name} ({m.in_features})" for name, m in targets if m.in_features % spec.group_size]
        if bad:
            fits = [g for g in GROUP_SIZES if all(m.in_features % g == 0 for _, m in targets)]
            raise ValueError(f"--quantize {spec}: in_features of {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}"
                             f" is not a multiple of the group size {spec.group_size}; groups that fit this model: "
                             f"{', '.join(f'{g}' for g in fits) or 'none (use int8)'}")

    def make(linear: nn.Module) -> nn.Module:
        if spec.nf4:
            return nf4_layer(linear)
        dtype = linear.weight.dtype
        return Int8Linear(linear, dtype) if spec.bits == 8 else Int4Linear(linear, spec.group_size, dtype)

    return {prefix + name: make for name, _ in targets}


@torch.no_grad()
def quantize_model(model: nn.Module, quantization: str | Quantization) -> int:
    """Replace every layer quantize_plan names with its quantized layer, in place, on the layers' device and in
    the type of the model's float weights; returns how many were replaced. Cast and move the model first: the
    int4 CPU layout is made for one device and type. (load_model quantizes a model folder's layers while it
    loads them instead: weights/materialize.py.)"""
    from vlmkit.weights.materialize import replace_layers

    return replace_layers(model, quantize_plan(model, quantization))
