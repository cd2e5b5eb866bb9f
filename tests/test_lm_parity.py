"""Llama, Mistral, Qwen2 and Phi-3 checkpoints: vlmkit's CausalLM against transformers (the reference).

Each case builds a tiny random transformers model, saves it, loads it with
vlmkit.models.from_pretrained and compares logits (plain and left-padded
batches) and 20-token greedy generation through the KV cache. Saving goes the
other way too: vlmkit's save_pretrained (single file and sharded) must load in
transformers' AutoModelForCausalLM with the same logits.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_lm_parity.py
"""

from __future__ import annotations

import json

import pytest
import torch
from lm_parity import (
    NEW_TOKENS,
    TOL,
    check_left_padded_logits,
    check_logits,
    check_reloaded_logits,
    hf_greedy,
    padded_batch,
)

import vlmkit.weights as vm
from vlmkit.config import LMConfig
from vlmkit.models.lm import CausalLM
from vlmkit.weights.llama import lm_config_from_hf, lm_config_to_hf, lm_state_from_hf

transformers = pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config,  # noqa: E402
                          Qwen2Config)

VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.7 * i for i in range(8)]}

# id -> (config class, config kwargs). Sequences in the tests are up to ~34 tokens long.
CASES = {
    "llama_gqa": (LlamaConfig, dict(TINY, max_position_embeddings=64)),
    "llama_bias_head_dim": (LlamaConfig, dict(TINY, attention_bias=True, mlp_bias=True, head_dim=24,
                                              max_position_embeddings=64)),
    "llama_tied": (LlamaConfig, dict(TINY, hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                     tie_word_embeddings=True, max_position_embeddings=64,
                                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "llama3_rope": (LlamaConfig, dict(TINY, max_position_embeddings=64, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_yarn": (LlamaConfig, dict(TINY, max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_dynamic": (LlamaConfig, dict(TINY, max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral_window": (MistralConfig, dict(TINY, sliding_window=8, max_position_embeddings=64)),
    "qwen2_bias": (Qwen2Config, dict(TINY, max_position_embeddings=64)),
    "phi3_partial_rotary": (Phi3Config, dict(TINY, max_position_embeddings=64, original_max_position_embeddings=64,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "partial_rotary_factor": 0.5})),
    "phi3_longrope": (Phi3Config, dict(TINY, num_key_value_heads=4, max_position_embeddings=64,
                                       original_max_position_embeddings=16, rope_parameters=dict(LONGROPE))),
}


def _randomize(model: torch.nn.Module) -> None:
    """Replace transformers' init (tiny weights, zero biases, unit norms) so every tensor matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, vlmkit model loaded from its save_pretrained directory, case id, that directory)."""
    config_class, kwargs = CASES[request.param]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config_class(**kwargs))
    _randomize(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf.eval(), vm.from_pretrained(path), request.param, path


@torch.no_grad()
def greedy(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, steps: int,
           refresh_at: int | None = None) -> torch.Tensor:
    """steps greedy tokens through a KVCache (B, steps). refresh_at: at this total length recompute the
    cache from scratch, as transformers' Phi-3 does when the sequence outgrows original_max_position_embeddings."""
    B, T = ids.shape
    cache = model.new_cache(B, T + steps)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits  # (B, 1, V)
    seq = ids
    for step in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        seq = torch.cat([seq, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        if step == steps - 1:
            break
        if seq.shape[1] == refresh_at:
            cache = model.new_cache(B, T + steps)
            logits = model(seq, attention_mask=mask, cache=cache, logits_to_keep=1).logits
        else:
            logits = model(token, attention_mask=mask, cache=cache, logits_to_keep=1).logits
    return seq[:, T:]


def test_logits_match(pair):
    hf, ours, case, _ = pair
    check_logits(hf, ours, case, VOCAB, (10, 24))  # below and above the long-context rope cases' original 16


def test_left_padded_batch_matches(pair):
    hf, ours, case, _ = pair
    check_left_padded_logits(hf, ours, case, *padded_batch([24, 13, 19], seed=1, vocab=VOCAB))


@torch.no_grad()
def test_greedy_generation_matches(pair):
    hf, ours, case, _ = pair
    ids, mask = padded_batch([12, 7], seed=2, vocab=VOCAB)
    if case == "phi3_longrope":
        ids, mask = ids[:1, -10:], mask[:1, -10:]  # one row: the cache refresh happens at a total length
    ref = hf_greedy(hf, ids, mask)
    refresh_at = LONGROPE["original_max_position_embeddings"] + 1 if case == "phi3_longrope" else None
    got = greedy(ours, ids, mask, NEW_TOKENS, refresh_at=refresh_at)
    assert torch.equal(got, ref), f"{case}: vlmkit {got.tolist()} != transformers {ref.tolist()}"


@torch.no_grad()
def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    _, ours, case, original = pair
    hf = AutoModelForCausalLM.from_pretrained(original).eval()  # fresh: dynamic RoPE keeps state across calls
    vm.save_pretrained(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    check_reloaded_logits(back, hf, case, VOCAB, 20)
    if hf.config.tie_word_embeddings:
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()


@torch.no_grad()
def test_sharded_save_loads_everywhere(tmp_path):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Qwen2Config(**TINY)).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = vm.from_pretrained(tmp_path / "hf")
    vm.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    ref = hf(ids).logits
    for model in (AutoModelForCausalLM.from_pretrained(tmp_path / "sharded"), vm.from_pretrained(tmp_path / "sharded")):
        assert (model(ids).logits - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_fresh_vlmkit_model_saves_as_llama(tmp_path):
    """A model built in vlmkit (never loaded) saves as model_type llama and transformers agrees on logits."""
    cfg = LMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}, max_position_embeddings=64)
    torch.manual_seed(0)
    ours = CausalLM(cfg).eval()
    _randomize(ours)
    vm.save_pretrained(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.model_type == "llama"
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    assert (hf(ids).logits - ours(ids).logits).abs().max().item() <= TOL


def test_bad_directories_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        vm.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported.*llama"):
        vm.from_pretrained(tmp_path)
    cfg = LlamaConfig(**TINY)
    cfg.save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        vm.from_pretrained(tmp_path)


def test_checkpoint_with_wrong_shapes_or_extra_tensors_is_refused(tmp_path):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    state = dict(hf.state_dict())
    cfg = lm_config_from_hf(hf.config.to_dict())
    with pytest.raises(ValueError, match="k_proj.weight.*expected 32 rows"):
        lm_state_from_hf({**state, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}, cfg)
    with pytest.raises(ValueError, match="does not use.*layers.2"):
        lm_state_from_hf({**state, "model.layers.2.input_layernorm.weight": torch.ones(64)}, cfg)
    state.pop("lm_head.weight")
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
        lm_state_from_hf(state, cfg)


def test_state_prefixes_are_configurable():
    """The LLaVA layout: body under model.language_model., lm_head at the top level or under a prefix."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Phi3Config(**dict(TINY, max_position_embeddings=64)))
    state = hf.state_dict()
    cfg = lm_config_from_hf(hf.config.to_dict())
    plain = lm_state_from_hf(state, cfg)
    moved = {("model.language_model." + k.removeprefix("model.") if k.startswith("model.") else "lm." + k): v
             for k, v in state.items()}
    nested = lm_state_from_hf(moved, cfg, prefix="model.language_model.", head_prefix="lm.")
    assert nested.keys() == plain.keys()
    assert all(torch.equal(nested[k], plain[k]) for k in plain)


# Minimal config.json dicts: missing keys take the transformers config class defaults.
MINIMAL = [
    {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    {"model_type": "mistral", "rope_theta": 1e6, "sliding_window": None},
    {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
     "tie_word_embeddings": True},
    {"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 24,
                                            "long_factor": [2.0] * 24}, "max_position_embeddings": 131072,
     "partial_rotary_factor": 0.5},
    {"model_type": "llama", "rope_theta": 500000.0, "max_position_embeddings": 131072, "attention_bias": True,
     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}},
]


@pytest.mark.parametrize("hf_dict", MINIMAL, ids=lambda d: d["model_type"])
def test_config_from_hf_agrees_with_transformers(hf_dict):
    ref = AutoConfig.for_model(**hf_dict)
    cfg = lm_config_from_hf(hf_dict)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.max_position_embeddings, cfg.rms_norm_eps) == (
        ref.num_attention_heads, ref.num_key_value_heads, ref.max_position_embeddings, ref.rms_norm_eps)
    assert cfg.tie_word_embeddings == ref.tie_word_embeddings
    assert cfg.sliding_window == getattr(ref, "sliding_window", None)
    params = dict(ref.rope_parameters)
    assert cfg.rope_theta == params.pop("rope_theta")
    assert cfg.partial_rotary_factor == params.pop("partial_rotary_factor", 1.0)
    params.pop("type", None)
    assert (cfg.rope_scaling or {"rope_type": "default"}) == params
    assert lm_config_from_hf(lm_config_to_hf(cfg, hf_dict["model_type"])) == cfg


def test_unrepresentable_configs_are_refused():
    qwen_like = LMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         qkv_bias=True)
    with pytest.raises(ValueError, match="use qwen2"):
        lm_config_to_hf(qwen_like, "llama")
    with pytest.raises(ValueError, match="not a Llama-family LM"):
        lm_config_to_hf(qwen_like, "gpt2")
