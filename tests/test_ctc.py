"""The CTC warm-up: column sequences, greedy decoding and the loss against hand-computed values, batches that
seek exactly, deterministic training, and a tiny tower learning to read (slow).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_ctc.py  (add -m slow for the learning run)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmkit.config import VisionConfig
from vlmkit.models.ctc import CTCReader, column_sequence, ctc_greedy_decode, ctc_loss
from vlmkit.models.vit import VisionTower
from vlmkit.train.ctc import CTCVocab, LineBatches, ctc_stage, heldout_ned
from vlmkit.train.loop import train

SIZE = (64, 24)  # (width, height): 6 x 16 patches of 4 px


def _reader(seed: int = 0) -> tuple[CTCReader, VisionConfig]:
    torch.manual_seed(seed)
    cfg = VisionConfig(image_size=64, patch_size=4, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, use_cls_token=False, pre_layernorm=False, select_layer=-1)
    return CTCReader(VisionTower(cfg), CTCVocab("abcd").size, line_height=SIZE[1]), cfg


def test_greedy_decode_hand_made():
    # steps (argmax): a a _ a b b _ c  -> "a", "a", "b", "c" (repeats collapse only without a blank between)
    best = torch.tensor([[1, 1, 0, 1, 2, 2, 0, 3], [0, 0, 0, 0, 0, 0, 0, 0]])
    logits = F.one_hot(best, 4).float() * 5.0  # (2, 8, 4)
    assert ctc_greedy_decode(logits) == [[1, 1, 2, 3], []]


def test_column_sequence_reads_columns_left_to_right():
    rows, cols, D = 2, 4, 1
    patches = torch.arange(rows * cols, dtype=torch.float).view(1, rows * cols, D)  # row-major ids 0..7
    assert column_sequence(patches, (rows, cols))[0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert column_sequence(patches, (rows, cols), merge_cols=2).tolist() == [[[0, 4, 1, 5], [2, 6, 3, 7]]]
    with pytest.raises(ValueError, match="merge_cols"):
        column_sequence(patches, (rows, cols), merge_cols=3)


def test_loss_by_hand_and_against_torch():
    # T = 2 steps, V = 2 (blank, "a"), target "a": alignments a a, _ a, a _  ->  p = pa0 pa1 + pb0 pa1 + pa0 pb1
    logits = torch.tensor([[[0.3, -0.2], [1.1, 0.4]]])  # (1, 2, 2)
    p = logits.softmax(-1)[0]
    by_hand = -math.log(p[0, 1] * p[1, 1] + p[0, 0] * p[1, 1] + p[0, 1] * p[1, 0])
    loss = ctc_loss(logits, torch.tensor([[1]]), torch.tensor([1]))
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    # a batch: the total NLL over the total number of target characters
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 5)
    targets = torch.tensor([[1, 2, 2], [4, 0, 0], [3, 1, 0]])
    lengths = torch.tensor([3, 1, 2])
    reference = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, torch.full((3,), 7), lengths,
                           reduction="none")
    assert ctc_loss(logits, targets, lengths).item() == pytest.approx(reference.sum().item() / 6, abs=1e-5)


def test_vocab_and_batches_seek_exactly():
    vocab = CTCVocab("abcd")
    assert vocab.size == 6 and vocab.encode("ab d") == [2, 3, 1, 5] and vocab.decode([2, 3, 1, 5]) == "ab d"
    with pytest.raises(ValueError, match="outside the CTC alphabet"):
        vocab.encode("abz")
    stream = iter(LineBatches(vocab, SIZE, batch_size=3, seed=1))
    first, second = next(stream), next(stream)
    assert first["pixel_values"].shape == (3, 3, 24, 64)
    assert (first["labels"][:, 0] == -100).all()
    resumed = LineBatches(vocab, SIZE, batch_size=3, seed=1)
    resumed.seek(3)
    again = next(iter(resumed))
    assert all(torch.equal(second[k], again[k]) for k in second)


def test_reader_shapes_and_training_is_deterministic():
    vocab = CTCVocab("abcd")
    curves = []
    for _ in range(2):
        reader, cfg = _reader()
        assert reader(torch.zeros(2, 3, 24, 64)).logits.shape == (2, 16, vocab.size)
        batches = LineBatches(vocab, SIZE, batch_size=4, seed=0, mean=cfg.image_mean, std=cfg.image_std)
        curves.append(train(reader, batches, ctc_stage(1e-3, warmup_steps=2), steps=5, progress=False).losses)
    assert curves[0] == curves[1]
    assert all(math.isfinite(v) for v in curves[0])


@pytest.mark.slow
def test_tiny_tower_learns_to_read():
    vocab = CTCVocab("abcd")
    reader, cfg = _reader()
    batches = LineBatches(vocab, SIZE, batch_size=16, seed=0, mean=cfg.image_mean, std=cfg.image_std)
    result = train(reader, batches, ctc_stage(1e-3, warmup_steps=10), steps=700, progress=False)
    ned = heldout_ned(reader, vocab, SIZE, num_lines=64, seed=0, mean=cfg.image_mean, std=cfg.image_std)
    assert result.losses[-1] < result.losses[0]
    assert ned < 0.75  # measured 0.534 (chance: 1.0); the head breaks out of chance after ~300 steps
