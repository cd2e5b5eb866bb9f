"""`vlmkit generate --video` on a Qwen2-VL directory against transformers' own pipeline, and its errors.

The oracle: a tiny random transformers Qwen2VLForConditionalGeneration and a character-level tokenizer
(a `tokenizers` BPE over printable ASCII with Qwen2-VL's special tokens and its Instruct chat template)
saved to tmp_path. transformers' tokenizer renders the chat template and tokenizes; `<|video_pad|>` is
expanded by hand to the count Qwen2VLProcessor computes, video_grid_thw.prod() / 4 with the grid
worked out here (112 px frames scaled up to 336 px by the video processor's 128*28*28 minimum:
24 x 24 patches, 4 frames -> 2 temporal patches, 288 tokens); the frames are read with PIL at
hand-computed indices, their pixel rows made by plan_video_dynamic (checked against the reference
patchify in test_dynamic; transformers' Qwen2VLVideoProcessor itself needs torchvision, not installed),
and transformers' `generate` answers greedily. vlmkit reads the same directory and clip through
`vlmkit generate --video ... --fps/--frames` (chat template, video placeholder count from the plan,
M-RoPE time ids) and must print the same text.

The clip: 10 crops of skimage's astronaut, 112 x 112, the window sliding 8 px right and 4 px down per
frame, as an animated GIF of 100 ms frames (1 s) and as a directory of numbered PNGs. `--fps 4` samples
at 0, 0.25, 0.5, 0.75 s, i.e. frames [0, 2, 5, 7]; `--frames 4` takes floor(k * 10 / 4) = [0, 2, 5, 7] too.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_video_generate.py
"""

from __future__ import annotations

import json
import string

import pytest
import skimage.data
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models

from vlmkit.cli import main
from vlmkit.generate import GenerationConfig, generate
from vlmkit.schemes.dynamic import plan_video_dynamic
from vlmkit.image.video import load_video_frames
from vlmkit.load import LoadedModel, load_model, tiny_random_model
from vlmkit.schemes.pad import image_token_count
from vlmkit.train.run import fresh_model
from vlmkit.models.lm import CausalLM
from vlmkit.presets import build_model, get_preset
from vlmkit.text.chat import get_chat_template
from vlmkit.text.tokenizer import CharTokenizer

# Qwen2-VL-Instruct's chat_template.json
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
PROMPT = "What moves in this clip?"
SAMPLED = [0, 2, 5, 7]  # 10 frames of 0.1 s sampled at 4 fps, or 4 frames evenly spaced
GRID = (2, 24, 24)  # temporal patches, patch rows, patch columns of the 4 sampled 112 px frames
VIDEO_TOKENS = 2 * 24 * 24 // 4


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    chars = sorted(set(string.printable))
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    backend.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", extra_special_tokens=SPECIAL[3:])
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.chat_template = QWEN2_VL_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, transformers model, processor): a tiny random Qwen2-VL with the tokenizer above."""
    tok = _tokenizer()
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start",
                                                                          "vision_end")}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    torch.manual_seed(0)
    config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=ids["image_pad"],
                                        video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
                                        vision_end_token_id=ids["vision_end"])
    model = transformers.Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():  # the default init (std 0.02) leaves near-ties in the logits; widen them
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif not torch.all(p == 1):
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("qwen2vl")
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(gif path, frame directory): 10 sliding crops of the astronaut."""
    astronaut = Image.fromarray(skimage.data.astronaut())
    frames = [astronaut.crop((8 * k, 4 * k, 8 * k + 112, 4 * k + 112)) for k in range(10)]
    folder = tmp_path_factory.mktemp("clip")
    gif = folder / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    directory = folder / "frames"
    directory.mkdir()
    for k, frame in enumerate(frames):
        frame.save(directory / f"frame_{k + 1}.png")
    return gif, directory


def _gif_frames(path, indices: list[int]) -> list[Image.Image]:
    with Image.open(path) as gif:
        out = []
        for i in indices:
            gif.seek(i)
            out.append(gif.convert("RGB"))
        return out


def _reference_answer(checkpoint, frames: list[Image.Image], max_new_tokens: int) -> tuple[str, int]:
    """(decoded greedy answer, prompt length) from transformers' tokenizer, chat template and generate."""
    _, model, tok = checkpoint
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<|video_pad|>") == 1
    ids = torch.tensor([tok(text.replace("<|video_pad|>", "<|video_pad|>" * VIDEO_TOKENS))["input_ids"]])
    video = (ids == tok.convert_tokens_to_ids("<|video_pad|>")).int()
    plan = plan_video_dynamic(frames)
    assert plan.extra["video_grid_thw"] == GRID
    out = model.generate(input_ids=ids, mm_token_type_ids=2 * video, pixel_values_videos=plan.pixel_values,
                         video_grid_thw=torch.tensor([GRID]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0)
    answer = out[0, ids.shape[1]:].tolist()
    assert len(set(answer)) > 2  # a meaningful comparison: not one repeated token
    return tok.decode(answer, skip_special_tokens=True), ids.shape[1]


def _vlmkit_answer(capsys, *args) -> dict:
    assert main(["generate", *map(str, args), "--prompt", PROMPT, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_video_gif_matches_transformers(checkpoint, clip, capsys):
    path, _, _ = checkpoint
    gif, _ = clip
    want, prompt_tokens = _reference_answer(checkpoint, _gif_frames(gif, SAMPLED), 12)
    got = _vlmkit_answer(capsys, "--model", path, "--video", gif, "--fps", 4, "--max-new-tokens", 12)
    assert got["prompt_tokens"] == prompt_tokens  # 288 video tokens + the template's text
    assert got["text"] == want
    reversed_clip, _ = _reference_answer(checkpoint, _gif_frames(gif, SAMPLED[::-1]), 12)
    assert reversed_clip != want  # the answer depends on the frames and their order, so the match means something


def test_generate_video_directory_with_frames_flag(checkpoint, clip, capsys):
    path, _, _ = checkpoint
    _, directory = clip
    frames = [Image.open(directory / f"frame_{i + 1}.png").convert("RGB") for i in SAMPLED]
    want, _ = _reference_answer(checkpoint, frames, 6)
    got = _vlmkit_answer(capsys, "--model", path, "--video", directory, "--frames", 4, "--max-new-tokens", 6)
    assert got["text"] == want


def test_builtin_qwen2_vl_template_renders_as_the_checkpoint_template():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
    builtin = get_chat_template("qwen2_vl").render(messages, add_generation_prompt=True)
    assert builtin == get_chat_template(QWEN2_VL_TEMPLATE).render(messages, add_generation_prompt=True)


def test_video_errors(checkpoint, clip, capsys):
    path, _, _ = checkpoint
    gif, directory = clip
    assert main(["generate", "--model", str(path), "--video", str(directory), "--prompt", PROMPT]) == 2
    assert "--source-fps" in capsys.readouterr().err  # a frame directory has no timing for --fps
    assert main(["generate", "--model", str(path), "--fps", "2", "--prompt", PROMPT]) == 2
    assert "sample a --video" in capsys.readouterr().err
    tokenizer = CharTokenizer(string.printable)
    frames = _gif_frames(gif, SAMPLED)
    text_only = LoadedModel("text-lm", CausalLM(get_preset("tiny-random").lm), tokenizer,
                            get_chat_template("chatml"))
    with pytest.raises(ValueError, match="text-only model; it cannot take videos"):
        text_only.plan_images([frames])
    deepseek = LoadedModel("deepseek-vl-small", build_model(get_preset("deepseek-vl-small")), tokenizer,
                           get_chat_template("chatml"))
    with pytest.raises(ValueError, match="does not take video"):
        deepseek.plan_images([frames])


def test_qwen2_vl_prompt_counts_video_pads_from_the_plan(checkpoint, clip):
    path, _, _ = checkpoint
    gif, _ = clip
    loaded = load_model(str(path))
    plans = loaded.plan_images([_gif_frames(gif, SAMPLED)])
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    prompt = loaded.prompt(messages, plans)
    video_id = loaded.model.cfg.video_token_id
    assert prompt.ids.count(video_id) == VIDEO_TOKENS
    assert prompt.plans == plans[0]
    with pytest.raises(ValueError, match="0 video placeholder"):
        loaded.prompt([{"role": "user", "content": PROMPT}], plans)


def test_qwen2_5_vl_video_time_step_from_the_sampled_fps(clip):
    """Qwen2.5-VL's second_per_grid_ts is temporal_patch_size / sampled fps (transformers' Qwen2_5_VLProcessor with
    VideoMetadata.sampled_fps = sampled / total * fps): 4 of 10 frames at 10 fps -> 4 fps -> 2 / 4 = 0.5 s."""
    gif, directory = clip
    loaded = fresh_model("qwen2.5-vl-small", "", 0)
    video = load_video_frames(gif, fps=4)
    assert video.indices == SAMPLED and video.sampled_fps == 4.0
    plans = loaded.plan_images([video])
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    prompt = loaded.prompt(messages, plans)
    inputs = loaded.image_inputs(prompt.plans)
    assert inputs["second_per_grid_ts"].tolist() == [0.5] and inputs["video_grid_thw"].tolist() == [list(GRID)]
    result = generate(loaded.model, [prompt.ids], GenerationConfig(max_new_tokens=2), prefill_inputs=inputs)
    assert len(result.token_ids[0]) == 2
    with pytest.raises(ValueError, match="carries no timing"):
        loaded.plan_images([load_video_frames(directory, num_frames=4)])  # a frame directory without a rate


def test_llava_style_model_takes_a_video_as_frames(clip, capsys):
    """tiny-random (a VLM without a video token) shows the 4 sampled frames as 4 images of 16 tokens each."""
    gif, _ = clip
    got = _vlmkit_answer(capsys, "--model", "tiny-random", "--video", gif, "--frames", 4, "--max-new-tokens", 2)
    text_only = _vlmkit_answer(capsys, "--model", "tiny-random", "--max-new-tokens", 2)
    images = len(tiny_random_model().tokenizer.encode("<image>\n" * 4))
    assert got["prompt_tokens"] - text_only["prompt_tokens"] == 4 * image_token_count(tiny_random_model().model.cfg) \
        + images - 4
