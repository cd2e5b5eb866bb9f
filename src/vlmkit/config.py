"""Typed configuration for every vlmkit model.

A model is three parts (vision tower -> projector -> language model) and each
part has one dataclass here. Configs validate themselves on construction, so a
bad value fails where it is written, not deep inside a forward pass. They turn
into plain dicts (`to_dict`) and back (`from_dict`) exactly, which is how a
config is saved next to every checkpoint.

    >>> lm = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
    ...               num_layers=2, num_heads=4, num_kv_heads=2)
    >>> lm.head_dim
    16
    >>> LMConfig.from_dict(lm.to_dict()) == lm
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlmkit.models.sam import SamConfig

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope", "yarn")
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
SELECT_FEATURES = ("patch", "cls_patch")
IMAGE_SCHEMES = ("pad", "anyres", "hd", "tiles", "dual", "slices", "sam")


def require(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless ok: the one way configs reject values."""
    if not ok:
        raise ValueError(message)


class Serializable:
    """to_dict / from_dict for (nested) config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        require(not unknown, f"{cls.__name__}: unknown keys {unknown}; valid keys are {sorted(names)}")
        return cls(**data)


_MOE_FIELDS = ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
               "shared_expert_intermediate_size", "shared_expert_gate", "dense_layers", "moe_scoring",
               "moe_topk_method", "moe_n_group", "moe_topk_group", "routed_scaling_factor", "moe_router_fp32")
_MLA_FIELDS = ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave")


@dataclass
class LMConfig(Serializable):
    """A Llama-family decoder: Llama, Mistral, Qwen2, Phi-3, SmolLM2; with experts, Qwen2-MoE; with
    experts and latent attention, DeepSeek-V2/V3 (the language model of DeepSeek-VL2)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None = num_heads (no grouped-query attention)
    head_dim: int | None = None  # None = hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # RoPE scaling in transformers' `rope_parameters` form minus rope_theta,
    # e.g. {"rope_type": "linear", "factor": 2.0}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False  # SmolLM2: True
    sliding_window: int | None = None  # Mistral: attend to at most this many previous tokens
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Mixture of experts (models/moe.py); num_experts 0 = a dense MLP in every layer and the
    # other MoE fields keep their defaults. Qwen2-MoE: 60 experts, top-4, one gated shared expert.
    num_experts: int = 0  # routed SwiGLU experts per MoE layer
    num_experts_per_tok: int = 0  # top-k: routed experts each token goes through
    moe_intermediate_size: int = 0  # hidden width of one routed expert
    norm_topk_prob: bool = False  # rescale each token's top-k softmax weights to sum to 1
    shared_expert_intermediate_size: int = 0  # width of the always-on shared expert(s); 0 = none
    shared_expert_gate: bool = False  # Qwen2-MoE: scale the shared expert by sigmoid(w . x)
    dense_layers: tuple[int, ...] = ()  # layers that keep the dense MLP (intermediate_size) in an MoE model
    # DeepSeek-V2/V3 routing (models/moe.py route): how experts are scored, picked and weighted.
    moe_scoring: str = "softmax"  # "softmax" (Qwen2-MoE, DeepSeek-V2) or "sigmoid" (DeepSeek-V3, DeepSeek-VL2)
    moe_topk_method: str = "greedy"  # "greedy", "group_limited_greedy" (V2) or "noaux_tc" (V3: + correction bias)
    moe_n_group: int = 1  # expert groups of the group-limited methods (num_experts / moe_n_group per group)
    moe_topk_group: int = 1  # groups a token may take its experts from
    routed_scaling_factor: float = 1.0  # the routed experts' weights are multiplied by this (DeepSeek-VL2: 2.0)
    moe_router_fp32: bool = False  # DeepSeek: router logits in fp32; Qwen2-MoE: in the model dtype
    # Multi-head latent attention (models/mla.py, DeepSeek-V2/V3); kv_lora_rank 0 = ordinary attention.
    kv_lora_rank: int = 0  # width of the compressed key/value latent that the KV cache stores
    q_lora_rank: int = 0  # width of the query bottleneck; 0 = one full query projection
    qk_nope_head_dim: int = 0  # per-head query/key channels without RoPE
    qk_rope_head_dim: int = 0  # per-head query channels with RoPE; the key's are one head shared by all
    v_head_dim: int = 0  # per-head value channels
    rope_interleave: bool = False  # MLA: rotate channel pairs (2i, 2i + 1), DeepSeek's layout, not (i, i + d/2)

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            require(
                self.hidden_size % self.num_heads == 0,
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "set head_dim explicitly",
            )
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            require(getattr(self, name) > 0, f"LMConfig.{name} must be positive, got {getattr(self, name)}")
        require(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}",
        )
        require(self.hidden_act in ("silu", "gelu", "gelu_pytorch_tanh"),
                 f"LMConfig.hidden_act {self.hidden_act!r} unsupported; use silu, gelu or gelu_pytorch_tanh")
        require(0.0 < self.partial_rotary_factor <= 1.0,
                 f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            require(kind in ROPE_TYPES, f"rope_scaling type {kind!r} unknown; valid: {ROPE_TYPES}")
        require(self.sliding_window is None or self.sliding_window > 0,
                 f"sliding_window must be positive or None, got {self.sliding_window}")
        self.dense_layers = tuple(self.dense_layers)
        self._check_moe()
        self._check_mla()

    def _check_moe(self) -> None:
        if self.num_experts == 0:
            moe_set = [f.name for f in dataclasses.fields(self)
                       if f.name in _MOE_FIELDS and getattr(self, f.name) != f.default]
            require(not moe_set, f"LMConfig fields {moe_set} only apply to a mixture of experts; "
                                 "set num_experts > 0 or remove them")
            return
        require(self.num_experts > 0, f"LMConfig.num_experts must be >= 0, got {self.num_experts}")
        require(1 <= self.num_experts_per_tok <= self.num_experts,
                 f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                 f"got {self.num_experts_per_tok}")
        require(self.moe_intermediate_size > 0,
                 f"moe_intermediate_size must be positive with experts, got {self.moe_intermediate_size}")
        require(self.shared_expert_intermediate_size >= 0,
                 f"shared_expert_intermediate_size must be >= 0, got {self.shared_expert_intermediate_size}")
        require(not self.shared_expert_gate or self.shared_expert_intermediate_size > 0,
                 "shared_expert_gate needs a shared expert: set shared_expert_intermediate_size > 0")
        require(not self.mlp_bias, "mixture-of-experts MLPs have no bias; set mlp_bias=False")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        require(not bad, f"dense_layers {bad} are out of range for {self.num_layers} layers")
        from vlmkit.models.moe import check_routing  # the routing options are checked beside the router

        check_routing(self)

    def _check_mla(self) -> None:
        if self.kv_lora_rank == 0:
            mla_set = [f.name for f in dataclasses.fields(self)
                       if f.name in _MLA_FIELDS and getattr(self, f.name) != f.default]
            require(not mla_set, f"LMConfig fields {mla_set} only apply to multi-head latent attention; "
                                 "set kv_lora_rank > 0 or remove them")
            return
        from vlmkit.models.mla import check_latent_attention  # checked beside the attention it configures

        check_latent_attention(self)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` uses the mixture-of-experts block instead of the dense MLP."""
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def rotary_dim(self) -> int:
        """Number of leading channels of each head that RoPE rotates: int(head_dim * factor),
        rounded up to even as transformers' frequency table (arange(0, dim, 2)) does;
        qk_rope_head_dim with latent attention."""
        if self.kv_lora_rank:
            return self.qk_rope_head_dim
        dim = int(self.head_dim * self.partial_rotary_factor)
        return dim + dim % 2


@dataclass
class VisionConfig(Serializable):
    """A ViT image encoder: CLIP (CLS token, pre-layernorm, quick_gelu) or SigLIP (no CLS, gelu-tanh)."""

    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    use_cls_token: bool = True  # CLIP: True, SigLIP: False
    pre_layernorm: bool = True  # CLIP: True, SigLIP: False
    post_layernorm: bool = True
    use_head: bool = False  # SigLIP attention-pooling head (not used by VLMs)
    patch_bias: bool = False  # CLIP's patch conv has no bias, SigLIP's does
    # Which hidden state a VLM takes: -1 = last layer, -2 = penultimate (LLaVA).
    select_layer: int = -2
    select_feature: str = "patch"  # "patch" drops CLS, "cls_patch" keeps every token
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        self.image_mean = tuple(self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(self.image_std)  # type: ignore[assignment]
        for name in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            require(getattr(self, name) > 0, f"VisionConfig.{name} must be positive, got {getattr(self, name)}")
        require(self.image_size % self.patch_size == 0,
                 f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        require(self.hidden_size % self.num_heads == 0,
                 f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        require(self.hidden_act in VISION_ACTIVATIONS,
                 f"VisionConfig.hidden_act {self.hidden_act!r} unknown; valid: {VISION_ACTIVATIONS}")
        require(self.select_feature in SELECT_FEATURES,
                 f"select_feature {self.select_feature!r} unknown; valid: {SELECT_FEATURES}")
        require(-self.num_layers - 1 <= self.select_layer <= self.num_layers,
                 f"select_layer {self.select_layer} is out of range for {self.num_layers} layers "
                 f"(valid: {-self.num_layers - 1}..{self.num_layers})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.use_cls_token)

    @property
    def tokens_per_image(self) -> int:
        """Feature vectors the tower hands to the projector for one image at image_size."""
        keep_cls = self.use_cls_token and self.select_feature == "cls_patch"
        return self.num_patches + int(keep_cls)


@dataclass
class ProjectorConfig(Serializable):
    """Maps vision features to the LM width. `type` is a key of models.projectors.PROJECTORS:
    "linear", "mlp{N}x_gelu" or "merge2x2_mlp{N}x_gelu" (2x2 space-to-depth, then the MLP)."""

    type: str = "mlp2x_gelu"
    in_dim: int = 1024
    out_dim: int = 4096
    bias: bool = True

    def __post_init__(self) -> None:
        from vlmkit.models.projectors import parse_projector_type  # validates the name, lists valid ones

        parse_projector_type(self.type)
        require(self.in_dim > 0 and self.out_dim > 0,
                 f"projector dims must be positive, got in_dim={self.in_dim}, out_dim={self.out_dim}")


@dataclass
class VLMConfig(Serializable):
    """A vision-language model: vision tower -> projector -> language model.
    `vision` is None exactly for image_scheme='sam', whose only tower is vision_high."""

    vision: VisionConfig | None = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    image_token_id: int = 32000  # placeholder id in input_ids that image features replace
    # How an image becomes views and tokens (image/schemes/, layouts in models/layouts/):
    #   "pad"    LLaVA-1.5: one square view;
    #   "anyres" LLaVA-NeXT: base view + tiles of a canvas from grid_pinpoints, unpad, newline per row;
    #   "hd"     Phi-3.5-vision HD-N: global + up to max_crops 336-px crops, 2x2 merge, sub_GN/glb_GN;
    #   "tiles"  DeepSeek-VL2: global + up to max_crops 384-px tiles, 2x2 downsample, newline/separator;
    #   "dual"   Vary-base: a CLIP view for `vision` and a SAM view for `vision_high`, one row per token;
    #   "slices" MiniCPM-V: source + up to max_crops slices near vision.image_size**2 px, each view at its
    #            own size through the tower and a perceiver resampler (models/glue_slices.py);
    #   "sam"    Vary-tiny: no CLIP tower (vision=None), the image resized to vision_high.image_size, the SAM
    #            tokens through `projector` alone (models/glue_sam.py).
    image_scheme: str = "pad"
    # anyres: candidate canvases as (height, width), multiples of vision.image_size; () otherwise.
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    # hd: N of HD-N (Phi-3.5-vision: 16 for one image, 4 for many); tiles: most local tiles m*n
    # (DeepSeek-VL2: 9); slices: max_slices (MiniCPM-V: 9). None = that default; must stay None for pad and anyres.
    max_crops: int | None = None
    # dual (and sam: vision_high only, projector_high None; None otherwise): the SAM tower (downsample="vary") and its own projector. An image's
    # rows are cat([projector(CLIP tokens), projector_high(SAM tokens)], dim=-1), concatenated along
    # channels, so projector.out_dim + projector_high.out_dim == lm.hidden_size (Vary: 1024 + 1024).
    vision_high: SamConfig | None = None
    projector_high: ProjectorConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.projector, dict):
            self.projector = ProjectorConfig.from_dict(self.projector)
        if isinstance(self.lm, dict):
            self.lm = LMConfig.from_dict(self.lm)
        if isinstance(self.vision_high, dict):
            from vlmkit.models.sam import SamConfig  # the SAM tower's config lives with the tower

            self.vision_high = SamConfig.from_dict(self.vision_high)
        if isinstance(self.projector_high, dict):
            self.projector_high = ProjectorConfig.from_dict(self.projector_high)
        self.grid_pinpoints = tuple(tuple(p) for p in self.grid_pinpoints)  # type: ignore[misc]
        require(self.vision is not None or self.image_scheme == "sam",
                 f"image_scheme={self.image_scheme!r} needs a vision tower: set vision (only image_scheme='sam' "
                 "runs without one)")
        self._check_image_scheme()
        self._check_dual()
        if self.image_scheme == "sam":
            self._check_sam()
        else:
            require(self.projector.in_dim == self.vision.hidden_size * _merge_factor(self.projector.type),
                    f"projector.in_dim {self.projector.in_dim} does not match the vision width "
                    f"{self.vision.hidden_size} x merge factor {_merge_factor(self.projector.type)}")
        high = self.projector_high.out_dim if self.projector_high is not None else 0
        require(self.projector.out_dim + high == self.lm.hidden_size,
                 f"projector.out_dim {self.projector.out_dim}" + (f" + projector_high.out_dim {high}" if high else "")
                 + f" != lm.hidden_size {self.lm.hidden_size}")
        require(0 <= self.image_token_id < self.lm.vocab_size,
                 f"image_token_id {self.image_token_id} is outside the LM vocabulary (size {self.lm.vocab_size})")

    def _check_image_scheme(self) -> None:
        require(self.image_scheme in IMAGE_SCHEMES,
                 f"image_scheme {self.image_scheme!r} unknown; valid: {IMAGE_SCHEMES}")
        if self.image_scheme != "anyres":
            require(not self.grid_pinpoints, "grid_pinpoints are only used by image_scheme='anyres'; "
                                              "remove them or set image_scheme='anyres'")
        if self.image_scheme in ("pad", "anyres"):
            require(self.max_crops is None, f"max_crops is only used by image_scheme 'hd', 'tiles' and 'slices'; "
                                             f"remove it for image_scheme={self.image_scheme!r}")
        checks = {"anyres": self._check_anyres, "hd": self._check_hd, "tiles": self._check_tiles,
                  "slices": self._check_slices}
        if self.image_scheme in checks:
            checks[self.image_scheme]()

    def _check_anyres(self) -> None:
        tile = self.vision.image_size
        require(bool(self.grid_pinpoints), "image_scheme='anyres' needs grid_pinpoints, e.g. "
                                            f"(({tile}, {2 * tile}), ({2 * tile}, {tile}), ({2 * tile}, {2 * tile}))")
        for pinpoint in self.grid_pinpoints:
            require(len(pinpoint) == 2 and all(isinstance(v, int) and v > 0 and v % tile == 0 for v in pinpoint),
                     f"grid pinpoint {pinpoint} must be (height, width), positive multiples of the tower's "
                     f"image_size {tile}")
        require(self.vision.select_feature == "patch",
                 "image_scheme='anyres' lays out square patch grids: set vision.select_feature='patch' (drop CLS)")
        require(_merge_factor(self.projector.type) == 1,
                 f"image_scheme='anyres' does not combine with the merging projector {self.projector.type!r}")

    def _check_merged_views(self, view: int, patch: int, tower_size: int, default_crops: int) -> None:
        """hd / tiles: the plan counts tokens for `view`-px views of `patch`-px patches merged 2x2,
        so the tower must see exactly that grid, and the projector must take the merged 4*D vectors."""
        scheme = self.image_scheme
        if self.max_crops is None:
            self.max_crops = default_crops
        require(isinstance(self.max_crops, int) and self.max_crops >= 1,
                 f"max_crops is {self.max_crops!r}; image_scheme={scheme!r} needs a positive int")
        require(self.vision.patch_size == patch and self.vision.image_size == tower_size,
                 f"image_scheme={scheme!r} plans {view}-px views of {patch}-px patches; set vision.patch_size="
                 f"{patch} and vision.image_size={tower_size} (got {self.vision.patch_size} and "
                 f"{self.vision.image_size})")
        require(self.vision.select_feature == "patch",
                 f"image_scheme={scheme!r} merges square patch grids: set vision.select_feature='patch'")
        require(_merge_factor(self.projector.type) == 4,
                 f"image_scheme={scheme!r} merges 2x2 patches before the projector MLP: use a "
                 f"'merge2x2_mlp{{N}}x_gelu' projector with in_dim 4 * {self.vision.hidden_size}, "
                 f"not {self.projector.type!r}")

    def _check_hd(self) -> None:
        from vlmkit.image.schemes.hd import CROP

        self._check_merged_views(CROP, 14, CROP, 16)  # 24 x 24 patches -> 12 x 12 merged tokens per crop

    def _check_tiles(self) -> None:
        from vlmkit.image.schemes.tiles import PATCH, TILE

        # SigLIP-so400m's stride-14 patch conv reads the first 27 * 14 = 378 pixels of each 384-px tile.
        self._check_merged_views(TILE, PATCH, TILE // PATCH * PATCH, 9)

    def _check_slices(self) -> None:
        """slices: every view, whatever its size, becomes the resampler's Q query tokens; the plan takes its
        query_num from the projector, max_slices from max_crops and its slice resolution from vision.image_size."""
        from vlmkit.models.projectors import parse_projector_type

        if self.max_crops is None:
            self.max_crops = 9
        require(isinstance(self.max_crops, int) and self.max_crops >= 1,
                 f"max_crops is {self.max_crops!r}; image_scheme='slices' needs a positive int (max_slices, 9)")
        require(parse_projector_type(self.projector.type).family == "perceiver",
                 f"image_scheme='slices' gives every view (non-square, any size) the same number of query "
                 f"tokens: use a 'perceiver{{Q}}q' or 'perceiver{{Q}}q_{{L}}x{{H}}' resampler projector, not "
                 f"{self.projector.type!r} (qwen_resampler{{Q}}q takes square patch grids only)")

    def _check_dual(self) -> None:
        """vision_high / projector_high exist exactly for image_scheme='dual', where both branches must
        give the same number of tokens (their rows are concatenated along channels) at full resolution."""
        high, proj = self.vision_high, self.projector_high
        if self.image_scheme == "sam":
            return
        if self.image_scheme != "dual":
            require(high is None and proj is None, "vision_high and projector_high are only used by "
                                                   "image_scheme='dual' (and vision_high by 'sam'); remove "
                                                   "them or set image_scheme='dual'")
            return
        require(high is not None and proj is not None,
                 "image_scheme='dual' (Vary-base) needs vision_high (a SamConfig with downsample='vary') and "
                 "projector_high (in_dim = vision_high.feature_dim, e.g. 1024)")
        require(self.max_crops is None, "max_crops is not used by image_scheme='dual'; remove it")
        require(high.downsample == "vary", f"image_scheme='dual' plans Vary's SAM branch: set "
                                           f"vision_high.downsample='vary', not {high.downsample!r}")
        require(self.vision.select_feature == "patch",
                 "image_scheme='dual' drops CLIP's CLS token as Vary does: set vision.select_feature='patch'")
        for name, p in (("projector", self.projector), ("projector_high", proj)):
            require(_merge_factor(p.type) == 1 and not _is_resampler(p.type),
                     f"image_scheme='dual' keeps every token of both branches: {name} must be 'linear' or "
                     f"'mlp{{N}}x_gelu', not {p.type!r}")
        require(proj.in_dim == high.feature_dim,
                 f"projector_high.in_dim {proj.in_dim} != vision_high.feature_dim {high.feature_dim}")
        clip, sam = self.vision.num_patches, high.tokens_per_image
        require(clip == sam, f"the CLIP branch gives {clip} tokens ({self.vision.image_size} px / "
                             f"{self.vision.patch_size}) but the SAM branch {sam} ({high.image_size} px / "
                             f"{high.patch_size}, two stride-2 convs); both must match (Vary: 224/14 and 1024/16)")


    def _check_sam(self) -> None:
        """sam (Vary-tiny): the SAM tower is the only one, every one of its tokens goes through `projector`."""
        require(self.vision is None, "image_scheme='sam' has no CLIP tower: set vision=None (the SAM tower is "
                                     "vision_high)")
        require(self.vision_high is not None, "image_scheme='sam' (Vary-tiny) needs vision_high, a SamConfig "
                                              "(downsample='vary' for Vary's 256 tokens of 1024)")
        require(self.projector_high is None, "image_scheme='sam' has one projector: set projector (in_dim = "
                                             "vision_high.feature_dim) and remove projector_high")
        require(self.max_crops is None, "max_crops is not used by image_scheme='sam'; remove it")
        require(_merge_factor(self.projector.type) == 1 and not _is_resampler(self.projector.type),
                 f"image_scheme='sam' keeps every SAM token: projector must be 'linear' or 'mlp{{N}}x_gelu', "
                 f"not {self.projector.type!r}")
        require(self.projector.in_dim == self.vision_high.feature_dim,
                 f"projector.in_dim {self.projector.in_dim} != vision_high.feature_dim {self.vision_high.feature_dim}")


def _merge_factor(projector_type: str) -> int:
    from vlmkit.models.projectors import parse_projector_type

    return parse_projector_type(projector_type).merge ** 2


def _is_resampler(projector_type: str) -> bool:
    """A projector of learned queries (qwen_resampler, perceiver) sets its own token count."""
    from vlmkit.models.projectors import parse_projector_type

    return parse_projector_type(projector_type).queries > 0
