"""Held-out evaluation of the demo VLM: every answer is the LM's greedy generation (vlmkit.generate).

    answers = generate_answers(model, tokenizer, samples)            # one string per sample
    scores  = score(samples, answers)                                # per-sample NED or exact match

Text lines and paragraphs are scored by normalized edit distance (vlmkit.eval.metrics, Vary's OCR metric);
shape questions by exact match of the one-word answer (easy-VQA has one reference per question), the answer
taken out of the reply by demo.data.reply_answer (a reply may start with a rationale: "red circle. no").
`shape_breakdown` splits the shape score into "what" and yes/no questions and sets the yes/no figure beside
a baseline that never looks at the image: the answer its question form (negated or not) most often has in
the training split. easy-VQA's yes/no answers are skewed by form, so that baseline is high (about 85%).
It also scores the rationales the yes/no replies give against the image's description (data.image_labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmkit.decoding import model_device
from vlmkit.demo.data import YES_NO, Sample, encode_row, image_description, is_negated, reply_answer, reply_rationale
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
                pixels = torch.stack([samples[i].pixels for i in chunk]).to(model_device(model))  # (b, 3, H, W)
                result = generate(model, prompts, GenerationConfig(max_new_tokens=max_new_tokens, seed=0),
                                  prefill_inputs={"pixel_values": pixels}, tokenizer=tokenizer)
                for i, text in zip(chunk, result.texts):
                    answers[i] = text
    finally:
        model.train(was_training)
    return answers


def score(sample: Sample, reply: str) -> float:
    """NED (lower is better) for text tasks, exact match (1 = right) of the reply's answer (reply_answer) for
    shape questions."""
    if sample.task == "shape":
        return exact_match(reply_answer("shape", reply), sample.answer)
    return normalized_edit_distance(reply, sample.answer)


def mean_score(samples: Sequence[Sample], answers: Sequence[str]) -> float:
    if not samples:
        raise ValueError("no samples to score")
    return sum(score(s, a) for s, a in zip(samples, answers)) / len(samples)


def shape_breakdown(samples: Sequence[Sample], answers: Sequence[str], train_questions: Sequence[str],
                    train_answers: Sequence[str]) -> dict[str, float | None]:
    """Accuracy on the "what" and the yes/no shape questions, and on the yes/no ones of the baseline that answers
    every question with the majority answer of its form (is_negated or not) among the training questions;
    "rationale": the share of yes/no replies whose rationale is the image's description, over the yes/no
    questions whose image's description is known (None when no reply has a rationale), with their count."""
    counts: dict[bool, dict[str, int]] = {False: {}, True: {}}
    for question, answer in zip(train_questions, train_answers):
        if answer in YES_NO:
            form = counts[is_negated(question)]
            form[answer] = form.get(answer, 0) + 1
    majority = {negated: max(form, key=form.get) if form else None for negated, form in counts.items()}
    shapes = [(s, a) for s, a in zip(samples, answers) if s.task == "shape"]
    what = [score(s, a) for s, a in shapes if s.answer not in YES_NO]
    yes_no = [(s, a) for s, a in shapes if s.answer in YES_NO]
    described = [(d, reply_rationale(a)) for s, a in yes_no if (d := image_description(s.labels)) is not None]
    given = any(r is not None for _, r in described)

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None
    return {"what": mean(what), "yes_no": mean([score(s, a) for s, a in yes_no]),
            "yes_no_form_majority": mean([float(majority[is_negated(s.question)] == s.answer) for s, _ in yes_no]),
            "rationale": mean([float(d == r) for d, r in described]) if given else None,
            "rationale_scored": len(described)}
