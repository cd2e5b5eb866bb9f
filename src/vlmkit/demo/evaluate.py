"""Held-out evaluation of the demo VLM: every answer is the LM's greedy generation (vlmkit.generate).

    answers = generate_answers(model, tokenizer, samples)            # one string per sample
    scores  = score(samples, answers)                                # per-sample NED or exact match

Text lines and paragraphs are scored by normalized edit distance (vlmkit.eval.metrics, Vary's OCR metric);
shape questions by exact match of the one-word answer (easy-VQA has one reference per question).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmkit.demo.data import Sample, encode_row
from vlmkit.demo.model import DemoVLM
from vlmkit.eval.metrics import exact_match, normalized_edit_distance
from vlmkit.generate import generate
from vlmkit.sampling import GenerationConfig
from vlmkit.text.tokenizer import Tokenizer


@torch.no_grad()
def generate_answers(model: DemoVLM, tokenizer: Tokenizer, samples: Sequence[Sample], max_new_tokens: int = 80,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers of the LM for every sample, in order (samples are batched by image size)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.pixels.shape), []).append(i)
    answers: list[str] = [""] * len(samples)
    was_training = model.training
    model.eval()
    try:
        for (_, H, W), indices in groups.items():
            tokens = model.num_image_tokens(H, W)
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                prompts = [encode_row(tokenizer, model.image_token_id, tokens, samples[i].question, None)[0]
                           for i in chunk]
                pixels = torch.stack([samples[i].pixels for i in chunk])  # (b, 3, H, W)
                result = generate(model, prompts, GenerationConfig(max_new_tokens=max_new_tokens, seed=0),
                                  prefill_inputs={"pixel_values": pixels}, tokenizer=tokenizer)
                for i, text in zip(chunk, result.texts):
                    answers[i] = text
    finally:
        model.train(was_training)
    return answers


def score(sample: Sample, answer: str) -> float:
    """NED (lower is better) for text tasks, exact match (1 = right) for shape questions."""
    if sample.task == "shape":
        return exact_match(answer, sample.answer)
    return normalized_edit_distance(answer, sample.answer)


def mean_score(samples: Sequence[Sample], answers: Sequence[str]) -> float:
    if not samples:
        raise ValueError("no samples to score")
    return sum(score(s, a) for s, a in zip(samples, answers)) / len(samples)
