"""Models by Hugging Face hub id (issue 15, part 3) and `vlmkit inspect`, with no network.

The hub cache is built by hand in the layout huggingface_hub reads (models--owner--name/refs/<ref> holding a
commit hash, snapshots/<commit>/<file> symlinked to blobs/<sha256>), with HF_HUB_OFFLINE=1 and HF_HUB_CACHE
pointing at it. The oracles: the answer `--model <the folder>` gives (the folder that went into the cache),
the files a hand-written list says a model needs, huggingface_hub's own pattern filter, and the checkpoint's
sizes computed by hand (tiny-random's parts, SmolLM2-135M's published 134.5M parameters).

The download path is exercised by replacing huggingface_hub's network calls inside snapshot_download (the
repository listing and the per-file download) with fakes that record what is asked for: huggingface_hub's
own filtering decides what is requested, so the test shows which files vlmkit would fetch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_first_hour import run_main

import vlmkit
from vlmkit import hub as vlmkit_hub
from vlmkit.hub import allow_patterns, is_allowed, is_hub_spec, parse_hub_spec
from vlmkit.load import load_model, tiny_random_model

SRC = Path(vlmkit.__file__).resolve().parents[1]
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
PROMPT = ["--prompt", "Name a colour.", "--max-new-tokens", "8", "--json"]


def cache_repo(cache: Path, repo_id: str, commit: str, files: dict[str, Path | bytes],
               refs: tuple[str, ...] = ("main",)) -> Path:
    """Put files (name -> a file to copy, or bytes) into a hand-built hub cache as snapshot `commit` of repo_id,
    each ref (branch or tag) naming it; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir()}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # relative specs (owner/name) must not meet a folder by accident
    return cache


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny-random models saved by LoadedModel.save_pretrained: seed 0 (folder a) and seed 1 (folder b)."""
    root = tmp_path_factory.mktemp("saved")
    return {name: tiny_random_model(seed).save_pretrained(root / name) for name, seed in (("a", 0), ("b", 1))}


def answer(capsys, model: str | Path) -> str:
    status, out, err = run_main(capsys, "generate", "--model", model, *PROMPT)
    assert status == 0, err
    return json.loads(out)["text"]


# --- what reads as a hub id ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("llava-hf/llava-1.5-7b-hf", ("llava-hf/llava-1.5-7b-hf", None)),
    ("microsoft/Phi-3.5-vision-instruct@main", ("microsoft/Phi-3.5-vision-instruct", "main")),
    ("owner/name@" + COMMIT_A, ("owner/name", COMMIT_A)),
    ("owner/name@refs/pr/3", ("owner/name", "refs/pr/3")),
    ("tiny-random", None), ("a/b/c", None), ("./a/b", None), ("/abs/path", None), ("owner/name@", None),
    ("../name", None), ("model.gguf", None),
])
def test_what_reads_as_a_hub_id(spec, expected):
    hub = parse_hub_spec(spec)
    assert (None if hub is None else (hub.repo_id, hub.revision)) == expected


def test_a_local_folder_of_the_same_name_wins(tmp_path, monkeypatch, saved):
    monkeypatch.chdir(tmp_path)
    assert is_hub_spec("owner/name")
    shutil.copytree(saved["a"], tmp_path / "owner" / "name")
    assert not is_hub_spec("owner/name")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # the hub is never asked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_model("owner/name").name == "owner/name"


# --- only what a model needs is fetched -----------------------------------------------------------------

# A real repository's listing (llava-hf/llava-1.5-7b-hf's, with the pickles other repositories carry).
REPO_LISTING = [
    ".gitattributes", "README.md", "added_tokens.json", "chat_template.json", "config.json",
    "generation_config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
    "processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json", "chat_template.jinja", "merges.txt", "vocab.json",
    "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "training_args.bin",
    "model.pt", "weights.pth", "last.ckpt", "optimizer.pt", "flax_model.msgpack", "tf_model.h5",
    "consolidated.safetensors", "original/model.safetensors", "onnx/model.onnx", "onnx/config.json",
]
# Written by hand: what vlmkit reads from such a repository.
NEEDED = {
    "added_tokens.json", "chat_template.json", "config.json", "generation_config.json",
    "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
    "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "chat_template.jinja", "merges.txt", "vocab.json",
    "pytorch_model.bin.index.json",  # a JSON index (no pickle); harmless
}


def test_the_patterns_select_what_a_model_needs_and_never_a_pickle():
    from huggingface_hub.utils import filter_repo_objects

    chosen = set(filter_repo_objects(REPO_LISTING, allow_patterns=list(vlmkit_hub.ALLOW_PATTERNS),
                                     ignore_patterns=list(vlmkit_hub.IGNORE_PATTERNS)))
    assert chosen == NEEDED
    assert {f for f in REPO_LISTING if is_allowed(f)} == NEEDED  # vlmkit's own reading of the patterns agrees
    assert not [f for f in chosen if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))]
    weightless = set(filter_repo_objects(REPO_LISTING, allow_patterns=allow_patterns(weights=False),
                                         ignore_patterns=list(vlmkit_hub.IGNORE_PATTERNS)))
    assert weightless == {f for f in NEEDED if not f.endswith(".safetensors")}


class FakeHub:
    """Stands in for the hub inside huggingface_hub's snapshot_download: the repository's listing (HfApi) and
    the per-file download (hf_hub_download), which writes the file into the cache and records its name."""

    def __init__(self, files: dict[str, bytes], commit: str = COMMIT_A) -> None:
        self.files, self.commit, self.requested = files, commit, []

    def api(self, *args, **kwargs):
        from huggingface_hub.hf_api import RepoFile

        hub = self

        class Api:
            def repo_info(self, repo_id, **kwargs):
                return type("Info", (), {"sha": hub.commit})()

            def list_repo_tree(self, repo_id, **kwargs):
                return [RepoFile(path=name, size=len(data), oid=hashlib.sha1(data).hexdigest())
                        for name, data in hub.files.items()]

            def list_repo_files(self, repo_id, **kwargs):
                return list(hub.files)

        return Api()

    def download(self, repo_id, *, filename, revision, cache_dir, **kwargs):
        self.requested.append(filename)
        snapshot = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / revision
        (snapshot / filename).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / filename).write_bytes(self.files[filename])
        return str(snapshot / filename)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub._snapshot_download as snapshot_module

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)

    def install(files: dict[str, bytes]) -> FakeHub:
        hub = FakeHub(files)
        monkeypatch.setattr(snapshot_module, "HfApi", hub.api)
        monkeypatch.setattr(snapshot_module, "hf_hub_download", hub.download)
        monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
        return hub

    return install


def test_online_only_the_allowed_files_are_requested_and_the_model_loads(fake_hub, saved, capsys):
    files = {name: path.read_bytes() for name, path in folder_files(saved["a"]).items()}
    pickles = {"pytorch_model.bin": b"\x80\x04pickle", "training_args.bin": b"\x80\x04", "model.pt": b"\x80"}
    hub = fake_hub({**files, **pickles, "README.md": b"# tiny", "onnx/model.onnx": b"onnx"})
    assert answer(capsys, "owner/tiny") == answer(capsys, saved["a"])
    assert sorted(hub.requested) == sorted(files)  # config, weights, tokenizer, generation_config: nothing else


def test_online_a_pickle_only_repository_is_refused_before_any_weight_is_read(fake_hub, saved, capsys):
    hub = fake_hub({"config.json": (saved["a"] / "config.json").read_bytes(), "pytorch_model.bin": b"\x80\x04",
                    "tokenizer.json": (saved["a"] / "tokenizer.json").read_bytes()})
    status, _, err = run_main(capsys, "generate", "--model", "owner/old", "--prompt", "hi")
    assert status == 2
    assert "only as pickle files (pytorch_model.bin)" in err and "save_pretrained(OUT, safe_serialization=True)" in err
    assert sorted(hub.requested) == ["config.json", "tokenizer.json"]


# --- offline, from a hand-built cache ------------------------------------------------------------------


def test_generate_by_hub_id_answers_as_the_folder_does(offline_cache, saved, capsys):
    cache_repo(offline_cache, "owner/tiny", COMMIT_A, folder_files(saved["a"]))
    assert answer(capsys, "owner/tiny") == answer(capsys, saved["a"])


def test_at_revision_picks_another_snapshot(offline_cache, saved, capsys):
    cache_repo(offline_cache, "owner/tiny", COMMIT_A, folder_files(saved["a"]))
    cache_repo(offline_cache, "owner/tiny", COMMIT_B, folder_files(saved["b"]), refs=("v2",))
    a, b = answer(capsys, saved["a"]), answer(capsys, saved["b"])
    assert a != b  # the two seeds answer differently, so the revision shows in the answer
    assert answer(capsys, "owner/tiny") == a
    assert answer(capsys, "owner/tiny@main") == a
    assert answer(capsys, "owner/tiny@v2") == b  # a tag
    assert answer(capsys, f"owner/tiny@{COMMIT_B}") == b  # a commit


def test_from_pretrained_takes_a_hub_id(offline_cache, saved):
    from vlmkit.models import from_pretrained

    cache_repo(offline_cache, "owner/tiny", COMMIT_A, folder_files(saved["a"]))
    model = from_pretrained("owner/tiny")
    expected = load_model(str(saved["a"])).model.state_dict()
    assert all((model.state_dict()[k] == v).all() for k, v in expected.items())


def test_a_pickle_only_repository_is_refused_offline(offline_cache, saved, capsys):
    cache_repo(offline_cache, "owner/old", COMMIT_A, {"config.json": saved["a"] / "config.json",
                                                      "pytorch_model.bin": b"\x80\x04pickle"})
    status, _, err = run_main(capsys, "generate", "--model", "owner/old", "--prompt", "hi")
    assert status == 2
    assert "owner/old: the repository holds its weights only as pickle files (pytorch_model.bin)" in err
    assert "never pickles" in err and "save_pretrained(OUT, safe_serialization=True)" in err


def test_an_uncached_id_offline_is_a_clear_error_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-m", "vlmkit.cli", "generate", "--model", "someone/some-vlm-7b@v1",
                           "--prompt", "hi"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    where = tmp_path / "hub" / "models--someone--some-vlm-7b"
    assert f"no local folder of that name; revision 'v1' was not found in the Hugging Face cache at {where}" \
        in done.stderr
    assert "HF_HUB_OFFLINE is set" in done.stderr and "hf download someone/some-vlm-7b --revision v1" in done.stderr


def test_an_unreachable_hub_names_the_network_error(fake_hub, capsys, monkeypatch):
    import huggingface_hub._snapshot_download as snapshot_module

    fake_hub({})

    def unreachable(*args, **kwargs):  # the connection error of the HTTP client huggingface_hub uses
        raise snapshot_module.httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    class Down:
        repo_info = list_repo_tree = staticmethod(unreachable)

    monkeypatch.setattr(snapshot_module, "HfApi", lambda *a, **k: Down())
    status, _, err = run_main(capsys, "generate", "--model", "someone/some-vlm-7b", "--prompt", "hi")
    assert status == 2
    assert "was not found in the Hugging Face cache at" in err
    assert "the hub could not be reached" in err and "Temporary failure in name resolution" in err
    assert "HF_HUB_OFFLINE=1" in err and "hf download someone/some-vlm-7b" in err


# --- vlmkit inspect -------------------------------------------------------------------------------------


def inspect_json(capsys, model) -> dict:
    status, out, err = run_main(capsys, "inspect", model, "--json")
    assert status == 0, err
    return json.loads(out)


def tiny_random_sizes() -> dict[str, int]:
    """tiny-random's parts counted by hand from its config (presets.tiny_random, vocabulary 107 of the
    character tokenizer): ViT 32px/8, width 64, 2 layers, MLP 128, CLS and 16 + 1 positions, pre/post norm;
    projector mlp2x 64->64->64; LM width 64, 2 layers, 4 heads of 16 with 2 KV heads, SwiGLU MLP 128, RMSNorm,
    untied head."""
    w = 64
    vision_layer = 4 * (w * w + w) + (w * 128 + 128) + (128 * w + w) + 2 * 2 * w
    vision = 3 * 8 * 8 * w + w + 17 * w + 2 * w + 2 * vision_layer + 2 * w
    projector = 2 * (w * w + w)
    lm_layer = w * (w + 2 * 32) + w * w + 3 * w * 128 + 2 * w
    lm = 107 * w + 2 * lm_layer + w + 107 * w
    return {"vision": vision, "projector": projector, "lm": lm}


def test_inspect_tiny_random_and_its_saved_folder(tmp_path, capsys, saved):
    sizes = tiny_random_sizes()
    for spec in ("tiny-random", saved["a"]):
        report = inspect_json(capsys, spec)
        assert report["part_parameters"] == sizes, spec
        assert report["parameters"] == sum(sizes.values())
        assert report["memory"] == {"float32": 4 * sum(sizes.values()), "bfloat16": 2 * sum(sizes.values())}
        assert report["parts"]["lm"] == "x2 w64 vocab 107" and report["parts"]["vision"] == "ViT 32px/8 x2 w64"
        assert report["loader"] and report["problem"] is None
    assert report["model_type"] == "llava" and report["stored_dtypes"] == {"F32": 64}
    status, out, _ = run_main(capsys, "inspect", saved["a"])
    assert status == 0 and "loader:      vlmkit.weights, model_type 'llava' -> VLM" in out
    assert "lm         x2 w64 vocab 107" in out


def test_inspect_a_gguf(capsys):
    report = inspect_json(capsys, "smollm2-135m")
    # SmolLM2-135M: 30 layers, width 576, 9 heads of 64 / 3 KV heads, MLP 1536, vocabulary 49152, tied embedding
    layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576
    stored = 49152 * 576 + 30 * layer + 576
    assert report["parameters"] == stored == 134_515_008
    assert report["model_type"] == "llama" and report["parts"]["lm"] == "x30 w576 vocab 49152"
    assert report["part_parameters"] == {"lm": stored}
    assert set(report["stored_dtypes"]) == {"Q4_1", "Q8_0", "F32"} and "gguf" in report["loader"]


def test_inspect_a_hub_id_reads_the_cached_snapshot(offline_cache, saved, capsys):
    snapshot = cache_repo(offline_cache, "owner/tiny", COMMIT_A, folder_files(saved["a"]))
    report = inspect_json(capsys, "owner/tiny")
    assert report["source"].startswith(f"hub owner/tiny (snapshot {snapshot}; weights cached")
    assert report["part_parameters"] == tiny_random_sizes() and report["model_type"] == "llava"
    assert report["loader"] == "vlmkit.weights, model_type 'llava' -> VLM"


def test_inspect_says_why_it_cannot_load(offline_cache, tmp_path, saved, capsys):
    phi3_v = tmp_path / "phi4mm"  # a family vlmkit has no converter for (phi3_v has one since issue 15)
    phi3_v.mkdir()
    (phi3_v / "config.json").write_text(json.dumps({"model_type": "phi4_multimodal", "hidden_size": 3072}))
    import torch
    from safetensors.torch import save_file

    save_file({"model.vision_embed_tokens.glb_GN": torch.zeros(1, 1, 4096),
               "model.layers.0.self_attn.qkv_proj.weight": torch.zeros(9, 3, dtype=torch.bfloat16)},
              str(phi3_v / "model.safetensors"))
    report = inspect_json(capsys, phi3_v)
    assert report["loader"] is None and report["problem"].startswith("model_type 'phi4_multimodal' is not supported yet")
    assert report["parameters"] == 4096 + 27 and report["stored_dtypes"] == {"F32": 1, "BF16": 1}
    assert set(report["parts"]) == {"model.vision_embed_tokens", "model.layers"}

    cache_repo(offline_cache, "owner/old", COMMIT_A, {"config.json": saved["a"] / "config.json",
                                                      "pytorch_model.bin": b"\x80\x04"})
    report = inspect_json(capsys, "owner/old")
    assert report["loader"] is None and "only as pickle files (pytorch_model.bin)" in report["problem"]
    assert report["model_type"] == "llava"


def test_train_takes_a_hub_id(offline_cache, saved):
    from vlmkit.train.run import load_for_training

    cache_repo(offline_cache, "owner/tiny", COMMIT_B, folder_files(saved["b"]))
    loaded = load_for_training("owner/tiny", [], seed=0)
    expected = load_model(str(saved["b"])).model.state_dict()
    assert all((loaded.model.state_dict()[k] == v).all() for k, v in expected.items())


def test_a_cached_snapshot_without_weights_says_what_may_be_missing(offline_cache, saved, capsys):
    # what `vlmkit inspect owner/name` leaves in the cache online: the config and tokenizer, not the weights
    cache_repo(offline_cache, "owner/tiny", COMMIT_A, {"config.json": saved["a"] / "config.json",
                                                       "tokenizer.json": saved["a"] / "tokenizer.json"})
    status, _, err = run_main(capsys, "generate", "--model", "owner/tiny", "--prompt", "hi")
    assert status == 2 and "holds no safetensors weights" in err
    assert "only part of the repository was downloaded" in err and "hf download owner/tiny" in err


def test_inspect_online_reads_the_weights_headers_without_downloading_them(fake_hub, saved, capsys, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub
    from safetensors.torch import load_file

    files = {name: path.read_bytes() for name, path in folder_files(saved["a"]).items()}
    hub = fake_hub(files)
    stored = load_file(saved["a"] / "model.safetensors")  # what the hub's range requests on the headers return
    tensors = {name: SimpleNamespace(dtype="F32", shape=list(t.shape)) for name, t in stored.items()}
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda repo_id, revision=None: SimpleNamespace(
        files_metadata={"model.safetensors": SimpleNamespace(tensors=tensors)}))
    report = inspect_json(capsys, "owner/tiny")
    assert sorted(hub.requested) == sorted(f for f in files if not f.endswith(".safetensors"))
    assert report["part_parameters"] == tiny_random_sizes() and report["stored_dtypes"] == {"F32": 64}
    assert "weights not downloaded" in report["source"] and report["loader"]
