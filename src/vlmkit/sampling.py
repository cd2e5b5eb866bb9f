"""Sampling the next token: the generation settings and transformers' logits processors.

Processors run in transformers' order (generation/utils.py, _get_logits_processor):
repetition penalty, temperature, top-k, top-p; temperature 0 means greedy (argmax).
Every row may carry its own seeded torch.Generator, so a row's draws do not depend on
the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop. temperature 0 means greedy (argmax)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy; otherwise logits are divided by it before sampling
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens with probability >= top_p; 1 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt + output; 1 = off
    stop_token_ids: tuple[int, ...] = ()  # a row stops when it samples one (the tokenizer's end ids are added)
    # A row stops when its text contains one, or when it samples one that is a special token such as
    # "<|im_end|>" (text is decoded without special tokens). Needs a tokenizer.
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None  # None = a fresh random seed per call

    def __post_init__(self) -> None:
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = (self.stop_token_ids,)
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)
        checks = [
            (is_int(self.max_new_tokens) and self.max_new_tokens > 0,
             f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (is_int(self.top_k) and self.top_k >= 0, f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"),
            (all(is_int(t) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be non-negative ints, got {self.stop_token_ids}"),
            (all(isinstance(s, str) and s for s in self.stop_strings),
             f"stop_strings must be non-empty strings, got {self.stop_strings}"),
            (self.seed is None or is_int(self.seed), f"seed must be an int or None, got {self.seed!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def is_int(value: Any) -> bool:
    """True for ints, not bools (a bool is an int in Python but never a valid count or id here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, sec. 4.1) as transformers applies it: the logit of every
    token in previous_ids is divided by penalty if positive and multiplied by it if negative.

    logits (B, V); previous_ids (B, L) with negative entries meaning padding (ignored).
    """
    B, V = logits.shape
    ids = torch.where(previous_ids < 0, V, previous_ids.long())  # padding -> a spare column, dropped below
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, ids, True)[:, :V]  # (B, V)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return torch.where(seen, penalized, logits)


def process_logits(logits: torch.Tensor, cfg: GenerationConfig,
                   previous_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The scores tokens are drawn from: fp32 logits (B, V) after repetition penalty, temperature,
    top-k and top-p, removed tokens at -inf. For greedy (temperature 0) only the penalty applies:
    the rest cannot change the argmax."""
    scores = logits.float()  # (B, V)
    if cfg.repetition_penalty != 1.0 and previous_ids is not None:
        scores = apply_repetition_penalty(scores, previous_ids, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return scores
    scores = scores / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(scores, min(cfg.top_k, scores.shape[-1])).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))  # ties with the k-th are kept
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_scores.softmax(dim=-1)
        mass_above = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=-1)  # (B, V)
        drop_sorted = mass_above >= cfg.top_p  # the most likely token always stays (its mass_above is 0)
        drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_next(logits: torch.Tensor, cfg: GenerationConfig,
                generator: torch.Generator | Sequence[torch.Generator] | None = None,
                previous_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token of every row: (B,) ids from logits (B, V).

    previous_ids (B, L) are the ids already in prompt + output (for the repetition
    penalty; negative = padding). generator is one torch.Generator for the whole
    batch or one per row (rows then draw independently of each other).
    """
    scores = process_logits(logits, cfg, previous_ids)  # (B, V)
    if cfg.temperature == 0:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)  # (B, V)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"got {len(generator)} generators for {probs.shape[0]} rows; pass one per row or one")
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])


def sample_rows(logits: torch.Tensor, cfgs: Sequence[GenerationConfig],
                generators: Sequence[torch.Generator | None],
                previous_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token of rows that each have their own settings: (B,) ids from logits (B, V).

    cfgs[i] and generators[i] (None for a greedy row) belong to row i. Rows with the
    same temperature, top-k, top-p and repetition penalty go through sample_next
    together; every operation there is row by row, so a row's token is what
    sample_next gives for it alone. previous_ids (B, L), negative = padding, is
    needed only when some row has a repetition penalty.
    """
    if not len(cfgs) == len(generators) == logits.shape[0]:
        raise ValueError(f"got {logits.shape[0]} rows of logits, {len(cfgs)} configs and {len(generators)} "
                         "generators; pass one config and one generator (or None) per row")
    groups: dict[tuple[float, int, float, float], list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault((cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty), []).append(i)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)  # (B,)
    for rows in groups.values():
        cfg = cfgs[rows[0]]
        if cfg.repetition_penalty != 1.0 and previous_ids is None:
            raise ValueError("a row has a repetition penalty; pass previous_ids (B, L) for the batch")
        # One group (generate's batch, or a server batch with one setting): every row, without gathering them.
        index = slice(None) if len(rows) == len(cfgs) else torch.tensor(rows, device=logits.device)
        previous = previous_ids[index] if cfg.repetition_penalty != 1.0 else None
        group_generators = [generators[i] for i in rows] if cfg.temperature != 0 else None
        tokens[index] = sample_next(logits[index], cfg, group_generators, previous)
    return tokens


def row_generators(cfg: GenerationConfig, n: int, device: torch.device | None = None) -> list[torch.Generator] | None:
    """One generator per row on device (the model's: the logits it draws from are there; None = torch's
    default device), all seeded with cfg.seed (or one fresh random seed); None for greedy. The same seed
    draws the same tokens on one device type, not across types (each has its own generator algorithm)."""
    if cfg.temperature == 0:
        return None
    seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    return [torch.Generator(device=device).manual_seed(seed) for _ in range(n)]
