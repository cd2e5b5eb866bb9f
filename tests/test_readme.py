"""The README's "Use it from Python" snippet, run verbatim where a newcomer runs it: in a folder where the
README's Train commands have run (scaled down: fewer samples and steps, the same flags otherwise).

The oracles: the snippet's streamed answer equals its generate() answer (the README says they take the same
arguments; greedy decoding gives one answer), and `vlmkit generate --model my-model`, on the folder the
snippet's save_pretrained wrote, gives that same answer to the same question and image: the folder holds
the model and the tokenizer with its chat template, or the prompt's ids (and so the answer) would differ.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import vlmkit

README = Path(__file__).resolve().parents[1] / "README.md"
SRC = Path(vlmkit.__file__).resolve().parents[1]  # the vlmkit under test, also for subprocesses run elsewhere
# The Train section's sizes, scaled down to seconds; every other flag is the README's.
SCALE = {"--shapes": "16", "--steps": "2", "--batch-size": "4", "--checkpoint-every": "1"}


def section(title: str) -> str:
    """The README's text under `## title`, up to the next `## ` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def code_blocks(text: str, language: str = "") -> list[str]:
    """The fenced code blocks of text opened with ```language."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600, check=False)


def train_commands() -> list[list[str]]:
    """The Train section's commands up to its first `vlmkit generate`, as argv lists with SCALE applied."""
    block = code_blocks(section("Train"))[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["vlmkit", "generate"]:
            break
        for i, word in enumerate(words[:-1]):
            if word in SCALE:
                words[i + 1] = SCALE[word]
        commands.append([sys.executable, "-m", "vlmkit.cli", *words[1:]])
    return commands


def test_readme_python_snippet_runs_verbatim(tmp_path):
    commands = train_commands()
    assert [c[3:5] for c in commands] == [["data", "synth"], ["train", "--model"]]
    for argv in commands:
        done = run(argv, tmp_path)
        assert done.returncode == 0, done.stderr
    [snippet] = code_blocks(section("Use it from Python"), "python")

    done = run([sys.executable, "-c", snippet], tmp_path)

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    streamed, _, last = done.stdout.removesuffix("\n").rpartition("\n")  # the streamed text may hold newlines
    text, reason = last.rsplit(" ", 1)
    assert ast.literal_eval(text) == streamed and reason in ("stop", "length")
    assert streamed.strip(), "the snippet printed no answer"

    image = re.search(r'load_image\("([^"]+)"\)', snippet).group(1)
    question = re.search(r'"text": "([^"]+)"', snippet).group(1)
    max_new_tokens = re.search(r"max_new_tokens=(\d+)", snippet).group(1)
    done = run([sys.executable, "-m", "vlmkit.cli", "generate", "--model", "my-model", "--image", image,
                "--prompt", question, "--max-new-tokens", max_new_tokens, "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == streamed
