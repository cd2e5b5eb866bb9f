"""The interface every model that takes images implements, and the one placeholder scatter.

VLM (the LLaVA-style glue), Qwen2VL / Qwen2_5_VL, DeepseekVL and the demo's DemoVLM are ImageModels.
The loader, the trainer, generation, the chat session, the server and the evaluation use nothing else:

    plans = model.plan_images([image, video_frames])   # its scheme's ImagePlans (views + token count), in order
    inputs = model.image_inputs(flat_plans)            # forward keyword tensors, as the reference processor makes
    out = model(input_ids, **inputs)                   # pixels encoded in the prefill, rows scattered, LM run
    rows = model.encode_images(**inputs)               # or encode once: each image's (T_i, C) rows ...
    out = model(input_ids, image_embeds=rows, **{k: inputs[k] for k in model.image_position_inputs})
    cache = model.new_cache(batch_size, max_len)       # what generation decodes with
    model.placeholder_ids                              # {"image": id} (+ "video" where video is native)

The scheme (vlmkit.schemes, named by the config) plans, makes the inputs and encodes; the model holds the
modules and runs the forward. `scatter_rows` is the only code that puts image rows into the text
embeddings: in order, at the placeholder positions, after checking that the counts agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from vlmkit.image.plan import ImagePlan, MediaPlans
from vlmkit.models.lm import CausalLM, CausalLMOutput, KVCache
from vlmkit.schemes import SCHEMES, Media, get_scheme, image_inputs, plan_media
from vlmkit.schemes.base import one_of


def scatter_rows(input_ids: torch.Tensor, embeds: torch.Tensor, rows: Sequence[torch.Tensor], token_id: int,
                 kind: str = "image") -> torch.Tensor:
    """embeds (B, T, C) with every position where input_ids (B, T) is token_id replaced, in order (row-major
    over the batch), by the rows of the images (each image's (T_i, C)); ValueError naming both counts unless
    the placeholders and the rows agree. kind ("image", "video") names them in the message.

        >>> ids = torch.tensor([[5, 9, 9, 6]])
        >>> scatter_rows(ids, torch.zeros(1, 4, 2), [torch.ones(2, 2)], 9)[0, :, 0].tolist()
        [0.0, 1.0, 1.0, 0.0]
    """
    slots = input_ids == token_id  # (B, T)
    placeholders = int(slots.sum())
    counts = [r.shape[0] for r in rows]
    if not counts:
        if placeholders:
            pixels = "pixel_values" if kind == "image" else f"pixel_values_{kind}s"
            raise ValueError(f"the prompt has {placeholders} {kind} placeholder tokens but no {pixels} were given "
                             f"(0 feature tokens); pass the {kind}s or remove the placeholders")
        return embeds
    if placeholders != sum(counts):
        each = f"{counts[0]} each" if len(set(counts)) == 1 else ", ".join(map(str, counts))
        raise ValueError(f"the prompt has {placeholders} {kind} placeholder tokens but the {kind}s give {sum(counts)} "
                         f"features: {len(counts)} {kind}(s) give {sum(counts)} feature tokens ({each}); put each "
                         f"{kind}'s plan.num_tokens placeholders (id {token_id}) in the prompt")
    flat = torch.cat(list(rows)).to(embeds.dtype)  # (sum T_i, C)
    return embeds.masked_scatter(slots.unsqueeze(-1), flat)


MODEL_CLASSES: dict[type, type[ImageModel]] = {}  # config class -> the ImageModel built from it


def build_model(cfg: Any) -> ImageModel:
    """The ImageModel of a config (VLMConfig -> VLM, Qwen2VLConfig -> Qwen2VL, ...). Builds on the current
    default device, so `with torch.device("meta"): build_model(cfg)` allocates nothing."""
    model_class = MODEL_CLASSES.get(type(cfg))
    if model_class is None:
        known = ", ".join(c.__name__ for c in MODEL_CLASSES)
        raise ValueError(f"no model class is registered for {type(cfg).__name__}; known configs: {known}")
    return model_class(cfg)


def takes_images(model: nn.Module) -> bool:
    """Whether model is an ImageModel (it has image placeholders); text-only models are CausalLMs."""
    return isinstance(model, ImageModel)


class ImageModel(nn.Module):
    """Base of the models that take images (see the module docstring). A subclass names its config class
    (`config_class`, which registers it for build_model) and builds its modules (at least `lm`, a CausalLM)
    in __init__ after super().__init__(cfg); cfg names the image scheme (cfg.image_scheme) and the
    placeholder (cfg.image_token_id)."""

    lm: CausalLM
    config_class: type | None = None  # the config class this model is built from (registered in MODEL_CLASSES)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("config_class") is not None:
            MODEL_CLASSES[cls.config_class] = cls

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.scheme = get_scheme(cfg.image_scheme)

    @property
    def image_token_id(self) -> int:
        return self.cfg.image_token_id

    @property
    def placeholder_ids(self) -> dict[str, int]:
        """The placeholder token of each kind of media the prompt can hold natively: {"image": id}."""
        return {"image": self.cfg.image_token_id}

    @property
    def image_position_inputs(self) -> tuple[str, ...]:
        """The image_inputs entries forward still needs when given image_embeds instead of pixels."""
        return self.scheme.position_inputs

    def plan_images(self, media: Sequence[Media]) -> list[MediaPlans]:
        """The plans of a prompt's images and videos in message order (vlmkit.schemes.plan_media)."""
        return plan_media(self.cfg, media)

    def image_inputs(self, plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
        """The forward keyword tensors of the plans, in prompt order ({} without plans), on the model's
        device (the scheme makes them on the host: vlmkit.schemes.image_inputs)."""
        device = next(self.parameters()).device
        return {name: tensor.to(device) for name, tensor in image_inputs(plans).items()}

    def encode_images(self, *inputs: Any, **named: Any) -> list[torch.Tensor]:
        """Each image's (T_i, C) rows at the LM width, from its scheme's inputs (positionally in the order of
        scheme.input_names, or by name): what forward takes back as image_embeds."""
        return self.scheme.encode(self, *inputs, **named)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.lm.new_cache(batch_size, max_len)

    def image_rows(self, inputs: dict[str, Any], image_embeds: Sequence[torch.Tensor] | None
                   ) -> list[torch.Tensor] | None:
        """The images' rows for a forward pass: encoded from the pixel inputs, or image_embeds as given (checked
        against the position inputs); None when neither is given. Raises ValueError for inputs this model's
        scheme does not take and for images given twice."""
        given = {k: v for k, v in inputs.items() if v is not None}
        self._check_input_names(given)
        pixels = [k for k in given if k not in self.scheme.position_inputs]
        if image_embeds is not None:
            if pixels:
                raise ValueError("pass the images once: pixel_values or image_embeds (encoded rows), not both")
            self.scheme.check_embeds(self.cfg, image_embeds,
                                     {k: given.get(k) for k in self.scheme.position_inputs})
            return list(image_embeds)
        if not pixels:
            if given:
                raise ValueError(f"{', '.join(given)} was given without the images' pixel_values or image_embeds; "
                                 "pass both")
            return None
        if "pixel_values" not in given:
            raise ValueError(f"{', '.join(pixels)} need pixel_values beside them (image_scheme "
                             f"{self.scheme.name!r} takes {', '.join(self.scheme.input_names)})")
        return self.encode_images(**given)

    def _check_input_names(self, given: dict[str, Any]) -> None:
        for name in given:
            if name in self.scheme.input_names:
                continue
            owners = [s.name for s in SCHEMES.values() if name in s.input_names]
            if owners:
                raise ValueError(f"{name} is only used by image_scheme{one_of(owners)}, not {self.scheme.name!r}; "
                                 "drop it")
            raise ValueError(f"{type(self).__name__} got an unknown input {name!r}; image_scheme "
                             f"{self.scheme.name!r} takes {', '.join(self.scheme.input_names)}")

    def embed_prompt(self, input_ids: torch.Tensor | None, image_inputs: dict[str, Any],
                     image_embeds: Sequence[torch.Tensor] | None = None, cache: KVCache | None = None,
                     inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The LM's input embeddings (B, T, C): input_ids embedded (or inputs_embeds as given) with the images'
        rows scattered into the placeholders. A prefill (no cache, or an empty one) with placeholders but no
        images raises ValueError, as does a count mismatch (scatter_rows)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.lm.embed(input_ids)  # (B, T, C)
        rows = self.image_rows(image_inputs, image_embeds)
        if rows is not None and input_ids is None:
            raise ValueError("images need input_ids to show where the image placeholders are")
        if input_ids is not None and (rows is not None or cache is None or cache.length == 0):
            inputs_embeds = scatter_rows(input_ids, inputs_embeds, rows or [], self.image_token_id)
        return inputs_embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # the scheme's views, prompt order (see its module)
        image_sizes: torch.Tensor | None = None,  # anyres, hd, tiles, slices: sizes beside the views
        attention_mask: torch.Tensor | None = None,  # (B, S)
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        loss_only: bool = False,  # with labels: project only the labelled positions (train/loop.py)
        segment_ids: torch.Tensor | None = None,  # (B, T) packed samples: 1, 2, ... per sample, 0 = padding
        image_embeds: Sequence[torch.Tensor] | None = None,  # N x (T_i, C) from encode_images, for the pixels
        **image_inputs: Any,  # the scheme's other inputs: pixel_values_high, high_res_pixel_values, ...
    ) -> CausalLMOutput:
        """Logits (and loss with labels) of the prompt with its images: the pixels are encoded (or image_embeds
        used), scattered into the placeholders, and the LM runs. The keywords follow transformers' LLaVA models
        (input_ids, pixel_values, image_sizes, attention_mask, ...)."""
        inputs = {"pixel_values": pixel_values, "image_sizes": image_sizes, **image_inputs}
        embeds = self.embed_prompt(input_ids, inputs, image_embeds, cache, inputs_embeds)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, labels=labels, logits_to_keep=logits_to_keep, loss_only=loss_only,
                       segment_ids=segment_ids)
