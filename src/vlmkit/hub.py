"""Models by Hugging Face hub id: `--model owner/name` or `owner/name@revision` (a branch, tag or commit).

    folder = hub_folder("llava-hf/llava-1.5-7b-hf")          # the snapshot folder in the hub cache
    folder = hub_folder("someone/model@v1.0")                 # another revision

A spec names the hub only when it is not a local folder (a folder of that name wins: vlmkit.load) and reads as
`owner/name[@revision]` (is_hub_spec). It is resolved through huggingface_hub's cache (HF_HUB_CACHE, by default
~/.cache/huggingface/hub): online, `snapshot_download` fetches what is missing, showing huggingface_hub's
progress bars on stderr; with HF_HUB_OFFLINE=1, or when the hub cannot be reached, a cached snapshot is used.
Only the files that describe and hold a model are fetched (ALLOW_PATTERNS: config and other .json files,
safetensors weights and their index, tokenizer and processor files, chat templates; top level only:
IGNORE_PATTERNS); never a pickle
(*.bin, *.pt, *.pth, *.ckpt), which vlmkit does not load. A repository whose weights are only pickles is
refused with how to convert it (PICKLE_ADVICE).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

# What a model snapshot needs: configs (config.json, generation_config.json, preprocessor_config.json,
# processor_config.json, tokenizer_config.json, special_tokens_map.json, model.safetensors.index.json, ...),
# weights, tokenizers (tokenizer.json; SentencePiece and BPE vocabularies) and chat templates.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "merges.txt", "vocab.txt",
                  "chat_template.jinja", "*.jinja")
# Subfolders (original/, onnx/, ...) hold other formats vlmkit does not read; consolidated*.safetensors is
# Mistral's own layout, a second copy of the weights beside the transformers shards.
IGNORE_PATTERNS = ("*/*", "consolidated*")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_ADVICE = ("vlmkit loads only safetensors, never pickles; convert it once with transformers: "
                 "AutoModel.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True) (or use a "
                 "safetensors revision of the repository) and pass --model OUT")

# owner/name: letters, digits, '-', '_' and '.'; an optional @revision (branch, tag or commit; may hold '/').
_HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str | None  # None: the default branch (main)

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_spec(spec: str) -> HubSpec | None:
    """owner/name[@revision] as a HubSpec, or None when spec does not read as one (a path with more parts, a
    name without an owner, ...)."""
    match = _HUB_SPEC.fullmatch(spec)
    if match is None or spec.startswith(("./", "../")) or ".." in match["repo"]:
        return None
    return HubSpec(match["repo"], match["revision"])


def is_hub_spec(spec: str) -> bool:
    """spec reads as a hub id and is not an existing path (a local folder of that name wins)."""
    return parse_hub_spec(spec) is not None and not Path(spec).exists()


def is_allowed(filename: str) -> bool:
    """Whether hub_folder lets huggingface_hub fetch a repository file: it matches ALLOW_PATTERNS and none
    of IGNORE_PATTERNS."""
    return (any(fnmatch.fnmatch(filename, p) for p in ALLOW_PATTERNS)
            and not any(fnmatch.fnmatch(filename, p) for p in IGNORE_PATTERNS))


def allow_patterns(weights: bool = True) -> list[str]:
    """The patterns hub_folder passes to snapshot_download: ALLOW_PATTERNS, less the weights when not weights."""
    return [p for p in ALLOW_PATTERNS if weights or not p.endswith(".safetensors")]


def hub_cache_dir() -> Path:
    """The hub cache in use: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default (read now, so a
    change of the environment after import counts)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set to a true value (1, true, yes, on): use the cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def repo_cache_folder(repo_id: str) -> Path:
    """Where huggingface_hub keeps repo_id's snapshots: <cache>/models--owner--name."""
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def hub_folder(spec: str | HubSpec, weights: bool = True) -> Path:
    """The local snapshot folder of a hub spec, downloading the allowed files (ALLOW_PATTERNS; without
    *.safetensors when not weights) when online and missing. With weights, a snapshot without safetensors
    weights is refused (ValueError): with PICKLE_ADVICE when the repository's weights are pickles. Errors
    (FileNotFoundError / ValueError) say what was looked for, where, and what to do."""
    hub = spec if isinstance(spec, HubSpec) else parse_hub_spec(spec)
    if hub is None:
        raise ValueError(f"{spec!r} is not a hub id (owner/name or owner/name@revision)")
    from huggingface_hub import errors, snapshot_download

    try:
        folder = Path(snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=hub_cache_dir(),
                                        allow_patterns=allow_patterns(weights),
                                        ignore_patterns=list(IGNORE_PATTERNS), local_files_only=hub_offline()))
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f"--model {hub}: the repository {hub.repo_id} has no revision {hub.revision!r} "
                                f"on the Hugging Face hub (a branch, tag or commit): {_first_line(e)}") from None
    except errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(f"--model {hub}: no local folder of that name, and no repository {hub.repo_id} on "
                                f"the Hugging Face hub, or it is private or gated and needs a token (hf auth login): "
                                f"{_first_line(e)}") from None
    except errors.LocalEntryNotFoundError as e:
        incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub 1.x and later
        if incomplete and isinstance(e, incomplete):
            raise FileNotFoundError(f"--model {hub}: {_first_line(e)} {_cache_advice(hub)}") from None
        raise FileNotFoundError(_not_cached_message(hub, e)) from None
    except errors.HfHubHTTPError as e:
        raise FileNotFoundError(f"--model {hub}: the Hugging Face hub answered with an error: {_first_line(e)}. "
                                f"{_cache_advice(hub)}") from None
    if weights:
        problem = weights_problem(folder, hub)
        if problem:
            raise ValueError(problem)
    return folder


def weights_problem(folder: Path, hub: HubSpec | None = None) -> str | None:
    """Why a model folder (a hub spec's snapshot, or a local folder when hub is None) cannot be loaded for want
    of safetensors weights, None when it has them: the repository's file list (online) or the folder's files
    say whether its weights are pickles."""
    if any(folder.glob("*.safetensors")):
        return None
    files = [p.name for p in folder.iterdir()]
    if hub is not None and not hub_offline():
        files += _repo_files(hub)
    what = f"--model {hub}: the repository" if hub is not None else f"{folder}"
    pickles = sorted({f for f in files if f.endswith(PICKLE_SUFFIXES)})
    if pickles:
        return (f"{what} holds its weights only as pickle files ({', '.join(pickles[:4])}"
                f"{' ...' if len(pickles) > 4 else ''}); {PICKLE_ADVICE}")
    if hub is None:
        return f"no safetensors weights in {folder} (model.safetensors, or shards with model.safetensors.index.json)"
    return (f"--model {hub}: the cached snapshot {folder} holds no safetensors weights (model.safetensors or "
            f"shards with model.safetensors.index.json): either only part of the repository was downloaded (e.g. "
            f"its config, by vlmkit inspect), and running online fetches the rest (hf download {hub.repo_id}), or "
            f"the repository's weights are pickle files (.bin/.pt) and {PICKLE_ADVICE}")


def remote_safetensors_headers(hub: HubSpec) -> dict[str, dict]:
    """The headers of the repository's safetensors files read from the hub (range requests, no tensor data):
    file name -> tensor name -> {dtype, shape}; {} when the repository has none."""
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        meta = get_safetensors_metadata(hub.repo_id, revision=hub.revision)
    except NotASafetensorsRepoError:
        return {}
    return {name: {tensor: {"dtype": info.dtype, "shape": list(info.shape)} for tensor, info in file.tensors.items()}
            for name, file in meta.files_metadata.items() if "/" not in name}


def _repo_files(hub: HubSpec) -> list[str]:
    """The repository's file names at the revision, or [] when the hub cannot tell (the cache alone decides)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return [Path(f).name for f in HfApi().list_repo_files(hub.repo_id, revision=hub.revision)]
    except (HfHubHTTPError, OSError):  # unreachable or refused: the cached files are all there is to go on
        return []


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _cache_advice(hub: HubSpec) -> str:
    return (f"Download it while online (hf download {hub.repo_id}"
            f"{f' --revision {hub.revision}' if hub.revision else ''}), or set HF_HUB_CACHE to a cache that "
            f"holds it; HF_HUB_OFFLINE=1 uses the cache without trying the network; or pass --model with a "
            f"local model folder")


def _not_cached_message(hub: HubSpec, error: Exception) -> str:
    """The hub spec is not in the cache and could not be fetched: where vlmkit looked, why the hub was not
    asked or could not answer, and what to do."""
    where = repo_cache_folder(hub.repo_id)
    cause = error.__cause__ or error.__context__
    if hub_offline():
        reason = "HF_HUB_OFFLINE is set, so the hub was not asked"
    elif cause is not None:
        reason = f"the hub could not be reached ({type(cause).__name__}: {_first_line(cause)})"
    else:
        reason = f"the hub could not be reached ({_first_line(error)})"
    what = f"revision {hub.revision!r}" if hub.revision else "it"
    return (f"--model {hub}: no local folder of that name; {what} was not found in the Hugging Face cache at "
            f"{where}, and {reason}. "
            f"{_cache_advice(hub)}")
