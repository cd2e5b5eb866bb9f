"""What a newcomer meets in the first hour (issue 14, section 6), one test per item: generate and stream take
the same arguments; a model folder written by LoadedModel.save_pretrained carries its tokenizer; the errors
for a hub id, a weights file, a checkpoint, an unknown flag, a bad dataset record and an unknown --group-lr
name the next step; --version, eval's data flags, presets' column headers, --overlay's files, and a closed
pipe.

The oracles are written by hand (the flags a message must name, tiny-random's groups vision/projector/lm,
LLaVA-1.5's published 576 tokens for a 336x336 image, the version in pyproject.toml) or are another
implementation (transformers' AutoTokenizer reading the folder vlmkit wrote, generate against stream).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers

import vlmkit
from vlmkit.cli import main
from vlmkit.data.formats import DatasetError, load_dataset
from vlmkit.generate import GenerationConfig, generate, stream
from vlmkit.load import load_model
from vlmkit.text.tokenizer import HFTokenizer, load_tokenizer
from vlmkit.train.checkpoint import TrainState, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(vlmkit.__file__).resolve().parents[1]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vlmkit_cli(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], cwd=cwd, env=env, text=True, timeout=300,
                          check=False, **({"capture_output": True} | kwargs))


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """main(args) in this process: (exit status, stdout, stderr); argparse's exits are caught."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


@pytest.fixture
def shapes(tmp_path):
    """A 3-record dataset whose images live in tmp_path/pictures, the record on line 3 naming a missing one."""
    (tmp_path / "pictures").mkdir()
    records = []
    for i, colour in enumerate(("red", "blue", "green")):
        name = f"{colour}.png"
        if i != 1:
            Image.new("RGB", (32, 32), colour).save(tmp_path / "pictures" / name)
        records.append({"id": colour, "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": colour}]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


# --- Python: generate and stream, save_pretrained ----------------------------------------------------------


def test_generate_and_stream_take_the_same_arguments(tiny):
    plans = tiny.plan_images([Image.new("RGB", (40, 30), "red")])
    ids = tiny.prompt_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], plans)
    args = (tiny.model, ids, GenerationConfig(max_new_tokens=8))
    kwargs = {"prefill_inputs": tiny.image_inputs(plans), "tokenizer": tiny.tokenizer}
    streamed = "".join(stream(*args, **kwargs))
    assert generate(*args, **kwargs).texts == [streamed]
    # one prompt as a list, a (T,) tensor, a (1, T) tensor or a batch of one: the same answer
    for prompt in (torch.tensor(ids), torch.tensor([ids]), [ids]):
        assert "".join(stream(tiny.model, prompt, args[2], **kwargs)) == streamed
        assert generate(tiny.model, prompt, args[2], **kwargs).texts == [streamed]


def _word_tokenizer() -> HFTokenizer:
    words = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>", "user", "assistant", "hello", "there", "\n"]
    backend = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    return HFTokenizer(backend, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", chat_template=TEMPLATE,
                       extra_special_tokens=["<|im_start|>"])


def test_tokenizer_save_pretrained_is_read_back_by_vlmkit_and_transformers(tmp_path):
    from transformers import AutoTokenizer

    written = _word_tokenizer().save_pretrained(tmp_path)
    assert sorted(written) == ["tokenizer.json", "tokenizer_config.json"]
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.eos_token, ours.bos_token, ours.chat_template) == ("<|im_end|>", "<s>", TEMPLATE)
    assert theirs.eos_token == "<|im_end|>" and theirs.bos_token == "<s>"
    messages = [{"role": "user", "content": "hello"}]
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False) == [3, 4, 8, 6, 2, 8, 3, 5, 8]


def test_loaded_model_save_pretrained_writes_a_folder_vlmkit_generate_loads(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "saved")
    assert (folder / "tokenizer.json").is_file()
    again = load_model(str(folder))
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    assert again.prompt_ids(messages) == tiny.prompt_ids(messages)
    cfg = GenerationConfig(max_new_tokens=6)
    expected = generate(tiny.model, tiny.prompt_ids(messages), cfg, tokenizer=tiny.tokenizer).texts[0]
    done = vlmkit_cli("generate", "--model", str(folder), "--prompt", "Name a colour.", "--max-new-tokens", "6",
                      "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == expected


# --- errors that name the next step ------------------------------------------------------------------------


def test_a_hub_id_neither_cached_nor_reachable_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch, capsys):
    # vlmkit now resolves hub ids itself (vlmkit.hub); offline with an empty cache it names the cache folder,
    # why the hub was not asked and the next step (tests/test_hub_ids.py covers the rest).
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, _, err = run_main(capsys, "generate", "--model", "someone/some-vlm-7b", "--prompt", "hi")
    assert status == 2
    assert f"not found in the Hugging Face cache at {tmp_path / 'models--someone--some-vlm-7b'}" in err
    assert "hf download someone/some-vlm-7b" in err and "HF_HUB_OFFLINE" in err


def test_a_safetensors_file_says_to_pass_its_folder(tiny, tmp_path, capsys):
    folder = tiny.save_pretrained(tmp_path / "saved")
    status, _, err = run_main(capsys, "generate", "--model", folder / "model.safetensors", "--prompt", "hi")
    assert status == 2 and f"pass --model {folder}" in err


@pytest.mark.parametrize("final_model", [True, False])
def test_a_checkpoint_says_resume_or_use_the_run_folder(tiny, tmp_path, capsys, final_model):
    run = tmp_path / "run"
    optimizer = torch.optim.AdamW(tiny.model.parameters())
    checkpoint = save_checkpoint(run, tiny.model, optimizer, TrainState(step=3, sample_index=0))
    assert checkpoint.name == "step-000003"
    if final_model:
        tiny.save_pretrained(run)
    status, _, err = run_main(capsys, "generate", "--model", checkpoint, "--prompt", "hi")
    assert status == 2 and "model_type" not in err
    assert f"--out {run} --resume" in err
    assert (f"pass the run folder: --model {run}" in err) == final_model
    assert ("has not written its final model yet" in err) != final_model


@pytest.mark.parametrize("verb, args", [("generate", ["--model", "tiny-random", "--prompt", "hi"]),
                                        ("data synth", ["--out", "x"])])
def test_an_unknown_flag_prints_the_verbs_usage(capsys, verb, args):
    status, _, err = run_main(capsys, *verb.split(), *args, "--no-such-flag")
    assert status == 2
    assert err.startswith(f"usage: vlmkit {verb} [-h]")
    assert f"vlmkit {verb}: error: unrecognized arguments: --no-such-flag" in err


def test_data_errors_name_the_cli_flags_on_the_cli_and_the_keywords_in_python(shapes, capsys):
    status, _, err = run_main(capsys, "eval", "--model", "tiny-random", "--data", shapes)
    assert status == 2
    assert "--data-policy skip" in err and "--image-root DIR" in err
    assert "policy='skip'" not in err and "image_root=" not in err
    with pytest.raises(DatasetError) as info:
        load_dataset(shapes)
    assert "policy='skip'" in str(info.value) and "image_root=" in str(info.value)


def test_an_unknown_group_lr_is_refused_before_the_data_is_prepared(shapes, tmp_path, capsys, monkeypatch):
    from vlmkit.train import run

    def prepare_data(*args, **kwargs):
        raise AssertionError("the data was prepared before --group-lr was checked")

    monkeypatch.setattr(run, "prepare_data", prepare_data)
    status, _, err = run_main(capsys, "train", "--model", "tiny-random", "--data", shapes, "--image-root",
                              shapes.parent / "pictures", "--data-policy", "skip", "--steps", "1", "--out",
                              tmp_path / "run", "--group-lr", "foo=1e-4")
    assert status == 2
    assert "--group-lr foo=0.0001: tiny-random has no group 'foo'; its groups are vision, projector, lm" in err


# --- the smaller things ------------------------------------------------------------------------------------


def test_version(capsys):
    status, out, _ = run_main(capsys, "--version")
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert status == 0 and out.startswith(f"vlmkit {version} (torch {torch.__version__}, Python ")


def test_eval_takes_data_policy_and_image_root(shapes, capsys):
    status, out, err = run_main(capsys, "eval", "--model", "tiny-random", "--data", shapes, "--image-root",
                                shapes.parent / "pictures", "--data-policy", "skip", "--max-new-tokens", "2",
                                "--json")
    assert status == 0, err
    assert json.loads(out)["num_samples"] == 2
    assert f"{shapes}:2: record 'blue': image 'blue.png': no such file" in err


def test_presets_has_column_headers(capsys):
    status, out, _ = run_main(capsys, "presets")
    header, llava = out.splitlines()[:2]
    assert status == 0
    names = ["preset", "parameters", "scheme", "projector", "tokens 336x336", "tokens 1344x672"]
    assert header.startswith("preset") and all(name in header for name in names)
    # LLaVA-1.5: 576 tokens for both sizes, right-aligned under each header
    end_336, end_1344 = (header.index(h) + len(h) for h in ("tokens 336x336", "tokens 1344x672"))
    assert llava.startswith("llava-1.5 ")
    assert llava[end_336 - 3:end_336] == "576" and llava[end_1344 - 3:end_1344] == "576"


def test_overlay_names_the_files_it_wrote(tmp_path, capsys):
    images = []
    for i in range(2):
        images.append(tmp_path / f"in{i}.png")
        Image.new("RGB", (64, 48), "white").save(images[-1])
    status, out, err = run_main(capsys, "tokens", *images, "--scheme", "pad", "--overlay", tmp_path / "plan.png",
                                "--json")
    assert status == 0 and len(json.loads(out)) == 2  # stdout stays the JSON
    for source, written in zip(images, ("plan.png", "plan-1.png")):
        assert f"overlay of {source} written to {tmp_path / written}" in err
        assert (tmp_path / written).is_file()


def test_a_closed_pipe_ends_quietly(tmp_path):
    """As `vlmkit tokens ... | head -1` (or `vlmkit presets | head -1`, the same handler, slower to run)."""
    Image.new("RGB", (64, 48), "white").save(tmp_path / "in.png")
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line: every write meets EPIPE
    try:
        done = vlmkit_cli("tokens", str(tmp_path / "in.png"), "--scheme", "pad", stdout=write,
                          stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(write)
    assert done.returncode == 141  # as a process ended by SIGPIPE
    assert done.stderr == ""
