"""Collation and packing: padding by hand, and packed samples computing exactly as if each were alone.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_collate.py
"""

from __future__ import annotations

import pytest
import torch

from vlmkit.config import LMConfig
from vlmkit.data.collate import collate, pack
from vlmkit.data.labels import TrainingExample, build_training_example
from vlmkit.image.plan import ImagePlan
from vlmkit.models.lm import IGNORE_INDEX, CausalLM
from vlmkit.schemes import image_inputs

X = IGNORE_INDEX


def _plan(value: float) -> ImagePlan:
    return ImagePlan("pad", torch.full((1, 3, 4, 4), value), (4, 4), (4, 4), (1, 1), {"features": 2})


def test_collate_pads_right_and_concatenates_images():
    a = TrainingExample([5, 6, 7], [X, 6, 7], [_plan(1.0)])
    b = TrainingExample([8, 9], [X, 9], [])
    c = TrainingExample([1], [X], [_plan(2.0), _plan(3.0)])
    batch = collate([a, b, c], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0], [1, 0, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, 9, X], [X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    assert batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]


def test_pack_layout_by_hand():
    a = TrainingExample([5, 6, 7], [X, 6, 7], [])
    b = TrainingExample([8, 9], [8, 9], [])  # a label on the first token is dropped: it would predict across samples
    c = TrainingExample([1, 2, 3, 4], [X, X, 3, 4], [])
    batch = pack([a, b, c], max_len=5, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7, X, 9], [X, X, 3, 4, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="longer than max_len=3"):
        pack([a, c], max_len=3, pad_id=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return CausalLM(cfg).eval()


def _examples() -> list[TrainingExample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for length, prompt in [(7, 3), (5, 2), (9, 4), (4, 1), (6, 6)]:
        ids = torch.randint(0, 50, (length,), generator=g).tolist()
        out.append(TrainingExample(ids, [X] * prompt + ids[prompt:], []))
    return out


@torch.no_grad()
def test_packed_logits_equal_each_sample_alone(model):
    examples = _examples()
    batch = pack(examples, max_len=16, pad_id=0)
    assert batch["input_ids"].shape[0] == 3  # [7, 5] [9, 4] [6]: several samples share rows
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   segment_ids=batch["segment_ids"]).logits  # (R, T, V)
    row, offset, worst = 0, 0, 0.0
    for ex in examples:
        if offset + len(ex) > 16:
            row, offset = row + 1, 0
        alone = model(torch.tensor([ex.input_ids])).logits[0]  # (T_i, V)
        worst = max(worst, (logits[row, offset:offset + len(ex)] - alone).abs().max().item())
        offset += len(ex)
    assert worst <= 1e-5
    # segment_ids alone (positions derived from them) give the same logits
    derived = model(input_ids=batch["input_ids"], segment_ids=batch["segment_ids"]).logits
    assert (derived - logits).abs().max().item() <= 1e-6
    # and without the block-diagonal mask the samples would see each other
    crossed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert (crossed - logits).abs().max().item() > 1e-3


@torch.no_grad()
def test_packed_loss_is_the_token_weighted_loss_alone(model):
    examples = _examples()
    total, count = 0.0, 0
    for ex in examples:
        labels = torch.tensor([ex.labels])
        n = int((labels[:, 1:] != X).sum())
        if n == 0:
            continue  # a sample with no label (the last one here) adds nothing; alone its mean is 0/0
        total += model(torch.tensor([ex.input_ids]), labels=labels).loss.item() * n
        count += n
    batch = pack(examples, max_len=16, pad_id=0)
    packed = model(**batch).loss.item()
    assert abs(packed - total / count) <= 1e-5
    assert abs(model(**batch, loss_only=True).loss.item() - total / count) <= 1e-5
    padded = model(**collate(examples, pad_id=0)).loss.item()  # right padding: same mean as well
    assert abs(padded - total / count) <= 1e-5


def test_segment_ids_with_a_cache_are_refused(model):
    cache = model.new_cache(1, 8)
    model(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="segment_ids"):
        model(torch.tensor([[3]]), cache=cache, segment_ids=torch.tensor([[1]]))


def test_packed_vlm_batch_equals_its_samples_alone():
    from PIL import Image

    from vlmkit.load import tiny_random_model

    loaded = tiny_random_model()
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    examples = []
    for text, reply in (("hi", "ok"), ("what?", "a green box")):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
                    {"role": "assistant", "content": reply}]
        examples.append(build_training_example(loaded.tokenizer, loaded.chat_template, messages,
                                               loaded.model.image_token_id, loaded.plan_images([img])))
    packed = pack(examples, max_len=200, pad_id=loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        together = loaded.model(**packed).logits[0]
        start = 0
        for ex in examples:
            alone = loaded.model(input_ids=torch.tensor([ex.input_ids]),
                                 **image_inputs(ex.plans)).logits[0]
            n = len(ex.input_ids)
            assert (together[start:start + n] - alone).abs().max().item() <= 1e-5
            start += n
