"""Typed configuration of the parts every vlmkit model is made of.

A vision-language model is a vision tower, a projector and a language model; each part has one
dataclass here (LMConfig, VisionConfig, ProjectorConfig, with the grammar of projector names).
A whole model's config lives beside its model class, because it names the image scheme the model
runs: VLMConfig in models/vlm.py, Qwen2VLConfig in models/qwen2_vl.py, DeepseekVLConfig in
models/deepseek_vl.py. This module is the bottom layer: it imports nothing from the rest of vlmkit.

Configs validate themselves on construction, so a bad value fails where it is written, not deep
inside a forward pass. They turn into plain dicts (`to_dict`) and back (`from_dict`) exactly, which
is how a config is saved next to every checkpoint.

    >>> lm = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
    ...               num_layers=2, num_heads=4, num_kv_heads=2)
    >>> lm.head_dim
    16
    >>> LMConfig.from_dict(lm.to_dict()) == lm
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import re
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope", "yarn")
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")
SELECT_FEATURES = ("patch", "cls_patch")
# Pixel normalisation (x / 255 - mean) / std of the towers vlmkit builds, defined here once.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP: LLaVA, Phi-3.5-V, Qwen2-VL, Vary
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SigLIP: DeepSeek-VL2, MiniCPM-V
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM
IMAGENET_STD = (0.229, 0.224, 0.225)
MOE_SCORINGS = ("softmax", "sigmoid")
MOE_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


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
        """The expert fields, and routing options models/moe.route can follow (DeepSeek-V2/V3 papers, sec. 2)."""
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
        require(self.moe_scoring in MOE_SCORINGS, f"moe_scoring {self.moe_scoring!r} unknown; valid: {MOE_SCORINGS}")
        require(self.moe_topk_method in MOE_TOPK_METHODS,
                f"moe_topk_method {self.moe_topk_method!r} unknown; valid: {MOE_TOPK_METHODS}")
        require(self.routed_scaling_factor > 0, f"routed_scaling_factor must be positive, got {self.routed_scaling_factor}")
        G, E = self.moe_n_group, self.num_experts
        require(G >= 1 and E % G == 0, f"moe_n_group {G} must be >= 1 and divide num_experts {E}")
        require(1 <= self.moe_topk_group <= G, f"moe_topk_group must be in 1..moe_n_group ({G}), got {self.moe_topk_group}")
        if self.moe_topk_method != "greedy":
            reachable = self.moe_topk_group * (E // G)
            require(self.num_experts_per_tok <= reachable,
                    f"{self.moe_topk_method} picks {self.num_experts_per_tok} experts from {self.moe_topk_group} "
                    f"group(s) of {E // G} ({reachable} reachable); raise moe_topk_group or lower num_experts_per_tok")
        require(self.moe_topk_method != "noaux_tc" or E // G >= 2,
                f"noaux_tc scores a group by its two best experts; num_experts / moe_n_group is {E // G}")

    def _check_mla(self) -> None:
        """The latent-attention fields, and settings models/mla.py can run."""
        if self.kv_lora_rank == 0:
            mla_set = [f.name for f in dataclasses.fields(self)
                       if f.name in _MLA_FIELDS and getattr(self, f.name) != f.default]
            require(not mla_set, f"LMConfig fields {mla_set} only apply to multi-head latent attention; "
                                 "set kv_lora_rank > 0 or remove them")
            return
        require(self.kv_lora_rank > 0, f"kv_lora_rank must be >= 0, got {self.kv_lora_rank}")
        require(self.q_lora_rank >= 0 and self.qk_nope_head_dim >= 0,
                f"q_lora_rank ({self.q_lora_rank}) and qk_nope_head_dim ({self.qk_nope_head_dim}) must be >= 0")
        require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                f"qk_rope_head_dim must be positive and even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        require(self.v_head_dim > 0, f"v_head_dim must be positive with latent attention, got {self.v_head_dim}")
        require(self.num_kv_heads == self.num_heads, f"latent attention expands keys and values for every head: set "
                                                   f"num_kv_heads = num_heads ({self.num_heads}), got {self.num_kv_heads}")
        require(self.partial_rotary_factor == 1.0 and self.sliding_window is None,
                "latent attention rotates exactly qk_rope_head_dim channels over the full context: leave "
                "partial_rotary_factor at 1.0 and sliding_window at None")

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
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # How a patch grid other than the trained (image_size / patch_size)^2 one finds its positions: False
    # resizes the table bicubically (transformers' interpolate_pos_encoding); True looks each patch up in the
    # table by bucketed fractional coordinates (NaViT / Idefics2, MiniCPM-V's modeling_navit_siglip.py),
    # which it then does for every grid (models/vit.bucket_position_ids).
    position_buckets: bool = False
    # features() of the last layer after post_layernorm (SigLIP's last_hidden_state, which MiniCPM-V's resampler
    # reads) instead of the raw hidden state; needs select_layer -1 and post_layernorm.
    feature_post_norm: bool = False
    # Side of the stored square position table, resized bicubically to the patch grid on every forward
    # (Qwen-VL: 16, a 256-row table for its 32 x 32 patches, visual.py get_abs_pos); 0 = the patch grid itself.
    position_grid: int = 0

    def __post_init__(self) -> None:
        self.image_mean = tuple(self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(self.image_std)  # type: ignore[assignment]
        for name in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            require(getattr(self, name) > 0, f"VisionConfig.{name} must be positive, got {getattr(self, name)}")
        require(self.position_grid >= 0, f"VisionConfig.position_grid must be 0 or positive, got {self.position_grid}")
        require(self.image_size % self.patch_size == 0,
                 f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        require(self.hidden_size % self.num_heads == 0,
                 f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        require(self.hidden_act in VISION_ACTIVATIONS,
                 f"VisionConfig.hidden_act {self.hidden_act!r} unknown; valid: {VISION_ACTIVATIONS}")
        require(self.select_feature in SELECT_FEATURES,
                 f"select_feature {self.select_feature!r} unknown; valid: {SELECT_FEATURES}")
        require(not self.feature_post_norm or (self.post_layernorm and self.select_layer in (-1, self.num_layers)),
                 "feature_post_norm normalises the last layer's features: it needs select_layer -1 and "
                 "post_layernorm")
        require(-self.num_layers - 1 <= self.select_layer <= self.num_layers,
                 f"select_layer {self.select_layer} is out of range for {self.num_layers} layers "
                 f"(valid: {-self.num_layers - 1}..{self.num_layers})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def position_side(self) -> int:
        """Side of the stored position table's square grid (position_grid, else the patch grid)."""
        return self.position_grid or self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.position_side**2 + int(self.use_cls_token)

    @property
    def tokens_per_image(self) -> int:
        """Feature vectors the tower hands to the projector for one image at image_size."""
        keep_cls = self.use_cls_token and self.select_feature == "cls_patch"
        return self.num_patches + int(keep_cls)


SAM_DOWNSAMPLES = ("none", "vary", "deepseek")
# How a SAM view is resized to image_size x image_size: "bicubic" (Pillow; Vary-toy's BlipImageEvalProcessor) or
# "cv2_linear" (OpenCV's INTER_LINEAR on the uint8 image; Vary-base's albumentations test_transform).
SAM_RESIZES = ("bicubic", "cv2_linear")


@dataclass
class SamConfig(Serializable):
    """SAM's ViTDet image encoder (models/sam.py) and the downsampling that VLMs add after its neck.

    Defaults are SAM ViT-B at 1024 px: 768 wide, 12 layers, windows of 14 patches,
    global attention at layers 2, 5, 8, 11, neck to 256 channels -> (256, 64, 64).
    `downsample` picks what follows the neck:
      "none"     the (output_channels, 64, 64) map itself;
      "vary"     Vary: two stride-2 3x3 convs 256 -> 512 -> 1024, 64x64 -> 16x16 = 256 tokens;
      "deepseek" DeepSeek-VL: bilinear resize to resize_to (default 96), then the same two convs
                 -> 24x24 = 576 tokens; with global_branch, DeepSeek-VL's "sam_hd" path adds a
                 second neck on the first global layer's output, scaled by a learned alpha.
    """

    image_size: int = 1024
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14  # side of the attention windows in patches; 0 = every layer global
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    output_channels: int = 256
    downsample: str = "none"
    downsample_channels: tuple[int, int] = (512, 1024)
    resize_to: int | None = None  # "deepseek" only: side the neck map is resized to; None = 96
    global_branch: bool = False  # "deepseek" only: DeepSeek-VL's sam_hd second neck
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "bicubic"  # how the scheme resizes the view: SAM_RESIZES

    def __post_init__(self) -> None:
        require(self.resize in SAM_RESIZES, f"SamConfig.resize {self.resize!r} unknown; valid: {SAM_RESIZES}")
        self.global_attn_indexes = tuple(self.global_attn_indexes)
        self.downsample_channels = tuple(self.downsample_channels)  # type: ignore[assignment]
        self.image_mean = tuple(self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(self.image_std)  # type: ignore[assignment]
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                     "num_layers", "num_heads", "output_channels"):
            require(getattr(self, name) > 0, f"SamConfig.{name} must be positive, got {getattr(self, name)}")
        require(self.image_size % self.patch_size == 0,
                 f"SAM image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        require(self.hidden_size % self.num_heads == 0,
                 f"SAM hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        require(self.hidden_act in VISION_ACTIVATIONS,
                 f"SamConfig.hidden_act {self.hidden_act!r} unknown; valid: {VISION_ACTIVATIONS}")
        require(self.window_size >= 0, f"SamConfig.window_size must be >= 0 (0 = global), got {self.window_size}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_layers]
        require(not bad, f"global_attn_indexes {bad} are outside layers 0..{self.num_layers - 1}")
        require(self.downsample in SAM_DOWNSAMPLES,
                 f"SamConfig.downsample {self.downsample!r} unknown; valid: {SAM_DOWNSAMPLES}")
        require(len(self.downsample_channels) == 2 and all(c > 0 for c in self.downsample_channels),
                 f"downsample_channels must be two positive ints (e.g. (512, 1024)), got {self.downsample_channels}")
        if self.downsample == "deepseek":
            if self.resize_to is None:
                self.resize_to = 96
            require(self.resize_to > 0, f"SamConfig.resize_to must be positive, got {self.resize_to}")
        else:
            require(self.resize_to is None and not self.global_branch,
                     f"resize_to and global_branch are only used by downsample='deepseek'; remove them "
                     f"for downsample={self.downsample!r}")
        require(not self.global_branch or bool(self.global_attn_indexes),
                 "global_branch reads the first global-attention layer: set global_attn_indexes")

    @property
    def grid(self) -> int:
        """Patches per side of the image: 64 for 1024 px / 16."""
        return self.image_size // self.patch_size

    @property
    def feature_size(self) -> int:
        """Side of the final feature map: grid (none), 16 (Vary at 1024 px), 24 (DeepSeek-VL)."""
        if self.downsample == "none":
            return self.grid
        side = self.grid if self.downsample == "vary" else self.resize_to
        for _ in range(2):  # each 3x3 stride-2 pad-1 conv maps n -> ceil(n / 2)
            side = (side + 1) // 2
        return side

    @property
    def feature_dim(self) -> int:
        """Channels of each output token: output_channels, or downsample_channels[1] after downsampling."""
        return self.output_channels if self.downsample == "none" else self.downsample_channels[1]

    @property
    def tokens_per_image(self) -> int:
        """Tokens one image becomes: 4096 (none), 256 (Vary), 576 (DeepSeek-VL) at 1024 px."""
        return self.feature_size ** 2


# ---- projectors: the grammar of ProjectorConfig.type (models/projectors.py builds each family) ----------

# Each valid form of a projector name: (regex, family); models/projectors.py maps families to builders.
_FORMS = {
    r"linear": "linear",
    r"mlp(?P<depth>\d+)x_gelu": "mlp",
    r"merge(?P<m1>\d+)x(?P<m2>\d+)_mlp(?P<depth>\d+)x_gelu": "merge_mlp",
    r"qwen_resampler(?P<queries>\d+)q": "qwen_resampler",
    r"perceiver(?P<queries>\d+)q(?:_(?P<depth>\d+)x(?P<width>\d+))?": "perceiver",
    r"minicpmv_resampler(?P<queries>\d+)q": "minicpmv_resampler",
}
VALID_PROJECTOR_TYPES = ("linear", "mlp{N}x_gelu", "merge2x2_mlp{N}x_gelu", "qwen_resampler{Q}q",
                         "perceiver{Q}q", "perceiver{Q}q_{L}x{H}", "minicpmv_resampler{Q}q")


@dataclass(frozen=True)
class ProjectorSpec:
    """A parsed projector name: its family and the numbers the name carries."""

    family: str
    depth: int = 1  # number of Linear layers
    merge: int = 1  # side of the square block of patches merged into one token
    queries: int = 0  # resamplers: number of learnable queries = LM tokens per image (0: not a resampler)
    width: int = 0  # perceiver{Q}q_{L}x{H}: Q-Former width H (0: BERT-base Q-Former)


def parse_projector_type(name: str) -> ProjectorSpec:
    """Parse a projector type string; raise ValueError listing the valid forms if it is unknown."""
    for pattern, family in _FORMS.items():
        m = re.fullmatch(pattern, name)
        if m is None:
            continue
        groups = m.groupdict()
        depth = int(groups.get("depth") or 1)
        merge = int(groups.get("m1") or 1)
        queries = int(groups.get("queries") or 0)
        width = int(groups.get("width") or 0)
        if depth < 1 or ("queries" in groups and queries < 1) or (groups.get("width") is not None and width < 1):
            break
        if family == "merge_mlp" and not (groups["m1"] == groups["m2"] == "2"):
            raise ValueError(f"projector type {name!r}: only a 2x2 merge is supported")
        return ProjectorSpec(family, depth, merge, queries, width)
    raise ValueError(f"unknown projector type {name!r}; valid types are {', '.join(VALID_PROJECTOR_TYPES)}")


@dataclass
class ProjectorConfig(Serializable):
    """Maps vision features to the LM width. `type` is one of VALID_PROJECTOR_TYPES: "linear",
    "mlp{N}x_gelu", "merge2x2_mlp{N}x_gelu" (2x2 space-to-depth, then the MLP), or a resampler of Q
    learned queries, "qwen_resampler{Q}q" / "perceiver{Q}q" (models/projectors.py, models/resampler.py)."""

    type: str = "mlp2x_gelu"
    in_dim: int = 1024
    out_dim: int = 4096
    bias: bool = True

    def __post_init__(self) -> None:
        parse_projector_type(self.type)
        require(self.in_dim > 0 and self.out_dim > 0,
                 f"projector dims must be positive, got in_dim={self.in_dim}, out_dim={self.out_dim}")

    @property
    def spec(self) -> ProjectorSpec:
        """The parsed type: family, depth, 2x2 merge, resampler queries."""
        return parse_projector_type(self.type)
