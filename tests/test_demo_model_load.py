"""`--model DEMO-REPORT`: the model `vlmkit demo` saves in its report folder, loaded and talked to.

One demo run at a tiny schedule (module fixture, ~9 s on one thread) trains and saves a model. The oracles:
- the in-memory trained model the run returns: the reloaded model's weights and logits equal it bit for bit;
- the demo's own data and evaluation path: a user's image prepared by its size gives the pixels of the demo's
  held-out sample (demo.data), the chat template the ids of demo.data.encode_row, and `vlmkit generate`,
  `vlmkit chat` and the server (uvicorn on a free port, the openai client) answer as demo.evaluate's
  generate_answers does. A model trained for a few steps answers nearly the same whatever the image, so the
  answer alone would not catch a wrong image or prompt: each of those paths is also watched at the model
  (every DemoVLM prefill is recorded) and must have fed it exactly encode_row's ids and the sample's pixels
  (or, in the chat, the rows encode_images makes of them).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_demo_model_load.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest
import torch
from PIL import Image

from test_serve import Server, png_data_url
from vlmkit.chat_session import ChatSession
from vlmkit.cli import main
from vlmkit.demo import data as D
from vlmkit.demo import saved
from vlmkit.demo.evaluate import generate_answers
from vlmkit.demo.model import DemoVLM
from vlmkit.demo.run import DemoSettings, Schedule, run_demo
from vlmkit.load import load_model
from vlmkit.sampling import GenerationConfig
from vlmkit.serve import create_app

SEED = 0
MAX_NEW = 30


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(the run's result with its in-memory model, the report folder) of a tiny-schedule demo run."""
    out = tmp_path_factory.mktemp("demo") / "report"
    schedule = Schedule(warmup_steps=2, read_steps=2, joint_steps=5, batch_size=4)
    settings = DemoSettings(minutes=5, seed=SEED, threads=1, out=str(out), schedule=schedule, eval_lines=2,
                            eval_paragraphs=1, eval_shapes=2, quiet=True)
    return run_demo(settings), out


@pytest.fixture(scope="module")
def samples(demo, tmp_path_factory):
    """A held-out text line, paragraph and shape question, each with its image written as a PNG file."""
    folder = tmp_path_factory.mktemp("images")
    picked = {"line": D.line_item(SEED, D.HELDOUT, 0, keep_image=True),
              "paragraph": D.paragraph_item(SEED, D.HELDOUT, 0, keep_image=True),
              "shape": D.ShapeQuestions(D.HELDOUT).item(5, keep_image=True)}
    for task, sample in picked.items():
        sample.image.save(folder / f"{task}.png")
    return {task: (sample, folder / f"{task}.png") for task, sample in picked.items()}


@pytest.fixture
def prefills(monkeypatch) -> list[dict]:
    """Every DemoVLM forward with an image during the test (any thread): its input_ids and image inputs."""
    calls: list[dict] = []
    forward = DemoVLM.forward

    def recording(self, *args, **kwargs):
        if kwargs.get("pixel_values") is not None or kwargs.get("image_embeds") is not None:
            calls.append({key: kwargs.get(key) for key in ("input_ids", "pixel_values", "image_embeds")})
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DemoVLM, "forward", recording)
    return calls


def _greedy(demo, sample: D.Sample) -> str:
    """The demo evaluation's answer (demo.evaluate.generate_answers, greedy) of the in-memory model."""
    result, _ = demo
    return generate_answers(result.model, result.tokenizer, [sample], max_new_tokens=MAX_NEW)[0]


def _prompt_ids(demo, sample: D.Sample) -> list[int]:
    """demo.data.encode_row's prompt for the sample (its image's token count from the model)."""
    model, tokenizer = demo[0].model, demo[0].tokenizer
    _, H, W = sample.pixels.shape
    return D.encode_row(tokenizer, model.image_token_id, model.num_image_tokens(H, W), sample.question, None)[0]


def _assert_fed(demo, calls: list[dict], sample: D.Sample) -> None:
    """The one prefill in calls had the sample's prompt ids and pixels (or the rows encode_images makes of them)."""
    assert len(calls) == 1, len(calls)
    call = calls[0]
    assert call["input_ids"].tolist() == [_prompt_ids(demo, sample)]
    if call["image_embeds"] is not None:
        with torch.no_grad():
            rows = demo[0].model.encode_images(sample.pixels[None])
        assert len(call["image_embeds"]) == 1 and torch.equal(call["image_embeds"][0], rows[0])
    else:
        assert torch.equal(call["pixel_values"], sample.pixels[None])
    calls.clear()


def _run_cli(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_saved_model_reloads_bit_for_bit(demo, samples):
    result, out = demo
    assert result.summary["model_dir"] == str(out) and "## The model" in (out / "report.md").read_text()
    loaded = load_model(str(out))
    trained, model = result.model, loaded.model
    assert type(model).__name__ == "DemoVLM" and loaded.takes_images and not model.training
    assert model.cfg == trained.cfg
    # the default demo grounds the question's class words: the shape sample's "green" reads the image's classes,
    # so the encoded rows below must carry them for the cached logits to match
    assert model.cfg.mark_class_words and model.cfg.ground_class_words and "match_embed" in model.state_dict()
    assert trained.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in trained.state_dict().items())
    assert model.lm.lm_head.weight is model.lm.embed.weight  # still tied after loading
    assert loaded.tokenizer.vocab == result.tokenizer.vocab
    for task in ("line", "shape"):  # a training-format batch (answers included) of each image size
        sample = samples[task][0]
        batch = D.collate_samples([sample, sample], result.tokenizer, D.ctc_vocab(), trained)
        with torch.no_grad():
            expected = trained(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
            got = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
            # the chat's encode-once path: encoded rows instead of the pixels, the same logits
            rows = model.encode_images(batch["pixel_values"])
            cached = model(input_ids=batch["input_ids"], image_embeds=rows).logits
        assert torch.equal(got, expected) and torch.equal(cached, expected)
    assert (out / saved.WEIGHTS_FILE).stat().st_size < 20e6  # ~4.25 M fp32 parameters, the tied head once


def test_saved_model_loads_in_bf16(demo, samples):
    """`--dtype bfloat16` on the demo folder: every weight in bf16, pixels cast by the model, and the logits those
    of the fp32 model within bf16's rounding (8 bits of mantissa: a few hundredths of the logits' range)."""
    result, out = demo
    loaded = load_model(str(out), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    for task in ("line", "shape"):
        sample = samples[task][0]
        batch = D.collate_samples([sample], result.tokenizer, D.ctc_vocab(), result.model)
        with torch.no_grad():
            expected = result.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
            got = loaded.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits.float()
        spread = (expected.max() - expected.min()).item()
        assert 0 < (got - expected).abs().max().item() <= 0.05 * spread, task


def test_user_images_and_prompts_are_prepared_as_the_demo_did(demo, samples):
    loaded = load_model(str(demo[1]))
    for task, (sample, path) in samples.items():
        plans = loaded.plan_images([Image.open(path)])
        assert torch.equal(plans[0].pixel_values[0], sample.pixels), task
        messages = [{"role": "user", "content": [{"type": "text", "text": sample.question}, {"type": "image"}]}]
        ids = loaded.prompt_ids(messages, plans)
        assert ids == D.encode_row(loaded.tokenizer, loaded.image_token_id, plans[0].num_tokens, sample.question,
                                   None)[0]
    assert plans[0].num_tokens == 2 * 16  # the 64x64 shape image: 64/32 token rows x 64/4 columns
    with pytest.raises(ValueError, match=r"256x32 \(line\), 256x96 \(paragraph\), 64x64 \(shape\).*100x50"):
        loaded.plan_images([Image.new("RGB", (100, 50))])


def test_generate_cli_answers_as_the_demo_evaluation(demo, samples, prefills, capsys):
    folder = str(demo[1])
    for task, (sample, path) in samples.items():
        expected = _greedy(demo, sample)
        prefills.clear()
        out = _run_cli(capsys, "generate", "--model", folder, "--image", str(path), "--prompt", sample.question,
                       "--max-new-tokens", str(MAX_NEW), "--json")
        assert (out["text"], out["prompt_tokens"]) == (expected, len(_prompt_ids(demo, sample))), task
        _assert_fed(demo, prefills, sample)
    line = samples["line"][0]
    recorded = [e["prediction"] for e in demo[0].examples if e["task"] == "line"][0]  # the run's own evaluation
    assert generate_answers(demo[0].model, demo[0].tokenizer, [line], max_new_tokens=D.LINE_CHARS[1] + 6)[0] == recorded


def test_chat_one_shot_json_and_the_image_encoded_once(demo, samples, prefills, capsys):
    folder = str(demo[1])
    sample, path = samples["shape"]
    expected = _greedy(demo, sample)
    prefills.clear()
    out = _run_cli(capsys, "chat", "--model", folder, "--image", str(path), "--prompt", sample.question,
                   "--max-new-tokens", str(MAX_NEW), "--json")
    assert (out["text"], out["prompt_tokens"]) == (expected, len(_prompt_ids(demo, sample)))
    _assert_fed(demo, prefills, sample)
    # Two turns about one image: each question is answered about the image alone, the image encoded once.
    line, line_path = samples["line"]
    expected = _greedy(demo, line)
    session = ChatSession(load_model(folder), GenerationConfig(max_new_tokens=MAX_NEW))
    session.attach_image(line_path)
    for _ in range(2):
        prefills.clear()
        assert "".join(session.ask(line.question)) == expected
        _assert_fed(demo, prefills, line)
    assert session.vision_calls == 1


def test_server_answers_a_base64_image_as_the_demo_evaluation(demo, samples, prefills):
    server = Server(create_app(load_model(str(demo[1])), model_name="demo"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for task in ("line", "shape"):
            sample = samples[task][0]
            expected = _greedy(demo, sample)
            prefills.clear()
            messages = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(sample.image)}},
                {"type": "text", "text": sample.question}]}]
            response = client.chat.completions.create(model="demo", messages=messages, max_tokens=MAX_NEW,
                                                      temperature=0)
            assert response.choices[0].message.content == expected, task
            assert response.usage.prompt_tokens == len(_prompt_ids(demo, sample))
            _assert_fed(demo, prefills, sample)
            chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=MAX_NEW,
                                                         temperature=0, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected, task
            _assert_fed(demo, prefills, sample)
        with pytest.raises(openai.BadRequestError, match="system message"):
            client.chat.completions.create(model="demo", max_tokens=4, messages=[
                {"role": "system", "content": "be brief"}] + messages)
        # the demo LM's 512 positions bound prompt + max_tokens (the shape prompt is under 100 tokens)
        with pytest.raises(openai.BadRequestError, match="context of 512 tokens"):
            client.chat.completions.create(model="demo", max_tokens=500, messages=messages)
    finally:
        server.stop()


def test_missing_or_corrupt_files_are_refused_by_name(demo, tmp_path, capsys):
    _, out = demo

    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(out, folder)
        return folder

    truncated = copy("truncated")
    data = (truncated / saved.WEIGHTS_FILE).read_bytes()
    (truncated / saved.WEIGHTS_FILE).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the sha256"):
        load_model(str(truncated))
    no_tokenizer = copy("no_tokenizer")
    (no_tokenizer / saved.TOKENIZER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json is missing"):
        load_model(str(no_tokenizer))
    bad_json = copy("bad_json")
    (bad_json / saved.CONFIG_FILE).write_text("{ not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(str(bad_json))
    # An interrupted save (here: the tokenizer fails to write) leaves no config.json: refused, not half-loaded.
    interrupted = copy("interrupted")
    tokenizer = demo[0].tokenizer

    class Failing(type(tokenizer)):
        def save(self, path):
            raise OSError("disk full")

    failing = Failing(tokenizer.chars, tokenizer.special_tokens, tokenizer.chat_template)
    with pytest.raises(OSError, match="disk full"):
        saved.save_demo_model(demo[0].model, failing, interrupted)
    with pytest.raises(FileNotFoundError, match="holds no saved demo model"):
        load_model(str(interrupted))
    # through the CLI: exit code 2 and the message
    assert main(["generate", "--model", str(truncated), "--prompt", "hi"]) == 2
    assert "does not match the sha256" in capsys.readouterr().err


def test_conversations_the_demo_model_cannot_take_are_refused(demo, samples):
    loaded = load_model(str(demo[1]))
    image = Image.open(samples["shape"][1])
    question = {"type": "text", "text": "what shape is in the image?"}
    with_image = {"role": "user", "content": [{"type": "image"}, question]}
    cases = [("system message", [{"role": "system", "content": "hi"}, with_image], [image]),
             ("one image; this conversation has 0", [{"role": "user", "content": [question]}], []),
             ("one image; this conversation has 2",
              [with_image, {"role": "assistant", "content": "circle"}, with_image], [image, image]),
             ("one-line question", [{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": "what\nshape?"}]}], [image])]
    for match, messages, images in cases:
        with pytest.raises(ValueError, match=match):
            loaded.prompt(messages, loaded.plan_images(images))
    # a later turn shows the conversation's image with the new question only, as the demo trained
    turns = [with_image, {"role": "assistant", "content": "circle"},
             {"role": "user", "content": "what color is the shape?"}]
    plans = loaded.plan_images([image])
    assert loaded.prompt(turns, plans).ids == D.encode_row(loaded.tokenizer, loaded.image_token_id,
                                                           plans[0].num_tokens, "what color is the shape?", None)[0]
