"""The vision-vocabulary warm-up: train a vision tower from scratch to read rendered text lines with a CTC head.

Plain autoregressive training of a tiny VLM from scratch stays at chance for a long time on a CPU; teaching
the tower to read first (Vary-tiny's idea of a vision vocabulary) breaks out in a few hundred steps. Lines
come from vlmkit.data.synth_text.line_sample, rendered on the fly: sample i of a split is a pure function
of (seed, split, i), so the stream can seek (exact resume) and the held-out split never meets training.

    vocab = CTCVocab(alphabet="abcd")
    reader = CTCReader(VisionTower(cfg), vocab.size, line_height=16)
    batches = LineBatches(vocab, (64, 16), batch_size=16, seed=0, mean=cfg.image_mean, std=cfg.image_std)
    result = train(reader, batches, ctc_stage(2e-3), steps=150)     # vlmkit.train.loop.train
    ned = heldout_ned(reader, vocab, (64, 16), num_lines=64, seed=0, mean=cfg.image_mean, std=cfg.image_std)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from vlmkit.config import SIGLIP_MEAN, SIGLIP_STD
from vlmkit.data.synth_text import DEFAULT_ALPHABET, line_sample
from vlmkit.decoding import model_device
from vlmkit.eval.metrics import normalized_edit_distance
from vlmkit.models.ctc import BLANK, CTCReader, ctc_greedy_decode
from vlmkit.models.lm import IGNORE_INDEX
from vlmkit.text.tokenizer import CharTokenizer
from vlmkit.train.stages import Stage

Batch = dict[str, torch.Tensor]
TRAIN_SPLIT, HELDOUT_SPLIT = 0, 1


class CTCVocab:
    """Characters <-> CTC ids: a CharTokenizer over the alphabet plus the space, shifted so that the
    first character is 1 (0 is the blank). size counts the blank."""

    def __init__(self, alphabet: str = DEFAULT_ALPHABET) -> None:
        self.alphabet = alphabet
        self.tokenizer = CharTokenizer(alphabet + " ")
        self._first = len(self.tokenizer.special_tokens)  # the tokenizer id of the first character
        self.size = len(self.tokenizer.chars) + 1

    def encode(self, text: str) -> list[int]:
        """CTC ids (1..size-1) of text; raises ValueError on a character outside the alphabet."""
        unknown = sorted(set(text) - set(self.tokenizer.chars))
        if unknown:
            raise ValueError(f"text {text!r} has characters {unknown} outside the CTC alphabet {self.alphabet!r}")
        return [i - self._first + 1 for i in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of CTC ids (no blanks)."""
        return self.tokenizer.decode([i - 1 + self._first for i in ids])


def line_pixels(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A PIL RGB image -> (3, H, W) float pixels: each channel's distance from its median (the background)
    in [0, 1], so text is bright on dark whatever its colours, then normalized with the tower's mean and std."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    x = (x - x.flatten(1).median(dim=1).values.view(3, 1, 1)).abs()  # (3, H, W)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def render_lines(vocab: CTCVocab, size: tuple[int, int], indices: range, seed: int, split: int = TRAIN_SPLIT,
                 min_chars: int = 3, max_chars: int = 6) -> list[tuple[object, str]]:
    """(image, text) lines number `indices` of a split, each from np.random.default_rng([seed, split, i])."""
    return [line_sample(np.random.default_rng([seed, split, i]), size, min_chars, max_chars, vocab.alphabet)
            for i in indices]


def line_batch(vocab: CTCVocab, lines: Sequence[tuple[object, str]], mean: Sequence[float],
               std: Sequence[float]) -> Batch:
    """Collate (image, text) lines into a CTCReader batch: pixel_values (B, 3, H, W), input_ids (B, S)
    targets padded with BLANK, labels (B, 1 + S) targets behind a leading IGNORE_INDEX column, padded with it."""
    targets = [vocab.encode(text) for _, text in lines]
    S = max(len(t) for t in targets)
    input_ids = torch.full((len(lines), S), BLANK, dtype=torch.long)  # (B, S)
    labels = torch.full((len(lines), 1 + S), IGNORE_INDEX, dtype=torch.long)  # (B, 1 + S)
    for row, t in enumerate(targets):
        input_ids[row, :len(t)] = torch.tensor(t)
        labels[row, 1:1 + len(t)] = torch.tensor(t)
    pixels = torch.stack([line_pixels(image, mean, std) for image, _ in lines])  # (B, 3, H, W)
    return {"pixel_values": pixels, "input_ids": input_ids, "labels": labels}


class LineBatches:
    """An endless, seeded stream of rendered-line batches for vlmkit.train.loop.train; seek(sample_index)
    continues it exactly (sample i is always the same line). size is (width, height)."""

    def __init__(self, vocab: CTCVocab, size: tuple[int, int], batch_size: int, seed: int = 0,
                 mean: Sequence[float] = SIGLIP_MEAN, std: Sequence[float] = SIGLIP_STD,
                 min_chars: int = 3, max_chars: int = 6) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.vocab, self.size, self.batch_size, self.seed = vocab, size, batch_size, seed
        self.mean, self.std, self.min_chars, self.max_chars = mean, std, min_chars, max_chars
        self.sample_index = 0

    def seek(self, sample_index: int) -> None:
        """Continue from the sample_index-th line of the stream."""
        self.sample_index = sample_index

    def __iter__(self) -> Iterator[Batch]:
        while True:
            indices = range(self.sample_index, self.sample_index + self.batch_size)
            self.sample_index += self.batch_size
            lines = render_lines(self.vocab, self.size, indices, self.seed, TRAIN_SPLIT, self.min_chars, self.max_chars)
            yield line_batch(self.vocab, lines, self.mean, self.std)


def ctc_stage(lr: float = 2e-3, warmup_steps: int = 20, weight_decay: float = 0.0) -> Stage:
    """The warm-up stage for a CTCReader: tower and CTC head both train at lr (warmup, then cosine)."""
    return Stage("ctc", {"vision": lr, "ctc": lr}, weight_decay=weight_decay, warmup_steps=warmup_steps,
                 description="vision tower + CTC head trained to read rendered lines (vision vocabulary warm-up)")


@torch.no_grad()
def read_lines(reader: CTCReader, vocab: CTCVocab, pixel_values: torch.Tensor) -> list[str]:
    """Greedy CTC reading of (B, 3, H, W) line pixels (moved to the reader's device)."""
    was_training = reader.training
    reader.eval()
    try:
        return [vocab.decode(ids) for ids in ctc_greedy_decode(reader(pixel_values.to(model_device(reader))).logits)]
    finally:
        reader.train(was_training)


def heldout_ned(reader: CTCReader, vocab: CTCVocab, size: tuple[int, int], num_lines: int, seed: int = 0,
                mean: Sequence[float] = SIGLIP_MEAN, std: Sequence[float] = SIGLIP_STD,
                min_chars: int = 3, max_chars: int = 6, batch_size: int = 32) -> float:
    """Mean normalized edit distance of greedy CTC reading on num_lines held-out lines (a split training
    never draws from)."""
    if num_lines < 1:
        raise ValueError(f"num_lines must be >= 1, got {num_lines}")
    scores = []
    for start in range(0, num_lines, batch_size):
        lines = render_lines(vocab, size, range(start, min(start + batch_size, num_lines)), seed, HELDOUT_SPLIT,
                             min_chars, max_chars)
        pixels = line_batch(vocab, lines, mean, std)["pixel_values"]  # (B, 3, H, W)
        for pred, (_, text) in zip(read_lines(reader, vocab, pixels), lines):
            scores.append(normalized_edit_distance(pred, text))
    return float(np.mean(scores))
