"""A CTC reading head on the vision tower: the "vision vocabulary" warm-up for towers trained from scratch.

A text line H x W with patch P gives the tower a rows x cols grid of patches (rows = H/P, cols = W/P).
Reading runs left to right, so each column of patches becomes one step of a sequence (the "4x1 patch
merging" of a 4-row grid; `merge_cols` k > 1 also merges k neighbouring columns), and a small head maps
every step to character logits (its first layer a width-3 convolution over steps, so a step also sees the
columns beside it: a character spans 2-3 patch columns):

    x = tower.features(pixels)                          # (B, rows*cols, D), row-major patches
    x = column_sequence(x, (rows, cols), k)             # (B, cols/k, rows*k*D)
    logits = out(gelu(conv1d_3(norm(x))))               # (B, T = cols/k, V)

Vocabulary: index 0 is the CTC blank (BLANK); characters are 1..V-1. `ctc_loss` is Graves et al. 2006
("Connectionist Temporal Classification") via F.ctc_loss; `ctc_greedy_decode` takes the best class per
step, collapses repeats and drops blanks (the same paper's best-path decoding).

Run `python -m vlmkit.models.ctc` for a shape check on a tiny random tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlmkit.config import VisionConfig
from vlmkit.models.lm import IGNORE_INDEX
from vlmkit.models.vit import VisionTower

BLANK = 0  # the CTC blank class; characters are 1..vocab_size-1


def column_sequence(features: torch.Tensor, grid: tuple[int, int], merge_cols: int = 1) -> torch.Tensor:
    """Row-major patch features (B, rows*cols, D) -> one step per k columns, left to right: (B, cols/k, rows*k*D).

    Step t concatenates columns t*k .. t*k+k-1, each column top to bottom."""
    rows, cols = grid
    B, N, D = features.shape
    if N != rows * cols:
        raise ValueError(f"features have {N} tokens but the grid is {rows}x{cols} = {rows * cols}; drop the CLS "
                         "token (select_feature='patch') or pass the grid of the image that was encoded")
    if merge_cols < 1 or cols % merge_cols:
        raise ValueError(f"merge_cols {merge_cols} must be >= 1 and divide the {cols} patch columns")
    x = features.reshape(B, rows, cols, D).transpose(1, 2)  # (B, cols, rows, D)
    return x.reshape(B, cols // merge_cols, merge_cols * rows * D)  # (B, T, k*rows*D)


class CTCHead(nn.Module):
    """Per-step character logits from a column sequence: LayerNorm, Conv1d (width 3) to in_dim, GELU, Linear
    to vocab.

    in_dim is the tower's width D; rows the number of patch rows of the line images; merge_cols how many
    columns make one step. vocab_size counts the blank (index 0)."""

    def __init__(self, in_dim: int, vocab_size: int, rows: int = 1, merge_cols: int = 1) -> None:
        super().__init__()
        if vocab_size < 2 or rows < 1 or merge_cols < 1:
            raise ValueError(f"CTCHead needs vocab_size >= 2 (blank + a character), rows >= 1 and merge_cols >= 1; "
                             f"got {vocab_size}, {rows}, {merge_cols}")
        self.rows, self.merge_cols = rows, merge_cols
        width = rows * merge_cols * in_dim
        self.norm = nn.LayerNorm(width)
        self.merge = nn.Conv1d(width, in_dim, kernel_size=3, padding=1)  # each step also sees its neighbours
        self.out = nn.Linear(in_dim, vocab_size)

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, rows*cols, D) features of a rows x cols grid -> (B, cols/merge_cols, vocab_size) logits."""
        if grid[0] != self.rows:
            raise ValueError(f"this CTC head was built for {self.rows} patch rows but the images have {grid[0]}; "
                             "render lines at the height the head was built for")
        x = column_sequence(features, grid, self.merge_cols)  # (B, T, k*rows*D)
        x = self.merge(self.norm(x).transpose(1, 2)).transpose(1, 2)  # (B, T, D)
        return self.out(F.gelu(x))  # (B, T, V)


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """CTC negative log-likelihood per target character: sum over the batch / total target length.

    logits (B, T, V) with blank = 0; targets (B, S) padded (only the first target_lengths[b] of row b are
    read; they must be in 1..V-1); every input has all T steps. log_softmax runs in fp32; impossible
    alignments (a target longer than T allows) count as 0 (zero_infinity) instead of inf."""
    if targets.dim() != 2 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets have shape {tuple(targets.shape)}; expected (batch={logits.shape[0]}, length)")
    total = int(target_lengths.sum())
    if total == 0:
        raise ValueError("every target is empty; CTC needs at least one target character in the batch")
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    input_lengths = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long, device=logits.device)
    nll = F.ctc_loss(log_probs, targets.clamp(min=0), input_lengths, target_lengths, blank=BLANK,
                     reduction="sum", zero_infinity=True)
    return nll / total


def ctc_greedy_decode(logits: torch.Tensor) -> list[list[int]]:
    """Best-path decoding of (B, T, V) logits: argmax per step, collapse repeats, drop blanks.

    >>> ctc_greedy_decode(torch.eye(3)[[1, 1, 0, 1, 2, 2, 0]][None])
    [[1, 1, 2]]
    """
    best = logits.argmax(dim=-1)  # (B, T)
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return [row[mask].tolist() for row, mask in zip(best, keep)]


@dataclass
class CTCOutput:
    logits: torch.Tensor  # (B, T, V); empty when loss_only
    loss: torch.Tensor | None = None


class CTCReader(nn.Module):
    """A vision tower (`vision`) with a CTC head (`ctc`) reading text lines of one height.

    forward takes the batches of vlmkit.train.ctc (so it trains with vlmkit.train.loop.train):
    `input_ids` (B, S) are the target characters padded with BLANK, `labels` (B, 1 + S) the same with
    IGNORE_INDEX padding behind one leading IGNORE_INDEX column (the loop counts labels[:, 1:], the LM
    shift, as a step's tokens, so micro-batches are weighted by their character counts)."""

    def __init__(self, tower: VisionTower, vocab_size: int, line_height: int, merge_cols: int = 1) -> None:
        super().__init__()
        P = tower.cfg.patch_size
        if line_height % P:
            raise ValueError(f"line_height {line_height} is not a multiple of the patch size {P}")
        self.vision = tower
        self.ctc = CTCHead(tower.cfg.hidden_size, vocab_size, line_height // P, merge_cols)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_only: bool = False) -> CTCOutput:
        """Logits for (B, 3, H, W) lines; with labels also the per-character CTC loss."""
        P = self.vision.cfg.patch_size
        grid = (pixel_values.shape[2] // P, pixel_values.shape[3] // P)
        features = self.vision.features(pixel_values, interpolate_pos_encoding=True)  # (B, rows*cols, D)
        logits = self.ctc(features, grid)  # (B, T, V)
        if labels is None:
            return CTCOutput(logits)
        if input_ids is None:
            raise ValueError("CTCReader needs input_ids (the padded targets) together with labels")
        lengths = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)  # (B,)
        loss = ctc_loss(logits, input_ids, lengths)
        return CTCOutput(logits[:, :0] if loss_only else logits, loss)


if __name__ == "__main__":
    cfg = VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       use_cls_token=False, pre_layernorm=False, select_layer=-1)
    reader = CTCReader(VisionTower(cfg), vocab_size=6, line_height=16)
    logits = reader(torch.randn(2, 3, 16, 64)).logits
    print("logits", tuple(logits.shape))  # (2, 16, 6): 16 columns of 4 patches
