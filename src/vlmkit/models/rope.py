"""Rotary position embeddings (RoPE) and the scaling variants checkpoints use.

RoPE rotates channel pairs (i, i + d/2) of each query/key head by the angle
position * inv_freq[i] (the "rotate half" layout of transformers' Llama).
Scaling variants change inv_freq (and sometimes scale cos/sin):

    default   inv_freq[i] = theta ** (-2i / d)
    linear    inv_freq / factor (position interpolation)
    dynamic   NTK-aware: theta grows with the sequence length once it passes max_position_embeddings
    llama3    low frequencies / factor, high ones kept, a smooth ramp between (Llama 3.1)
    longrope  inv_freq / short_factor[i] or / long_factor[i] by sequence length, cos/sin scaled (Phi-3)
    yarn      interpolation/extrapolation blend by frequency band, cos/sin scaled (YaRN paper, sec. 3)

The formulas follow transformers' modeling_rope_utils.py (the reference these
are tested against). LMConfig.rope_scaling holds transformers' `rope_parameters`
dict minus rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}.

M-RoPE (Qwen2-VL, arXiv:2409.12191 sec. 2.1): with `mrope_section` in rope_scaling,
e.g. {"rope_type": "default", "mrope_section": [16, 24, 24]}, position_ids may be
(3, B, T) temporal/height/width positions; frequency i of the rotary_dim / 2 takes its
angle from axis k when it lies in the k-th section (sections cycling t, h, w), as
transformers' Qwen2VLRotaryEmbedding.recomposition_frequencies does. Text tokens carry
the same position on all three axes, which is plain RoPE.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn

from vlmkit.config import LMConfig

# Types whose scaling is anchored at the pre-training context length.
_ANCHORED = ("llama3", "yarn", "longrope")


def rope_parameters(cfg: LMConfig) -> dict[str, Any]:
    """cfg.rope_scaling with `rope_type` set (legacy key `type` accepted) and, for llama3, yarn and
    longrope, `original_max_position_embeddings` defaulting to cfg.max_position_embeddings."""
    params = dict(cfg.rope_scaling or {})
    params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
    if params["rope_type"] in _ANCHORED:
        params.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
    return params


def _required(params: dict[str, Any], key: str) -> Any:
    if params.get(key) is None:
        raise ValueError(f"rope_scaling of type {params['rope_type']!r} needs {key!r}; got {params}")
    return params[key]


def _exponents(dim: int) -> torch.Tensor:
    """(dim // 2,) the exponents 2i / dim of the default RoPE frequencies."""
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _default(cfg: LMConfig, params: dict, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    return 1.0 / (cfg.rope_theta ** _exponents(cfg.rotary_dim)), 1.0


def _linear(cfg: LMConfig, params: dict, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    inv_freq, _ = _default(cfg, params, seq_len)
    return inv_freq / _required(params, "factor"), 1.0


def _dynamic(cfg: LMConfig, params: dict, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """NTK-aware scaling: theta' = theta * (factor * L / L_max - (factor - 1)) ** (d / (d - 2)), L >= L_max.

    seq_len may be a 0-dim tensor (as RotaryEmbedding passes it); the arithmetic
    then runs in fp32, exactly as transformers' forward pass does.
    """
    factor = _required(params, "factor")
    dim, max_len = cfg.rotary_dim, cfg.max_position_embeddings
    if seq_len is None:
        seq_len = max_len
    elif isinstance(seq_len, torch.Tensor):
        seq_len = torch.clamp(seq_len, min=max_len)
    else:
        seq_len = max(seq_len, max_len)
    base = cfg.rope_theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim)), 1.0


def _llama3(cfg: LMConfig, params: dict, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Llama 3.1: wavelengths above old_len / low_freq_factor are divided by factor, those below
    old_len / high_freq_factor kept, and the band between interpolated linearly in old_len / wavelength."""
    inv_freq, _ = _default(cfg, params, seq_len)
    factor = _required(params, "factor")
    low, high = _required(params, "low_freq_factor"), _required(params, "high_freq_factor")
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled), 1.0


def _longrope(cfg: LMConfig, params: dict, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Phi-3 LongRoPE: per-frequency factors, long_factor once seq_len > original_max_position_embeddings.

    The cos/sin scale is sqrt(1 + ln(factor) / ln(original)) with factor = max / original
    unless the checkpoint gives `factor` or `attention_factor`.
    """
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or cfg.max_position_embeddings / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    use_long = seq_len is not None and seq_len > original
    ext = _required(params, "long_factor" if use_long else "short_factor")
    if len(ext) != cfg.rotary_dim // 2:
        raise ValueError(f"longrope {'long' if use_long else 'short'}_factor has {len(ext)} entries; "
                         f"rotary_dim {cfg.rotary_dim} needs {cfg.rotary_dim // 2}")
    ext = torch.tensor(ext, dtype=torch.float32)
    return 1.0 / (ext * cfg.rope_theta ** _exponents(cfg.rotary_dim)), float(attention)


def _yarn(cfg: LMConfig, params: dict, seq_len: int | torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, sec. 3.2-3.4): dimensions rotating fewer than beta_slow times over the original
    context are interpolated (divided by factor), more than beta_fast times extrapolated (kept), a linear ramp
    between; cos/sin scale 0.1 ln(factor) + 1 (or the mscale / mscale_all_dim ratio, DeepSeek style)."""
    dim, base = cfg.rotary_dim, cfg.rope_theta
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or cfg.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def dim_at(rotations: float) -> float:
        """The (fractional) dimension index whose wavelength fits `rotations` times into the original context."""
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_at(beta_fast), dim_at(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (dim/2,)
    extrapolate = 1 - ramp  # 1 = keep the original frequency, 0 = fully interpolated
    pos_freqs = base ** _exponents(dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention)


_INIT: dict[str, Callable[[LMConfig, dict, Any], tuple[torch.Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "llama3": _llama3,
    "longrope": _longrope,
    "yarn": _yarn,
}


def rope_inv_freq(cfg: LMConfig, seq_len: int | torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq (rotary_dim // 2,) in fp32, attention scaling applied to cos/sin).

    seq_len matters only to `dynamic` (the length the frequencies are stretched
    to) and `longrope` (short or long factors); None means "at model creation".
    """
    params = rope_parameters(cfg)
    kind = params["rope_type"]
    if kind not in _INIT:
        raise ValueError(f"rope type {kind!r} unknown; valid: {sorted(_INIT)}")
    return _INIT[kind](cfg, params, seq_len)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin tables for given positions.

    The frequency tables are plain fp32 attributes rather than buffers so that
    `model.to(torch.bfloat16)` cannot round them; they follow position_ids' device.
    `dynamic` and `longrope` pick their frequencies per call from the largest
    position, with transformers' rules (modeling_rope_utils.dynamic_rope_update):
    dynamic recomputes when the length grows past every length seen so far and
    returns to the original table once a call is shorter than max_position_embeddings;
    longrope uses the long factors whenever max position + 1 > original_max_position_embeddings.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        params = rope_parameters(cfg)
        self.rope_type = params["rope_type"]
        self.inv_freq, self.attention_scaling = rope_inv_freq(cfg)  # (rotary_dim/2,) fp32
        self.original_inv_freq = self.inv_freq
        self.original_max_len = cfg.max_position_embeddings
        self.max_len_seen = cfg.max_position_embeddings  # dynamic: the length inv_freq was stretched to
        self.mrope_section = params.get("mrope_section")  # M-RoPE: frequencies per t/h/w axis, or None
        if self.mrope_section is not None:
            self.mrope_section = [int(n) for n in self.mrope_section]
            if sum(self.mrope_section) != cfg.rotary_dim // 2 or min(self.mrope_section) < 0:
                raise ValueError(f"mrope_section {self.mrope_section} must be non-negative and sum to rotary_dim / 2 "
                                 f"= {cfg.rotary_dim // 2}, the number of rotary frequencies")
        if self.rope_type == "longrope":
            self.long_threshold = params["original_max_position_embeddings"]
            self.long_inv_freq, _ = rope_inv_freq(cfg, seq_len=self.long_threshold + 1)

    def _follow(self, device: torch.device) -> None:
        """Move the frequency tables to device (once, on the first call after the model moved)."""
        if self.inv_freq.device != device:
            for name in ("inv_freq", "original_inv_freq", "long_inv_freq"):
                if hasattr(self, name):
                    setattr(self, name, getattr(self, name).to(device))

    def _current_inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.rope_type == "longrope":
            seq_len = int(position_ids.max()) + 1
            return self.long_inv_freq if seq_len > self.long_threshold else self.original_inv_freq
        if self.rope_type == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_len_seen:  # grow: stretch to the new length
                inv_freq, _ = rope_inv_freq(self.cfg, seq_len=torch.tensor(seq_len))
                self.inv_freq = inv_freq.to(position_ids.device)
                self.max_len_seen = seq_len
            elif seq_len < self.original_max_len < self.max_len_seen:  # short again: back to the original
                self.inv_freq = self.original_inv_freq
                self.max_len_seen = self.original_max_len
        return self.inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, rotary_dim) for position_ids (B, T), or for (3, B, T) t/h/w positions
        with M-RoPE (rope_scaling["mrope_section"]), cast to dtype."""
        self._follow(position_ids.device)
        inv_freq = self._current_inv_freq(position_ids)  # (rotary_dim/2,)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, rotary_dim/2) or (3, B, T, rotary_dim/2)
        if position_ids.dim() == 3:
            freqs = self._mrope_select(freqs)  # (B, T, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def _mrope_select(self, freqs: torch.Tensor) -> torch.Tensor:
        """(3, B, T, rotary_dim/2) angles per axis -> (B, T, rotary_dim/2): section k from axis k % 3."""
        if self.mrope_section is None or freqs.shape[0] != 3:
            raise ValueError(f"position_ids of shape {tuple(freqs.shape[:-1])} need M-RoPE: 3 axes (t, h, w) and "
                             "rope_scaling['mrope_section']; pass (B, T) positions for plain RoPE")
        sections = freqs.split(self.mrope_section, dim=-1)
        return torch.cat([part[k % 3] for k, part in enumerate(sections)], dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """(s, s) -> (-s, s) on the two halves of the last dimension: the sin table apply_rotary takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x (..., hd) by cos and signed_sin(sin) (..., rotary_dim),
    broadcast over the leading dimensions.

    transformers computes x * cos + rotate_half(x) * sin with rotate_half(x1, x2) = (-x2, x1).
    Rolling x by half gives (x2, x1); times (-s, s) that is the same product, bit for bit
    (negation is exact), in one op instead of three.
    """
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + x.roll(rd // 2, dims=-1) * sin_signed
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + x_rot.roll(rd // 2, dims=-1) * sin_signed, x_pass), dim=-1)
