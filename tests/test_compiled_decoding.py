"""--compile (decoding.compile_decoding): the decode step's forward pass through torch.compile.

Oracle: the same step run eagerly (decoding.decode_step without compile_decoding) on the same model, rows and
prompts. The compiled step must give
- the same greedy tokens, step for step;
- logits within a stated tolerance of the eager ones: fp32 |compiled - eager| <= 1e-4 * max|eager| (inductor
  fuses and reorders the fp32 sums: differences of a few ulps of the sums, ~1e-6 relative); bf16 activations
  (the int4 model) <= 2^-5 * max|eager|: a bf16 value has 8 significant bits (a step of 2^-8 relative), and
  inductor keeps the elementwise ops between the matmuls in fp32 where eager rounds each one to bf16, so a few
  such roundings per layer may differ;
- a bounded number of compiled graphs while the KV cache grows step by step: at most one graph per shape
  class (no padding at one row, padding (an attention mask) at two rows), not one per step.

The default tests use small random models (compile takes ~10-30 s each on a loaded 2-core CPU); SmolLM2-135M
int4 is -m slow.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src python -m pytest -q tests/test_compiled_decoding.py
"""

from __future__ import annotations

import pytest
import torch

from vlmkit.config import LMConfig
from vlmkit.decoding import compile_decoding, compiled_step, decode_step, prefill_batch
from vlmkit.generate import new_row
from vlmkit.load import load_model
from vlmkit.models.lm import CausalLM
from vlmkit.quantize import Int4Linear, quantize_model
from vlmkit.sampling import GenerationConfig

STEPS = 12


def decode(model: torch.nn.Module, prompts: list[tuple[list[int], int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy decoding of (prompt, max new tokens) rows through decoding.decode_step (trim on, as the server
    runs it): each row's tokens and the logits (B, V) of every step, the prefill's first."""
    rows = [new_row(p, GenerationConfig(max_new_tokens=n, temperature=0.0)) for p, n in prompts]
    with torch.inference_mode():
        batch = prefill_batch(model, rows, max(len(p) + n for p, n in prompts), {}, pad_id=0)
        logits = [batch.logits.float().clone()]
        while batch.rows:
            decode_step(model, batch, trim=True)
            if batch.rows:
                logits.append(batch.logits.float().clone())
    return [r.ids for r in rows], logits


def compare(model: torch.nn.Module, prompts: list[tuple[list[int], int]], rel: float, graphs: int) -> None:
    """The compiled step's tokens and logits against the eager step's; at most `graphs` graphs compiled."""
    eager_ids, eager_logits = decode(model, prompts)
    step = compile_decoding(model)
    assert compiled_step(model) is step
    ids, logits = decode(model, prompts)
    assert ids == eager_ids
    assert len(logits) == len(eager_logits) == max(n for _, n in prompts)
    for got, want in zip(logits, eager_logits):
        assert (got - want).abs().max() <= rel * want.abs().max()
    assert 1 <= step.graphs <= graphs  # not one per cache length: STEPS - 1 steps ran compiled
    assert step.seconds > 0


def test_compiled_equals_eager_tiny_random_padding_and_rows_leaving():
    """tiny-random (fp32): two rows of different lengths (left padding: the step with an attention mask), the
    short one stopping after 3 tokens (the batch shrinks to one row without padding): two shape classes, so at
    most two graphs over 11 steps."""
    loaded = load_model("tiny-random")
    encode = loaded.tokenizer.encode
    compare(loaded.model, [(encode("The capital of France is"), STEPS), (encode("Hi"), 3)], rel=1e-4, graphs=2)


def int4_lm() -> CausalLM:
    """A small random Llama-shaped LM in bf16 with int4 (group 32) linear layers, tied head."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=512, tie_word_embeddings=True)
    model = CausalLM(cfg).eval().to(torch.bfloat16)
    quantize_model(model, "int4")
    return model


def test_compiled_int4_equals_eager():
    model = int4_lm()
    assert all(m.kernel for m in model.modules() if isinstance(m, Int4Linear))  # the CPU kernel, not dequantizing
    compare(model, [([5, 17, 33, 2, 90, 41, 7], STEPS)], rel=2**-5, graphs=1)


def test_compile_unavailable_is_a_clear_error(monkeypatch):
    import torch._inductor.cpp_builder as builder
    from torch._inductor.exc import InvalidCxxCompiler

    def missing() -> str:
        raise InvalidCxxCompiler()

    monkeypatch.setattr(builder, "get_cpp_compiler", missing)
    loaded = load_model("tiny-random")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler.*run without --compile"):
        compile_decoding(loaded.model)
    assert compiled_step(loaded.model) is None


def test_cli_flag_reaches_the_loader():
    from vlmkit.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "tiny-random", "--prompt", "hi", "--compile"])
    assert args.compile
    for verb in (["chat"], ["serve"], ["eval", "--data", "x.json"]):
        assert build_parser().parse_args([*verb, "--model", "tiny-random", "--compile"]).compile


@pytest.mark.slow
def test_compiled_smollm2_int4_equals_eager():
    loaded = load_model("smollm2-135m", quantize="int4")
    compare(loaded.model, [(loaded.tokenizer.encode("The capital of France is"), STEPS)], rel=2**-5, graphs=1)
