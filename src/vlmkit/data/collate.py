"""Batches of TrainingExamples: padded (collate) or several samples packed into each row (pack).

    batch = collate(examples, pad_id)          # input_ids, labels, attention_mask (+ image inputs)
    batch = pack(examples, max_len, pad_id)    # input_ids, labels, position_ids, segment_ids (+ images)
    out = model(**batch)                       # CausalLM; the loss is the mean over labelled tokens

Packing puts consecutive samples in one row while they fit in max_len. Each sample gets its own
segment id (1, 2, ... within a row; padding is segment 0), its positions restart at 0, and
CausalLM attends only within a segment (block-diagonal causal attention), so every sample is
computed as if it were alone. The first token of each sample gets no label: its prediction
would come from the previous sample (alone, position 0 has no prediction either).
Image inputs come from vlmkit.schemes.image_inputs over every example's plans in order, which is
row-major prompt order, the order the VLM fills placeholder runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmkit.data.labels import TrainingExample
from vlmkit.models.lm import IGNORE_INDEX
from vlmkit.schemes import image_inputs


def _check(examples: Sequence[TrainingExample]) -> None:
    if not examples:
        raise ValueError("no examples to batch; pass at least one TrainingExample")
    for i, ex in enumerate(examples):
        if len(ex.input_ids) != len(ex.labels) or not ex.input_ids:
            raise ValueError(f"example {i} has {len(ex.input_ids)} ids and {len(ex.labels)} labels; "
                             "build it with build_training_example")


def _rows(rows: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    """(len(rows), longest) tensor, each row right-padded with fill."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(examples: Sequence[TrainingExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded (training needs no left padding): input_ids (B, T) padded with
    pad_id, labels (B, T) padded with IGNORE_INDEX, attention_mask (B, T) 1 on real tokens, and the image
    inputs of all examples' plans in order (pixel_values, image_sizes, ... as image_inputs gives them)."""
    _check(examples)
    return {
        "input_ids": _rows([ex.input_ids for ex in examples], pad_id),  # (B, T)
        "labels": _rows([ex.labels for ex in examples], IGNORE_INDEX),  # (B, T)
        "attention_mask": _rows([[1] * len(ex) for ex in examples], 0),  # (B, T)
        **image_inputs([p for ex in examples for p in ex.plans]),
    }


def pack(examples: Sequence[TrainingExample], max_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Consecutive examples packed into rows of at most max_len tokens (a new row starts when the next
    example does not fit), rows right-padded to the longest: input_ids, labels, position_ids and
    segment_ids, all (R, T), plus the image inputs in order. Pass them all to CausalLM.forward.
    An example longer than max_len raises ValueError (it is never cut)."""
    _check(examples)
    too_long = [i for i, ex in enumerate(examples) if len(ex) > max_len]
    if too_long:
        raise ValueError(f"example(s) {too_long[:5]} are longer than max_len={max_len} "
                         f"(longest {max(len(examples[i]) for i in too_long)} tokens); raise max_len or drop them")
    rows: list[list[TrainingExample]] = [[]]
    for ex in examples:
        if sum(len(e) for e in rows[-1]) + len(ex) > max_len:
            rows.append([])
        rows[-1].append(ex)
    ids, labels, positions, segments = [], [], [], []
    for row in rows:
        ids.append([t for ex in row for t in ex.input_ids])
        labels.append([t for ex in row for t in [IGNORE_INDEX, *ex.labels[1:]]])
        positions.append([p for ex in row for p in range(len(ex))])
        segments.append([s for n, ex in enumerate(row, start=1) for s in [n] * len(ex)])
    return {
        "input_ids": _rows(ids, pad_id),  # (R, T)
        "labels": _rows(labels, IGNORE_INDEX),  # (R, T)
        "position_ids": _rows(positions, 0),  # (R, T) restarting at 0 per sample
        "segment_ids": _rows(segments, 0),  # (R, T) 1, 2, ... per sample, 0 = padding
        **image_inputs([p for ex in examples for p in ex.plans]),
    }
