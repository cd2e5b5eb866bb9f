"""What an image scheme is: the one object that knows how an image becomes views, tokens and rows.

A scheme answers, for the models that run it:

    check_config(cfg)            which config values its plan and encoder can follow (raises ValueError)
    work(cfg, size, n)           the bytes plan() allocates for an image of size (width, height), from the size
                                 alone; check_work refuses an image above MAX_WORK_BYTES before plan() runs
    plan(cfg, image, n)          image -> ImagePlan: views, grid and token count (the only place it is counted);
                                 n is the number of images in the prompt (DeepSeek-VL2's tiles depend on it)
    plan_video(cfg, video, n)    a video's plans (default: every frame planned as an image)
    inputs(plans)                the forward keyword tensors of a batch's plans, as transformers' processor
                                 for the reference model makes them
    encode(model, **inputs)      those tensors -> each image's (T_i, C) rows at the LM width: the vision
                                 tower(s), the projector and the feature layout (merges, newlines, separators)
    vectors(cfg)                 learned embeddings the layout inserts (e.g. LLaVA-NeXT's image_newline)
    geometry(plan)               where the views fall on the image, for `vlmkit tokens --overlay`

and describes its prompt format (`placeholders`, `prompt_format`) and the model class that runs it.
Schemes are registered by name in vlmkit.schemes (SCHEMES); a model's config names its scheme.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from vlmkit.config import require
from vlmkit.image.overlay import Geometry, View, whole_box
from vlmkit.image.pixels import normalize_work, pil_bytes
from vlmkit.image.plan import ImagePlan, ImagePlanError
from vlmkit.image.video import VideoFrames
from vlmkit.text.chat import ChatTemplate, chat_template_for

if TYPE_CHECKING:
    import torch.nn as nn

Video = Sequence[Image.Image] | VideoFrames  # a video given as its sampled frames

MAX_WORK_BYTES = 256 << 20  # the most a scheme may allocate to plan one image (beyond the image itself)


class Scheme:
    """Base of every image scheme (see the module docstring); a subclass is one module of vlmkit.schemes.

    Class attributes a scheme sets:
        name               the registry key and ImagePlan.scheme
        model_class        the model class that runs it ("VLM" for the LLaVA-style glue of models/vlm.py)
        reference_preset   the preset whose config `vlmkit tokens --scheme NAME` plans with (None: none)
        input_names        the forward keywords inputs() makes
        position_inputs    of those, the ones forward still needs when given encoded rows (image_embeds)
        config_fields      VLMConfig's scheme-specific fields it reads (grid_pinpoints, max_crops, ...)
        counts_images      whether a plan depends on how many images the prompt holds
        placeholders       config field -> text of its special token, for a fresh character vocabulary
        prompt_format      the built-in chat template its models use when a checkpoint has none (None: any)
        segment_special_tokens  whether the reference processor tokenizes the text between image placeholders
                           piece by piece, each piece with the tokenizer's special tokens (Phi-3-V: a BOS
                           before each), rather than the whole prompt in one pass (vlmkit.prompt)
        grid_unit          what plan.grid counts, for `vlmkit tokens`
        image_placeholder  the text a chat template writes for an image part, when it is not the image token's
                           own text (None); prompt.py finds the images there
        image_text(plan, index, image_token)  the text an image placeholder becomes (its image ids written as
                           image_token, their text), e.g. MiniCPM-V's `<image>` and `<slice>` wrappers; None
                           (the default): the run of plan.num_tokens image ids alone
    """

    name: str = ""
    model_class: str = "VLM"
    reference_preset: str | None = None
    input_names: tuple[str, ...] = ("pixel_values",)
    position_inputs: tuple[str, ...] = ()
    config_fields: tuple[str, ...] = ()
    counts_images: bool = False
    placeholders: dict[str, str] = {"image_token_id": "<image>"}
    prompt_format: str | None = None
    segment_special_tokens: bool = False
    grid_unit: str = "view"
    image_placeholder: str | None = None

    def image_text(self, plan: ImagePlan, index: int, image_token: str) -> str | None:
        """The prompt text of the index-th image (0-based, prompt order) of plan; None: just its image ids."""
        return None

    def check_config(self, cfg: Any) -> None:
        """Raise ValueError for VLMConfig values this scheme cannot follow; may fill scheme defaults (max_crops).
        VLMConfig calls it; a scheme with a model class of its own is checked by that model's config class.
        The default: a vision tower whose features (merged 2x2 if the projector merges) feed the projector."""
        require_vision(cfg, self.name)
        require_projector_input(cfg)

    def work(self, cfg: Any, size: tuple[int, int], num_images: int = 1) -> int:
        """An upper bound on the bytes plan(cfg, image, num_images) allocates for an RGB image of size
        (width, height), beyond the image itself: computed from the size, allocating nothing. check_work
        compares it with MAX_WORK_BYTES before planning. The default is for a scheme that converts and
        normalises the image at its own size; a scheme that resizes, pads or tiles states its own."""
        return pil_bytes(*size) + normalize_work(*size)

    def video_work(self, cfg: Any, size: tuple[int, int], frames: int, num_images: int) -> int:
        """work() for a video of `frames` frames of size: by default its frames are planned one at a time."""
        return self.work(cfg, size, num_images)

    def plan(self, cfg: Any, image: Image.Image, num_images: int = 1) -> ImagePlan:
        """The ImagePlan of one image for a model of config cfg."""
        raise NotImplementedError(f"image scheme {self.name!r} has no plan")

    def plan_video(self, cfg: Any, video: Video, num_images: int) -> list[ImagePlan]:
        """A video's plans: every sampled frame planned as one image (LLaVA-style models take video so)."""
        frames = video.frames if isinstance(video, VideoFrames) else list(video)
        if not frames:
            raise ValueError("the video has no frames; sample at least one with vlmkit.image.video")
        return [self.plan(cfg, frame, num_images) for frame in frames]

    def inputs(self, plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
        """The forward keyword tensors of plans (prompt order). Default: pixel_values (N, 3, S, S)."""
        return {"pixel_values": torch.cat([p.pixel_values for p in plans])}  # (N, 3, S, S)

    def encode(self, model: nn.Module, *inputs: Any, **named: Any) -> list[torch.Tensor]:
        """Each image's (T_i, C) rows from the tensors inputs() makes, in order."""
        raise NotImplementedError(f"image scheme {self.name!r} has no encoder")

    def check_embeds(self, cfg: Any, rows: Sequence[torch.Tensor], positions: dict[str, Any]) -> None:
        """Raise ValueError unless already-encoded rows (encode's output) go with the position inputs given
        beside them; the default has no position inputs to check."""

    def vectors(self, cfg: Any) -> dict[str, int]:
        """Learned embeddings the feature layout inserts: parameter name -> width."""
        return {}

    def geometry(self, plan: ImagePlan) -> Geometry:
        """Where plan's views fall on its image. Default: one view of the whole image at the view's size."""
        size = tuple(plan.pixel_values.shape[-1:-3:-1])  # (width, height)
        return Geometry(None, 0, 0, self.grid_unit, (View(whole_box(plan), size, "view (squashed)"),))

    def chat_template(self, tokenizer: Any, cfg: Any, fallback: str | None) -> ChatTemplate:
        """The template a model of this scheme is prompted with: the tokenizer's own, else prompt_format,
        else the built-in template named fallback."""
        return chat_template_for(tokenizer, default=self.prompt_format or fallback)


def check_work(scheme: Scheme, cfg: Any, size: tuple[int, int], num_images: int = 1, frames: int = 0) -> int:
    """scheme's estimate of what planning an image of size (width, height) allocates (a video of `frames`
    frames when frames > 0), or ImagePlanError when it exceeds MAX_WORK_BYTES. Every plan goes through
    here first (vlmkit.schemes.plan_image / plan_media), so no scheme allocates by an image's long side
    unchecked."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImagePlanError(f"image of {width}x{height}: zero size; an image needs at least 1x1 pixels")
    estimate = (scheme.video_work(cfg, size, frames, num_images) if frames else
                scheme.work(cfg, size, num_images))
    if estimate > MAX_WORK_BYTES:
        what = f"a video of {frames} {width}x{height} frames" if frames else f"a {width}x{height} image"
        raise ImagePlanError(f"{what}: planning it under image_scheme={scheme.name!r} would allocate about "
                             f"{estimate / 2**20:,.0f} MiB, more than the bound of {MAX_WORK_BYTES >> 20} MiB "
                             "per image; crop it or resize it (a less extreme aspect ratio or a shorter long "
                             "side) and try again")
    return estimate


# ---- config rules shared by schemes ---------------------------------------------------------------------------

def require_vision(cfg: Any, scheme: str) -> None:
    """The scheme reads a CLIP / SigLIP tower: cfg.vision must be set."""
    require(cfg.vision is not None, f"image_scheme={scheme!r} needs a vision tower: set vision (only "
                                    "image_scheme='sam' runs without one)")


def require_projector_input(cfg: Any) -> None:
    """projector.in_dim is the tower's width, times 4 when the projector merges 2x2 patches."""
    merge = cfg.projector.spec.merge ** 2
    require(cfg.projector.in_dim == cfg.vision.hidden_size * merge,
            f"projector.in_dim {cfg.projector.in_dim} does not match the vision width {cfg.vision.hidden_size} x "
            f"merge factor {merge}")


def require_max_crops(cfg: Any, scheme: str, default: int, what: str) -> None:
    """max_crops (None = default) must be a positive int; what says what it bounds."""
    if cfg.max_crops is None:
        cfg.max_crops = default
    require(isinstance(cfg.max_crops, int) and cfg.max_crops >= 1,
            f"max_crops is {cfg.max_crops!r}; image_scheme={scheme!r} needs a positive int ({what}, {default})")


# ---- inputs and encoders shared by schemes ---------------------------------------------------------------------

def stacked_views(plans: Sequence[ImagePlan]) -> torch.Tensor:
    """(N, V_max, 3, S, S): each image's views, zero-padded to the most views."""
    views = max(p.pixel_values.shape[0] for p in plans)
    return torch.stack([torch.cat([p.pixel_values, p.pixel_values.new_zeros(
        views - p.pixel_values.shape[0], *p.pixel_values.shape[1:])]) for p in plans])  # (N, V_max, 3, S, S)


def per_plan(plans: Sequence[ImagePlan], batch: torch.Tensor) -> list[torch.Tensor]:
    """Split outputs computed over every plan's views at once (sum V, ...) back into each plan's (V_i, ...)."""
    return list(batch.split([p.pixel_values.shape[0] for p in plans]))


# ---- a global view plus a canvas of square local views (hd, tiles) -------------------------------------------

def require_merged_views(cfg: Any, scheme: str, view: int, patch: int, tower_size: int, default_crops: int) -> None:
    """hd / tiles: the plan counts tokens for `view`-px views of `patch`-px patches merged 2x2, so the tower
    must see exactly that grid, and the projector must take the merged 4*D vectors."""
    require_vision(cfg, scheme)
    require_max_crops(cfg, scheme, default_crops, "the most local views")
    require(cfg.vision.patch_size == patch and cfg.vision.image_size == tower_size,
            f"image_scheme={scheme!r} plans {view}-px views of {patch}-px patches; set vision.patch_size="
            f"{patch} and vision.image_size={tower_size} (got {cfg.vision.patch_size} and {cfg.vision.image_size})")
    require(cfg.vision.select_feature == "patch",
            f"image_scheme={scheme!r} merges square patch grids: set vision.select_feature='patch'")
    require(cfg.projector.spec.merge == 2,
            f"image_scheme={scheme!r} merges 2x2 patches before the projector MLP: use a "
            f"'merge2x2_mlp{{N}}x_gelu' projector with in_dim 4 * {cfg.vision.hidden_size}, not {cfg.projector.type!r}")
    require_projector_input(cfg)


def canvas_inputs(plans: Sequence[ImagePlan]) -> dict[str, torch.Tensor]:
    """pixel_values (N, V_max, 3, S, S) [global, local row-major] zero-padded, and image_sizes (N, 2): each
    image's local canvas (rows * S, cols * S) as (height, width), as Phi-3.5-V's processor sends it."""
    sizes = torch.tensor([[p.grid[0] * p.pixel_values.shape[-2], p.grid[1] * p.pixel_values.shape[-1]]
                          for p in plans])  # (N, 2) (height, width)
    return {"pixel_values": stacked_views(plans), "image_sizes": sizes}


def canvas_plans(scheme: str, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                 num_tokens: Callable[[int, int], int]) -> list[ImagePlan]:
    """Each image's plan rebuilt from canvas_inputs-style tensors: its grid from its canvas size and its token
    count from num_tokens(rows, cols), the scheme's own formula, which the layout checks its output against.

    pixel_values (N, V, 3, S, S) zero-padded or (sum V, 3, S, S) concatenated, [global, local row-major];
    image_sizes (N, 2): the local canvas (rows * S, cols * S) as (height, width).
    """
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
        plans.append(ImagePlan(scheme, pixels, (w, h), (w, h), (rows, cols), {"tokens": num_tokens(rows, cols)}))
    if pixel_values.ndim == 5 and pixel_values.shape[0] != len(plans):
        raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(plans)}")
    if pixel_values.ndim == 4 and offset != pixel_values.shape[0]:
        raise ValueError(f"pixel_values holds {pixel_values.shape[0]} views but the image_sizes plan {offset}")
    return plans


def one_of(names: Sequence[str]) -> str:
    """image_scheme names as an error message writes them after `image_scheme`.

        >>> one_of(["dual"]), one_of(["hd", "tiles", "slices"])
        ("='dual'", "='hd', 'tiles' or 'slices'")
    """
    quoted = [repr(n) for n in names]
    return "=" + (quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}")
