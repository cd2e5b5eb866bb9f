"""ChatSession and `vlmkit chat` with Qwen2-VL, Qwen2.5-VL and DeepSeek-VL: each image encoded once per conversation.

Each model is a tiny random transformers model (weights widened so greedy answers are not near-ties)
saved to tmp_path with a character tokenizer holding the model's special tokens, and loaded by
`vlmkit.load.load_model(DIR)`, the loader `vlmkit chat --model DIR` uses. A conversation of two turns
with an image in turn 1 (and, for Qwen2-VL, a second image in turn 2). Oracles for the second turn:
- logits (ChatSession.next_turn_logits, built from the cached rows): the model's uncached forward on
  the whole conversation with pixel inputs (the path the parity tests check against transformers),
  within 1e-5, and transformers' own forward on the same ids and pixels, within 1e-4;
- answer: vlmkit.generate on the same conversation from pixels, greedy: the same text and ids;
- encodes: forward hooks on the vision towers' patch embeddings (not the session's own counter)
  count the pixel rows read: each image's exactly once over the whole conversation.
That the tolerance sees wrong positions: the Qwen models' logits with each grid's rows and columns
swapped (same token count, so only the M-RoPE positions change) move by more than 1e-2.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_chat_media_models.py
"""

from __future__ import annotations

import io
import json
import os
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib.cbook
import pytest
import skimage.data
import torch
import transformers
from PIL import Image

from vlmkit.chat_session import ChatSession
from vlmkit.cli import main
from vlmkit.generate import generate
from vlmkit.image.load import load_image
from vlmkit.load import LoadedModel, load_model
from vlmkit.sampling import GenerationConfig
from vlmkit.text.tokenizer import DEFAULT_SPECIAL_TOKENS, CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
QWEN_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
CACHE_TOL = 1e-5  # cached rows vs the same model recomputed from pixels: the same arithmetic, re-batched
REFERENCE_TOL = 1e-4  # vs transformers, as the parity tests
MODELS = ("qwen2-vl", "qwen2.5-vl", "deepseek-vl")
QUESTIONS = ("What is in the picture?", "And what about this one?")
MAX_NEW_TOKENS = 8


def _qwen_text_config(tok: CharTokenizer) -> dict:
    return dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def _qwen_ids(tok: CharTokenizer) -> dict:
    return dict(image_token_id=tok.token_to_id("<|image_pad|>"), video_token_id=tok.token_to_id("<|video_pad|>"),
                vision_start_token_id=tok.token_to_id("<|vision_start|>"),
                vision_end_token_id=tok.token_to_id("<|vision_end|>"))


def _qwen2_vl(tok: CharTokenizer) -> transformers.PreTrainedModel:
    vision = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    cfg = transformers.Qwen2VLConfig(vision_config=vision, text_config=_qwen_text_config(tok), **_qwen_ids(tok))
    return transformers.Qwen2VLForConditionalGeneration(cfg)


def _qwen2_5_vl(tok: CharTokenizer) -> transformers.PreTrainedModel:
    vision = dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    cfg = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text_config(tok), **_qwen_ids(tok))
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg)


def _deepseek_vl(tok: CharTokenizer) -> transformers.PreTrainedModel:
    cfg = transformers.DeepseekVLHybridConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=64, patch_size=16, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        high_res_vision_config=dict(model_type="sam_vision_model", image_size=128, patch_size=16, hidden_size=32,
                                    mlp_dim=64, num_hidden_layers=2, num_attention_heads=4, window_size=3,
                                    global_attn_indexes=[1], output_channels=8),
        text_config=dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.token_to_id("<image>"))
    model = transformers.DeepseekVLHybridForConditionalGeneration(cfg)
    with torch.no_grad():
        model.model.high_res_vision_alpha.fill_(0.8)  # 0 at init would hide the SAM global branch
    return model


# name -> (transformers model builder, the tokenizer's special tokens, its chat template)
BUILDERS: dict[str, tuple[Callable[[CharTokenizer], transformers.PreTrainedModel], tuple[str, ...], str]] = {
    "qwen2-vl": (_qwen2_vl, QWEN_SPECIAL, "qwen2_vl"),
    "qwen2.5-vl": (_qwen2_5_vl, QWEN_SPECIAL, "qwen2_vl"),
    "deepseek-vl": (_deepseek_vl, DEFAULT_SPECIAL_TOKENS, "chatml"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Callable[[str], tuple[Path, transformers.PreTrainedModel]]:
    """name -> (directory with config.json, safetensors and tokenizer.json; the transformers model), built once."""
    built: dict[str, tuple[Path, transformers.PreTrainedModel]] = {}

    def get(name: str) -> tuple[Path, transformers.PreTrainedModel]:
        if name not in built:
            make, special, template = BUILDERS[name]
            tok = CharTokenizer(string.printable, special, chat_template=template)
            torch.manual_seed(0)
            model = make(tok).eval()
            with torch.no_grad():  # the default init (std 0.02) leaves near-ties in the logits; widen them
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0, 0.15)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            tok.save(path / "tokenizer.json")
            built[name] = path, model
        return built[name]

    return get


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Two PNGs whose Qwen2-VL grids are not square: grace_hopper 112 x 168 (4 x 6 merged tokens, full
    2 x 2 windows) and the astronaut 140 x 84 (3 x 5, short windows)."""
    folder = tmp_path_factory.mktemp("photos")
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB").resize((112, 168))
    astronaut = Image.fromarray(skimage.data.astronaut()).resize((140, 84))
    paths = [folder / "hopper.png", folder / "astronaut.png"]
    hopper.save(paths[0])
    astronaut.save(paths[1])
    return paths


def _count_pixel_rows(model: torch.nn.Module) -> list[int]:
    """A counter of the pixel rows every vision tower's patch embedding reads (a forward hook): images for
    DeepSeek-VL's two towers (N, 3, H, W), patches for Qwen2-VL's (N, C*T*P*P)."""
    seen = [0]
    for name in ("vision", "vision_high"):
        tower = getattr(model, name, None)
        if tower is not None:
            tower.patch_embed.register_forward_hook(lambda _, args, __: seen.__setitem__(0, seen[0] + len(args[0])))
    return seen


def _transformers_inputs(loaded: LoadedModel, ids: torch.Tensor) -> dict:
    """Keywords transformers' model needs beside the pixels: Qwen2-VL's token types (1 = image)."""
    if "image_grid_thw" in loaded.model.image_position_inputs:
        return {"mm_token_type_ids": (ids == loaded.image_token_id).int()}
    return {}


@pytest.mark.parametrize("name", MODELS)
def test_second_turn_from_cached_rows_equals_a_fresh_run(name, checkpoint, photos):
    path, hf = checkpoint(name)
    loaded = load_model(str(path))
    towers = len([n for n in ("vision", "vision_high") if getattr(loaded.model, n, None) is not None])
    seen = _count_pixel_rows(loaded.model)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    session = ChatSession(loaded, cfg)
    shown = [photos[0]]  # the images of the conversation, in order
    session.attach_image(shown[0])
    first = "".join(session.ask(QUESTIONS[0]))
    rows_of_first = towers * len(session.images[0].plan.pixel_values)  # its patches or its one view per tower
    assert session.vision_calls == 1 and seen[0] == rows_of_first
    if name == "qwen2-vl":  # a second image, brought by the second turn
        shown.append(photos[1])
        session.attach_image(shown[1])
    logits = session.next_turn_logits(QUESTIONS[1])  # (1, T, V) from the cached rows
    second = "".join(session.ask(QUESTIONS[1]))
    assert session.vision_calls == len(shown)  # one encode per turn that brought an image
    # across three prompts (turn 1, next_turn_logits, turn 2) the towers read each image's pixels once
    assert seen[0] == towers * sum(len(image.plan.pixel_values) for image in session.images)

    # the same conversation recomputed from pixels, the towers inside the forward
    prompt = loaded.prompt(session.messages[:-1], loaded.plan_images([load_image(p) for p in shown]))
    pixels = loaded.image_inputs(prompt.plans)
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        uncached = loaded.model(input_ids=ids, **pixels).logits  # (1, T, V)
        reference = hf(input_ids=ids, **_transformers_inputs(loaded, ids), **pixels).logits  # (1, T, V)
    assert logits.shape == uncached.shape and session.last_prompt_tokens == len(prompt.ids)
    assert (logits - uncached).abs().max().item() <= CACHE_TOL
    assert (logits - reference).abs().max().item() <= REFERENCE_TOL
    full = generate(loaded.model, [prompt.ids], cfg, prefill_inputs=pixels, tokenizer=loaded.tokenizer)
    assert second == full.texts[0] and session.last_result.token_ids == full.token_ids
    assert len(set(full.token_ids[0])) > 2  # a meaningful comparison: not one repeated token

    opening = loaded.prompt(session.messages[:1], loaded.plan_images([load_image(shown[0])]))
    alone = generate(loaded.model, [opening.ids], cfg, prefill_inputs=loaded.image_inputs(opening.plans),
                     tokenizer=loaded.tokenizer)
    assert first == alone.texts[0]

    if "image_grid_thw" in pixels:  # the positions come from the grids: a transposed grid must show
        rows = [image.encoded.rows for image in session.images]
        transposed = pixels["image_grid_thw"][:, [0, 2, 1]]  # same tokens per image, other M-RoPE positions
        assert not torch.equal(transposed, pixels["image_grid_thw"])
        with torch.no_grad():
            moved = loaded.model(input_ids=ids, image_embeds=rows, image_grid_thw=transposed).logits
        assert (moved - logits).abs().max().item() > 1e-2


def test_image_embeds_errors(checkpoint, photos):
    loaded = load_model(str(checkpoint("qwen2-vl")[0]))
    prompt = loaded.prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                           loaded.plan_images([load_image(photos[0])]))
    inputs = loaded.image_inputs(prompt.plans)
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        rows = loaded.model.encode_images(**inputs)
        assert [r.shape[0] for r in rows] == [24]  # 4 x 6 merged tokens
        with pytest.raises(ValueError, match="need image_grid_thw too"):
            loaded.model(input_ids=ids, image_embeds=rows)
        with pytest.raises(ValueError, match="pixel_values or image_embeds"):
            loaded.model(input_ids=ids, image_embeds=rows, **inputs)
        with pytest.raises(ValueError, match=r"\[23\] rows per image but image_grid_thw gives \[24\]"):
            loaded.model(input_ids=ids, image_embeds=[rows[0][:-1]], image_grid_thw=inputs["image_grid_thw"])
    deepseek = load_model(str(checkpoint("deepseek-vl")[0]))
    with torch.no_grad(), pytest.raises(ValueError, match="15 image placeholder tokens .* give 16 feature tokens"):
        deepseek.model(input_ids=torch.tensor([[5] + [deepseek.image_token_id] * 15]),
                       image_embeds=deepseek.model.encode_images(**deepseek.image_inputs(
                           deepseek.plan_images([load_image(photos[0])]))))


def _generated(loaded: LoadedModel, messages: list, images: list[Path]) -> tuple[str, int]:
    """(vlmkit.generate's greedy answer, prompt length) for messages showing images, from pixels."""
    prompt = loaded.prompt(messages, loaded.plan_images([load_image(p) for p in images]))
    result = generate(loaded.model, [prompt.ids], GenerationConfig(max_new_tokens=MAX_NEW_TOKENS),
                      prefill_inputs=loaded.image_inputs(prompt.plans), tokenizer=loaded.tokenizer)
    return result.texts[0], len(prompt.ids)


def test_chat_one_shot_subprocess_with_qwen2_vl(checkpoint, photos):
    """`vlmkit chat --model DIR --image a.png --prompt ... --json` in a subprocess (about 5 s, most of it
    importing torch): the answer and prompt length of vlmkit.generate on the same message."""
    path, _ = checkpoint("qwen2-vl")
    out = subprocess.run([sys.executable, "-m", "vlmkit.cli", "chat", "--model", str(path), "--image", str(photos[0]),
                          "--prompt", QUESTIONS[0], "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}
    text, prompt_tokens = _generated(load_model(str(path)), [message], photos[:1])
    assert answer["text"] == text and answer["prompt_tokens"] == prompt_tokens
    assert answer["completion_tokens"] == MAX_NEW_TOKENS or answer["finish_reason"] == "stop"


def test_chat_interactive_two_turns_with_qwen2_vl(checkpoint, photos, tmp_path, monkeypatch, capsys):
    """`vlmkit chat --model DIR` reading /image lines and two questions from stdin (in process): each answer
    is vlmkit.generate's on the conversation so far, recomputed from pixels."""
    path, _ = checkpoint("qwen2-vl")
    saved = tmp_path / "chat.json"
    script = [f"/image {photos[0]}", QUESTIONS[0], f"/image {photos[1]}", QUESTIONS[1], f"/save {saved}"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    out = capsys.readouterr()
    assert "error" not in out.err and "2 image(s)" not in out.err  # each /image went with its own question
    record = json.loads(saved.read_text())
    assert record["images"] == [str(p) for p in photos]
    assert [len(m["content"]) for m in record["messages"][::2]] == [2, 2]  # one image part + the text each
    loaded = load_model(str(path))
    texts = [_generated(loaded, record["messages"][:1], photos[:1])[0],
             _generated(loaded, record["messages"][:3], photos)[0]]
    assert [m["content"] for m in record["messages"][1::2]] == texts
    assert out.out == "".join(text + "\n" for text in texts)  # streamed; answers may hold any printable character
