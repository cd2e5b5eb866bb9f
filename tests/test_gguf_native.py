"""--quantize gguf (weights/gguf.py load_native): a GGUF file's Q4_x / Q5_x / Q8_0 blocks kept as integer weights.

Oracles:
- layers: the native layers (torch's int4 CPU kernel, which computes (q - 8) * scale + offset per group, and the
  dequantizing path) equal F.linear with the weights dequantized by the `gguf` package's own
  `gguf.quants.dequantize` (llama.cpp's formulas) in float64, within test_quantize's derived `bound`; and a layer
  built with a wrong offset (Q4_1's / Q4_K's min m where m + 8d is due, Q5_x planes without m) is far outside
  it, so the test can fail; gguf-py writes no K-quants, so the test's k_quantize writes their blocks;
- the quantized embedding's rows (Q6_K's too) equal gguf.quants.dequantize's rows exactly (the same fp32
  operations);
- whole model: a tiny llama / qwen2 GGUF (written as llama.cpp's converter writes it: test_gguf.write_gguf) loaded
  natively in fp32 gives the logits and greedy tokens of the same file dequantized (load_gguf, itself checked
  against transformers in test_gguf), and never dequantizes a Q4_0 / Q4_1 / Q8_0 tensor; the same for a
  Q4_K_M-like file (Q4_K, Q5_x, Q6_K: only its Q6_K matrices are dequantized), also where a Q6_K v is fused with
  Q4_K q and k (a StackedLinear: F.linear with the oracle's concatenated matrix, within `bound`);
- SmolLM2-135M-Instruct Q4_1 (slow): the same greedy tokens over 64 steps as the file dequantized to fp32 on 10
  prompts, perplexity of test_quantize's PROSE within 8% of fp32's, and a peak memory of loading lower than the
  dequantizing load's by more than the float32 weights' size.

Run: PYTHONPATH=src python -m pytest -q tests/test_gguf_native.py (add -m slow for the SmolLM2 tests)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import test_gguf
import torch
from gguf import GGMLQuantizationType as QT
from test_gguf import bpe, tiny_hf_model, write_gguf  # noqa: F401  (bpe: a fixture)
from test_quantize import bound, perplexity

from vlmkit import quantize
from vlmkit.cli import build_parser
from vlmkit.load import load_model
from vlmkit.quantize import (
    Int4Linear,
    Int8GroupLinear,
    QuantizedEmbedding,
    StackedLinear,
)
from vlmkit.weights import gguf as vgguf
from vlmkit.weights.gguf import (
    BlockPart,
    load_gguf,
    native_embedding,
    native_linear,
    stacked_linear,
)

NATIVE = (QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q5_0, QT.Q5_1, QT.Q5_K)
K_TYPES = (QT.Q4_K, QT.Q5_K, QT.Q6_K)


def k_quantize(w: np.ndarray, qtype: QT) -> np.ndarray:
    """(rows, cols) float32 -> raw Q4_K / Q5_K / Q6_K rows (gguf 0.19 quantizes none): a plain round-to-nearest
    quantizer writing ggml's block layout (ggml-common.h's block_q4_K / _q5_K / _q6_K), so that the tensors carry
    the weights; gguf.quants.dequantize of its bytes stays the oracle, and test_k_quantize_keeps_the_weights checks the packing."""
    n = w.shape[0]
    x = w.reshape(-1, 256).astype(np.float64)  # one super-block a row
    if qtype in (QT.Q4_K, QT.Q5_K):
        top = 15 if qtype == QT.Q4_K else 31
        sub = x.reshape(-1, 8, 32)
        low = np.minimum(sub.min(-1), 0)  # (B, 8): w = step q - m with m = -low >= 0
        step = (sub.max(-1) - low) / top
        d = (step.max(-1, keepdims=True) / 63).astype(np.float16)  # (B, 1)
        dmin = (-low).max(-1, keepdims=True) / 63
        dmin = dmin.astype(np.float16)
        sc = np.clip(np.round(step / np.where(d > 0, d, 1)), 0, 63).astype(np.uint8)
        mn = np.clip(np.round(-low / np.where(dmin > 0, dmin, 1)), 0, 63).astype(np.uint8)
        s = d.astype(np.float64) * sc
        q = np.clip(np.round((sub + (dmin.astype(np.float64) * mn)[..., None]) / np.where(s > 0, s, 1)[..., None]),
                    0, top).astype(np.uint8)  # (B, 8, 32)
        scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                                 (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)  # get_scale_min's packing
        lo = q & 15
        qs = (lo[:, 0::2] | (lo[:, 1::2] << 4)).reshape(-1, 128)  # 32 bytes: sub-block 2c low nibbles, 2c+1 high
        qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)  # bit s: sub-block s
        out = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, *([qh] if top == 31 else []), qs],
                             axis=1)
    else:
        sub = x.reshape(-1, 16, 16)
        step = np.abs(sub).max(-1) / 31  # (B, 16): w = step (q - 32), q - 32 in [-32, 31]
        d = (step.max(-1, keepdims=True) / 127).astype(np.float16)
        sc = np.clip(np.round(step / np.where(d > 0, d, 1)), -128, 127).astype(np.int8)
        s = d.astype(np.float64) * sc
        q = (np.clip(np.round(sub / np.where(s != 0, s, 1)[..., None]), -32, 31) + 32).astype(np.uint8)
        q = q.reshape(-1, 2, 4, 32)  # (B, half, quarter, l): the layout of vgguf._q6_k_codes
        lo, hi = q & 15, q >> 4
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8)], axis=1)
    return out.reshape(n, -1)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_k_quantize_keeps_the_weights(qtype):
    """The test's own Q4_K / Q6_K writer: gguf's dequantization of its bytes is within one step of the weights
    (a wrongly packed scale or code would be far off), so the tiny models below carry their weights."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 512)) * 0.1 + 0.02).astype(np.float32)
    err = np.abs(gguf.quants.dequantize(k_quantize(w, qtype), qtype) - w)
    assert err.max() < {QT.Q4_K: 0.03, QT.Q5_K: 0.015, QT.Q6_K: 0.008}[qtype]  # measured 0.020, 0.010, 0.0063


def quantize_any(w: np.ndarray, qtype: QT) -> np.ndarray:
    return k_quantize(w, qtype) if qtype in K_TYPES else gguf.quants.quantize(w, qtype)


def blocks(qtype: QT, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(raw rows (rows, bytes) uint8 as llama.cpp's quantizer writes them, gguf's dequantization (rows, cols))."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.1 + rng.uniform(-0.05, 0.05, (rows, 1))).astype(np.float32)
    raw = quantize_any(w, qtype)
    return torch.from_numpy(raw.copy()), gguf.quants.dequantize(raw, qtype).astype(np.float64)


def steps(raw: np.ndarray, qtype: QT) -> torch.Tensor:
    """Per weight, the step of its group's codes: d of the block, d * scale of the sub-block for Q4_K / Q5_K."""
    b = raw.reshape(-1, vgguf.DEQUANTIZERS[qtype][1])
    d = b[:, :2].copy().view("<f2").astype(np.float64)
    if qtype in (QT.Q4_K, QT.Q5_K):
        d = d * gguf.quants.Q4_K.get_scale_min(b[:, 4:16])[0].astype(np.float64)  # (B, 8)
    return torch.from_numpy(np.repeat(np.abs(d).reshape(raw.shape[0], -1), 32, axis=1))


def kernel_form(x: torch.Tensor, w: torch.Tensor, step: torch.Tensor, raw: torch.Tensor, qtype: QT):
    """(inputs, weights, steps) as the int4 kernel sees them: Q8_0's / Q5_x's W = c d + m (c = q, or q - 16 for
    Q5_0) is the two int4 planes side by side, (h - 8) 16d and (l - 8) d + 8d + m with c + 128 = 16 h + l, fed
    [x, x]; Q4_x as they are."""
    if qtype in (QT.Q4_0, QT.Q4_1, QT.Q4_K):
        return x, w, step
    q, d, m = vgguf.decode_blocks(raw, qtype)
    q, d = q.double(), d.double().repeat_interleave(32, 1)
    m = 0 if m is None else m.double().repeat_interleave(32, 1)
    u = q - (16 if qtype == QT.Q5_0 else 0) + 128
    h = torch.div(u, 16, rounding_mode="floor")
    return torch.cat([x, x], -1), torch.cat([(h - 8) * 16 * d, (u - 16 * h - 8) * d + 8 * d + m], 1), \
        torch.cat([16 * step, step], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("qtype", NATIVE, ids=lambda t: t.name)
@pytest.mark.parametrize("out_features", [48, 40])  # 48: the CPU kernel; 40: the dequantizing path
def test_native_linear_equals_gguf_dequantized(qtype, dtype, out_features):
    raw, w = blocks(qtype, out_features, 256)
    layer = native_linear(raw, qtype, dtype, "cpu")
    planes = qtype in (QT.Q8_0, QT.Q5_0, QT.Q5_1, QT.Q5_K)
    assert isinstance(layer, Int8GroupLinear if planes else Int4Linear)
    assert (layer.planes if planes else layer).kernel == (out_features % 16 == 0 and dtype != torch.float64)
    torch.manual_seed(0)
    x = torch.randn(3, 256).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, out_features)
    w = torch.from_numpy(w)
    y_ref = x.double() @ w.T
    xk, wk, step = kernel_form(x, w, steps(raw.numpy(), qtype), raw, qtype)
    assert torch.allclose(xk.double() @ wk.T, y_ref, rtol=1e-12, atol=1e-12)  # the split is exact
    tol = bound(xk, wk, y_ref, dtype, step)
    err = (y.double() - y_ref).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    if qtype in (QT.Q4_1, QT.Q4_K) and dtype != torch.bfloat16:  # the test can fail: offset m, not m + 8d
        q, d, m = vgguf.decode_blocks(raw, qtype)
        wrong = Int4Linear.from_codes(q, d, m, 32, dtype)
        assert ((wrong(x).double() - y_ref).abs() > tol).float().mean() > 0.5
    if qtype in (QT.Q5_1, QT.Q5_K) and dtype != torch.bfloat16:  # and the planes' offset m left out
        q, d, _ = vgguf.decode_blocks(raw, qtype)
        wrong = Int8GroupLinear(q, d, 32, dtype)
        assert ((wrong(x).double() - y_ref).abs() > tol).float().mean() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_linear_equals_gguf_dequantized(dtype):
    """q, k in Q4_K (the int4 kernel, then its dequantizing path: 40 rows) and v in Q6_K (a float nn.Linear of its
    dequantized rows), with a bias: F.linear with the three oracle-dequantized matrices concatenated, within
    test_quantize's bound (for the float part: step 0, leaving its weights' and outputs' rounding to dtype and the
    fp32 sums)."""
    specs = [(QT.Q4_K, 48), (QT.Q4_K, 40), (QT.Q6_K, 32)]
    made = [blocks(qtype, rows, 512, seed=i) for i, (qtype, rows) in enumerate(specs)]
    parts = [BlockPart(raw.view(rows, 2, -1), qtype) for (raw, _), (qtype, rows) in zip(made, specs)]
    torch.manual_seed(0)
    bias = torch.randn(120) * 0.1
    layer = stacked_linear(parts, dtype, "cpu", bias)
    assert isinstance(layer, StackedLinear) and (layer.in_features, layer.out_features) == (512, 120)
    assert [type(p) for p in layer.parts] == [Int4Linear, Int4Linear, torch.nn.Linear]
    assert [p.kernel for p in layer.parts[:2]] == [True, False]
    x = torch.randn(2, 3, 512).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, 120)
    w = torch.from_numpy(np.concatenate([oracle for _, oracle in made]))  # (120, 512) float64
    y_ref = x.double() @ w.T + bias.to(dtype).double()
    step = torch.cat([steps(made[0][0].numpy(), QT.Q4_K), steps(made[1][0].numpy(), QT.Q4_K),
                      torch.zeros(32, 512, dtype=torch.float64)])
    tol = bound(x, w, y_ref, dtype, step) + 2.0 ** {torch.float32: -24, torch.bfloat16: -8}[dtype] * bias.abs()
    err = (y.double() - y_ref).abs()
    print(f"{dtype}: max |error| {err.max().item():.3g}, max error / bound {(err / tol).max().item():.3g}")
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    swapped = StackedLinear([layer.parts[1], layer.parts[0], layer.parts[2]])  # the test can fail: q and k swapped
    assert ((swapped(x).double() - y_ref).abs() > tol)[..., :88].float().mean() > 0.5


def test_int4_packing_in_row_blocks_gives_the_whole_layout(monkeypatch):
    q = torch.randint(0, 16, (320, 96), dtype=torch.uint8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    monkeypatch.setattr(quantize, "PACK_ROWS", 64)
    assert torch.equal(quantize.pack_int4(q), whole)
    monkeypatch.setattr(quantize, "PACK_ROWS", 128)  # a last block of 64 rows
    assert torch.equal(quantize.pack_int4(q), whole)


def test_q6_k_matrices_have_no_int4_layout():
    raw, _ = blocks(QT.Q6_K, 16, 256)
    with pytest.raises(ValueError, match="Q6_K matrices have no int4 layout: its 16-value sub-blocks"):
        native_linear(raw, QT.Q6_K, torch.float32, "cpu")


@pytest.mark.parametrize("qtype", [*NATIVE, QT.Q6_K], ids=lambda t: t.name)
def test_native_embedding_rows_equal_gguf_dequantized(qtype):
    raw, w = blocks(qtype, 50, 256 if qtype in K_TYPES else 96, seed=3)
    emb = native_embedding(raw, qtype, torch.float32, "cpu")
    assert isinstance(emb, QuantizedEmbedding) and emb.codes.dtype == torch.int8
    assert emb.group_size == (16 if qtype == QT.Q6_K else 32)
    ids = torch.tensor([[0, 7, 49], [7, 7, 1]])
    assert torch.equal(emb(ids).double(), torch.from_numpy(w)[ids])
    assert native_embedding(raw, qtype, torch.bfloat16, "cpu")(ids).dtype == torch.bfloat16


# every matrix in a native type: attention in Q4_1, MLP in Q4_0 / Q8_0, embedding Q8_0, an untied head Q4_1
ALL_NATIVE = {"token_embd": QT.Q8_0, "attn_q": QT.Q4_1, "attn_k": QT.Q4_1, "attn_v": QT.Q4_1,
              "attn_output": QT.Q4_0, "ffn_gate": QT.Q4_0, "ffn_up": QT.Q4_0, "ffn_down": QT.Q8_0,
              "output": QT.Q4_1}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama: Q/K rows unpermuted, untied head; qwen2: tied
def test_tiny_gguf_native_equals_dequantized(arch, bpe, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(test_gguf, "TENSOR_TYPES", ALL_NATIVE)
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", tiny_hf_model(arch, len(bpe[0])), arch, bpe)
    reference, tok = load_gguf(path)
    seen: list[QT] = []
    dequantize = vgguf.dequantize
    monkeypatch.setattr(vgguf, "dequantize", lambda data, qtype, shape: seen.append(QT(qtype)) or
                        dequantize(data, qtype, shape))
    loaded = load_model(str(path), quantize="gguf", dtype=torch.float32)
    assert set(seen) == {QT.F32}  # the norms only: no block went through a float matrix
    lm = loaded.model
    assert loaded.quantization == "gguf" and loaded.dtype == torch.float32
    assert isinstance(lm.embed, QuantizedEmbedding)
    assert isinstance(lm.lm_head, Int8GroupLinear if arch == "qwen2" else Int4Linear)  # qwen2: the tied Q8_0
    assert isinstance(lm.layers[0].attn.qkv, Int4Linear) and isinstance(lm.layers[1].mlp.down, Int8GroupLinear)
    ids = torch.tensor([tok.encode("<|im_start|>user\nHello world, 2024!<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        ours, theirs = lm(ids).logits, reference(ids).logits
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
        assert test_gguf.greedy(lm, ids, 20) == test_gguf.greedy(reference, ids, 20)
    # the KV cache follows the float type, not the integer weights
    assert lm.new_cache(1, 8).keys[0].dtype == torch.float32
    assert load_model(str(path), quantize="gguf", dtype=torch.float64).model.new_cache(1, 8).keys[0].dtype == \
        torch.float64


# as llama.cpp's Q4_K_M mixes them: matrices Q4_K, some Q6_K (llama: ffn_down and the head, dequantized; qwen2:
# a Q6_K embedding, native, and its tied head, dequantized; its attn_output Q5_1 and ffn_down Q5_K as in a Q5_K_M
# file). K-quant rows need 256 inputs: hidden 256, MLP 512.
K_MIX = {"token_embd": QT.Q4_K, "attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q4_K, "attn_output": QT.Q4_K,
         "ffn_gate": QT.Q4_K, "ffn_up": QT.Q4_K, "ffn_down": QT.Q6_K, "output": QT.Q6_K}


def k_quant_file(arch: str, types: dict, bpe, tmp_path, monkeypatch):  # noqa: F811
    """A tiny arch model written as a GGUF with these tensor types, the file dequantized to fp32 (the reference
    model) and its tokenizer, and the list every later vgguf.dequantize call appends its type to."""
    monkeypatch.setattr(test_gguf, "TENSOR_TYPES", types)
    monkeypatch.setattr(test_gguf, "QUANTIZE", quantize_any)
    model = tiny_hf_model(arch, len(bpe[0]), hidden_size=256, intermediate_size=512)
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", model, arch, bpe)
    reference, tok = load_gguf(path)
    seen: list[QT] = []
    dequantize = vgguf.dequantize
    monkeypatch.setattr(vgguf, "dequantize", lambda data, qtype, shape: seen.append(QT(qtype)) or
                        dequantize(data, qtype, shape))
    return path, reference, tok, seen


def check_answers_as_dequantized(lm, reference, tok) -> None:
    """fp32 logits within 1e-4 of the largest and 20 equal greedy tokens on a chat prompt."""
    ids = torch.tensor([tok.encode("<|im_start|>user\nHello world, 2024!<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        ours, theirs = lm(ids).logits, reference(ids).logits
        print(f"max |logit difference| {(ours - theirs).abs().max().item():.3g} of max |logit| "
              f"{theirs.abs().max().item():.3g}")
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
        assert test_gguf.greedy(lm, ids, 20) == test_gguf.greedy(reference, ids, 20)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_k_quant_gguf_native_equals_dequantized(arch, bpe, tmp_path, monkeypatch):  # noqa: F811
    types = K_MIX if arch == "llama" else dict(K_MIX, token_embd=QT.Q6_K, attn_output=QT.Q5_1, ffn_down=QT.Q5_K)
    path, reference, tok, seen = k_quant_file(arch, types, bpe, tmp_path, monkeypatch)
    first = "blk.0.ffn_down.weight (Q6_K)" if arch == "llama" else "token_embd.weight (Q6_K, as the tied head)"
    with pytest.warns(UserWarning, match=rf"\({re.escape(first)}.*Q6_K matrices: its 16-value sub-blocks"):
        loaded = load_model(str(path), quantize="gguf", dtype=torch.float32)
    assert set(seen) == {QT.F32, QT.Q6_K}  # the norms and the Q6_K matrices only
    lm = loaded.model
    assert isinstance(lm.embed, QuantizedEmbedding) and lm.embed.group_size == (32 if arch == "llama" else 16)
    assert type(lm.lm_head) is torch.nn.Linear
    for layer in lm.layers:
        assert isinstance(layer.attn.qkv, Int4Linear) and isinstance(layer.mlp.gate_up, Int4Linear)
        assert isinstance(layer.attn.out, Int4Linear if arch == "llama" else Int8GroupLinear)
        assert type(layer.mlp.down) is (torch.nn.Linear if arch == "llama" else Int8GroupLinear)
    check_answers_as_dequantized(lm, reference, tok)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases, split across the parts
def test_fused_parts_of_different_types_stay_native(arch, bpe, tmp_path, monkeypatch):  # noqa: F811
    """As in a Q4_K_M file, layer 0's v is Q6_K beside Q4_K q and k (and here its up Q5_K beside a Q4_K gate);
    layer 1 is uniform. Layer 0's q/k/v and gate/up become StackedLinears whose only float part is the Q6_K v,
    layer 1's stay one native layer each, and the model gives the dequantized file's logits and greedy tokens."""
    types = K_MIX if arch == "llama" else dict(K_MIX, token_embd=QT.Q6_K, attn_output=QT.Q5_1, ffn_down=QT.Q5_K)
    path, reference, tok, seen = k_quant_file(arch, {**types, "blk.0.attn_v": QT.Q6_K, "blk.0.ffn_up": QT.Q5_K}, bpe,
                                              tmp_path, monkeypatch)
    with pytest.warns(UserWarning, match="dequantized") as caught:
        lm = load_model(str(path), quantize="gguf", dtype=torch.float32).model
    message = next(str(w.message) for w in caught if "--quantize gguf" in str(w.message))
    named = re.findall(r"([\w.]+\.weight) \((\w+)", message)
    assert ("blk.0.attn_v.weight", "Q6_K") in named and all(qtype == "Q6_K" for _, qtype in named), named
    assert set(seen) == {QT.F32, QT.Q6_K}  # the norms and the Q6_K matrices only
    first, second = lm.layers
    assert isinstance(first.attn.qkv, StackedLinear) and isinstance(first.mlp.gate_up, StackedLinear)
    assert [type(p) for p in first.attn.qkv.parts] == [Int4Linear, Int4Linear, torch.nn.Linear]
    assert [type(p) for p in first.mlp.gate_up.parts] == [Int4Linear, Int8GroupLinear]
    assert (first.attn.qkv.parts[0].bias is not None) == (arch == "qwen2")
    assert type(second.attn.qkv) is Int4Linear and type(second.mlp.gate_up) is Int4Linear
    check_answers_as_dequantized(lm, reference, tok)


def test_other_types_are_dequantized_with_a_warning(bpe, tmp_path, monkeypatch):  # noqa: F811
    types = dict(ALL_NATIVE, attn_v=QT.Q6_K, ffn_down=QT.Q6_K, ffn_up=QT.F16)
    monkeypatch.setattr(test_gguf, "TENSOR_TYPES", types)
    monkeypatch.setattr(test_gguf, "QUANTIZE", quantize_any)
    model = tiny_hf_model("llama", len(bpe[0]), hidden_size=256, intermediate_size=512)
    path = write_gguf(tmp_path / "mixed.gguf", model, "llama", bpe)
    with pytest.warns(UserWarning, match=r"4 matrices .* dequantized to torch.float32 \(blk.0.attn_v.weight \(Q6_K\), "
                      r"blk.0.ffn_down.weight \(Q6_K\), blk.1.attn_v.weight \(Q6_K\).*; Q6_K "
                      r"matrices: its 16-value sub-blocks are finer than the int4 kernel's groups \(32 to 256\)"):
        loaded = load_model(str(path), quantize="gguf", dtype=torch.float32)
    lm = loaded.model
    # q/k (Q4_1) stay native beside a float Q6_K v; gate (Q4_0) beside the F16 up; the Q6_K down has no int4 layout
    qkv, gate_up = lm.layers[0].attn.qkv, lm.layers[0].mlp.gate_up
    assert [type(p) for p in qkv.parts] == [Int4Linear, Int4Linear, torch.nn.Linear]
    assert [type(p) for p in gate_up.parts] == [Int4Linear, torch.nn.Linear]
    assert type(lm.layers[0].mlp.down) is torch.nn.Linear and isinstance(lm.layers[0].attn.out, Int4Linear)
    reference, tok = load_gguf(path)
    ids = torch.tensor([tok.encode("Hello world")])
    with torch.no_grad():
        assert (lm(ids).logits - reference(ids).logits).abs().max() <= 1e-4 * reference(ids).logits.abs().max()


def test_flag_on_the_verbs_and_non_gguf_models():
    parser = build_parser()
    for verb, extra in [("generate", ["--prompt", "hi"]), ("chat", []), ("serve", []), ("eval", ["--data", "d.jsonl"])]:
        assert parser.parse_args([verb, "--model", "m.gguf", "--quantize", "gguf", *extra]).quantize == "gguf"
    with pytest.raises(ValueError, match="not a .gguf file.*use --quantize int4 or int8"):
        load_model("tiny-random", quantize="gguf")


# --- SmolLM2-135M-Instruct, Q4_1 (slow) ---------------------------------------------------------

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis simply.",
           "List three uses of a paperclip.", "What is 17 times 23?", "Tell me a short story about a robot.",
           "How do I boil an egg?", "Translate 'good morning' into Spanish.", "Why is the sky blue?",
           "Give me a tip for learning to code."]


def greedy_with_gaps(lm, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, per step, the gap between the best and second-best logit."""
    cache = lm.new_cache(1, len(ids) + steps + 1)
    logits = lm(input_ids=torch.tensor([ids]), cache=cache, logits_to_keep=1).logits[0, -1].float()
    tokens, gaps = [], []
    for _ in range(steps):
        top = logits.topk(2)
        tokens.append(int(top.indices[0]))
        gaps.append(float(top.values[0] - top.values[1]))
        logits = lm(input_ids=torch.tensor([[tokens[-1]]]), cache=cache).logits[0, -1].float()
    return tokens, gaps


@pytest.mark.slow
def test_smollm2_native_greedy_64_steps_as_fp32_dequantized():
    """Native fp32 (the file's exact weights, summed in another order) against the file dequantized to fp32: the
    same 64 greedy tokens on all 10 prompts. Native bf16 (the default) is reported, not asserted: bf16 rounds the
    activations (and the scales to 8 bits), so it departs from fp32 where the two best logits are close; its first
    difference and the fp32 logit gap there are printed."""
    fp32 = load_model("smollm2-135m")
    native = load_model("smollm2-135m", quantize="gguf", dtype=torch.float32)
    native_bf16 = load_model("smollm2-135m", quantize="gguf")
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = fp32.prompt_ids([{"role": "user", "content": prompt}])
            want, gaps = greedy_with_gaps(fp32.model, ids, 64)
            got, _ = greedy_with_gaps(native.model, ids, 64)
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
            assert first is None, (prompt, first, gaps[first])
            bf16, _ = greedy_with_gaps(native_bf16.model, ids, 64)
            diff = next((i for i, (a, b) in enumerate(zip(bf16, want)) if a != b), None)
            print(f"{prompt!r}: native fp32 = fp32 over 64 steps; native bf16 "
                  + ("the same" if diff is None else f"first differs at step {diff} (fp32 logit gap {gaps[diff]:.3f})"))


@pytest.mark.slow
def test_smollm2_native_perplexity_and_bytes():
    base, n = perplexity(load_model("smollm2-135m"))
    assert n > 900 and 5 < base < 60
    for dtype in (torch.bfloat16, torch.float32):
        loaded = load_model("smollm2-135m", quantize="gguf", dtype=dtype)
        ppl, _ = perplexity(loaded)
        nbytes = sum(t.nbytes for t in [*loaded.model.parameters(), *loaded.model.buffers()])
        print(f"native {dtype}: perplexity {ppl:.3f} (fp32 dequantized {base:.3f}), {nbytes / 1e6:.1f} MB")
        assert ppl <= base * 1.08, (dtype, base, ppl)
        assert nbytes < 0.3 * 538e6  # the fp32 weights: 538 MB; measured 134 MB (bf16 scales), 154 MB (fp32)


PEAK = """
import json, sys, torch
from vlmkit.load import load_model
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss would carry the parent's over the fork)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
before = peak()
load_model("smollm2-135m", **json.loads(sys.argv[1]))
print(peak() - before)
"""


@pytest.mark.slow
def test_smollm2_native_loading_never_holds_the_float_weights():
    """Peak resident memory of loading, in a fresh process (the tokenizer's ~170 MB and the file's map included):
    the dequantizing load holds the float32 state and the float32 model (538 MB each) at once, as does any load
    that quantizes from floats (--quantize int4). A native load that took the float detour even once would hold a
    float32 copy of the weights beside the rest; native loading must stay below the dequantizing load by more
    than that copy (measured: 781 MB against 1413 MB for the dequantizing load and 1410 MB for --quantize int4)."""
    def peak(kw: dict) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK, json.dumps(kw)], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return int(out.stdout.split()[-1])
    native, dense = peak({"quantize": "gguf"}), peak({})
    print(f"peak memory of loading: native {native / 1e6:.0f} MB, dequantized fp32 {dense / 1e6:.0f} MB")
    assert native + 538e6 < dense
