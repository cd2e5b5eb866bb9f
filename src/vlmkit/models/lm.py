"""The language model: one Llama-family decoder for Llama, Mistral, Qwen2, Phi-3 and SmolLM2.

    x = embed(ids)                                   # (B, T, C)
    for each layer:
        x = x + attn(rms_norm(x))                    # RoPE, grouped-query attention, KV cache
        x = x + down(silu(gate(h)) * up(h)), h = rms_norm(x)
    logits = lm_head(rms_norm(x))                    # (B, T, V)

The architectures differ only in data (LMConfig): qkv bias (Qwen2), sliding
window (Mistral), tied embeddings (SmolLM2), RoPE scaling (Phi-3 longrope,
Llama-3 ...), a mixture of experts in place of the MLP (Qwen2-MoE, DeepSeek-V2/V3,
models/moe.py), latent attention in place of attention (DeepSeek-V2/V3, models/mla.py).
Query/key/value and gate/up projections are stored fused (`qkv`, `gate_up`):
one matmul instead of three or two, which is faster on a CPU; weights/ splits
and joins them for each checkpoint format.

Run `python -m vlmkit.models.lm` for a shape check on a tiny random model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import LMConfig
from vlmkit.models.activations import ACTIVATIONS
from vlmkit.models.rope import RotaryEmbedding, apply_rotary, signed_sin

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (B, T, V), (B, k, V) for logits_to_keep=k, None for loss_only
    loss: torch.Tensor | None = None


class KVCache:
    """Preallocated key/value buffers for every layer, filled left to right.

    `length` tokens are stored; a forward pass writes its T new keys/values at
    [length, length + T) in every layer and then calls `advance(T)`.

    Every buffer is (batch, ..., positions, ...): rows on dim 0, positions on dim 2
    ((B, nkv, S, hd) for attention, (B, 1, S, r) and (B, 1, S, dr) for latent
    attention). The row operations work on those two dims only, so they serve both:
    select (keep or reorder rows), join (append other caches' rows, right-aligned),
    trim (drop leading padding columns) and grow (more capacity). A subclass with
    per-row state of its own (models/qwen2_vl.py's MRopeCache) carries it by
    overriding `_take_rows`, which select and join call.
    """

    def __init__(self, cfg: LMConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        k_shape = v_shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        if cfg.kv_lora_rank:  # latent attention caches its latent and shared RoPE key (models/mla.py)
            k_shape = (batch_size, 1, max_len, cfg.kv_lora_rank)
            v_shape = (batch_size, 1, max_len, cfg.qk_rope_head_dim)
        self.keys = [torch.zeros(k_shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(v_shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) after the cached tokens; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions but {end} are needed; "
                             "create the cache with a larger max_len")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (B',) in that order (e.g. drop finished sequences)."""
        self.keys = [k[rows] for k in self.keys]  # (B', ..., max_len, ...) each
        self.values = [v[rows] for v in self.values]
        self._take_rows([(self, rows)])

    def join(self, mask: torch.Tensor, others: Sequence[tuple[KVCache, torch.Tensor]], room: int = 1) -> torch.Tensor:
        """Append the rows of `others` after this cache's rows; return the joined mask (B, W).

        mask (b, length) marks this cache's real tokens (1) and left padding (0), and
        each other cache comes with its own. Every part is cut to the columns one of its
        rows uses, and every row is right-aligned to W, the widest part, with left
        padding. The joined cache holds W tokens and has room for `room` more.
        """
        parts = [(self, mask), *others]
        spans = []  # (first used column, length) of each part
        for cache, part_mask in parts:
            if part_mask.shape != (cache.batch_size, cache.length):
                raise ValueError(f"a mask {tuple(part_mask.shape)} came with a cache of {cache.batch_size} rows "
                                 f"and {cache.length} positions; pass each cache with its (rows, length) mask")
            if type(cache) is not type(self) or _layout(cache) != _layout(self):
                raise ValueError(f"cannot join a {type(cache).__name__} {_layout(cache)} to a {type(self).__name__} "
                                 f"{_layout(self)} (layers, key and value shapes past rows and positions, "
                                 "dtype): join caches of one model")
            spans.append((leading_padding(part_mask), cache.length))
        width = max(end - first for first, end in spans)
        sizes = [cache.batch_size for cache, _ in parts]
        joined = mask.new_zeros(sum(sizes), width)  # (B, W)
        start = 0
        for (_, part_mask), (first, end), b in zip(parts, spans, sizes):
            joined[start:start + b, width - (end - first):] = part_mask[:, first:]
            start += b

        def join_layer(buffers: list[torch.Tensor]) -> torch.Tensor:
            """One layer's buffers (b_i, ..., S_i, ...) of every part -> (B, ..., W + room, ...)."""
            k = buffers[0]
            out = k.new_zeros(sum(sizes), k.shape[1], width + room, k.shape[3])  # (B, ..., W + room, ...)
            row = 0
            for buffer, (first, end), b in zip(buffers, spans, sizes):
                out[row:row + b, :, width - (end - first):width] = buffer[:, :, first:end]
                row += b
            return out

        self.keys = [join_layer([c.keys[i] for c, _ in parts]) for i in range(len(self.keys))]
        self.values = [join_layer([c.values[i] for c, _ in parts]) for i in range(len(self.values))]
        self.length, self.max_len = width, width + room
        self._take_rows([(cache, None) for cache, _ in parts])
        return joined

    def trim(self, mask: torch.Tensor) -> torch.Tensor:
        """Drop the leading columns that are padding in every row; return the mask (B, L') that is left.

        mask (B, length) marks the real tokens (1) and left padding (0). The buffers
        become views that start past the dropped columns, so capacity shrinks by as much.
        """
        if mask.shape != (self.batch_size, self.length):
            raise ValueError(f"the mask is {tuple(mask.shape)} but the cache holds {self.batch_size} rows of "
                             f"{self.length} positions; pass the mask of the cached tokens")
        first = leading_padding(mask)
        if first:
            self.keys = [k[:, :, first:] for k in self.keys]  # (B, ..., max_len - first, ...) each
            self.values = [v[:, :, first:] for v in self.values]
            self.length -= first
            self.max_len -= first
        return mask[:, first:]

    def grow(self, n: int) -> None:
        """Add room for n more positions (copies the buffers)."""
        if n < 1:
            raise ValueError(f"grow adds positions to the cache: n must be >= 1, got {n}")
        self.keys = [F.pad(k, (0, 0, 0, n)) for k in self.keys]  # (B, ..., max_len + n, ...) each
        self.values = [F.pad(v, (0, 0, 0, n)) for v in self.values]
        self.max_len += n

    def _take_rows(self, sources: list[tuple[KVCache, torch.Tensor | None]]) -> None:
        """Hook for per-row state besides keys and values: this cache's rows are now, in order, the rows
        `rows` (all rows when None) of each source cache (`self` among them, already changed only in its keys
        and values). KVCache has no such state; a subclass that has some overrides this."""


def _layout(cache: KVCache) -> tuple:
    """What two caches must share to be joined: layer count, the key and value dims besides rows and positions,
    and the dtype."""
    k, v = cache.keys[0], cache.values[0]
    return len(cache.keys), (k.shape[1], k.shape[3]), (v.shape[1], v.shape[3]), k.dtype


def leading_padding(mask: torch.Tensor) -> int:
    """How many leading columns of mask (B, L) are 0 (padding) in every row."""
    return int((mask.cumsum(dim=1) == 0).sum(dim=1).min())


def cache_dtype(cfg: LMConfig, weight: torch.Tensor) -> torch.dtype:
    """The KV cache's type for a model whose weights are like `weight`: fp32 on a CPU when the weights are bf16
    or fp16, the weights' type otherwise. The CPU attention kernels for half types are several times slower
    than fp32's: with a 12 x 768 LM in bf16, a decoding step of 8 rows over 200 cached positions took 39.7 ms
    with a bf16 cache and 27.9 ms with an fp32 one (bench/bench_dtype.py). The stored keys and values are the
    same numbers (bf16 widens to fp32 exactly); the queries and the attention run in fp32. Latent attention
    (mla.py) multiplies its cache by its weights, so keeps their type."""
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16) and not cfg.kv_lora_rank:
        return torch.float32
    return weight.dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as Llama's reference does."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op for the common fp32 case
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias)
        self.out = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.nh + 2 * self.nkv, self.hd)  # (B, T, nh + 2 nkv, hd)
        qk = apply_rotary(qkv[:, :, : self.nh + self.nkv], cos, sin_signed)  # queries and keys in one pass
        q = qk[:, :, : self.nh].transpose(1, 2)  # (B, nh, T, hd)
        k = qk[:, :, self.nh:].transpose(1, 2)  # (B, nkv, T, hd)
        v = qkv[:, :, self.nh + self.nkv:].transpose(1, 2)  # (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd), S = cached + T
            q = q.to(k.dtype)  # a CPU cache stays fp32 under bf16 weights (cache_dtype)
        causal_only = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal_only,
                                           enable_gqa=self.nkv != self.nh)  # (B, nh, T, hd)
        return self.out(y.to(x.dtype).transpose(1, 2).reshape(B, T, self.nh * self.hd))


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one matmul (`gate_up`)."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (..., hidden) each
        return self.down(self.act(gate) * up)


class MLP(SwiGLU):
    """The decoder's SwiGLU; intermediate_size defaults to cfg.intermediate_size (an MoE's shared expert
    passes its own)."""

    def __init__(self, cfg: LMConfig, intermediate_size: int | None = None) -> None:
        super().__init__(cfg.hidden_size, intermediate_size or cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.kv_lora_rank:
            from vlmkit.models.mla import LatentAttention  # here, not at the top: mla.py builds on this file

            self.attn = LatentAttention(cfg, layer)
        else:
            self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer):
            from vlmkit.models.moe import MoE  # here, not at the top: moe.py builds on this file's MLP

            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class CausalLM(nn.Module):
    """Decoder-only LM with a head. forward takes ids or embeddings and returns CausalLMOutput."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # the head reuses the embedding: N(0, 0.02), as transformers and OPT initialise
            nn.init.normal_(self.embed.weight, std=0.02)  # it; nn.Embedding's N(0, 1) gives logits ~sqrt(C) wide
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.norm.weight  # the model's float type, also when the embedding is quantized (--quantize gguf)
        return KVCache(self.cfg, batch_size, max_len, dtype=cache_dtype(self.cfg, p), device=p.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        inputs_embeds: torch.Tensor | None = None,  # (B, T, C)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, 0 = padding; S = cached + T
        position_ids: torch.Tensor | None = None,  # (B, T), or (3, B, T) t/h/w positions with M-RoPE
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,  # (B, T), IGNORE_INDEX where no loss is taken
        logits_to_keep: int = 0,  # 0 = all positions, k = only the last k (generation needs 1)
        loss_only: bool = False,  # with labels: project only the labelled positions, return no logits
        segment_ids: torch.Tensor | None = None,  # (B, T) packed samples: a token sees only its own segment
    ) -> CausalLMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if segment_ids is not None and (past or segment_ids.shape != x.shape[:2]):
            raise ValueError(f"segment_ids must be (B, T) = {tuple(x.shape[:2])} for a forward without a KV cache "
                             f"(packed training); got {tuple(segment_ids.shape)} with {past} cached positions")
        if position_ids is None:
            position_ids = (segment_position_ids(segment_ids) if segment_ids is not None
                            else default_position_ids(attention_mask, past, T, x.device))
        cos, sin = self.rope(position_ids, x.dtype)  # (B, T, rotary_dim) each
        cos, sin = cos.unsqueeze(2), signed_sin(sin).unsqueeze(2)  # (B, T, 1, rotary_dim): broadcast over heads
        mask = attention_bias(attention_mask, past, T, self.cfg.sliding_window, x.device, segment_ids)

        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if loss_only:
            if labels is None:
                raise ValueError("loss_only=True needs labels")
            return CausalLMOutput(logits=None, loss=self.labelled_loss(x, labels))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)


    def labelled_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """causal_lm_loss computed from final hidden states (B, T, C), running lm_head only where a
        next-token label exists. In VLM training most positions (image, prompt) carry IGNORE_INDEX,
        so this skips most of the vocabulary projection and its backward pass; the value is the same."""
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][keep])  # (N, V)
        return F.cross_entropy(logits.float(), targets[keep])


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not IGNORE_INDEX."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def default_position_ids(attention_mask: torch.Tensor | None, past: int, T: int,
                         device: torch.device) -> torch.Tensor:
    """Positions of the T new tokens: count of real tokens before each one (left padding aware)."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).unsqueeze(0)  # (1, T)
    positions = attention_mask.long().cumsum(-1) - 1  # (B, S)
    return positions.clamp(min=0)[:, -T:]


def segment_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) counting from 0 at the start of every run of equal segment ids (packed samples).

        >>> segment_position_ids(torch.tensor([[1, 1, 1, 2, 2, 0]])).tolist()
        [[0, 1, 2, 0, 1, 0]]
    """
    T = segment_ids.shape[-1]
    index = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values  # (B, T) start of each run
    return index - first


def attention_bias(attention_mask: torch.Tensor | None, past: int, T: int,
                   sliding_window: int | None, device: torch.device,
                   segment_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S) where True = may attend; None when plain causal attention will do.

    Query i (absolute position past + i) sees key j when j <= past + i, j is not
    padding, with a sliding window W, past + i - j < W, and, with segment_ids (B, T)
    (packed samples, no cache), segment_ids[i] == segment_ids[j]: block-diagonal causal.
    """
    S = past + T
    needs_window = sliding_window is not None and S > sliding_window
    if attention_mask is None and segment_ids is None and not needs_window and (past == 0 or T == 1):
        return None  # is_causal (T > 1, no cache) or a single query that sees everything
    q = torch.arange(past, S, device=device).unsqueeze(1)  # (T, 1)
    k = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    allowed = k <= q
    if needs_window:
        allowed = allowed & (q - k < sliding_window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (B, 1, T, T)
    if attention_mask is not None:
        if attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but "
                             f"{past} cached + {T} new = {S} are attended")
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        # A fully padded query row (left padding) would give NaN; let it see itself.
        allowed = allowed | _diagonal(T, S, device)
    return allowed


def _diagonal(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T, S) mask letting each new query attend to its own key."""
    eye = torch.zeros(T, S, dtype=torch.bool, device=device)
    eye[torch.arange(T, device=device), torch.arange(S - T, S, device=device)] = True
    return eye[None, None]


if __name__ == "__main__":
    cfg = LMConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    model = CausalLM(cfg)
    ids = torch.randint(0, 100, (2, 7))
    print("logits", tuple(model(ids).logits.shape))  # (2, 7, 100)
