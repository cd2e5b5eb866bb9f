"""The demo's trained model as a folder: save it, load it back, and prompt it as the demo trained it.

    save_demo_model(model, tokenizer, "demo-report")     # run_demo does this at the end of every run
    model, tokenizer = load_demo_model("demo-report")    # vlmkit.load.load_model("demo-report") wraps it

The folder (the report folder of `vlmkit demo`) holds
    config.json        {"model_type": "vlmkit-demo", "format_version": 1, "demo_config": DemoConfig fields,
                        "files": {file name: sha256 of its bytes}}
    model.safetensors  DemoVLM.state_dict() (the tied LM head left out: it is the embedding)
    tokenizer.json     the character tokenizer (CharTokenizer.save; vlmkit.text.tokenizer.load_tokenizer reads it)
Saving writes every file under a temporary name and renames it into place, config.json last and only after
the old one is removed: a folder whose save was interrupted has no config.json and is refused as "no saved
model", never loaded half-written. Loading checks each file's sha256 against config.json, so a truncated,
edited or mismatched file is refused with its name.

How a loaded demo model is prompted (what vlmkit.load's LoadedModel uses for it):
- DemoChatTemplate renders exactly demo.data.encode_row's prompt, `<s><image>question\\n`, from a conversation
  with one image. The demo trained on single questions about one image, so the model sees the conversation's
  image and the last user question only: earlier turns are not shown to it (each question is answered on its
  own), a system message or a second image is refused.
- plan_demo_image prepares an image as the demo prepared its evaluation data, chosen by its size (the only
  sizes the model trained on, each prepared by demo.data.task_pixels): 256x32 a text line, 256x96 a text
  block, 64x64 an easy-VQA shape image. Any other size is refused with that list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmkit.demo import data as D
from vlmkit.demo.model import DemoConfig, DemoVLM
from vlmkit.image.plan import ImagePlan
from vlmkit.text.chat import ChatTemplate, Message
from vlmkit.text.tokenizer import CharTokenizer, Tokenizer, load_tokenizer
from vlmkit.weights.hf import load_state

MODEL_TYPE = "vlmkit-demo"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
TIED_HEAD = "lm.lm_head.weight"  # the LM's output projection, tied to lm.embed.weight
REPORT_FILES = ("report.md", "results.json")  # what every `vlmkit demo` report folder holds
SHAPE_SIZE = (64, 64)  # (width, height) of easy-VQA's images
IMAGE_SIZES = {D.LINE_SIZE: "line", D.PARAGRAPH_SIZE: "paragraph", SHAPE_SIZE: "shape"}  # what each size is
SCHEME = "demo"  # ImagePlan.scheme of a demo image


# ---- files ---------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace(tmp: Path, final: Path) -> None:
    """Flush tmp to disk, make it world-readable like the report's files and rename it to final (atomic on one
    file system)."""
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    tmp.chmod(0o644)
    os.replace(tmp, final)


def save_demo_model(model: DemoVLM, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write model and its character tokenizer into folder (see the module docstring); returns config.json's path."""
    if not isinstance(tokenizer, CharTokenizer):
        raise ValueError(f"only the character-level demo LM is saved; got a {type(tokenizer).__name__} "
                         "(the --llm smollm2 run does not save its model)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).unlink(missing_ok=True)  # from here until the end, the folder holds no loadable model
    state = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    if model.lm.cfg.tie_word_embeddings:
        state.pop(TIED_HEAD)
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    _replace(tmp, folder / WEIGHTS_FILE)
    tmp = folder / f".{TOKENIZER_FILE}.tmp"
    tokenizer.save(tmp)
    _replace(tmp, folder / TOKENIZER_FILE)
    config = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION,
              "demo_config": dataclasses.asdict(model.cfg),
              "files": {name: _sha256(folder / name) for name in (WEIGHTS_FILE, TOKENIZER_FILE)}}
    tmp = folder / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(config, indent=1) + "\n")
    _replace(tmp, folder / CONFIG_FILE)
    return folder / CONFIG_FILE


def is_demo_folder(folder: str | Path) -> bool:
    """Whether folder's config.json names a saved demo model (model_type "vlmkit-demo"), or folder is a demo
    report without config.json (its save was interrupted or never ran: load_demo_model says so)."""
    folder = Path(folder)
    file = folder / CONFIG_FILE
    if not file.is_file():
        return folder.is_dir() and all((folder / name).is_file() for name in REPORT_FILES)
    try:
        return json.loads(file.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False  # not a demo config; the general loader reports what is wrong with it


def demo_config_from_dict(data: Mapping[str, Any]) -> DemoConfig:
    """A DemoConfig from its saved fields (JSON lists back to the tuples the dataclass declares)."""
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    unknown, missing = sorted(set(data) - names), sorted(n for n in ("lm_vocab_size", "ctc_to_lm", "image_token_id",
                                                                      "prompt_end_id") if n not in data)
    if unknown or missing:
        raise ValueError(f"demo_config has unknown keys {unknown} / lacks {missing}; valid keys: {sorted(names)}")
    fields = dict(data)
    for name in ("ctc_to_lm", "stem_channels", "letter_ids"):
        if name in fields:
            fields[name] = tuple(fields[name])
    if "class_words" in fields:
        fields["class_words"] = tuple(tuple(ids) for ids in fields["class_words"])
    return DemoConfig(**fields)


def load_demo_model(folder: str | Path) -> tuple[DemoVLM, Tokenizer]:
    """The saved demo model (eval mode) and its tokenizer; ValueError / FileNotFoundError naming the bad file."""
    folder = Path(folder)
    redo = "re-run `vlmkit demo --out DIR` to save a complete model"
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {folder} holds no saved demo model (a --llm smollm2 run saves "
                                f"none, an interrupted save leaves none); {redo}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); {redo}") from e
    if config.get("model_type") != MODEL_TYPE or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} is not a vlmkit-demo config of format {FORMAT_VERSION} (model_type "
                         f"{config.get('model_type')!r}, format_version {config.get('format_version')!r})")
    hashes = config.get("files")
    if not isinstance(hashes, dict) or set(hashes) != {WEIGHTS_FILE, TOKENIZER_FILE}:
        raise ValueError(f"{file} must list the sha256 of {WEIGHTS_FILE} and {TOKENIZER_FILE} under 'files'; {redo}")
    for name, expected in hashes.items():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; {redo}")
        if _sha256(folder / name) != expected:
            raise ValueError(f"{folder / name} does not match the sha256 config.json records for it: the file is "
                             f"truncated, edited or from another run; {redo}")
    cfg = demo_config_from_dict(config.get("demo_config") or {})
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE)
    if tokenizer.vocab_size != cfg.lm_vocab_size:
        raise ValueError(f"{folder / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model "
                         f"{cfg.lm_vocab_size}; {redo}")
    try:
        state = load_file(folder / WEIGHTS_FILE)
    except SafetensorError as e:
        raise ValueError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file ({e}); {redo}") from e
    model = DemoVLM(cfg)
    if model.lm.cfg.tie_word_embeddings and "lm.embed.weight" in state:
        state[TIED_HEAD] = state["lm.embed.weight"]
    load_state(model, state, str(folder / WEIGHTS_FILE))
    return model.eval(), tokenizer


# ---- prompting a loaded demo model -----------------------------------------------------------------------

def _parts(message: Message) -> list[Mapping[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


@dataclasses.dataclass(frozen=True)
class DemoChatTemplate(ChatTemplate):
    """demo.data.encode_row's prompt as a chat template: bos_token, the image's placeholder, the last user
    question, a newline (see the module docstring for which conversations it takes)."""

    bos_token: str
    image_token: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        if isinstance(messages, (str, Mapping)) or not all(isinstance(m, Mapping) and {"role", "content"} <= set(m)
                                                         for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        roles = [m["role"] for m in messages]
        if "system" in roles:
            raise ValueError("the demo model was trained without a system message; leave it out")
        if not messages or roles[-1] != "user":
            raise ValueError("the demo model answers a user question: the last message must be the user's")
        kinds = [part.get("type") for m in messages for part in _parts(m)]
        if kinds.count("image") != 1 or "video" in kinds:
            raise ValueError(f"the demo model answers questions about one image; this conversation has "
                             f"{kinds.count('image')} images{' and a video' if 'video' in kinds else ''} "
                             "(start a new conversation for another image)")
        question = "".join(p["text"] for p in _parts(messages[-1]) if p.get("type") == "text")
        if not question.strip() or "\n" in question:
            raise ValueError(f"the demo model takes a one-line question (it finds the question's end by its "
                             f"newline); got {question!r}")
        return self.bos_token + self.image_token + question + "\n"


def demo_chat_template(tokenizer: Tokenizer, model: DemoVLM) -> DemoChatTemplate:
    return DemoChatTemplate(tokenizer.id_to_token(tokenizer.bos_token_id), tokenizer.id_to_token(model.image_token_id))


def plan_demo_image(model: DemoVLM, image: object) -> ImagePlan:
    """The image prepared as the demo prepared its evaluation images of that size (module docstring): an
    ImagePlan with pixel_values (1, 3, H, W) and the model's token count for H x W."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"the demo model takes still images, not {type(image).__name__} (a video's frames)")
    kind = IMAGE_SIZES.get(image.size)
    if kind is None:
        sizes = ", ".join(f"{w}x{h} ({k})" for (w, h), k in IMAGE_SIZES.items())
        raise ValueError(f"the demo model takes images of the sizes it trained on: {sizes}; this image is "
                         f"{image.size[0]}x{image.size[1]}: crop or resize it to one of them")
    pixels = D.task_pixels(kind, image.convert("RGB"))  # (3, H, W)
    H, W = pixels.shape[1:]
    rows, cols = model.vision.grid(pixels[None])
    return ImagePlan(SCHEME, pixels[None], image.size, (W, H), (rows, cols), {"tokens": model.num_image_tokens(H, W)},
                     extra={"kind": kind})


def demo_image_inputs(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """pixel_values (N, 3, H, W) of demo plans; DemoVLM takes one image per prompt row, all of one size."""
    if not plans:
        return {}
    shapes = {tuple(p.pixel_values.shape) for p in plans}
    if any(p.scheme != SCHEME for p in plans) or len(shapes) != 1:
        raise ValueError(f"demo images must be planned by plan_demo_image and share one size; got schemes "
                         f"{sorted({p.scheme for p in plans})} and shapes {sorted(shapes)}")
    return {"pixel_values": torch.cat([p.pixel_values for p in plans])}  # (N, 3, H, W)
