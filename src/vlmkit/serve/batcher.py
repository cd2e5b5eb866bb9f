"""Continuous batching for the server: the requests in flight decode together, one forward pass per step.

    batcher = Batcher(loaded.model, loaded.tokenizer, max_batch_size=8, max_queue=32)
    ticket = batcher.submit(prompt_ids, prefill_inputs, GenerationConfig(max_new_tokens=64, seed=0))
    ticket = batcher.submit(prompt_ids, make_prefill_inputs, config)   # or a function, called at admission
    async for piece in ticket:          # text pieces as they become final (run on the event loop)
        ...
    ticket.result                       # the GenerationResult once the pieces are exhausted
    ticket.cancel()                     # the client went away: its row leaves the batch at the next step
    batcher.stop()

One worker thread owns the model (submit and the tickets are used from the asyncio event loop).
Each turn of its loop:
 1. admit waiting requests while fewer than max_batch_size rows decode. Each new prompt is
    prefilled alone (batch 1, with its own prefill inputs such as pixel_values, so images of
    different requests never need to line up), then its KV cache joins the batch cache, every row
    right-aligned to a common width with masked padding on the left. Prefill inputs given as a
    function are made here, on the worker thread, just before the prefill (the app's image-feature
    cache, image_cache.py, looks its images up and encodes the missing ones then); if making them
    fails, that request alone ends with the error;
 2. sample each row's next token from its logits with its own settings and seeded generator
    (sampling.sample_rows) and push it into its generate.Row (stop ids, stop strings, max_tokens);
    new text goes to the request's asyncio queue;
 3. drop finished and cancelled rows, and the leading padding columns no remaining row needs;
 4. one forward pass over the remaining rows' last tokens (B, 1) gives the next logits.
So requests join between decoding steps and leave as soon as they end.

A row computes what it would alone: its prefill is the same pass, its positions come from its own
attention mask (the count of real tokens before each one, so padding does not shift them), padding
keys are masked out, and its generator draws only for it. As in generate(), batched matrix products
may differ from single-row ones in the last bits of a float, which can flip an exact tie only.

The cache of a batch is rebuilt (copied) when rows join or leave, and grows by CACHE_GROWTH
positions when full. Besides keys and values, a model's cache may hold per-row tensors (Qwen2-VL's
MRopeCache.rope_deltas, one row per batch row, as its select() treats them); they are carried along.
A longrope (Phi-3) model picks its RoPE factors from the batch's largest position, which would let
rows affect each other, so the app keeps every request within original_max_position_embeddings.

Bounded: at most max_batch_size + max_queue requests are in flight (decoding or waiting for a row);
submit raises QueueFull beyond that, and the app answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from vlmkit.generate import GenerationResult, Row, model_device, new_row, result_of
from vlmkit.sampling import GenerationConfig, row_generators, sample_rows

MAX_BATCH_SIZE = 8  # rows decoded together in one forward pass
MAX_QUEUE = 32  # requests that may wait for a free row; more are refused (503)
CACHE_GROWTH = 64  # positions added to a full batch cache at a time

logger = logging.getLogger("vlmkit.serve")


class QueueFull(Exception):
    """Every row is busy and the waiting queue is full."""


class Ticket:
    """One request's view of its generation: an async iterator over text pieces, then `result`.

    The worker thread hands items over with loop.call_soon_threadsafe; iterate on that loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[], None] = lambda: None) -> None:
        self._loop, self._on_cancel = loop, on_cancel
        self._items: asyncio.Queue[str | GenerationResult | BaseException | None] = asyncio.Queue()
        self.cancelled = False  # set by cancel(); the worker drops the row at its next step
        self.result: GenerationResult | None = None

    def cancel(self) -> None:
        """Give up on this request (call on the event loop): its queue place is freed now, its row at
        the worker's next step."""
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel()
            self._items.put_nowait(None)

    def put(self, item: str | GenerationResult | BaseException) -> None:
        """From the worker thread: a text piece, the final result, or the error that ended the request."""
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody waits for this item
            self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[str]:
        while (item := await self._items.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                self.result = item
                return
            yield item

    async def complete(self) -> GenerationResult | None:
        """The whole generation's result; None if the ticket was cancelled."""
        async for _ in self:
            pass
        return self.result


# A prompt's extra forward keywords (e.g. pixel_values), a function making them on the worker thread, or None.
Prefill = dict[str, Any] | Callable[[], dict[str, Any]] | None


@dataclass(eq=False)  # compared by identity (the queue removes exactly this one)
class _Request:
    prompt: list[int]
    prefill: Prefill
    config: GenerationConfig
    ticket: Ticket


@dataclass
class _Slot:
    """A request decoding in the batch: its Row, generator (None when greedy) and pieces sent so far."""

    row: Row
    config: GenerationConfig
    ticket: Ticket
    generator: torch.Generator | None
    sent: int = 0


@dataclass
class _Batch:
    """The decoding rows, their KV cache (length L = mask width) and the logits their next token comes from."""

    slots: list[_Slot] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None  # (B, L) 1 = real token, 0 = left padding
    logits: torch.Tensor | None = None  # (B, V)


class Batcher:
    """Continuous batching over one model in a worker thread (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue: int = MAX_QUEUE) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size} and "
                             f"{max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._waiting: deque[_Request] = deque()
        self._batch = _Batch()
        self._in_flight = 0  # submitted and not yet ended (decoding, waiting, or being admitted)
        self.cancelled_requests = 0  # requests dropped because their ticket was cancelled
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return len(self._batch.slots)

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    def submit(self, prompt: Sequence[int], prefill: Prefill, config: GenerationConfig) -> Ticket:
        """Queue one request (call on the event loop); QueueFull when max_batch_size + max_queue are in flight.
        prefill: the prompt's extra forward keywords, or a function making them at admission (worker thread)."""
        ticket = Ticket(asyncio.get_running_loop(), on_cancel=lambda: self._withdraw(request))
        request = _Request(list(prompt), prefill, config, ticket)
        with self._wake:
            if self._in_flight >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_batch_size} requests are generating and "
                                f"{self.max_queue} are waiting; retry later")
            self._in_flight += 1
            self._waiting.append(request)
            self._start()
            self._wake.notify()
        return request.ticket

    def stop(self) -> None:
        """End the worker thread after its current step; requests still in flight end with a RuntimeError."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _withdraw(self, request: _Request) -> None:
        """A cancelled request still waiting leaves the queue at once (one decoding is left to the worker)."""
        with self._wake:
            if request in self._waiting:
                self._waiting.remove(request)
                self._in_flight -= 1
                self.cancelled_requests += 1

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="vlmkit-batcher", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------- the worker thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._batch.slots and not self._stopping:
                    self._wake.wait()
                if self._stopping:  # the requests still here end with an error rather than wait forever
                    ended = [s.ticket for s in self._batch.slots] + [r.ticket for r in self._waiting]
                    for ticket in ended:
                        ticket.put(RuntimeError("the server is shutting down; the request was not completed"))
                    self._in_flight -= len(ended)
                    self._batch, self._waiting = _Batch(), deque()
                    return
                room = self.max_batch_size - len(self._batch.slots)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                self._step(admitted)
            except Exception as e:  # a failed batch step: every request in it ends with the error
                logger.exception("a batched decoding step failed")
                for slot in self._batch.slots:
                    slot.ticket.put(e)
                self._end(len(self._batch.slots), cancelled=0)
                self._batch = _Batch()

    def _end(self, n: int, cancelled: int) -> None:
        with self._wake:
            self._in_flight -= n
            self.cancelled_requests += cancelled

    @torch.inference_mode()
    def _step(self, admitted: list[_Request]) -> None:
        self._admit(admitted)
        batch = self._batch
        if not batch.slots:
            return
        previous = None
        if any(s.config.repetition_penalty != 1.0 for s in batch.slots):
            previous = _history([s.row for s in batch.slots], batch.logits.device)  # (B, L)
        tokens = sample_rows(batch.logits, [s.config for s in batch.slots],
                             [s.generator for s in batch.slots], previous)  # (B,)
        for slot, token in zip(batch.slots, tokens.tolist()):
            if not slot.ticket.cancelled:
                slot.row.push(token)
                self._send(slot)
        keep = [j for j, s in enumerate(batch.slots) if s.row.finish_reason is None and not s.ticket.cancelled]
        cancelled = sum(s.ticket.cancelled for s in batch.slots)
        self._end(len(batch.slots) - len(keep), cancelled)
        if not keep:
            self._batch = _Batch()
            return
        if len(keep) < len(batch.slots):
            index = torch.tensor(keep, device=tokens.device)
            batch.cache, batch.mask = self._relayout([(batch.cache, batch.mask, index)],
                                                     [batch.slots[j] for j in keep])
            batch.slots, tokens = [batch.slots[j] for j in keep], tokens[index]
        if batch.cache.length == batch.cache.max_len:
            batch.cache, batch.mask = self._relayout([(batch.cache, batch.mask, None)], batch.slots)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(keep), 1)], dim=1)  # (B, L + 1)
        attention = None if bool(batch.mask.all()) else batch.mask  # no padding: plain causal attention
        batch.logits = self.model(input_ids=tokens[:, None], attention_mask=attention, cache=batch.cache,
                                  logits_to_keep=1).logits[:, -1]  # (B, V)

    def _admit(self, requests: list[_Request]) -> None:
        """Prefill each request alone and join the new rows to the batch (cancelled ones are dropped)."""
        parts, slots, logits = [], [], []
        batch = self._batch
        if batch.slots:
            parts.append((batch.cache, batch.mask, None))
            slots.extend(batch.slots)
            logits.append(batch.logits)
        for request in requests:
            if request.ticket.cancelled:
                self._end(1, cancelled=1)
                continue
            try:
                row = new_row(request.prompt, request.config, self.tokenizer)
                ids = torch.tensor([row.prompt], device=model_device(self.model))  # (1, T)
                prefill = request.prefill() if callable(request.prefill) else request.prefill
                cache = self.model.new_cache(1, ids.shape[1])
                out = self.model(input_ids=ids, cache=cache, logits_to_keep=1, **(prefill or {}))
            except Exception as e:  # this request's own inputs failed (e.g. a ValueError): it alone ends
                request.ticket.put(e)
                self._end(1, cancelled=0)
                continue
            generators = row_generators(request.config, 1)
            slots.append(_Slot(row, request.config, request.ticket, generators[0] if generators else None))
            parts.append((cache, ids.new_ones(ids.shape), None))
            logits.append(out.logits[:, -1])  # (1, V)
        if len(slots) > len(batch.slots):
            batch.slots = slots  # before the relayout, so that if it fails, _run ends these requests too
            batch.cache, batch.mask = self._relayout(parts, slots)
            batch.logits = torch.cat(logits)  # (B, V)

    def _send(self, slot: _Slot) -> None:
        """Hand the row's new text pieces, and its result once it has finished, to the request."""
        for piece in slot.row.pieces[slot.sent:]:
            slot.ticket.put(piece)
        slot.sent = len(slot.row.pieces)
        if slot.row.finish_reason is not None:
            slot.ticket.put(result_of([slot.row], with_text=self.tokenizer is not None))

    def _relayout(self, parts: list[tuple[Any, torch.Tensor, torch.Tensor | None]],
                  slots: list[_Slot]) -> tuple[Any, torch.Tensor]:
        """One batch cache and mask (B, W) from parts (cache, mask (b, L), rows to keep or None = all).

        Each part's rows are cut to the columns some kept row uses and right-aligned to the
        widest part, W; the cache has room for CACHE_GROWTH more positions, or for the most
        tokens any row may still generate if fewer.
        """
        cut = []
        for cache, mask, rows in parts:
            mask = mask if rows is None else mask[rows]  # (b, L)
            first = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())  # leading padding columns of every row
            cut.append((cache, mask[:, first:], rows, first))
        width = max(m.shape[1] for _, m, _, _ in cut)
        remaining = max(s.row.config.max_new_tokens - len(s.row.ids) for s in slots)
        new = self.model.new_cache(len(slots), width + max(1, min(CACHE_GROWTH, remaining)))
        mask = torch.zeros(len(slots), width, dtype=torch.long, device=cut[0][1].device)  # (B, W)
        start = 0
        for cache, part_mask, rows, first in cut:
            b, n = part_mask.shape
            end = cache.length
            for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
                k, v = k[:, :, first:end], v[:, :, first:end]  # (b or more, heads, n, dim) each
                k, v = (k, v) if rows is None else (k[rows], v[rows])
                new.keys[layer][start:start + b, :, width - n:width] = k
                new.values[layer][start:start + b, :, width - n:width] = v
            mask[start:start + b, width - n:] = part_mask
            start += b
        for name, value in list(vars(new).items()):  # per-row state besides keys and values
            if isinstance(value, torch.Tensor):
                setattr(new, name, torch.cat([getattr(c, name) if r is None else getattr(c, name)[r]
                                              for c, _, r, _ in cut]))
        new.advance(width)
        return new, mask


def _history(rows: list[Row], device: torch.device) -> torch.Tensor:
    """(B, L) prompt + generated ids of rows, left-padded with -1 (for the repetition penalty)."""
    seqs = [r.prompt + r.ids for r in rows]
    history = torch.full((len(seqs), max(map(len, seqs))), -1, dtype=torch.long, device=device)
    for i, seq in enumerate(seqs):
        history[i, history.shape[1] - len(seq):] = torch.tensor(seq, dtype=torch.long)
    return history
