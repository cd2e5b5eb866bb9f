"""The evaluation run: a model answers every sample of a dataset, each answer is scored, scores are averaged.

    samples, _ = load_dataset("synth/data.json")
    result = evaluate(load_model("tiny-random"), samples, metrics=("ned", "cer"), out_dir="eval-out")
    result.summary                       # {"ned": 0.93, "cer": 1.2}
    # eval-out/predictions.jsonl (one row per sample) and eval-out/summary.json; `vlmkit eval` on the command line

A sample's prompt is its conversation up to its last assistant turn, which is the reference: the
model answers with greedy decoding (batched; a row's answer does not depend on its batch, see
generate.py), and the answer is scored by each metric of `METRICS` (names -> metrics.py functions).

Several reference answers (ANLS, VQA accuracy): a dataset record holds one assistant text, so the
answers are written in it separated by a string given as `answer_separator`, e.g. the assistant
value "2 || two || 2 dogs" with answer_separator="||" (each answer is trimmed). Without a separator
the whole assistant text is the one reference. With several answers, the single-reference metrics
follow SQuAD: the best score over the answers counts (lowest NED / CER, highest F1 / exact match /
relaxed accuracy); ANLS takes the answers as its reference list; VQA accuracy needs at least two
(VQAv2 has ten) and refuses samples with fewer before anything is generated.

With compare_tesseract=True, Tesseract (eval/tesseract.py) reads the image of every one-image sample
and its answers are scored with the same metrics, reported beside the model's in the per-sample rows
(`tesseract_prediction`, `tesseract_<score>`) and in `tesseract_summary`. When Tesseract is not
installed this is skipped with a printed note that also goes into `notes` and summary.json.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from vlmkit.data.formats import Sample
from vlmkit.eval import metrics as m
from vlmkit.eval.tesseract import INSTALL_HINT, tesseract_available, tesseract_read
from vlmkit.generate import generate
from vlmkit.image.load import load_image
from vlmkit.load import LoadedModel
from vlmkit.sampling import GenerationConfig

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
DEFAULT_METRICS = ("ned", "cer", "word_f1", "exact_match")
TESSERACT_PREFIX = "tesseract_"

# A metric scores one prediction against the reference answers (at least one): {score name: value}.
MetricFn = Callable[[str, list[str]], dict[str, float]]


def _best(name: str, score: Callable[[str, str], float], lower_is_better: bool = False) -> MetricFn:
    """A single-reference score taken at its best over the answers (SQuAD's rule for several answers)."""
    pick = min if lower_is_better else max

    def metric(pred: str, refs: list[str]) -> dict[str, float]:
        return {name: pick(score(pred, ref) for ref in refs)}
    return metric


def _word_f1(pred: str, refs: list[str]) -> dict[str, float]:
    """Precision, recall and F1 against the answer with the highest F1."""
    precision, recall, f1 = max((m.word_f1(pred, ref) for ref in refs), key=lambda prf: prf[2])
    return {"word_precision": precision, "word_recall": recall, "word_f1": f1}


METRICS: dict[str, MetricFn] = {
    "ned": _best("ned", m.normalized_edit_distance, lower_is_better=True),
    "cer": _best("cer", m.character_error_rate, lower_is_better=True),
    "word_f1": _word_f1,
    "exact_match": _best("exact_match", m.exact_match),
    "relaxed_accuracy": _best("relaxed_accuracy", m.relaxed_accuracy),
    "anls": lambda pred, refs: {"anls": m.anls(pred, refs)},
    "vqa_accuracy": lambda pred, refs: {"vqa_accuracy": m.vqa_accuracy(pred, refs)},
}
LOWER_IS_BETTER = {"ned", "cer"}


def get_metrics(names: Sequence[str]) -> dict[str, MetricFn]:
    """The metric functions of names, in order; raises ValueError on an unknown or repeated name."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give each metric once and at least one, got {list(names)}")
    return {n: METRICS[n] for n in names}


@dataclass
class EvalResult:
    """One row per sample (id, prompt, prediction, reference, answers, scores) and the mean of every score."""

    per_sample: list[dict[str, Any]]
    summary: dict[str, float]
    model: str = ""
    metrics: list[str] = field(default_factory=list)
    tesseract_summary: dict[str, float] | None = None  # same scores for Tesseract's reading, when it ran
    notes: list[str] = field(default_factory=list)  # what was skipped and why

    def to_json(self) -> dict[str, Any]:
        """The summary as written to summary.json and printed by `vlmkit eval --json`."""
        return {"model": self.model, "num_samples": len(self.per_sample), "metrics": self.metrics,
                "summary": self.summary, "tesseract_summary": self.tesseract_summary, "notes": self.notes}


@dataclass
class _Case:
    """A sample split into what the model sees and what it is scored against."""

    sample: Sample
    prompt_messages: list[dict[str, Any]]
    reference: str
    answers: list[str]


def split_sample(sample: Sample, answer_separator: str | None = None) -> tuple[list[dict[str, Any]], str, list[str]]:
    """(prompt messages, reference text, reference answers): the conversation before the last assistant turn,
    that turn's text, and the text split on answer_separator (trimmed; the whole text without one)."""
    last = max((i for i, msg in enumerate(sample.messages) if msg["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise ValueError(f"sample {sample.id!r} has no assistant turn after a prompt to score against; every "
                         "evaluated conversation must end with the reference answer")
    reference = "".join(p["text"] for p in sample.messages[last]["content"] if p["type"] == "text")
    if answer_separator is None:
        answers = [reference]
    else:
        answers = [a.strip() for a in reference.split(answer_separator)]
        if any(not a for a in answers):
            raise ValueError(f"sample {sample.id!r}: reference {reference!r} has an empty answer when split on "
                             f"{answer_separator!r}; write answers as 'a{answer_separator}b'")
    return sample.messages[:last], reference, answers


def evaluate(loaded: LoadedModel, samples: Sequence[Sample], metrics: Sequence[str] = DEFAULT_METRICS,
             batch_size: int = 8, max_new_tokens: int = 128, answer_separator: str | None = None,
             compare_tesseract: bool = False, tesseract_psm: int = 7, out_dir: str | os.PathLike | None = None,
             quiet: bool = False) -> EvalResult:
    """Answer every sample with greedy decoding in batches and score each answer (see the module docstring).

    out_dir: write predictions.jsonl and summary.json there and print the summary table.
    quiet: no progress bar and no table (notes about skipped work are always printed, to stderr).
    """
    chosen = get_metrics(metrics)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not samples:
        raise ValueError("no samples to evaluate; check the dataset file")
    cases = [_Case(s, *split_sample(s, answer_separator)) for s in samples]
    if "vqa_accuracy" in chosen:
        few = [c.sample.id for c in cases if len(c.answers) < 2]
        if few:
            raise ValueError(f"vqa_accuracy needs the human answers (>= 2, VQAv2 has 10) but {len(few)} sample(s) "
                             f"have fewer, e.g. {few[:3]}; separate the answers with answer_separator "
                             "(--answer-separator) or use exact_match")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    rows: list[dict[str, Any]] = []
    batches = [cases[i:i + batch_size] for i in range(0, len(cases), batch_size)]
    for batch in _progress(batches, len(cases), "evaluating", enabled=not quiet, size=len):
        for case, prediction in zip(batch, _answer_batch(loaded, batch, cfg)):
            row = {"id": case.sample.id,
                   "prompt": loaded.chat_template.render(case.prompt_messages, add_generation_prompt=True),
                   "prediction": prediction, "reference": case.reference, "answers": case.answers}
            rows.append(row | _score(chosen, prediction, case.answers))
    score_keys = [k for k in rows[0] if k not in ("id", "prompt", "prediction", "reference", "answers")]
    result = EvalResult(rows, m.summarize([{k: r[k] for k in score_keys} for r in rows]), loaded.name, list(chosen))
    if compare_tesseract:
        _compare_tesseract(result, cases, chosen, score_keys, tesseract_psm, quiet)
    if out_dir is not None:
        write_results(result, out_dir)
        if not quiet:
            print(summary_table(result))
    return result


def _answer_batch(loaded: LoadedModel, batch: Sequence[_Case], cfg: GenerationConfig) -> list[str]:
    """Greedy answers to a batch of prompts; their images go in prompt order, row after row (the order in
    which the VLM fills the image placeholder tokens of the left-padded (B, T) batch)."""
    prompts, plans = [], []
    for case in batch:
        images = [load_image(path) for path in case.sample.images]
        prompt = loaded.prompt(case.prompt_messages, loaded.plan_images(images))
        prompts.append(prompt.ids)
        plans.extend(prompt.plans)
    with torch.inference_mode():
        result = generate(loaded.model, prompts, cfg, prefill_inputs=loaded.image_inputs(plans),
                          tokenizer=loaded.tokenizer)
    return result.texts


def _score(chosen: dict[str, MetricFn], prediction: str, answers: list[str]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for fn in chosen.values():
        scores.update(fn(prediction, answers))
    return scores


def _compare_tesseract(result: EvalResult, cases: Sequence[_Case], chosen: dict[str, MetricFn],
                       score_keys: list[str], psm: int, quiet: bool) -> None:
    """Read each one-image sample with Tesseract and add its scores beside the model's (or a note why not)."""
    if not tesseract_available():
        _note(result, f"Tesseract comparison skipped: Tesseract is not installed (no `tesseract` on PATH); "
                      f"{INSTALL_HINT}")
        return
    readable = [(row, case) for row, case in zip(result.per_sample, cases) if len(case.sample.images) == 1]
    if len(readable) < len(cases):
        _note(result, f"Tesseract read only the {len(readable)} one-image sample(s); "
                      f"{len(cases) - len(readable)} sample(s) with no or several images were left out of its scores")
    for row, case in _progress(readable, len(readable), "tesseract", enabled=not quiet):
        text = tesseract_read(load_image(case.sample.images[0]), psm=psm)
        row[TESSERACT_PREFIX + "prediction"] = text
        row.update({TESSERACT_PREFIX + k: v for k, v in _score(chosen, text, case.answers).items()})
    scored = [{k: row[TESSERACT_PREFIX + k] for k in score_keys} for row, _ in readable]
    result.tesseract_summary = m.summarize(scored) if scored else None
    if not scored:
        _note(result, "Tesseract comparison skipped: no sample has exactly one image")


def _note(result: EvalResult, text: str) -> None:
    result.notes.append(text)
    print(f"note: {text}", file=sys.stderr)


def write_results(result: EvalResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write out_dir/predictions.jsonl (one row per sample) and out_dir/summary.json; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions, summary = out / PREDICTIONS_FILE, out / SUMMARY_FILE
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.per_sample),
                           encoding="utf-8")
    summary.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return predictions, summary


def summary_table(result: EvalResult) -> str:
    """The mean scores as a text table, one row per score, Tesseract's column beside the model's when it ran."""
    header = ["score", result.model or "model"] + (["tesseract"] if result.tesseract_summary is not None else [])
    lines = []
    for key, value in result.summary.items():
        direction = "lower is better" if key in LOWER_IS_BETTER else "higher is better"
        cells = [f"{key} ({direction})", f"{value:.4f}"]
        if result.tesseract_summary is not None:
            other = result.tesseract_summary.get(key)
            cells.append("-" if other is None else f"{other:.4f}")
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def render(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    body = [render(header), render(["-" * w for w in widths]), *map(render, lines)]
    return "\n".join(body + [f"{len(result.per_sample)} samples"] + [f"note: {n}" for n in result.notes])


T = TypeVar("T")


def _progress(items: Sequence[T], total: int, desc: str, enabled: bool,
              size: Callable[[T], int] = lambda item: 1) -> Iterator[T]:
    """items with a progress bar on stderr counting samples (an item advances it by size(item)):
    tqdm when installed, else a counter line."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        done = 0
        for item in items:
            yield item
            done += size(item)
            print(f"\r{desc} {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)
        return
    with tqdm(total=total, desc=desc, unit="sample", file=sys.stderr) as bar:
        for item in items:
            yield item
            bar.update(size(item))
