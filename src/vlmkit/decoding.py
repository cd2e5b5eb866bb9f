"""One decoding step over a batch of rows with a KV cache: what generate() and the server's batcher share.

    batch = prefill_batch(model, rows, max_len, prefill_inputs, pad_id)   # prompts through the model once
    while batch.rows:
        decode_step(model, batch)         # advance (sample, push, drop), then next_logits (forward)

A DecodeBatch is the rows decoding together (generate.Row: prompt, settings, generator, output so
far), their KV cache, its mask (B, L) (1 = real token, 0 = left padding) and the logits (B, V) their
next tokens come from. decode_step samples each row's next token with the row's own settings and
generator, pushes it into the row (stop rules), drops the rows that finished (or that the caller
cancelled) from the rows, the cache and the mask, and runs one forward pass of the remaining rows'
new tokens. Rows join and leave through the cache's own row operations (models/lm.py, KVCache).

generate.py runs it from one prefill until every row has finished (replacing the forward pass at
Phi-3's longrope switch); serve/batcher.py admits new requests between steps (those arriving together
prefilled together by prefill_batch, then joined to the batch), cancels rows and grows the cache.

compile_decoding(model) (`--compile`, load_model(..., compile=True)) has the step's forward pass (next_logits)
run through torch.compile for every caller of that model: the sampling, the stop rules and the row bookkeeping
stay eager Python. The cache's length is a symbolic size (dynamic=True), so a growing cache does not recompile
each step: one graph without padding and one with an attention mask (the batch size is symbolic too, past 1).
Compilation happens at the first steps; CompiledStep.seconds adds up the wall time of the calls that compiled.
What it pays is measured in docs/benchmarks.md (`python bench/bench_cpu_generate.py`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from vlmkit.devices import compiles_with_triton
from vlmkit.sampling import sample_rows

if TYPE_CHECKING:
    from vlmkit.generate import Row
    from vlmkit.models.lm import KVCache


@dataclass
class DecodeBatch:
    """Rows decoding together: their KV cache, its mask, and the logits their next tokens come from."""

    rows: list[Row]
    cache: KVCache  # the model's (models/lm.py or a subclass), holding L = mask.shape[1] positions of every row
    mask: torch.Tensor  # (B, L) 1 = real token, 0 = left padding
    logits: torch.Tensor  # (B, V)


def prefill_batch(model: nn.Module, rows: list[Row], max_len: int, prefill_inputs: dict[str, Any],
                  pad_id: int) -> DecodeBatch:
    """The rows' prompts, left-padded, through the model once into a new cache of max_len positions."""
    ids, mask = left_pad([r.prompt for r in rows], pad_id, model_device(model))  # (B, T) each
    placeholders = getattr(model, "placeholder_ids", {})  # an ImageModel's; the padding must not look like one
    if not bool(mask.all()) and pad_id in placeholders.values():
        raise ValueError(f"the padding id {pad_id} is one of the model's placeholder ids {placeholders}; the padding "
                         "would be taken for image tokens: give the tokenizer another pad_token_id")
    cache = model.new_cache(len(rows), max_len)
    logits = model(input_ids=ids, attention_mask=_attention(mask), cache=cache, logits_to_keep=1,
                   **prefill_inputs).logits[:, -1]  # (B, V)
    return DecodeBatch(list(rows), cache, mask, logits)


def decode_step(model: nn.Module, batch: DecodeBatch, cancelled: Sequence[bool] | None = None,
                on_push: Callable[[], None] | None = None, trim: bool = False,
                forward: Callable[[DecodeBatch, torch.Tensor], torch.Tensor] | None = None) -> None:
    """One decoding step of every row of batch, in place (generate and the serving batcher both run it):
    advance (sample, push, drop the finished rows), then one forward pass of the remaining rows' new tokens
    (B, 1) sets batch.logits. forward(batch, tokens), when given, does that pass instead and returns the
    logits (B, V) (it may replace batch.cache, as generate's longrope recompute does). Once batch.rows is
    empty the batch is done: no forward pass ran."""
    tokens = advance(batch, cancelled, on_push, trim)
    if tokens is not None:
        batch.logits = forward(batch, tokens) if forward is not None else next_logits(model, batch, tokens)  # (B', V)


def advance(batch: DecodeBatch, cancelled: Sequence[bool] | None = None, on_push: Callable[[], None] | None = None,
            trim: bool = False) -> torch.Tensor | None:
    """The first half of a step, in place; returns the remaining rows' new tokens (B',), or None once no row
    is left. A caller that streams text reads the rows between this and the forward pass (next_logits).

     1. each row's next token is sampled from batch.logits with the row's own config and generator
        (sampling.sample_rows; the repetition penalty sees the row's prompt and output);
     2. it is pushed into its Row (stop rules), unless the row is in `cancelled` (one bool per row);
        then on_push() runs, when given (the server sends the new text from there);
     3. finished and cancelled rows leave batch.rows, the cache and the mask; with trim, so do the
        leading padding columns no remaining row needs; the mask gets the new tokens' column.
    """
    rows = batch.rows
    cancelled = cancelled if cancelled is not None else [False] * len(rows)
    previous = None
    if any(r.config.repetition_penalty != 1.0 for r in rows):
        previous = _history(rows, batch.logits.device)  # (B, S)
    tokens = sample_rows(batch.logits, [r.config for r in rows], [r.generator for r in rows], previous)  # (B,)
    for row, token, gone in zip(rows, tokens.tolist(), cancelled):
        if not gone:
            row.push(token)
    if on_push is not None:
        on_push()
    keep = [j for j, (row, gone) in enumerate(zip(rows, cancelled)) if row.finish_reason is None and not gone]
    if len(keep) < len(rows):
        batch.rows = [rows[j] for j in keep]
        if not keep:
            return None
        index = torch.tensor(keep, device=tokens.device)
        tokens = tokens[index]  # (B',)
        batch.cache.select(index)
        batch.mask = batch.mask[index]  # (B', L)
        if trim:
            batch.mask = batch.cache.trim(batch.mask)  # (B', L') L' <= L
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(keep), 1)], dim=1)  # (B', L + 1)
    return tokens


def next_logits(model: nn.Module, batch: DecodeBatch, tokens: torch.Tensor) -> torch.Tensor:
    """The logits (B, V) after one new token per row (B,), whose column batch.mask already has; through the
    model's CompiledStep when compile_decoding registered one."""
    step = _COMPILED.get(model)
    forward = step if step is not None else _forward_one
    return forward(model, tokens[:, None], _attention(batch.mask), batch.cache)  # (B, V)


def _forward_one(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """The forward pass of one new token per row: tokens (B, 1), mask (B, S) or None -> logits (B, V)."""
    return model(input_ids=tokens, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]


class CompiledStep:
    """_forward_one through torch.compile (inductor, dynamic shapes), for one model. seconds: wall time of the
    calls that compiled a graph (a step's own run time, milliseconds, included); graphs: how many were compiled.
    report(text), when set, is told each compilation (the CLI prints it on stderr)."""

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self.compiled = torch.compile(_forward_one, dynamic=True)
        self.seconds = 0.0
        self.graphs = 0
        self.report = report

    def __call__(self, model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None,
                 cache: KVCache) -> torch.Tensor:
        from torch._dynamo.exc import BackendCompilerFailed
        from torch._dynamo.utils import counters
        from torch._inductor.exc import InductorError

        before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        try:
            logits = self.compiled(model, tokens, mask, cache)
        except (BackendCompilerFailed, InductorError) as e:
            raise RuntimeError(f"--compile: torch.compile could not compile the decode step of "
                               f"{type(model).__name__} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                               f"run without --compile") from e
        new = counters["stats"]["unique_graphs"] - before
        if new:
            took = time.perf_counter() - start
            self.seconds += took
            self.graphs += new
            if self.report is not None:
                self.report(f"[--compile: the decode step compiled in {took:.1f} s "
                            f"({'with' if mask is not None else 'without'} padding, {len(tokens)} rows); "
                            f"{self.seconds:.1f} s in all]")
        return logits


_COMPILED: weakref.WeakKeyDictionary[nn.Module, CompiledStep] = weakref.WeakKeyDictionary()


def compile_decoding(model: nn.Module, report: Callable[[str], None] | None = None) -> CompiledStep:
    """Run the decode step's forward pass of model through torch.compile from now on (every caller of
    next_logits: generate, stream, chat, the server, eval); returns its CompiledStep (compile time, graphs).
    Compilation itself happens at the first steps. RuntimeError saying why when torch.compile cannot run
    here: no dynamo on this Python, no C++ compiler for the CPU's kernels, no Triton for a GPU's."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError("--compile: torch.compile is not supported on this Python / platform; run without "
                           "--compile")
    device = model_device(model)
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except InvalidCxxCompiler as e:
            raise RuntimeError(f"--compile: torch.compile builds the CPU kernels with a C++ compiler and found none "
                               f"({str(e).splitlines()[0]}); install g++ (apt-get install g++) or set CXX, or run "
                               f"without --compile") from e
    elif compiles_with_triton(device):
        from torch.utils._triton import has_triton

        if not has_triton():
            raise RuntimeError("--compile: torch.compile needs Triton for CUDA kernels and it is not installed "
                               "(pip install triton); or run without --compile")
    step = CompiledStep(report)
    _COMPILED[model] = step
    return step


def compiled_step(model: nn.Module) -> CompiledStep | None:
    """The CompiledStep compile_decoding registered for model, or None (the step runs eagerly)."""
    return _COMPILED.get(model)


def _attention(mask: torch.Tensor) -> torch.Tensor | None:
    """The attention_mask to pass for mask (B, S): None when nothing is padding (plain causal attention)."""
    return None if bool(mask.all()) else mask


def _history(rows: list[Row], device: torch.device) -> torch.Tensor:
    """(B, S) prompt + generated ids of rows, left-padded with -1 (for the repetition penalty)."""
    seqs = [r.prompt + r.ids for r in rows]
    width = max(map(len, seqs))
    return torch.tensor([[-1] * (width - len(seq)) + seq for seq in seqs], dtype=torch.long, device=device)  # (B, S)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and 1/0 mask with every prompt right-aligned; T = width or the longest prompt."""
    T = width or max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), T), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, T - len(p):] = 1
    return ids, mask


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (torch's default device, the CPU unless set, for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.get_default_device()
