"""--device: the resolver (vlmkit.devices), the flag on every verb that runs a model, cpu == auto on this
machine, and that nothing in src/ names a device outside the resolver.

This machine has no GPU: CUDA and MPS are simulated for the resolver's choice (what auto picks, which
cuda:N a torchrun rank gets, the errors), never run. `--device cuda` itself must fail with the clear error.
"""

from __future__ import annotations

import collections
import csv
import json
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from vlmkit import devices
from vlmkit.cli import build_parser, main
from vlmkit.data.synth import DATASET_FILE, synthesize
from vlmkit.devices import DeviceError, resolve_device
from vlmkit.generate import GenerationConfig, generate
from vlmkit.load import load_model

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmkit"
NO_GPU = not torch.cuda.is_available()
VALID = "auto, cpu, cuda, cuda:N, mps"  # the names the spec (issue 16) lists


# ---- the resolver -------------------------------------------------------------------------------------------

@pytest.mark.skipif(not NO_GPU, reason="auto is the CPU only on a machine without CUDA")
def test_auto_is_the_cpu_here():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    assert devices.available_devices() == ["cpu"]


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_absent_cuda_is_a_clear_error(name):
    with pytest.raises(DeviceError) as e:
        resolve_device(name)
    text = str(e.value)
    assert f"--device {name}" in text and "no CUDA device" in text and "available: cpu" in text


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:0", "cuda:-1", "", "tpu"])
def test_bad_names_are_refused_with_the_valid_list(name):
    with pytest.raises(DeviceError, match=re.escape(f"give one of {VALID}")):
        resolve_device(name)


def test_the_choice_on_simulated_machines(monkeypatch):
    """auto picks CUDA over MPS over the CPU; `cuda` is the local rank's GPU; absent devices are named."""
    monkeypatch.setattr(devices, "_cuda_count", lambda: 2)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)  # an explicit index wins
    assert resolve_device("mps") == torch.device("mps")
    assert devices.available_devices() == ["cpu", "cuda:0", "cuda:1", "mps"]
    with pytest.raises(DeviceError, match=re.escape("2 CUDA device(s), cuda:0 to cuda:1")):
        resolve_device("cuda:2")
    monkeypatch.setattr(devices, "_cuda_count", lambda: 0)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="MPS .* not available"):
        resolve_device("mps")


# ---- the flag -------------------------------------------------------------------------------------------------

MODEL_VERBS = ("generate", "chat", "serve", "eval", "train", "demo")  # the verbs that run a model


def test_every_verb_that_runs_a_model_has_the_flag():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    with_flag = {verb for verb, p in sub.choices.items() if any("--device" in a.option_strings for a in p._actions)}
    assert with_flag == set(MODEL_VERBS)
    for verb in MODEL_VERBS:
        device = next(a for a in sub.choices[verb]._actions if "--device" in a.option_strings)
        assert device.default == "auto"


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without CUDA")
def test_cli_device_cuda_exits_2_with_the_message():
    proc = subprocess.run([sys.executable, "-m", "vlmkit.cli", "generate", "--model", "tiny-random", "--prompt", "hi",
                           "--device", "cuda"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "vlmkit generate: error: --device cuda: this machine has no CUDA device" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("verb", ["chat", "eval", "train"])
def test_cli_bad_device_exits_2_before_any_work(verb, tmp_path, capsys):
    args = {"chat": ["--model", "tiny-random", "--prompt", "hi"],
            "eval": ["--model", "tiny-random", "--data", str(tmp_path / "missing.json")],
            "train": ["--model", "tiny-random", "--data", str(tmp_path / "missing.json"),
                      "--out", str(tmp_path / "run")]}[verb]
    assert main([verb, *args, "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert f"vlmkit {verb}: error: --device 'gpu' is not a device: give one of {VALID}" in err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


# ---- cpu == auto ----------------------------------------------------------------------------------------------

def _json_out(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out.pop("seconds", None)
    return out


@pytest.mark.skipif(not NO_GPU, reason="auto is the CPU only on a machine without CUDA")
def test_generate_cpu_equals_auto(tmp_path, capsys):
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(image)
    args = ["generate", "--model", "tiny-random", "--image", str(image), "--prompt", "What is it?", "--json",
            "--max-new-tokens", "12", "--temperature", "0.8", "--repetition-penalty", "1.2", "--seed", "3"]
    cpu = _json_out(capsys, [*args, "--device", "cpu"])
    auto = _json_out(capsys, [*args, "--device", "auto"])
    default = _json_out(capsys, args)
    assert cpu == auto == default
    assert cpu["completion_tokens"] > 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, {"shapes": 8}, seed=0, image_size=(32, 32), progress=False)
    return out / DATASET_FILE


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in csv.DictReader(f)]


@pytest.mark.skipif(not NO_GPU, reason="auto is the CPU only on a machine without CUDA")
def test_train_cpu_equals_auto(data, tmp_path, capsys):
    runs = {}
    for device in ("cpu", "auto"):
        out = tmp_path / device
        summary = _json_out(capsys, ["train", "--model", "tiny-random", "--data", str(data), "--steps", "3",
                                     "--batch-size", "2", "--lr", "1e-2", "--out", str(out), "--device", device,
                                     "--json"])
        runs[device] = (summary["losses"], _metrics(out), (out / "model.safetensors").read_bytes())
    assert runs["cpu"] == runs["auto"]
    assert len(runs["cpu"][0]) == 3


# ---- no hard-coded device in src/ -----------------------------------------------------------------------------

HARD_CODED = [
    (re.compile(r"""device\s*=\s*["'](cpu|cuda|mps)"""), "device= a literal"),
    (re.compile(r"""torch\.device\(\s*["']"""), "torch.device of a literal"),
    (re.compile(r"""["'](cuda|mps)(:\d+)?["']"""), "a cuda/mps literal"),
    (re.compile(r"""\.(cuda|mps)\("""), ".cuda() / .mps()"),
    (re.compile(r"""\.to\(\s*["'](cpu|cuda|mps)"""), ".to() a literal"),
    (re.compile(r"""torch\.autocast\(\s*["']"""), "autocast on a literal device type"),
    (re.compile(r"""set_default_device"""), "a global default device"),
]


def test_no_hard_coded_device_outside_the_resolver():
    """Only vlmkit/devices.py names devices; everything else takes the model's (or a tensor's) device.
    (.cpu() to bring results to the host stays allowed; `with torch.device("meta")` is written
    torch.device("meta") and is the one allowed literal: it allocates nothing.)"""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "devices.py" and path.parent == SRC:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in HARD_CODED:
                if pattern.search(code) and 'torch.device("meta")' not in code:
                    offenders.append(f"{path.relative_to(SRC.parent)}:{number}: {what}: {line.strip()}")
    assert not offenders, "hard-coded devices:\n" + "\n".join(offenders)


def test_the_static_check_catches_what_it_should():
    """The patterns above flag the forms they are meant to (so an empty offender list means something)."""
    bad = ['x = torch.zeros(3, device="cpu")', 'd = torch.device("cuda")', 'm.to("cuda:1")', 'y = x.cuda()',
           'with torch.autocast("cpu", dtype=torch.bfloat16):', 'if name == "mps":']
    for line in bad:
        assert any(p.search(line) for p, _ in HARD_CODED), line
    good = ['x = torch.zeros(3, device=ids.device)', 'y = logits.cpu().tolist()', 'torch.autocast(device.type)']
    for line in good:
        assert not any(p.search(line) for p, _ in HARD_CODED), line


# ---- every tensor made while the model runs follows it --------------------------------------------------------

FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.randn, torch.rand,
             torch.randint, torch.eye, torch.linspace, torch.as_tensor, torch.randperm}
# Host-side work by design: positions and orders worked out in python from the image grids, moved to the
# model's device in one copy (their docstrings say so).
HOST_SIDE = {("models/mrope.py", "mrope_positions"), ("models/qwen2_vl.py", "patch_positions"),
             ("models/qwen2_5_vl.py", "window_order")}


class _DevicelessFactories(TorchFunctionMode):
    """Records the vlmkit function of every tensor factory called without device= (which lands on the
    default device, the CPU, wherever the model is)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            for frame in reversed(traceback.extract_stack()[:-1]):
                if f"{SRC}/" in frame.filename:
                    self.sites[(Path(frame.filename).relative_to(SRC).as_posix(), frame.name)] += 1
                    break
        return func(*args, **kwargs)


@pytest.mark.parametrize("spec", ["tiny-random", "qwen2.5-vl-small"])
def test_tensors_made_while_generating_and_training_follow_the_model(spec):
    from vlmkit.data.collate import collate
    from vlmkit.data.labels import build_training_example
    from vlmkit.train.run import fresh_model

    loaded = load_model(spec, device="cpu") if spec == "tiny-random" else fresh_model(spec, "", 0)
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    built = loaded.prompt(question, loaded.plan_images([image]))  # planning and pixels: the host's work
    prefill = loaded.image_inputs(built.plans)
    example = build_training_example(loaded.tokenizer, loaded.chat_template,
                                     question + [{"role": "assistant", "content": "red"}], loaded.image_token_id,
                                     loaded.plan_images([image]))
    batch = collate([example, example], 0)
    probe = _DevicelessFactories()
    with probe:
        with torch.inference_mode():
            text = [loaded.prompt([{"role": "user", "content": [{"type": "text", "text": q}]}]).ids
                    for q in ("Hi", "What is red?")]  # two rows: left padding, sampling, the penalty
            generate(loaded.model, text, GenerationConfig(max_new_tokens=4, temperature=0.8, repetition_penalty=1.2,
                                                          seed=0), tokenizer=loaded.tokenizer)
            generate(loaded.model, [built.ids], GenerationConfig(max_new_tokens=4, seed=0), prefill_inputs=prefill,
                     tokenizer=loaded.tokenizer)
        loaded.model.train()
        loaded.model(**batch, loss_only=True).loss.backward()
    stray = {site: n for site, n in probe.sites.items() if site not in HOST_SIDE}
    assert not stray, f"tensors made without device= while the model ran: {stray}"


def test_bf16_is_refused_on_a_device_without_it(monkeypatch, tmp_path):
    """Where the device has no bf16 autocast (an older GPU; simulated), --bf16 is an error before any file."""
    from vlmkit.train import loop
    from vlmkit.train.stages import STAGES

    monkeypatch.setattr(loop, "autocast_dtype", lambda device: None)
    with pytest.raises(ValueError, match="--bf16: cpu cannot run bfloat16 autocast; leave --bf16 out"):
        loop.train(load_model("tiny-random").model, [], STAGES["sft"], 1, bf16=True, out_dir=tmp_path / "run",
                   progress=False)
    assert not (tmp_path / "run").exists()
