"""Tests for vlmkit.generate: cached vs naive decoding, batching, sampling, stops, streaming.

Oracles: transformers (logits processors, LlamaForCausalLM.generate), hand-computed
values, the no-cache reference path, and a scripted model whose output is known
in advance. Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_generate.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import LMConfig
from vlmkit.generate import GenerationConfig, generate, generate_naive, stream
from vlmkit.sampling import apply_repetition_penalty, process_logits, sample_next
from vlmkit.models.lm import CausalLM, KVCache

EOS, PAD = 256, 257


class ByteTokenizer:
    """Bytes are ids 0..255; 256 = eos, 257 = pad."""

    eos_token_id, pad_token_id = EOS, PAD

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out, run = [], []
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(bytes(run).decode("utf-8", errors="replace"))
            run = []
            if not skip_special_tokens:
                out.append("<eos>" if i == EOS else "<pad>")
        out.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(out)


class ScriptedLM(nn.Module):
    """Predicts script[n] after n real tokens, whatever they were: its output is known in advance.

    A prompt script[:k] is therefore continued with script[k:].
    """

    def __init__(self, script: list[int], vocab_size: int = 258) -> None:
        super().__init__()
        self.script, self.vocab_size = script, vocab_size
        self.cfg = LMConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1)
        self.anchor = nn.Parameter(torch.zeros(1))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch_size, max_len)

    def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0):
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        seen = attention_mask.sum(-1) if attention_mask is not None else torch.full((B,), past + T)
        if cache is not None:
            cache.advance(T)
        nxt = torch.tensor([self.script[min(n, len(self.script) - 1)] for n in seen.tolist()])
        return SimpleNamespace(logits=10.0 * F.one_hot(nxt, self.vocab_size).float()[:, None])  # (B, 1, V)


def tiny_lm(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    model = CausalLM(cfg).eval()
    with torch.no_grad():  # wider weights than the default init, so greedy output varies instead of looping
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    return model


PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7, 7, 12], [30, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


# ----------------------------------------------------------------------------- cache, batching


def test_cached_greedy_equals_naive():
    model = tiny_lm()
    cfg = GenerationConfig(max_new_tokens=24)
    fast, slow = generate(model, PROMPTS, cfg), generate_naive(model, PROMPTS, cfg)
    assert fast.token_ids == slow.token_ids
    assert all(len(ids) == 24 for ids in fast.token_ids)
    assert len(set(fast.token_ids[0])) > 3  # the model does not just repeat one token


def test_cached_sampling_equals_naive():
    model = tiny_lm()
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.95,
                           repetition_penalty=1.2, seed=3)
    assert generate(model, PROMPTS, cfg).token_ids == generate_naive(model, PROMPTS, cfg).token_ids


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_equals_alone(temperature):
    model = tiny_lm()
    cfg = GenerationConfig(max_new_tokens=20, temperature=temperature, repetition_penalty=1.1, seed=0)
    alone = [generate(model, [p], cfg).token_ids[0] for p in PROMPTS]
    assert generate(model, PROMPTS, cfg).token_ids == alone
    # A left-padded tensor with its mask gives the same rows as the lists.
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, 11 - len(p):], mask[i, 11 - len(p):] = torch.tensor(p), 1
    assert generate(model, ids, cfg, attention_mask=mask).token_ids == alone


def test_rows_finishing_early_leave_the_batch_without_changing_others():
    model = tiny_lm()
    free = [generate(model, [p], GenerationConfig(max_new_tokens=20)).token_ids[0] for p in PROMPTS]
    stop = free[1][5]  # row 1 stops at its 6th token (or earlier); other rows may stop too
    cfg = GenerationConfig(max_new_tokens=20, stop_token_ids=[stop])
    batched = generate(model, PROMPTS, cfg)
    for i, ids in enumerate(free):
        cut = ids.index(stop) if stop in ids else len(ids)
        assert batched.token_ids[i] == ids[:cut]
        assert batched.finish_reasons[i] == ("stop" if stop in ids else "length")
    assert batched.finish_reasons[1] == "stop" and len(batched.token_ids[1]) <= 5
    assert batched.token_ids == generate_naive(model, PROMPTS, cfg).token_ids


def test_max_new_tokens_respected():
    model = tiny_lm()
    for n in (1, 2, 7):
        result = generate(model, PROMPTS, GenerationConfig(max_new_tokens=n))
        assert [len(ids) for ids in result.token_ids] == [n, n, n]
        assert result.finish_reasons == ["length"] * 3


def test_prefill_inputs_reach_the_model_once():
    class Counting(nn.Module):
        def __init__(self, lm: CausalLM) -> None:
            super().__init__()
            self.lm, self.calls, self.calls_with_pixels = lm, 0, 0

        def new_cache(self, batch_size, max_len):
            return self.lm.new_cache(batch_size, max_len)

        def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0, pixel_values=None):
            self.calls += 1
            self.calls_with_pixels += pixel_values is not None
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                           logits_to_keep=logits_to_keep)

    model = Counting(tiny_lm())
    pixels = {"pixel_values": torch.zeros(2, 3, 8, 8)}
    generate(model, PROMPTS[:2], GenerationConfig(max_new_tokens=6), prefill_inputs=pixels)
    assert (model.calls, model.calls_with_pixels) == (6, 1)  # prefill + 5 single-token steps
    model.calls = model.calls_with_pixels = 0
    generate_naive(model, PROMPTS[:2], GenerationConfig(max_new_tokens=6), prefill_inputs=pixels)
    assert (model.calls, model.calls_with_pixels) == (6, 6)  # no cache: every pass is a prefill


# ----------------------------------------------------------------------------- sampling


def test_same_seed_reproduces_and_seeds_differ():
    model = tiny_lm()

    def run(seed):
        return generate(model, PROMPTS, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=seed)).token_ids

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0) != generate(model, PROMPTS, GenerationConfig(max_new_tokens=20)).token_ids


def test_top_k_1_equals_greedy():
    model = tiny_lm()
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=20)).token_ids
    top1 = generate(model, PROMPTS, GenerationConfig(max_new_tokens=20, temperature=1.5, top_k=1, seed=9))
    assert top1.token_ids == greedy


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0]])
    previous = torch.tensor([[0, 1, 1, 4, -1]])  # -1 = padding, ignored; repeats count once
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0, 2.0]])  # 2/2, -1*2, untouched, untouched, 4/2
    assert torch.equal(apply_repetition_penalty(logits, previous, 2.0), expected)
    assert torch.equal(process_logits(logits, GenerationConfig(repetition_penalty=2.0), previous), expected)
    # Penalty 10: [0.2, -10, 0.5, -3, 0.4], so greedy picks token 2 instead of token 4.
    assert sample_next(logits, GenerationConfig(repetition_penalty=10.0), None, previous).item() == 2


@pytest.mark.parametrize("penalty,temperature,top_k,top_p", [
    (1.3, 0.7, 10, 0.8), (1.0, 1.3, 0, 0.6), (0.8, 1.0, 5, 1.0), (1.5, 0.5, 0, 1.0), (1.0, 1.0, 3, 0.3),
])
def test_processors_match_transformers(penalty, temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 64, generator=gen)  # (B, V)
    previous = torch.randint(0, 64, (4, 15), generator=gen)  # (B, L)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)])
    if top_k:
        hf.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        hf.append(TopPLogitsWarper(top_p))
    expected = hf(previous, logits.clone())
    cfg = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ours = process_logits(logits, cfg, previous)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert bool(torch.isinf(expected).any()) == (top_k > 0 or top_p < 1.0)
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1), atol=1e-6, rtol=1e-5)


def test_sample_next_one_generator_or_one_per_row():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    cfg = GenerationConfig(temperature=1.0)
    shared = [sample_next(logits, cfg, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(shared[0], shared[1])
    per_row = sample_next(logits, cfg, [torch.Generator().manual_seed(5) for _ in range(3)])
    alone = [sample_next(logits[i:i + 1], cfg, torch.Generator().manual_seed(5)).item() for i in range(3)]
    assert per_row.tolist() == alone
    with pytest.raises(ValueError, match="generators"):
        sample_next(logits, cfg, [torch.Generator()])


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": 0}, {"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5},
    {"repetition_penalty": 0.0}, {"stop_token_ids": [-3]}, {"stop_strings": [""]}, {"seed": 1.5},
])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        GenerationConfig(**kwargs)


# ----------------------------------------------------------------------------- transformers parity


def test_greedy_matches_transformers_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmkit.weights import from_pretrained

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    for prompt, penalty in [(PROMPTS[0], 1.0), (PROMPTS[2], 1.0), (PROMPTS[0], 1.3)]:
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                               repetition_penalty=penalty, pad_token_id=0)[0, len(prompt):].tolist()
        ours = generate(model, [prompt], GenerationConfig(max_new_tokens=20, repetition_penalty=penalty))
        assert ours.token_ids[0] == expected
    assert len(set(expected)) > 3


def _phi3_longrope(tmp_path):
    """A tiny random transformers Phi-3 whose RoPE switches to the long factors past 16 positions,
    and the same checkpoint loaded in vlmkit."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from vlmkit.weights import from_pretrained

    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.7 * i for i in range(8)]}
    hf_cfg = Phi3Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                        original_max_position_embeddings=16, rope_parameters=rope,
                        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = Phi3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # wider weights than the default init, so argmax is never a near tie
        for param in hf.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
    hf.save_pretrained(tmp_path)
    return hf, from_pretrained(tmp_path)


def test_phi3_longrope_recomputes_the_cache_like_transformers(tmp_path, monkeypatch):
    """10 prompt tokens + 20 new: at 17 tokens the sequence outgrows original_max_position_embeddings (16)
    and transformers' Phi-3 recomputes its cache with the long factors; vlmkit must do the same."""
    import vlmkit.generate as vg

    hf, model = _phi3_longrope(tmp_path)
    assert model.rope.long_threshold == 16
    cfg = GenerationConfig(max_new_tokens=20)
    ids = torch.tensor([PROMPTS[2][:10], [0, 0, 0] + PROMPTS[0]])  # 10 tokens; 7 left-padded to 10
    mask = (torch.arange(10) >= torch.tensor([[0], [3]])).long()  # (2, 10)
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                           pad_token_id=0)[:, 10:].tolist()
    alone = hf.generate(ids[:1], do_sample=False, max_new_tokens=20, min_new_tokens=20,
                        pad_token_id=0)[:, 10:].tolist()
    assert len(set(alone[0])) > 3
    for run in (generate, generate_naive):
        assert run(model, ids[:1], cfg).token_ids == alone, run.__name__
        assert run(model, ids, cfg, attention_mask=mask).token_ids == expected, run.__name__
    # The check has teeth: keeping the short-factor cache past the switch changes the output.
    monkeypatch.setattr(vg, "_long_rope_threshold", lambda model: None)
    assert generate(model, ids[:1], cfg).token_ids != alone


def test_longrope_vlm_recompute_feeds_the_images_again():
    """A VLM's LM is found at model.lm; at the switch every row (a finished one too) is recomputed with the
    pixel_values, and the cached path still equals the no-cache reference."""
    import vlmkit.generate as vg
    from vlmkit.config import ProjectorConfig, VisionConfig
    from vlmkit.models.vlm import VLMConfig
    from vlmkit.models.vlm import VLM
    from vlmkit.schemes.pad import image_token_count

    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "original_max_position_embeddings": 16,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.7 * i for i in range(8)]}
    lm = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  max_position_embeddings=64, rope_scaling=rope)
    vision = VisionConfig(image_size=8, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=2)
    vlm_cfg = VLMConfig(vision=vision, projector=ProjectorConfig(in_dim=32, out_dim=64), lm=lm, image_token_id=99)
    model = VLM(vlm_cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
    assert vg._long_rope_threshold(model) == 16
    image = [99] * image_token_count(vlm_cfg)  # 4 placeholders
    prompts = [image + [5, 17, 42, 8], image + [7, 12]]  # 8 tokens: the switch comes after 9 new ones
    pixels = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    free = generate(model, prompts, GenerationConfig(max_new_tokens=14), prefill_inputs=pixels).token_ids
    cfg = GenerationConfig(max_new_tokens=14, stop_token_ids=[free[1][0]])  # row 1 stops at once
    fast = generate(model, prompts, cfg, prefill_inputs=pixels).token_ids
    assert fast == generate_naive(model, prompts, cfg, prefill_inputs=pixels).token_ids
    assert fast[1] == [] and len(fast[0]) > 9


# ----------------------------------------------------------------------------- stops and streaming


def scripted(text: str, tail: list[int] = ()) -> ScriptedLM:
    return ScriptedLM(ByteTokenizer().encode(text) + list(tail) + [ord("!")] * 50)


def test_stop_string_truncates_text():
    tok = ByteTokenizer()
    model = scripted("Q: The answer is 42.###extra")
    prompt = tok.encode("Q: ")
    cfg = GenerationConfig(max_new_tokens=40, stop_strings=["###", "zzz"])
    result = generate(model, [prompt], cfg, tokenizer=tok)
    assert result.texts == ["The answer is 42."] and result.finish_reasons == ["stop"]
    assert tok.decode(result.token_ids[0]) == "The answer is 42.###"  # generation ended on the stop string
    assert "".join(stream(model, prompt, cfg, tokenizer=tok)) == "The answer is 42."


def test_stop_string_false_starts_are_released():
    tok = ByteTokenizer()
    model = scripted("x:a#b##c###d")
    cfg = GenerationConfig(max_new_tokens=40, stop_strings=["###"])
    pieces = list(stream(model, tok.encode("x:"), cfg, tokenizer=tok))
    assert "".join(pieces) == "a#b##c"
    assert all("###" not in p for p in pieces)
    # Held-back "#"s come out once it is clear they are not a stop string; at the end they are flushed.
    short = generate(model, [tok.encode("x:")], GenerationConfig(max_new_tokens=4, stop_strings=["###"]), tokenizer=tok)
    assert short.texts == ["a#b#"] and short.finish_reasons == ["length"]


def test_stop_token_ids_and_eos():
    tok = ByteTokenizer()
    model = scripted(">hello", tail=[EOS])
    result = generate(model, [tok.encode(">")], GenerationConfig(max_new_tokens=30), tokenizer=tok)
    assert result.token_ids == [tok.encode("hello")] and result.finish_reasons == ["stop"]
    assert result.texts == ["hello"]
    by_id = generate(model, [tok.encode(">")], GenerationConfig(max_new_tokens=30, stop_token_ids=[ord("l")]))
    assert by_id.token_ids == [tok.encode("he")] and by_id.finish_reasons == ["stop"]
    assert by_id.texts is None
    no_tokenizer = generate(model, [tok.encode(">")], GenerationConfig(max_new_tokens=8))
    assert no_tokenizer.token_ids == [tok.encode("hello") + [EOS] + [ord("!")] * 2]  # eos only stops via tokenizer


def test_batched_stops_equal_alone():
    tok = ByteTokenizer()
    model = scripted("abc###def ghi###", tail=[EOS])
    cfg = GenerationConfig(max_new_tokens=12, stop_strings=["###"])
    prompts = [tok.encode("a"), tok.encode("abc###de"), tok.encode("abc###def gh")]
    batched = generate(model, prompts, cfg, tokenizer=tok)
    assert batched.texts == ["bc", "f ghi", "i"]
    for i, p in enumerate(prompts):
        alone = generate(model, [p], cfg, tokenizer=tok)
        assert alone.texts[0] == batched.texts[i] and alone.token_ids[0] == batched.token_ids[i]


def test_stream_never_splits_a_character():
    tok = ByteTokenizer()
    text = "héllo → wörld 日本語 🙂 done"
    model = scripted(">" + text, tail=[EOS])
    s = stream(model, tok.encode(">"), GenerationConfig(max_new_tokens=100), tokenizer=tok)
    pieces = list(s)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) == len(text)  # one piece per character: multi-byte ones arrive whole
    assert s.result.texts == [text] and s.result.finish_reasons == ["stop"]
    assert generate(model, [tok.encode(">")], GenerationConfig(max_new_tokens=100), tokenizer=tok).texts == [text]


def test_stream_keeps_spaces_a_tokenizer_drops_at_the_start_of_a_decode():
    class LeadingSpaceDropping(ByteTokenizer):
        """Like SentencePiece: a decode never starts with a space."""

        def decode(self, ids, skip_special_tokens=False):
            return super().decode(ids, skip_special_tokens).removeprefix(" ")

    tok = LeadingSpaceDropping()
    model = scripted("> one two  three", tail=[EOS])
    pieces = list(stream(model, tok.encode(">"), GenerationConfig(max_new_tokens=40), tokenizer=tok))
    assert "".join(pieces) == tok.decode(tok.encode(" one two  three")) == "one two  three"


def test_stream_stop_string_inside_multibyte_text_and_length_flush():
    tok = ByteTokenizer()
    model = scripted(">日本→語", tail=[EOS])
    assert "".join(stream(model, tok.encode(">"), GenerationConfig(stop_strings=["→"]), tokenizer=tok)) == "日本"
    # Cut mid-character by max_new_tokens: the unfinished bytes are flushed as U+FFFD, like decode does.
    s = stream(model, tok.encode(">"), GenerationConfig(max_new_tokens=4), tokenizer=tok)
    assert "".join(s) == tok.decode(tok.encode("日本")[:4]) == "日\ufffd"
    assert s.result.finish_reasons == ["length"]
    # A stop string completed only by that final flush still ends the text and counts as a stop.
    flushed = generate(model, [tok.encode(">")], GenerationConfig(max_new_tokens=4, stop_strings=["\ufffd"]),
                       tokenizer=tok)
    assert flushed.texts == ["日"] and flushed.finish_reasons == ["stop"]


def test_bad_inputs_raise():
    model = tiny_lm()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="one prompt .* or a batch"):
        generate(model, [[1, 2], 3])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1, 2]], GenerationConfig(stop_strings=["x"]))
    with pytest.raises(ValueError, match="one prompt"):
        stream(model, torch.ones(2, 3, dtype=torch.long), None, tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        stream(model, [1, 2, 3])
