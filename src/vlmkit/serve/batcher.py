"""Continuous batching for the server: the requests in flight decode together, one forward pass per step.

    batcher = Batcher(loaded.model, loaded.tokenizer, max_batch_size=8, max_queue=32, prefill_batch=8)
    ticket = batcher.submit(prompt_ids, plans, GenerationConfig(max_new_tokens=64, seed=0))   # plans: its images
    async for piece in ticket:          # text pieces as they become final (run on the event loop)
        ...
    ticket.result                       # the GenerationResult once the pieces are exhausted
    ticket.cancel()                     # the client went away: its row leaves the batch at the next step
    batcher.stop()

One worker thread owns the model (submit and the tickets are used from the asyncio event loop).
Each turn of its loop:
 1. admit waiting requests while fewer than max_batch_size rows decode. The requests admitted
    together are prefilled together, up to prefill_batch at a time (batched prefill; 1 prefills
    each alone): their prompts, left-padded, go through the model in one forward pass
    (decoding.prefill_batch, the prefill generate() runs), and the images of all of them are
    made into that pass's inputs at once by the batcher's `images` function, so the vision side
    runs once for the group. A request's images are whatever that function takes, in placeholder
    order; by default ImagePlans, turned into the scheme's inputs by the model's own
    image_inputs (the one ImageModel interface: every scheme makes one input batch from the plans
    of images of any sizes, as for a prompt holding several images). The app passes the image
    cache's function instead (image_cache.py: it looks the group's images up and encodes the
    missing ones in one encode_images call). This runs on the worker thread, just before the
    prefill. Then the group's KV cache joins the batch cache (KVCache.join), every row
    right-aligned to a common width with masked padding on the left. If a group's prefill fails,
    each of its requests is prefilled alone (logged), so the error ends only the request that
    causes it. Requests sent together reach the batcher spread over the time their parsing takes
    (tens of ms for images), so an idle batcher may wait up to prefill_wait seconds (0 by default)
    for prefill_batch requests before it admits the first ones;
 2. one decoding.decode_step, the step generate() runs too: each row's next token is sampled
    from its logits with its own settings and seeded generator (sampling.sample_rows) and pushed
    into its generate.Row (stop ids, stop strings, max_tokens), except for cancelled rows; new
    text (and the result of a finished row) goes to the request's asyncio queue; finished and
    cancelled rows leave the batch, and so do the leading padding columns no remaining row needs
    (KVCache.trim); one forward pass over the remaining rows' last tokens (B, 1) gives the next
    logits;
 3. a full cache grows by CACHE_GROWTH positions (KVCache.grow), or by the most tokens any row
    may still generate if fewer, so the next step has room.
So requests join between decoding steps and leave as soon as they end.

A row computes what it would alone: its prefill is the same pass, its positions come from its own
attention mask (the count of real tokens before each one, so padding does not shift them), padding
keys are masked out, and its generator draws only for it. As in generate(), batched matrix products
(in the prefill, the vision tower and the decoding steps) may differ from single-row ones in the last
bits of a float, which can flip an exact tie only.

The cache owns its rows: joining copies the rows into new buffers, dropping rows selects them,
cutting padding columns and growing change only the position dim. Besides keys and values a
model's cache may hold per-row state (Qwen2-VL's MRopeCache.rope_deltas); the cache's subclass
carries it through those operations. A longrope (Phi-3) model picks its RoPE factors from the
batch's largest position, which would let rows affect each other, so the app keeps every request
within original_max_position_embeddings (and generate()'s recompute at the switch is never needed).

Bounded: at most max_batch_size + max_queue requests are in flight (decoding or waiting for a row);
submit raises QueueFull beyond that, and the app answers 503.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from vlmkit.decoding import DecodeBatch, decode_step, model_device, prefill_batch
from vlmkit.generate import GenerationResult, Row, new_row, pad_id, result_of
from vlmkit.models.image_model import takes_images
from vlmkit.sampling import GenerationConfig

MAX_BATCH_SIZE = 8  # rows decoded together in one forward pass
MAX_QUEUE = 32  # requests that may wait for a free row; more are refused (503)
PREFILL_BATCH = MAX_BATCH_SIZE  # requests admitted together that are prefilled in one forward pass (1: each alone)
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


# The forward keywords of the images of prompts prefilled together, from each prompt's images (in row order, each
# prompt's in placeholder order; the items are what the submitter passed: ImagePlans by default).
ImagePrefill = Callable[[list[list[Any]]], dict[str, Any]]


@dataclass(eq=False)  # compared by identity (the queue removes exactly this one)
class _Request:
    prompt: list[int]
    images: list[Any]
    config: GenerationConfig
    ticket: Ticket
    row: Row | None = None  # made at admission


@dataclass
class _Slot:
    """The request of a row decoding in the batch: its ticket and how many of its row's pieces were sent."""

    ticket: Ticket
    sent: int = 0


class Batcher:
    """Continuous batching over one model in a worker thread (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue: int = MAX_QUEUE, prefill_batch: int = PREFILL_BATCH,
                 images: ImagePrefill | None = None, prefill_wait: float = 0.0) -> None:
        """prefill_batch: requests prefilled together in one forward pass (1: each alone). images: the function
        making a prefill's image inputs from the items submitted as images (default: the model's image_inputs,
        taking ImagePlans; None for a text-only model). prefill_wait: seconds an idle batcher waits for
        prefill_batch requests before it admits the ones it has."""
        if max_batch_size < 1 or max_queue < 0 or prefill_batch < 1 or not prefill_wait >= 0:
            raise ValueError(f"max_batch_size and prefill_batch must be >= 1, max_queue and prefill_wait >= 0, got "
                             f"{max_batch_size}, {prefill_batch}, {max_queue} and {prefill_wait}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.prefill_batch = max_batch_size, max_queue, prefill_batch
        self.prefill_wait = prefill_wait
        if images is None and takes_images(model):
            images = functools.partial(_plan_inputs, model)
        self.images = images
        self.pad_id = pad_id(tokenizer)
        self._waiting: deque[_Request] = deque()
        self._batch: DecodeBatch | None = None  # the rows decoding, their cache, mask and logits
        self._slots: dict[Row, _Slot] = {}  # the request of every row that has not ended yet
        self._in_flight = 0  # submitted and not yet ended (decoding, waiting, or being admitted)
        self.cancelled_requests = 0  # requests dropped because their ticket was cancelled
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return len(self._slots)

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    def submit(self, prompt: Sequence[int], images: Sequence[Any] | None, config: GenerationConfig) -> Ticket:
        """Queue one request (call on the event loop); QueueFull when max_batch_size + max_queue are in flight.
        images: the prompt's images in placeholder order, as the batcher's `images` function takes them
        (ImagePlans by default); None or () for a text-only prompt."""
        ticket = Ticket(asyncio.get_running_loop(), on_cancel=lambda: self._withdraw(request))
        request = _Request(list(prompt), list(images or ()), config, ticket)
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
                while not self._waiting and not self._slots and not self._stopping:
                    self._wake.wait()
                if not self._slots and self.prefill_wait > 0:
                    self._gather()
                if self._stopping:  # the requests still here end with an error rather than wait forever
                    ended = [s.ticket for s in self._slots.values()] + [r.ticket for r in self._waiting]
                    for ticket in ended:
                        ticket.put(RuntimeError("the server is shutting down; the request was not completed"))
                    self._in_flight -= len(ended)
                    self._batch, self._slots, self._waiting = None, {}, deque()
                    return
                room = self.max_batch_size - len(self._slots)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                self._step(admitted)
            except Exception as e:  # a failed batch step: every request in it ends with the error
                logger.exception("a batched decoding step failed")
                for slot in self._slots.values():
                    slot.ticket.put(e)
                self._end(len(self._slots), cancelled=0)
                self._batch, self._slots = None, {}

    def _gather(self) -> None:
        """Idle, with the lock held: wait up to prefill_wait seconds for prefill_batch requests (submit wakes it)."""
        deadline = time.monotonic() + self.prefill_wait
        wanted = min(self.prefill_batch, self.max_batch_size)
        while len(self._waiting) < wanted and not self._stopping and (left := deadline - time.monotonic()) > 0:
            self._wake.wait(left)

    def _end(self, n: int, cancelled: int) -> None:
        with self._wake:
            self._in_flight -= n
            self.cancelled_requests += cancelled

    @torch.inference_mode()
    def _step(self, admitted: list[_Request]) -> None:
        self._admit(admitted)
        batch = self._batch
        if batch is None:
            return
        rows = batch.rows
        cancelled = [self._slots[row].ticket.cancelled for row in rows]
        decode_step(self.model, batch, cancelled, on_push=lambda: self._deliver(rows, cancelled), trim=True)
        if not batch.rows:
            self._batch = None
        elif batch.cache.length == batch.cache.max_len:
            batch.cache.grow(_growth(batch.rows))

    def _admit(self, requests: list[_Request]) -> None:
        """Prefill the requests, prefill_batch at a time, and join their rows to the batch (cancelled ones are
        dropped)."""
        ready = []
        for request in requests:
            if request.ticket.cancelled:
                self._end(1, cancelled=1)
                continue
            try:
                if request.images and self.images is None:
                    raise ValueError(f"the prompt has {len(request.images)} image(s) but the model takes no images; "
                                     "send text only")
                request.row = new_row(request.prompt, request.config, self.tokenizer, model_device(self.model))
            except Exception as e:  # this request's own settings failed (e.g. a ValueError): it alone ends
                self._fail(request, e)
                continue
            ready.append(request)
        new = []
        for start in range(0, len(ready), self.prefill_batch):
            new += self._prefill(ready[start:start + self.prefill_batch])
        if new:
            parts = ([self._batch] if self._batch is not None else []) + new
            rows = [row for part in parts for row in part.rows]
            first = parts[0]
            mask = first.cache.join(first.mask, [(part.cache, part.mask) for part in parts[1:]], _growth(rows))
            self._batch = DecodeBatch(rows, first.cache, mask, torch.cat([part.logits for part in parts]))  # (B, V)

    def _prefill(self, group: list[_Request]) -> list[DecodeBatch]:
        """The group's prompts through the model in one forward pass, their images made into its inputs at once;
        if that fails, each request alone, so that an error ends only the requests that cause it."""
        rows = [request.row for request in group]
        try:
            inputs = self.images([request.images for request in group]) if any(r.images for r in group) else {}
            part = prefill_batch(self.model, rows, max(len(row.prompt) for row in rows), inputs, self.pad_id)
        except Exception as e:
            if len(group) == 1:  # this request's own inputs failed (e.g. a ValueError): it alone ends
                self._fail(group[0], e)
                return []
            logger.warning("the prefill of %d requests together failed (%s: %s); prefilling each alone",
                           len(group), type(e).__name__, e)
            return [part for request in group for part in self._prefill([request])]
        for request in group:
            self._slots[request.row] = _Slot(request.ticket)  # before the join, so that if it fails, _run ends it too
        return [part]

    def _fail(self, request: _Request, error: Exception) -> None:
        request.ticket.put(error)
        self._end(1, cancelled=0)

    def _deliver(self, rows: list[Row], cancelled: list[bool]) -> None:
        """After a step pushed its tokens: send each live row's new text; finished and cancelled rows end."""
        ended = 0
        for row, gone in zip(rows, cancelled):
            slot = self._slots[row]
            if not gone:
                self._send(row, slot)
            if gone or row.finish_reason is not None:
                del self._slots[row]
                ended += 1
        self._end(ended, cancelled=sum(cancelled))

    def _send(self, row: Row, slot: _Slot) -> None:
        """Hand the row's new text pieces, and its result once it has finished, to the request."""
        for piece in row.pieces[slot.sent:]:
            slot.ticket.put(piece)
        slot.sent = len(row.pieces)
        if row.finish_reason is not None:
            slot.ticket.put(result_of([row], with_text=self.tokenizer is not None))


def _plan_inputs(model: nn.Module, images: list[list[Any]]) -> dict[str, Any]:
    """The default image prefill: every prompt's ImagePlans, in row order, as the model's scheme inputs."""
    return model.image_inputs([plan for plans in images for plan in plans])


def _growth(rows: list[Row]) -> int:
    """Positions to add to a batch cache: CACHE_GROWTH, or the most tokens any row may still generate if fewer."""
    return max(1, min(CACHE_GROWTH, max(r.config.max_new_tokens - len(r.ids) for r in rows)))
