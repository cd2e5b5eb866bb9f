"""`--dtype bfloat16`: models loaded in bf16 compute what transformers computes in bf16, and the verbs use it.

Oracle for the numbers: transformers' own model cast to bf16. Neither implementation equals the fp32
result in bf16, so each is measured against transformers in fp32 on the same inputs, and vlmkit's error
must be no larger than twice transformers' (max and mean over the logits). A model that silently stayed
in fp32 would have a near-zero error, so the test also requires vlmkit's bf16 logits to differ from its
fp32 logits. Models: LLaVA (CLIP + mlp2x_gelu + Llama) and Qwen2-VL (M-RoPE), tiny and random, on a
real photo, with prompts of about 220 tokens: RoPE angles computed in bf16 instead of fp32 (as
transformers does) made vlmkit's max error 6x and 14x transformers' there, and failed this test.

Then the plumbing: load_model(spec, dtype) and the verbs' --dtype flag give bf16 weights; the server
reports its dtype in /health and answers the official `openai` client as vlmkit.generate answers with the
same bf16 model; an unknown --dtype is refused by the parser.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_dtype.py
"""

from __future__ import annotations

import dataclasses
import json
import string

import matplotlib.cbook
import openai
import pytest
import torch
import transformers
from PIL import Image

from test_chat_media_models import BUILDERS
from test_llava_parity import _hf_llava, _pixels, _prompt
from test_serve import SHAPES, SHAPES_URL, Server, direct, request, user
from vlmkit.cli import build_parser, main
from vlmkit.commands.common import load_model_of
from vlmkit.image.load import load_image
from vlmkit.load import load_model
from vlmkit.weights import from_pretrained
from vlmkit.models.lm import cache_dtype
from vlmkit.sampling import GenerationConfig
from vlmkit.serve import create_app
from vlmkit.text.tokenizer import CharTokenizer

ERROR_RATIO = 2.0  # vlmkit's bf16 error vs fp32 may be at most this multiple of transformers' bf16 error


def _assert_bf16_like_transformers(ours16: torch.Tensor, ours32: torch.Tensor, hf16: torch.Tensor,
                                   hf32: torch.Tensor) -> None:
    """Logits (B, T, V) of vlmkit and transformers, each in bf16 and fp32."""
    ours_err, ref_err = (ours16.float() - hf32).abs(), (hf16.float() - hf32).abs()
    assert (ours32 - hf32).abs().max().item() <= 1e-4  # the fp32 parity the bf16 comparison starts from
    assert ours_err.max().item() <= ERROR_RATIO * ref_err.max().item()
    assert ours_err.mean().item() <= ERROR_RATIO * ref_err.mean().item()
    assert (ours16.float() - ours32).abs().max().item() > 1e-3  # it did run in bf16


def _widen(model: torch.nn.Module) -> torch.nn.Module:
    """Weights drawn wider than the default init (std 0.02), so the logits spread over a range where bf16's
    relative rounding is visible and comparable."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model


def test_llava_in_bf16_is_as_close_as_transformers_in_bf16(tmp_path):
    hf = _widen(_hf_llava())
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    pixels = _pixels(ours)  # (1, 3, 32, 32) the real photo
    ids = torch.tensor([_prompt(1, 16, text_len=200)])  # positions up to 219: RoPE angles of size
    with torch.no_grad():
        hf32 = hf(input_ids=ids, pixel_values=pixels).logits
        ours32 = ours(input_ids=ids, pixel_values=pixels).logits
        hf16 = hf.to(torch.bfloat16)(input_ids=ids, pixel_values=pixels.bfloat16()).logits
        ours16 = ours.to(torch.bfloat16)(input_ids=ids, pixel_values=pixels).logits  # pixels cast by the model
    _assert_bf16_like_transformers(ours16, ours32, hf16, hf32)


def test_bf16_decoding_reads_an_fp32_cache_and_stays_as_close(tmp_path):
    """On a CPU the KV cache of a bf16 model is fp32 (models/lm.py cache_dtype: bf16 attention kernels are several
    times slower there). Decoding token by token from it must be as close to transformers' fp32 logits as
    transformers' own bf16 forward is."""
    hf = _widen(_hf_llava())
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval().to(torch.bfloat16)
    pixels = _pixels(ours)
    ids = torch.tensor([_prompt(1, 16, text_len=200)])
    steps = 8  # the last tokens, fed one at a time after a prefill of the rest
    cache = ours.new_cache(1, ids.shape[1])
    assert cache.keys[0].dtype == torch.float32
    with torch.no_grad():
        hf32 = hf(input_ids=ids, pixel_values=pixels).logits[:, -steps:]
        ours32 = from_pretrained(tmp_path).eval()(input_ids=ids, pixel_values=pixels).logits[:, -steps:]
        hf16 = hf.to(torch.bfloat16)(input_ids=ids, pixel_values=pixels.bfloat16()).logits[:, -steps:]
        ours(input_ids=ids[:, :-steps], pixel_values=pixels, cache=cache)
        decoded = torch.cat([ours(input_ids=ids[:, i:i + 1], cache=cache).logits
                             for i in range(ids.shape[1] - steps, ids.shape[1])], dim=1)  # (1, steps, V)
    _assert_bf16_like_transformers(decoded, ours32, hf16, hf32)
    latent = dataclasses.replace(ours.cfg.lm, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                                 num_kv_heads=ours.cfg.lm.num_heads)
    assert cache_dtype(latent, torch.zeros(1, dtype=torch.bfloat16)) == torch.bfloat16  # MLA keeps the weights'


def test_qwen2_vl_loaded_in_bf16_is_as_close_as_transformers_in_bf16(tmp_path):
    make, special, template = BUILDERS["qwen2-vl"]
    tok = CharTokenizer(string.printable, special, chat_template=template)
    torch.manual_seed(0)
    hf = _widen(make(tok).eval())
    hf.save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    ours32, ours16 = load_model(str(tmp_path)), load_model(str(tmp_path), dtype=torch.bfloat16)
    assert ours16.dtype == torch.bfloat16 and ours32.dtype == torch.float32
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB").resize((112, 168))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this? " * 16}]}]
    prompt = ours32.prompt(messages, ours32.plan_images([photo]))
    ids, inputs = torch.tensor([prompt.ids]), ours32.image_inputs(prompt.plans)
    types = {"mm_token_type_ids": (ids == ours32.image_token_id).int()}  # transformers' image-token mask
    with torch.no_grad():
        hf32 = hf(input_ids=ids, **types, **inputs).logits
        logits32 = ours32.model(input_ids=ids, **inputs).logits
        logits16 = ours16.model(input_ids=ids, **inputs).logits
        hf.to(torch.bfloat16)
        hf16 = hf(input_ids=ids, **types, pixel_values=inputs["pixel_values"].bfloat16(),
                  image_grid_thw=inputs["image_grid_thw"]).logits
    _assert_bf16_like_transformers(logits16, logits32, hf16, hf32)


def test_dtype_flag_loads_bf16_and_generate_runs(capsys):
    args = build_parser().parse_args(["chat", "--model", "tiny-random", "--dtype", "bfloat16", "--prompt", "hi"])
    assert load_model_of(args).dtype == torch.bfloat16
    assert load_model_of(build_parser().parse_args(["serve", "--model", "tiny-random"])).dtype == torch.float32
    assert main(["generate", "--model", "tiny-random", "--dtype", "bfloat16", "--image", str(SHAPES), "--prompt",
                 "What is here?", "--max-new-tokens", "12", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, text, reason = direct(load_model("tiny-random", dtype=torch.bfloat16), "What is here?", [load_image(SHAPES)],
                             GenerationConfig(max_new_tokens=12))
    # one id per character (specials such as <s> print as nothing); the answer may end at chatml's <|im_end|>
    # before the 12-token cap (issue 14)
    assert (printed["text"], printed["finish_reason"]) == (text, reason)
    tokens = printed["completion_tokens"]
    assert len(text) <= tokens <= 12 and (reason == "stop") == (tokens < 12)


def test_unknown_dtype_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--model", "tiny-random", "--dtype", "float64"])
    assert e.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_server_in_bf16_answers_as_generate_in_bf16():
    loaded = load_model("tiny-random", dtype=torch.bfloat16)
    server = Server(create_app(loaded, model_name="tiny-random"))
    try:
        status, health = request(server.url + "/health")
        assert status == 200 and health["dtype"] == "bfloat16"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model="tiny-random", messages=user("Colours?", SHAPES_URL),
                                                  max_tokens=16, temperature=0)
    finally:
        server.stop()
    _, text, reason = direct(loaded, "Colours?", [load_image(SHAPES)], GenerationConfig(max_new_tokens=16))
    assert response.choices[0].message.content == text and response.choices[0].finish_reason == reason
