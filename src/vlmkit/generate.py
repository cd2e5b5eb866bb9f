"""Text generation with a KV cache: sampling, batching, stop conditions and streaming.

    cfg = GenerationConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    result = generate(model, tok.encode("Hello"), cfg, tokenizer=tok)
    result.texts[0], result.finish_reasons[0]           # "...", "stop" or "length"
    for piece in stream(model, tok.encode("Hello"), cfg, tokenizer=tok):
        print(piece, end="", flush=True)

generate and stream take the same arguments: the prompt (one list of ids or a (T,) tensor, or a batch: a
list of id lists or a (B, T) tensor, of which stream takes a batch of one), the GenerationConfig, then by
keyword attention_mask, prefill_inputs and tokenizer.

The model needs only `new_cache(batch_size, max_len)` and a forward taking
input_ids, attention_mask (B, S), cache and logits_to_keep (CausalLM and VLM
both have them). Prompts of different lengths are left-padded; the prompt goes
through the model once (prefill, the only pass that gets prefill inputs such as
pixel_values), then each step is decoding's step, the one the server's batcher
runs too (decode_step): it samples every row's next token, pushes it into its Row
(stop rules), drops the rows that finished from the batch and the cache
(KVCache.select), and feeds one token per remaining row, reusing the cache.
generate runs the step's two halves (advance, next_logits) itself so that a
stream hands out each step's text before the next forward pass.
Every row samples from its own generator seeded with cfg.seed, so a row's output
does not depend on the rest of the batch: batched generation equals running
each prompt alone.

Phi-3's longrope is the one exception to "prefill once": keys cached with the
short RoPE factors are wrong once the model switches to the long ones, so at
the step where the (padded) sequence first grows past
original_max_position_embeddings the cache is dropped and the whole sequence
recomputed with the prefill inputs, the rule of transformers' Phi-3
(modeling_phi3.py, Phi3ForCausalLM.prepare_inputs_for_generation). That
recompute takes the place of the step's forward pass.

`generate_naive` runs the full sequence through the model at every step with no
cache and keeps finished rows in the batch (fed padding): slow and plainly
right, kept to check the fast path.

A row stops at cfg.stop_token_ids and at the tokenizer's end ids (end_ids: for a
model load.py loaded, its eos ids and the special tokens its chat template writes
after an assistant turn, e.g. `<|im_end|>`), at a stop string in its decoded text,
or after max_new_tokens. Text is decoded without special tokens, so a stop string
that is one special token (`<|im_end|>`) becomes a stop id (special_token_id).

Sampling (settings, logits processors, seeded draws) lives in sampling.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from vlmkit.decoding import DecodeBatch, advance, left_pad, model_device, next_logits, prefill_batch
from vlmkit.sampling import GenerationConfig, is_int, row_generators, sample_next

# Prompts: a (B, T) tensor (with an optional attention_mask) or one list of ids per prompt; or one prompt, a
# list of ids or a (T,) tensor (a batch of one).
Prompts = torch.Tensor | Sequence[Sequence[int]] | Sequence[int]


@dataclass
class GenerationResult:
    """Per prompt: generated ids (no prompt, no padding, no stop token), why it ended, and the text.

    After a stop string, token_ids still holds every sampled token (the last one
    completed the stop string) while texts ends before the stop string.
    """

    token_ids: list[list[int]]
    finish_reasons: list[str]  # "stop" (stop token or stop string) or "length" (max_new_tokens reached)
    texts: list[str] | None = None  # decoded text when a tokenizer was given


# ----------------------------------------------------------------------------- text and stops


class _TextTracker:
    """Turns one row's tokens into text pieces: only whole characters, and nothing from a stop string on.

    Each push decodes a short window ids[prefix:] and emits what it adds past
    ids[prefix:read] (decoding a window rather than single tokens keeps the spaces
    that some tokenizers drop at the start of a decode). Text ending in U+FFFD
    waits: the rest of a UTF-8 character may still come. Text that could be the
    start of a stop string waits too, until it is known not to be one.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...]) -> None:
        self.decode, self.stop_strings = decode, stop_strings
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.held = ""  # decoded text that might begin a stop string
        self.stopped = False  # a stop string was found; nothing more is emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self._filter(text[len(done):])

    def finish(self) -> str:
        """The text still held back at the end of generation (an unfinished character is kept as U+FFFD)."""
        rest = self.decode(self.ids[self.prefix:])[len(self.decode(self.ids[self.prefix:self.read])):]
        text = self._filter(rest)
        if not self.stopped:
            text, self.held = text + self.held, ""
        return text

    def _filter(self, new: str) -> str:
        if self.stopped:
            return ""
        text = self.held + new
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = max((n for s in self.stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]


class Row:
    """One prompt's progress: its settings and generator, sampled ids, text pieces, finish reason.

    push(token) applies the stop rules (stop ids, stop strings, max_new_tokens). decode_step samples
    each row with its own config and generator (None when greedy), for generate and the serving
    batcher (serve/batcher.py) alike.
    """

    def __init__(self, prompt: list[int], cfg: GenerationConfig, stop_ids: set[int], tokenizer: Any,
                 generator: torch.Generator | None = None) -> None:
        self.prompt, self.config, self.stop_ids, self.generator = prompt, cfg, stop_ids, generator
        self.ids: list[int] = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.text = None
        if tokenizer is not None:
            self.text = _TextTracker(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), cfg.stop_strings)

    def push(self, token_id: int) -> None:
        if token_id in self.stop_ids:
            self._finish("stop")
            return
        self.ids.append(token_id)
        if self.text is not None:
            self._emit(self.text.push(token_id))
            if self.text.stopped:
                self._finish("stop")
                return
        if len(self.ids) >= self.config.max_new_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        if self.text is not None:
            self._emit(self.text.finish())
            reason = "stop" if self.text.stopped else reason
        self.finish_reason = reason

    def _emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)


def _make_rows(input_ids: Prompts, attention_mask: torch.Tensor | None, cfg: GenerationConfig,
               tokenizer: Any, device: torch.device | None) -> list[Row]:
    """Unpadded prompts from a (B, T) tensor (+ mask) or lists of ids, or from one prompt (a (T,) tensor or a
    list of ids), one Row each (with row_generators's generator on device, the model's)."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    elif not isinstance(input_ids, torch.Tensor) and input_ids and all(is_int(t) for t in input_ids):
        input_ids = [input_ids]  # one prompt
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (length,) or (batch, length), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if attention_mask is None:
            prompts = input_ids.tolist()
        else:
            prompts = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a tensor input_ids; pass lists of ids without padding")
        if not all(isinstance(p, (Sequence, torch.Tensor)) for p in input_ids):
            raise ValueError("input_ids must be one prompt (a list of ids or a (T,) tensor) or a batch (a list "
                             "of id lists or a (B, T) tensor)")
        prompts = [[int(t) for t in p] for p in input_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (got an empty batch or an empty prompt)")
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode text; pass tokenizer=")
    stop_ids = set(cfg.stop_token_ids) | set(end_ids(tokenizer))
    text_stops = []
    for text in cfg.stop_strings:
        special = special_token_id(tokenizer, text)
        if special is None:
            text_stops.append(text)
        else:
            stop_ids.add(special)
    if len(text_stops) < len(cfg.stop_strings):
        cfg = dataclasses.replace(cfg, stop_strings=tuple(text_stops))
    generators = row_generators(cfg, len(prompts), device) or [None] * len(prompts)
    return [Row(p, cfg, stop_ids, tokenizer, g) for p, g in zip(prompts, generators)]


def end_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a row besides cfg.stop_token_ids: a vlmkit tokenizer's end_token_ids (the chat template's
    turn end and the eos ids, set when its model was loaded: load.py), else the tokenizer's eos_token_id."""
    ids = getattr(tokenizer, "end_token_ids", None)
    if ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        ids = [eos] if is_int(eos) else eos or []
    return tuple(ids)


def special_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of text when it is one special token of the tokenizer (e.g. `<|im_end|>`), else None.

    Text is matched on decoded text without special tokens, so a stop string that is a special token is a
    stop id instead; one that has a special token inside other text could never match, and is refused.
    """
    ids = tokenizer.encode(text)
    special = [i for i in ids if tokenizer.decode([i], skip_special_tokens=True) == "" and tokenizer.decode([i]) != ""]
    if not special:
        return None
    if len(ids) > 1:
        names = ", ".join(tokenizer.decode([i]) for i in special)
        raise ValueError(f"stop string {text!r} mixes special tokens ({names}) with other text; give each special "
                         "token as a stop string of its own")
    return special[0]


def new_row(prompt: Sequence[int], cfg: GenerationConfig, tokenizer: Any = None,
            device: torch.device | None = None) -> Row:
    """One prompt's Row (checked like generate's prompts; the tokenizer's end ids join the stop ids), its
    sampling generator on device (the model's; None = torch's default device)."""
    return _make_rows([prompt], None, cfg, tokenizer, device)[0]


def result_of(rows: list[Row], with_text: bool) -> GenerationResult:
    """The GenerationResult of finished rows (texts when with_text, i.e. a tokenizer decoded them)."""
    return GenerationResult(token_ids=[r.ids for r in rows], finish_reasons=[r.finish_reason for r in rows],
                            texts=["".join(r.pieces) for r in rows] if with_text else None)


def pad_id(tokenizer: Any) -> int:
    """The id left padding is written with (masked out, so any id works): the tokenizer's pad id, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0


def _long_rope_threshold(model: nn.Module) -> int | None:
    """original_max_position_embeddings of a longrope (Phi-3) language model, where its RoPE switches
    from the short to the long factors; None for every other model. A VLM's LM is model.lm."""
    lm = getattr(model, "lm", model)
    return getattr(getattr(lm, "rope", None), "long_threshold", None)


# ----------------------------------------------------------------------------- decoding loops


@torch.inference_mode()
def _decode_cached(model: nn.Module, rows: list[Row], cfg: GenerationConfig,
                   prefill_inputs: dict[str, Any], pad_id: int) -> Iterator[None]:
    """KV-cache decoding: prefill, then one step (advance, yield, forward) per yield until every row has finished."""
    max_len = max(len(r.prompt) for r in rows) + cfg.max_new_tokens
    batch = prefill_batch(model, rows, max_len, prefill_inputs, pad_id)
    threshold = _long_rope_threshold(model)
    forward = None
    if threshold is not None:
        forward = partial(_long_rope_forward, model, rows, threshold, max_len, prefill_inputs, pad_id)
    while batch.rows:
        tokens = advance(batch)  # the rows' new text is there now: hand it out before the forward pass
        yield
        if tokens is not None:
            batch.logits = forward(batch, tokens) if forward is not None else next_logits(model, batch, tokens)


def _long_rope_forward(model: nn.Module, rows: list[Row], threshold: int, max_len: int,
                       prefill_inputs: dict[str, Any], pad_id: int, batch: DecodeBatch,
                       tokens: torch.Tensor) -> torch.Tensor:
    """The step's forward pass for a longrope model: the plain one-token pass, except at the step where
    the padded sequence first grows past the threshold, where batch.cache is recomputed (see _recompute)."""
    width = batch.mask.shape[1]
    if batch.cache.length <= threshold < width:
        active = [i for i, r in enumerate(rows) if r.finish_reason is None]
        batch.cache, logits = _recompute(model, rows, active, width, max_len, prefill_inputs, pad_id)
        return logits
    return next_logits(model, batch, tokens)


def _recompute(model: nn.Module, rows: list[Row], active: list[int], width: int, max_len: int,
               prefill_inputs: dict[str, Any], pad_id: int) -> tuple[Any, torch.Tensor]:
    """A fresh cache and the last logits (b, V) of the active rows, from every row's whole sequence.

    Rows are left-padded to width, the current padded length, so active rows keep
    their layout (and positions). Finished rows go through too, because prefill
    inputs such as pixel_values cover the whole batch; they are dropped after.
    """
    ids, mask = left_pad([r.prompt + r.ids for r in rows], pad_id, model_device(model), width)  # (B, S) each
    cache = model.new_cache(len(rows), max_len)
    logits = model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1,
                   **prefill_inputs).logits[:, -1]  # (B, V)
    index = torch.tensor(active, device=ids.device)
    cache.select(index)
    return cache, logits[index]


@torch.inference_mode()
def _decode_naive(model: nn.Module, rows: list[Row], cfg: GenerationConfig,
                  prefill_inputs: dict[str, Any], pad_id: int) -> Iterator[None]:
    """No cache: the whole sequence goes through the model (with prefill inputs) every step;
    finished rows stay in the batch and are fed padding."""
    ids, mask = left_pad([r.prompt for r in rows], pad_id, model_device(model))  # (B, T) each
    generators = [r.generator for r in rows] if cfg.temperature != 0 else None
    while True:
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, **prefill_inputs)
        tokens = sample_next(out.logits[:, -1], cfg, generators, ids.masked_fill(mask == 0, -1))  # (B,)
        live = [r.finish_reason is None for r in rows]
        for row, token, was_live in zip(rows, tokens.tolist(), live):
            if was_live:
                row.push(token)
        yield
        live = torch.tensor([r.finish_reason is None for r in rows], device=ids.device)  # (B,)
        if not bool(live.any()):
            return
        ids = torch.cat([ids, torch.where(live, tokens, pad_id)[:, None]], dim=1)  # (B, S)
        mask = torch.cat([mask, live.long()[:, None]], dim=1)  # (B, S)


# ----------------------------------------------------------------------------- public entry points


def generate(model: nn.Module, input_ids: Prompts, cfg: GenerationConfig | None = None, *,
             attention_mask: torch.Tensor | None = None, prefill_inputs: dict[str, Any] | None = None,
             tokenizer: Any = None) -> GenerationResult:
    """Generate a continuation of every prompt with the KV cache.

    input_ids is a (B, T) tensor (padding marked by attention_mask, any side) or
    a list of id lists; or one prompt, a list of ids or a (T,) tensor (a batch of
    one). prefill_inputs (e.g. pixel_values, image_sizes) go to the first forward
    pass only. With a tokenizer: its pad id pads, its end ids stop a row
    (end_token_ids: a loaded model's eos ids and chat-template turn end), and
    texts are decoded. stream takes the same arguments.
    """
    cfg = cfg or GenerationConfig()
    rows = _make_rows(input_ids, attention_mask, cfg, tokenizer, model_device(model))
    for _ in _decode_cached(model, rows, cfg, prefill_inputs or {}, pad_id(tokenizer)):
        pass
    return result_of(rows, tokenizer is not None)


def generate_naive(model: nn.Module, input_ids: Prompts, cfg: GenerationConfig | None = None, *,
                   attention_mask: torch.Tensor | None = None, prefill_inputs: dict[str, Any] | None = None,
                   tokenizer: Any = None) -> GenerationResult:
    """Same as generate, without a cache (reference path; prefill inputs go to every forward pass)."""
    cfg = cfg or GenerationConfig()
    rows = _make_rows(input_ids, attention_mask, cfg, tokenizer, model_device(model))
    for _ in _decode_naive(model, rows, cfg, prefill_inputs or {}, pad_id(tokenizer)):
        pass
    return result_of(rows, tokenizer is not None)


class TextStream:
    """Iterator over the text pieces of one generation; `result` is set once it is exhausted."""

    def __init__(self, steps: Iterator[None], row: Row) -> None:
        self._steps, self._row, self._sent = steps, row, 0
        self.result: GenerationResult | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while self._sent == len(self._row.pieces):
            if self.result is not None:
                raise StopIteration
            try:
                next(self._steps)
            except StopIteration:
                self.result = result_of([self._row], with_text=True)
        self._sent += 1
        return self._row.pieces[self._sent - 1]


def stream(model: nn.Module, input_ids: Prompts, cfg: GenerationConfig | None = None, *,
           attention_mask: torch.Tensor | None = None, prefill_inputs: dict[str, Any] | None = None,
           tokenizer: Any = None) -> TextStream:
    """Generate for one prompt, yielding text as it becomes final. The arguments are generate's; the prompt
    is one (a list of ids, a (T,) tensor, or a batch of one) and the tokenizer is required.

    Pieces hold whole characters only and stop before a stop string; joined, they
    equal generate(...).texts[0].
    """
    if tokenizer is None:
        raise ValueError("stream needs a tokenizer to turn tokens into text: pass tokenizer=")
    cfg = cfg or GenerationConfig()
    rows = _make_rows(input_ids, attention_mask, cfg, tokenizer, model_device(model))
    if len(rows) != 1:
        raise ValueError(f"stream takes one prompt, got a batch of {len(rows)}; use generate")
    return TextStream(_decode_cached(model, rows, cfg, prefill_inputs or {}, pad_id(tokenizer)), rows[0])
