"""`vlmkit chat` and ChatSession: one-shot and interactive CLI (subprocess, pseudo-terminal), image features cached.

The oracles: `vlmkit generate` / `generate()` on the whole conversation recomputed from pixels (the
path that runs the vision tower inside the model forward), a forward hook on the vision tower's first
layer (not the session's own counter), and hand-counted prompt lengths.
"""

import json
import os
import pty
import select
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlmkit.chat_session import ChatSession
from vlmkit.config import LMConfig
from vlmkit.generate import generate
from vlmkit.image.load import load_image
from vlmkit.load import LoadedModel, tiny_random_model
from vlmkit.models.lm import CausalLM
from vlmkit.sampling import GenerationConfig
from vlmkit.text.chat import chat_template_for
from vlmkit.text.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAPES = "examples/shapes.png"  # relative to ROOT, the subprocesses' working directory
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def vlmkit(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=ENV)


def one_shot_json(verb: str, *args: str) -> dict:
    out = vlmkit(verb, "--model", "tiny-random", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ---- CLI ---------------------------------------------------------------------------------------------

def test_one_shot_with_an_image_json():
    args = ("--image", SHAPES, "--prompt", "Describe it.", "--max-new-tokens", "12")
    answer = one_shot_json("chat", *args)
    assert set(answer) >= {"text", "finish_reason", "prompt_tokens", "completion_tokens"}
    # tiny-random's random weights emit <|im_end|>, chatml's turn end, before the 12-token cap: the answer ends
    # there (issue 14). One id per character, except specials such as <s> and <pad> that print as nothing.
    assert answer["finish_reason"] == "stop" and len(answer["text"]) <= answer["completion_tokens"] < 12
    # chatml, one id per character, 3 marker tokens, 16 image tokens (32 px / patch 8, CLS dropped)
    assert answer["prompt_tokens"] == len("user\n" + "\nDescribe it." + "\n" + "assistant\n") + 3 + 16
    assert answer["text"] == one_shot_json("generate", *args)["text"]


def test_one_shot_streams_the_same_text():
    args = ("--prompt", "hi", "--max-new-tokens", "10", "--temperature", "0.8", "--seed", "3")
    out = vlmkit("chat", "--model", "tiny-random", *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == one_shot_json("chat", *args)["text"]


def test_interactive_session_two_turns_save_and_reset(tmp_path):
    first, after_reset = tmp_path / "first.json", tmp_path / "after_reset.json"
    script = [f"/image {SHAPES}", "What is it?", "And the colours?", f"/save {first}", "/reset", "hello",
              f"/save {after_reset}", "/quit", "never asked"]
    out = vlmkit("chat", "--model", "tiny-random", "--max-new-tokens", "8", stdin="\n".join(script) + "\n")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "error" not in out.stderr
    answers = out.stdout.splitlines()
    assert len(answers) == 3  # two turns, then one after /reset; nothing after /quit
    # the first turn is the one-shot prompt; after /reset, "hello" is asked with no history and no image
    assert answers[0] == one_shot_json("generate", "--image", SHAPES, "--prompt", "What is it?",
                                       "--max-new-tokens", "8")["text"]
    assert answers[2] == one_shot_json("generate", "--prompt", "hello", "--max-new-tokens", "8")["text"]

    saved = json.loads(first.read_text())
    assert saved["images"] == [SHAPES]
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert saved["messages"][2]["content"] == [{"type": "text", "text": "And the colours?"}]
    assert [saved["messages"][1]["content"], saved["messages"][3]["content"]] == answers[:2]
    reset = json.loads(after_reset.read_text())
    assert reset["images"] == [] and len(reset["messages"]) == 2


def test_bad_lines_are_reported_and_the_session_continues(tmp_path):
    script = ["/image /no/such.png", "/image", "/frobnicate", f"/save {tmp_path / 'no-dir' / 'x.json'}",
              "still here?"]  # end of input quits
    out = vlmkit("chat", "--model", "tiny-random", "--max-new-tokens", "5", stdin="\n".join(script) + "\n")
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert "error: /no/such.png: no such file" in out.stderr
    assert "/image needs a path" in out.stderr and "unknown command /frobnicate" in out.stderr
    assert out.stderr.count("error:") == 4
    assert len(out.stdout.splitlines()) == 1  # the question after the errors was answered


def test_one_shot_bad_input_is_a_clear_error():
    out = vlmkit("chat", "--model", "tiny-random", "--image", "/no/such.png", "--prompt", "x")
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr
    out = vlmkit("chat", "--model", "tiny-random", "--json")
    assert out.returncode == 2 and "--json goes with --prompt" in out.stderr


def test_interactive_through_a_pseudo_terminal(tmp_path):
    saved = tmp_path / "chat.json"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vlmkit.cli", "chat", "--model", "tiny-random",
                             "--max-new-tokens", "6"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=ENV)
    os.close(slave)
    output = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output:
            assert time.monotonic() < deadline, f"no {marker!r} in {output!r}"
            if select.select([master], [], [], 0.5)[0]:
                output += os.read(master, 4096)

    try:
        for line in [f"/image {SHAPES}", "What is it?", "Again?", f"/save {saved}"]:
            read_until(b"you> ")
            output = b""
            os.write(master, line.encode() + b"\n")
        read_until(b"you> ")
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    record = json.loads(saved.read_text())
    assert record["images"] == [SHAPES] and len(record["messages"]) == 4


# ---- ChatSession in process ------------------------------------------------------------------------------

def count_tower_calls(loaded: LoadedModel) -> list[int]:
    calls = [0]
    loaded.model.vision.layers[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_image_is_encoded_once_and_the_cache_is_exact():
    loaded = tiny_random_model()
    cfg = GenerationConfig(max_new_tokens=6, seed=0)
    tower = count_tower_calls(loaded)
    session = ChatSession(loaded, cfg)
    session.attach_image(ROOT / SHAPES)
    "".join(session.ask("What is it?"))
    logits = session.next_turn_logits("And the colours?")  # (1, T, V) from the cached rows
    second = "".join(session.ask("And the colours?"))
    assert tower[0] == 1 and session.vision_calls == 1

    # a fresh recomputation of the same conversation from pixels, the vision tower inside the forward
    messages = session.messages[:-1]
    plans = loaded.plan_images([load_image(ROOT / SHAPES)])
    prompt = loaded.prompt(messages, plans)
    pixels = loaded.image_inputs(prompt.plans)
    with torch.no_grad():
        reference = loaded.model(input_ids=torch.tensor([prompt.ids]), **pixels).logits  # (1, T, V)
    assert tower[0] == 2
    assert logits.shape == reference.shape and session.last_prompt_tokens == len(prompt.ids)
    assert (logits - reference).abs().max().item() <= 1e-5
    full = generate(loaded.model, [prompt.ids], cfg, prefill_inputs=pixels, tokenizer=loaded.tokenizer)
    assert second == full.texts[0] and session.last_result.token_ids == full.token_ids


def test_images_across_turns_and_reset():
    loaded = tiny_random_model()
    tower = count_tower_calls(loaded)
    session = ChatSession(loaded, GenerationConfig(max_new_tokens=4, seed=0), system="Be brief.")
    image = load_image(ROOT / SHAPES)
    session.attach_image(image)
    session.attach_image(image.rotate(90))
    "".join(session.ask("Compare them."))
    session.attach_image(image.transpose(0))
    "".join(session.ask("And this one?"))
    "".join(session.ask("Thanks."))
    assert session.vision_calls == 2 and tower[0] == 2  # one batch per turn that brought images
    assert [len(m["content"]) for m in session.messages if m["role"] == "user"] == [3, 2, 1]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}] and session.images == []


def test_a_bad_turn_leaves_the_history_unchanged():
    session = ChatSession(tiny_random_model(), GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="image placeholder"):
        session.ask("what does <image> mean?")  # a placeholder with no image behind it
    with pytest.raises(ValueError, match="empty"):
        session.ask("  ")
    assert session.messages == [] and session.vision_calls == 0


def test_text_only_model():
    tokenizer = CharTokenizer(string.printable)
    torch.manual_seed(0)
    lm = CausalLM(LMConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position_embeddings=256)).eval()
    loaded = LoadedModel("tiny-lm", lm, tokenizer, chat_template_for(tokenizer, flatten_content=True))
    cfg = GenerationConfig(max_new_tokens=5, seed=0)
    session = ChatSession(loaded, cfg)
    with pytest.raises(ValueError, match="text-only"):
        session.attach_image(ROOT / SHAPES)
    "".join(session.ask("hi"))
    second = "".join(session.ask("more"))
    ids = loaded.prompt(session.messages[:-1]).ids
    assert second == generate(lm, [ids], cfg, tokenizer=tokenizer).texts[0]
