"""The VLM glue: vision tower -> projector -> feature layout -> one masked scatter into the LM's embeddings.

    pad (LLaVA-1.5):     pixel_values (N, 3, S, S) --tower--> (N, P, Dv) --projector--> (N, P', C)
    anyres (LLaVA-NeXT): pixel_values (N, V, 3, S, S) zero-padded views + image_sizes (N, 2) original (h, w)
                         --tower, projector--> per image (1 + tiles, P, C) --layouts.anyres--> (T_i, C)
    hd (Phi-3.5-V):      pixel_values (N, V, 3, 336, 336) [global, crops] + image_sizes (N, 2) HD canvas (h, w)
                         --tower--> (V, 576, Dv) --layouts.hd (2x2 merge, sub_GN, glb_GN)--> (T_i, 4Dv)
                         --projector MLP--> (T_i, C)
    tiles (DeepSeek-VL2): pixel_values (N, V, 3, 384, 384) [global, tiles] + image_sizes (N, 2) tile canvas (h, w)
                         --tower (first 378 px)--> (V, 729, Dv) --downsample_2x2, projector MLP--> (V, 196, C)
                         --layouts.tiles (newline, view separator)--> (T_i, C)
    dual (Vary-base):    pixel_values (N, 3, 224, 224) CLIP views + pixel_values_high (N, 3, 1024, 1024) SAM views
                         --tower, projector | vision_high, projector_high--> cat on channels (N, 256, C)
                         (models/glue_dual.py)
    slices (MiniCPM-V):  pixel_values (N, V, 3, H, W) zero-padded views [source, slices] + image_sizes (N, V, 2)
                         each view's (h, w) --tower at its own size, resampler--> (V, Q, C) concatenated
                         (models/glue_slices.py)
    sam (Vary-tiny):     pixel_values (N, 3, 1024, 1024) SAM views, no CLIP tower (self.vision is None)
                         --vision_high (SAM + vary convs), projector--> (N, 256, C) (models/glue_sam.py)
    input_ids (B, T) with T_i placeholder ids per image --embed--> (B, T, C)
    the placeholder rows are replaced, in order, by the images' feature rows
    --> language model --> logits (B, T, V)

Each scheme's handling is one row of `SCHEMES` (plan, forward inputs, encoder, learned
vectors). How many tokens an image costs comes from its ImagePlan (image/schemes/):
`plan_images` builds the plans for the prompt; forward rebuilds each image's plan (or
its scheme's token formula) from image_sizes, and a placeholder / feature count
mismatch raises ValueError with both counts. forward also takes already-encoded rows
(`image_embeds`, what `encode_images` returns) instead of the pixels: chat_session.py encodes
each image of a conversation once that way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from PIL import Image

from vlmkit.config import VLMConfig
from vlmkit.image.plan import ImagePlan
from vlmkit.image.schemes import hd as hd_scheme
from vlmkit.image.schemes import tiles as tiles_scheme
from vlmkit.image.schemes.anyres import anyres_plan, plan_anyres
from vlmkit.image.schemes.pad import pad_token_count, plan_pad
from vlmkit.models.deepseek_vl import HYBRID, DeepseekVLConfig, hybrid_inputs, plan_hybrid
from vlmkit.models.glue_dual import dual_inputs, dual_plan, encode_dual
from vlmkit.models.glue_sam import encode_sam, sam_inputs, sam_plan
from vlmkit.models.glue_slices import encode_slices, slices_inputs, slices_plan
from vlmkit.models.layouts.anyres import pack_anyres
from vlmkit.models.layouts.hd import hd_layout
from vlmkit.models.layouts.tiles import downsample_2x2, tiles_layout
from vlmkit.models.lm import CausalLM, CausalLMOutput, KVCache
from vlmkit.models.projectors import build_projector, parse_projector_type
from vlmkit.models.qwen2_vl import dynamic_inputs
from vlmkit.models.sam import SamEncoder
from vlmkit.models.vit import VisionTower

Media = Image.Image | Sequence[Image.Image]  # one image, or a video as its sampled frames


def _pad_args(cfg: VLMConfig) -> dict[str, int | bool]:
    v, spec = cfg.vision, parse_projector_type(cfg.projector.type)
    return {"patch_size": v.patch_size, "keep_cls": v.use_cls_token and v.select_feature == "cls_patch",
            "merge": spec.merge, "queries": spec.queries}


def image_token_count(cfg: VLMConfig) -> int:
    """Placeholder tokens one image costs under the pad scheme (the same for every image size)."""
    if cfg.image_scheme != "pad":
        raise ValueError(f"under image_scheme={cfg.image_scheme!r} the token count depends on the image size; "
                         "use plan_image(cfg, image).num_tokens")
    return pad_token_count(cfg.vision.image_size, **_pad_args(cfg))  # type: ignore[arg-type]


# ---- planning: image -> ImagePlan, per scheme -------------------------------------------------------

def _plan_pad(cfg: VLMConfig, image: Image.Image, num_images: int) -> ImagePlan:
    v = cfg.vision
    return plan_pad(image, v.image_size, v.image_mean, v.image_std, **_pad_args(cfg))  # type: ignore[arg-type]


def _plan_anyres(cfg: VLMConfig, image: Image.Image, num_images: int) -> ImagePlan:
    v = cfg.vision
    return plan_anyres(image, cfg.grid_pinpoints, v.image_size, v.image_mean, v.image_std, v.patch_size)


def _plan_hd(cfg: VLMConfig, image: Image.Image, num_images: int) -> ImagePlan:
    v = cfg.vision
    return hd_scheme.plan_hd(image, cfg.max_crops, v.image_mean, v.image_std)  # type: ignore[arg-type]


def _plan_tiles(cfg: VLMConfig, image: Image.Image, num_images: int) -> ImagePlan:
    return tiles_scheme.plan_tiles(image, num_images=num_images, max_tiles=cfg.max_crops,  # type: ignore[arg-type]
                                   mean=cfg.vision.image_mean, std=cfg.vision.image_std)


def plan_image(cfg: VLMConfig, image: Image.Image, num_images: int = 1) -> ImagePlan:
    """The ImagePlan of one image under the model's image scheme: its views and its token count.
    num_images is how many images the prompt holds (tiles turns tiling off above 2). DeepSeek-VL, its own
    model class, plans its two fixed views with models/deepseek_vl.plan_hybrid."""
    if isinstance(cfg, DeepseekVLConfig):
        return plan_hybrid(cfg, image)
    return SCHEMES[cfg.image_scheme].plan(cfg, image, num_images)


def plan_video(cfg: VLMConfig, frames: Sequence[Image.Image], num_images: int | None = None) -> list[ImagePlan]:
    """The plans of a video given as sampled frames (image.video.load_video_frames): every frame is
    planned as one image, as LLaVA-style models take video. num_images counts the prompt's images
    (frames included); default len(frames)."""
    if not frames:
        raise ValueError("the video has no frames; sample at least one with vlmkit.image.video")
    total = len(frames) if num_images is None else num_images
    return [plan_image(cfg, frame, total) for frame in frames]


def plan_images(cfg: VLMConfig, media: Sequence[Media]) -> list[ImagePlan | list[ImagePlan]]:
    """Plan every image and video of one prompt, in message order: an image gives one ImagePlan,
    a video (a list of frames) a list of ImagePlans, the form prompt.build_prompt takes."""
    total = sum(1 if isinstance(m, Image.Image) else len(m) for m in media)
    return [plan_image(cfg, m, total) if isinstance(m, Image.Image) else plan_video(cfg, m, total) for m in media]


# ---- forward inputs: plans -> keyword tensors ---------------------------------------------------------

def _stacked_views(plans: Sequence[ImagePlan]) -> torch.Tensor:
    """(N, V_max, 3, S, S): each image's views, zero-padded to the most views."""
    views = max(p.pixel_values.shape[0] for p in plans)
    return torch.stack([torch.cat([p.pixel_values, p.pixel_values.new_zeros(
        views - p.pixel_values.shape[0], *p.pixel_values.shape[1:])]) for p in plans])  # (N, V_max, 3, S, S)


def _inputs_pad(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.cat([p.pixel_values for p in plans])}  # (N, 3, S, S)


def _inputs_anyres(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    sizes = torch.tensor([[p.original_size[1], p.original_size[0]] for p in plans])  # (N, 2) (height, width)
    return {"pixel_values": _stacked_views(plans), "image_sizes": sizes}


def _inputs_canvas(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """hd / tiles: image_sizes is the local canvas (rows * S, cols * S), as Phi-3.5-V's processor sends it."""
    sizes = torch.tensor([[p.grid[0] * p.pixel_values.shape[-2], p.grid[1] * p.pixel_values.shape[-1]]
                          for p in plans])  # (N, 2) (height, width)
    return {"pixel_values": _stacked_views(plans), "image_sizes": sizes}


def image_inputs(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """The forward keyword tensors for the images of a batch, in prompt order, as transformers' processors
    make them: pad -> pixel_values (N, 3, S, S); anyres, hd, tiles -> pixel_values (N, V_max, 3, S, S)
    zero-padded views and image_sizes (N, 2) as (height, width) (see the module docstring); dynamic (Qwen2-VL)
    -> models/qwen2_vl.dynamic_inputs. No plans -> {}."""
    if not plans:
        return {}
    schemes = {p.scheme for p in plans}
    if len(schemes) > 1:
        raise ValueError(f"the images were planned with different schemes {sorted(schemes)}; use the model's one")
    if plans[0].scheme == "dynamic":  # Qwen2-VL / Qwen2.5-VL, their own model class (models/qwen2_vl.py)
        return dynamic_inputs(plans)
    if plans[0].scheme == HYBRID:  # DeepSeek-VL, its own model class (models/deepseek_vl.py)
        return hybrid_inputs(plans)
    if plans[0].scheme not in SCHEMES:
        raise ValueError(f"the VLM glue has no {plans[0].scheme!r} scheme; valid: {sorted(SCHEMES)}")
    return SCHEMES[plans[0].scheme].inputs(plans)


@dataclass(frozen=True)
class SchemeGlue:
    """How the VLM handles one image scheme.

    plan:      (cfg, image, images in the prompt) -> ImagePlan
    inputs:    plans -> forward keyword tensors
    encode:    (model, pixel_values, image_sizes, **scheme inputs such as dual's pixel_values_high)
               -> each image's (T_i, C) rows, in order
    vectors:   learned embeddings the layout inserts: parameter name -> its width given the config
    """

    plan: Callable[[VLMConfig, Image.Image, int], ImagePlan]
    inputs: Callable[[Sequence[ImagePlan]], dict[str, torch.Tensor]]
    encode: Callable[..., list[torch.Tensor]]
    vectors: dict[str, Callable[[VLMConfig], int]]


class VLM(nn.Module):
    """A LLaVA-style vision-language model built from a VLMConfig; cfg.image_scheme picks its row of SCHEMES."""

    # The image_inputs entries forward still needs when given image_embeds instead of pixels: none.
    image_position_inputs: tuple[str, ...] = ()

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision) if cfg.vision is not None else None  # None: sam (Vary-tiny)
        p = cfg.projector
        self.projector = build_projector(p.type, p.in_dim, p.out_dim, p.bias)
        self.lm = CausalLM(cfg.lm)
        if cfg.vision_high is not None:  # Vary's SAM branch: beside CLIP (dual) or alone (sam)
            self.vision_high = SamEncoder(cfg.vision_high)
        if cfg.projector_high is not None:  # dual: the SAM branch's own projector (models/glue_dual.py)
            q = cfg.projector_high
            self.projector_high = build_projector(q.type, q.in_dim, q.out_dim, q.bias)
        for name, width_of in SCHEMES[cfg.image_scheme].vectors.items():  # e.g. LLaVA-NeXT's image_newline
            width = width_of(cfg)
            self.register_parameter(name, nn.Parameter(torch.randn(width) / math.sqrt(width)))  # (width,)

    @property
    def image_token_id(self) -> int:
        return self.cfg.image_token_id

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.lm.new_cache(batch_size, max_len)

    def _project(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, S, S) views -> (V, P', C) LM-width features."""
        return self.projector(self._features(views))  # (V, P', C)

    def _features(self, views: torch.Tensor) -> torch.Tensor:
        """(V, 3, S, S) views -> (V, P, Dv) tower features, in the projector's dtype."""
        return self.vision.features(views.to(next(self.projector.parameters()).dtype))  # (V, P, Dv)

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None,
                      **scheme_inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every image's token sequence (T_i, C), in order; see the module docstring for the input shapes.
        scheme_inputs are a scheme's own tensors (dual: pixel_values_high)."""
        return SCHEMES[self.cfg.image_scheme].encode(self, pixel_values, image_sizes, **scheme_inputs)

    def anyres_plans(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[ImagePlan]:
        """Rebuild each image's anyres plan from transformers-style inputs: pixel_values (N, V, 3, S, S)
        padded, or all views concatenated (sum V, 3, S, S); image_sizes (N, 2) as (height, width)."""
        if image_sizes is None:
            raise ValueError("an anyres (LLaVA-NeXT) model needs image_sizes (num_images, 2) as (height, width) "
                             "next to pixel_values; image_inputs(plans) makes both")
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        v = self.cfg.vision
        geometry = (self.cfg.grid_pinpoints, v.image_size, v.patch_size)
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes "
                                 f"{len(sizes)}; pass one (height, width) per image")
            return [anyres_plan((w, h), pixel_values[i], *geometry) for i, (h, w) in enumerate(sizes)]
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (images, views, 3, S, S) or (views, 3, S, S), "
                             f"got shape {tuple(pixel_values.shape)}")
        plans, offset = [], 0
        for h, w in sizes:
            plans.append(anyres_plan((w, h), pixel_values[offset:], *geometry))
            offset += plans[-1].pixel_values.shape[0]
        if offset != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} views but the image_sizes plan {offset}")
        return plans

    def canvas_plans(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[ImagePlan]:
        """hd / tiles: rebuild each image's grid and token count from its canvas size.

        pixel_values (N, V, 3, S, S) zero-padded or (sum V, 3, S, S) concatenated, [global, local row-major];
        image_sizes (N, 2): the local canvas (rows * S, cols * S) as (height, width). The token count is the
        scheme's own formula (hd_num_tokens / tiles_num_tokens), which the layout checks its output against.
        """
        scheme = self.cfg.image_scheme
        if image_sizes is None:
            raise ValueError(f"an {scheme} model needs image_sizes (num_images, 2), each image's local canvas "
                             "(height, width), next to pixel_values; image_inputs(plans) makes both")
        if pixel_values.ndim not in (4, 5):
            raise ValueError(f"pixel_values must be (images, views, 3, S, S) or (views, 3, S, S), "
                             f"got shape {tuple(pixel_values.shape)}")
        side = pixel_values.shape[-1]
        plans, offset = [], 0
        for i, (h, w) in enumerate(image_sizes.tolist()):
            if h <= 0 or w <= 0 or h % side or w % side:
                raise ValueError(f"image_sizes[{i}] = ({h}, {w}) is not a canvas of whole {side}-px views")
            rows, cols = h // side, w // side
            views = 1 + rows * cols
            if pixel_values.ndim == 5:
                if i >= pixel_values.shape[0] or views > pixel_values.shape[1]:
                    raise ValueError(f"image {i} has a {rows}x{cols} grid ({views} views) but pixel_values has "
                                     f"shape {tuple(pixel_values.shape)}")
                pixels = pixel_values[i, :views]  # (views, 3, S, S)
            else:
                pixels = pixel_values[offset:offset + views]  # (views, 3, S, S)
                offset += views
                if pixels.shape[0] != views:
                    raise ValueError(f"pixel_values holds {pixel_values.shape[0]} views but the image_sizes "
                                     f"need at least {offset}")
            tokens = SCHEME_TOKEN_FORMULAS[scheme](rows, cols)
            plans.append(ImagePlan(scheme, pixels, (w, h), (w, h), (rows, cols), {"tokens": tokens}))
        if pixel_values.ndim == 5 and pixel_values.shape[0] != len(plans):
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(plans)}")
        if pixel_values.ndim == 4 and offset != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} views but the image_sizes plan {offset}")
        return plans

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             image_embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scatter the images' (T_i, C) rows into inputs_embeds (B, T, C) where input_ids is the placeholder."""
        is_image = input_ids == self.image_token_id  # (B, T)
        placeholders = int(is_image.sum())
        counts = [e.shape[0] for e in image_embeds]
        if placeholders != sum(counts):
            each = f"{counts[0]} each" if len(set(counts)) == 1 else ", ".join(map(str, counts))
            raise ValueError(
                f"the prompt has {placeholders} image placeholder tokens (id {self.image_token_id}) but the "
                f"{len(counts)} image(s) give {sum(counts)} feature tokens ({each}); build the prompt with "
                "plan_image(cfg, image).num_tokens placeholders per image")
        flat = torch.cat(list(image_embeds)).to(inputs_embeds.dtype)  # (sum T_i, C)
        return inputs_embeds.masked_scatter(is_image.unsqueeze(-1), flat)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # pad: (N, 3, S, S); others: (N, V, 3, S, S), prompt order
        image_sizes: torch.Tensor | None = None,  # (N, 2) (height, width), per scheme: see the module docstring
        attention_mask: torch.Tensor | None = None,  # (B, S)
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        inputs_embeds: torch.Tensor | None = None,
        loss_only: bool = False,
        pixel_values_high: torch.Tensor | None = None,  # dual: (N, 3, S_high, S_high) SAM views
        segment_ids: torch.Tensor | None = None,  # (B, T) packed samples: 1, 2, ... per sample, 0 = padding
        image_embeds: Sequence[torch.Tensor] | None = None,  # N x (T_i, C) from encode_images, for the pixels
    ) -> CausalLMOutput:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.lm.embed(input_ids)  # (B, T, C)
        if (pixel_values is not None or image_embeds is not None) and input_ids is None:
            raise ValueError("images need input_ids to show where the image placeholders are")
        if pixel_values is not None:
            if image_embeds is not None:
                raise ValueError("pass the images once: pixel_values or image_embeds (encoded rows), not both")
            scheme_inputs = {} if pixel_values_high is None else {"pixel_values_high": pixel_values_high}
            if scheme_inputs and self.cfg.image_scheme != "dual":
                raise ValueError(f"pixel_values_high is only used by image_scheme='dual', not "
                                 f"{self.cfg.image_scheme!r}; drop it")
            image_embeds = self.encode_images(pixel_values, image_sizes, **scheme_inputs)
        if image_embeds is not None:
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_embeds)
        elif input_ids is not None and (cache is None or cache.length == 0):
            placeholders = int((input_ids == self.image_token_id).sum())
            if placeholders:
                raise ValueError(f"the prompt has {placeholders} image placeholder tokens but no pixel_values "
                                 "were given (0 feature tokens); pass the images or remove the placeholders")
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, labels=labels, logits_to_keep=logits_to_keep, loss_only=loss_only,
                       segment_ids=segment_ids)


# ---- encoders: forward inputs -> each image's (T_i, C) rows, per scheme ------------------------------

def _encode_pad(model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (num_images, 3, H, W), got shape {tuple(pixel_values.shape)}")
    return list(model._project(pixel_values).unbind(0))  # N x (P', C)


def _encode_anyres(model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
    plans = model.anyres_plans(pixel_values, image_sizes)
    features = model._project(torch.cat([p.pixel_values for p in plans]))  # (sum V, P, C)
    chunks = features.split([p.pixel_values.shape[0] for p in plans])
    return [pack_anyres(f, p, model.image_newline) for f, p in zip(chunks, plans)]  # N x (T_i, C)


def _encode_hd(model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
    """Phi-3.5-V: layout at the vision width (merge, sub_GN, glb_GN), then the projector MLP."""
    plans = model.canvas_plans(pixel_values, image_sizes)
    features = model._features(torch.cat([p.pixel_values for p in plans]))  # (sum V, 576, Dv)
    chunks = features.split([p.pixel_values.shape[0] for p in plans])
    return [model.projector.mlp(hd_layout(f, p, model.sub_gn, model.glb_gn))  # (T_i, 4Dv) -> (T_i, C)
            for f, p in zip(chunks, plans)]


def _encode_tiles(model: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
    """DeepSeek-VL2: downsample + projector MLP per view, then the layout at the LM width."""
    plans = model.canvas_plans(pixel_values, image_sizes)
    seen = model.cfg.vision.image_size  # the stride-14 conv reads the first 27 * 14 = 378 px of a 384 tile
    views = torch.cat([p.pixel_values for p in plans])[..., :seen, :seen]  # (sum V, 3, 378, 378)
    projected = model.projector.mlp(downsample_2x2(model._features(views)))  # (sum V, 196, C)
    chunks = projected.split([p.pixel_values.shape[0] for p in plans])
    return [tiles_layout(f, p, model.image_newline, model.view_separator) for f, p in zip(chunks, plans)]


def _lm_width(cfg: VLMConfig) -> int:
    return cfg.lm.hidden_size


def _merged_vision_width(cfg: VLMConfig) -> int:
    return 4 * cfg.vision.hidden_size


SCHEMES: dict[str, SchemeGlue] = {
    "pad": SchemeGlue(_plan_pad, _inputs_pad, _encode_pad, {}),
    "anyres": SchemeGlue(_plan_anyres, _inputs_anyres, _encode_anyres, {"image_newline": _lm_width}),
    # Phi-3.5-V's sub_GN (row newline) and glb_GN (local/global separator) live at 4 * vision width.
    "hd": SchemeGlue(_plan_hd, _inputs_canvas, _encode_hd, {"sub_gn": _merged_vision_width,
                                                            "glb_gn": _merged_vision_width}),
    # DeepSeek-VL2's image_newline and view_seperator live at the LM width.
    "tiles": SchemeGlue(_plan_tiles, _inputs_canvas, _encode_tiles, {"image_newline": _lm_width,
                                                                     "view_separator": _lm_width}),
    "dual": SchemeGlue(dual_plan, dual_inputs, encode_dual, {}),
    # MiniCPM-V: wrappers and row breaks are prompt text, every view gives the resampler's queries.
    "slices": SchemeGlue(slices_plan, slices_inputs, encode_slices, {}),
    # Vary-tiny: the SAM tower alone; <img> / </img> are prompt text.
    "sam": SchemeGlue(sam_plan, sam_inputs, encode_sam, {}),
}

# Tokens of an image with a rows x cols local grid, the formulas of image/schemes/{hd,tiles}.py.
SCHEME_TOKEN_FORMULAS: dict[str, Callable[[int, int], int]] = {
    "hd": hd_scheme.hd_num_tokens,
    "tiles": lambda rows, cols: tiles_scheme.tiles_num_tokens(rows, cols, tiles_scheme.view_side()),
}
