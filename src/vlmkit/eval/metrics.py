"""Evaluation metrics for OCR and visual question answering, each a pure function of strings.

Every function states the formula it computes and the benchmark that defines it. Strings are
compared by Python characters (Unicode code points), never bytes, so one Chinese character is
one edit. Per-sample scores are floats; `summarize` averages a list of per-sample dicts.

Run the worked examples with `python -m pytest --doctest-modules src/vlmkit/eval/metrics.py`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence

__all__ = [
    "levenshtein", "normalized_edit_distance", "character_error_rate", "word_f1", "anls",
    "vqa_normalize", "vqa_accuracy", "relaxed_accuracy", "exact_match", "normalize_text", "summarize",
]


def levenshtein(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Minimum number of single-element insertions, deletions and substitutions turning `a` into `b`.

    Works on strings (by character) and on token lists alike. The Wagner-Fischer dynamic
    programme, O(len(a) * len(b)) time, keeping two rows of length min(len) + 1; a common
    prefix and suffix are stripped first since they never cost an edit.

    >>> levenshtein("kitten", "sitting")
    3
    >>> levenshtein("北京大学", "北京大雪")
    1
    >>> levenshtein(["the", "cat", "sat"], ["the", "cat"])
    1
    """
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    a, b = a[start:end_a], b[start:end_b]
    if len(a) < len(b):
        a, b = b, a  # the row runs over the shorter sequence
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))  # previous[j]: distance between a[:i-1] and b[:j]
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1,                 # delete x
                               current[j - 1] + 1,              # insert y
                               previous[j - 1] + (x != y)))     # substitute (free when equal)
        previous = current
    return previous[-1]


def normalized_edit_distance(pred: Sequence[Hashable], ref: Sequence[Hashable]) -> float:
    """Levenshtein(pred, ref) / max(len(pred), len(ref)), in [0, 1]; 0.0 when both are empty.

    The OCR metric of Vary (Wei et al. 2023, "Vary: Scaling up the Vision Vocabulary", Table 1,
    "Edit Distance"); lower is better. No normalisation of case or spaces is applied.

    >>> normalized_edit_distance("kitten", "sitting")  # 3 / 7
    0.42857142857142855
    >>> normalized_edit_distance("", "")
    0.0
    """
    longest = max(len(pred), len(ref))
    return levenshtein(pred, ref) / longest if longest else 0.0


def character_error_rate(pred: str, ref: str) -> float:
    """Character error rate: Levenshtein(pred, ref) / len(ref) (insertions can push it above 1).

    An empty reference has no characters to divide by: the denominator is taken as 1, so the
    CER is 0.0 for an empty prediction and len(pred) (one per inserted character) otherwise.

    >>> character_error_rate("sitting", "kitten")  # 3 edits over 6 reference characters
    0.5
    >>> character_error_rate("abc", "")
    3.0
    """
    return levenshtein(pred, ref) / max(len(ref), 1)


def word_f1(pred: str | Sequence[str], ref: str | Sequence[str]) -> tuple[float, float, float]:
    """Bag-of-words (precision, recall, F1) of a prediction against a reference.

    Normalisation: a string is lower-cased and split on whitespace (punctuation stays attached
    to its word); a list is taken as the tokens as given, so `word_f1(list(p), list(r))` scores
    Chinese by character. The overlap is the multiset intersection, as in SQuAD's token F1 and
    Vary's F1: precision = overlap / len(pred), recall = overlap / len(ref), F1 = their harmonic
    mean. Two empty token lists score (1, 1, 1); one empty list, or no overlap, scores (0, 0, 0).

    >>> word_f1("the cat the hat", "The cat sat")  # overlap {the, cat} = 2
    (0.5, 0.6666666666666666, 0.5714285714285715)
    """
    pred_tokens = pred.lower().split() if isinstance(pred, str) else list(pred)
    ref_tokens = ref.lower().split() if isinstance(ref, str) else list(ref)
    if not pred_tokens and not ref_tokens:
        return 1.0, 1.0, 1.0
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0, 0.0, 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return precision, recall, 2 * precision * recall / (precision + recall)


def normalize_text(text: str) -> str:
    """Lower-case, trim, and collapse every run of whitespace to one space.

    >>> normalize_text("  Dear   Dr.\\tLobo ")
    'dear dr. lobo'
    """
    return " ".join(text.lower().split())


def anls(pred: str, refs: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer (DocVQA, ST-VQA; Biten et al. 2019).

    score = max over references r of s(r), s(r) = 1 - NED(pred, r), and 0 when that best
    similarity is below `threshold` (0.5). Answers are compared case-insensitively, trimmed and
    with whitespace runs collapsed, as the DocVQA evaluation script does (`normalize_text`); that
    script divides by the longer raw answer, here the normalised lengths are used (they differ
    only for answers with extra spaces). The dataset ANLS is the mean of this over questions.

    >>> anls("12/15/89", ["12/15/88"])  # 1 - 1/8
    0.875
    >>> anls("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"])
    1.0
    >>> anls("tomato", "potato")  # similarity 4/6 passes; "cat" vs "dog" would not
    0.6666666666666667
    """
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ValueError("anls needs at least one reference answer; got an empty list")
    pred = normalize_text(pred)
    best = max(1.0 - normalized_edit_distance(pred, normalize_text(ref)) for ref in refs)
    return best if best >= threshold else 0.0


# VQAv2 answer processing, after the official evaluation (GT-Vision-Lab/VQA, vqaEval.py) and
# https://visualqa.org/evaluation.html. Contractions missing one apostrophe get it back: the
# official table lists, for each contraction below, every spelling with exactly one apostrophe
# dropped ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've").
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've "
    "shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
    "someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're "
    "what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're "
    "why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're "
    "you've"
).split()
_MISSING_APOSTROPHE = {
    word[:i] + word[i + 1:]: word for word in _CONTRACTIONS for i, c in enumerate(word) if c == "'"
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"  # apostrophe, colon and period are not in it
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def vqa_normalize(answer: str) -> str:
    """The VQAv2 answer processing, in the official evaluation's order.

    1. Newlines and tabs become spaces; the answer is trimmed.
    2. Each punctuation mark of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where the
       answer has it next to a space or anywhere contains a digit-comma-digit ("100,978" ->
       "100978"), and replaced by a space otherwise ("black-white" -> "black white").
    3. Periods not followed by a digit are deleted (a decimal point "2.5" stays).
    4. Lower-case; number words "none", "zero" ... "ten" become digits; articles a/an/the are
       dropped; a contraction missing an apostrophe gets it back ("dont" -> "don't").

    The contraction table is the official one except "somebody'd", which the official table maps
    the wrong way round ("somebody'd" -> "somebodyd") and is left alone here; its capitalised
    entries ("Im", "Ive", "Id've") can never match lower-cased words and are left out, and its
    "let's" and "she's" entries map to themselves, so "lets" and "shes" are not changed either.

    >>> vqa_normalize("Two dogs.")
    '2 dogs'
    >>> vqa_normalize("The black-and-white cat")
    'black and white cat'
    >>> vqa_normalize("dont know, 2.5 or 1,000?")
    "don't know 2.5 or 1000"
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        delete = glue or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete else " ")
    out = _PERIOD_NOT_DECIMAL.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [_MISSING_APOSTROPHE.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (10 per question in VQAv2).

    Acc = mean over the len(answers) subsets that leave one human out of
    min(#humans in the subset who gave `pred` / 3, 1) (Antol et al. 2015; "averaged over all
    10 choose 9 sets of human annotators", visualqa.org/evaluation.html). Prediction and answers
    are compared after `vqa_normalize`. With 10 answers, m matching humans score 0, 0.3, 0.6, 0.9
    for m = 0..3 and 1.0 for m >= 4. The official script skips the processing when all answers
    are identical; here it is always applied, which only differs for a prediction that the
    processing would change (an official "Two" against ten "2" scores 0, here 1).

    >>> vqa_accuracy("Two", ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"])
    0.6
    """
    if len(answers) < 2:
        raise ValueError(f"vqa_accuracy needs the human answers (10 per VQAv2 question); got {len(answers)}. "
                         "Score a single reference with exact_match instead.")
    pred = vqa_normalize(pred)
    hits = [vqa_normalize(a) == pred for a in answers]
    matches = sum(hits)
    humans_agreeing = sum(min(matches - left_out, 3) for left_out in hits)  # per subset, capped at 3
    return humans_agreeing / (3 * len(hits))


def _to_number(text: str) -> float | None:
    """A finite float from "12", "-3.5", "1e3"; "12%" reads as 0.12; None for anything else."""
    text = text.strip()
    scale = 1.0
    if text.endswith("%"):
        text, scale = text[:-1], 0.01
    try:
        value = float(text) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_accuracy(pred: str, ref: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Masry et al. 2022): 1.0 if correct, else 0.0.

    When both answers are numbers and the reference is not zero, the prediction is correct if
    |pred - ref| / |ref| <= tolerance (5%). A trailing "%" divides by 100, so "12%" equals
    "0.12" but not "12", as in Pix2Struct's `relaxed_correctness`, the reference implementation.
    Everything else (words, a zero reference) must match exactly after `normalize_text`.

    >>> relaxed_accuracy("10.4", "10")
    1.0
    >>> relaxed_accuracy("10.6", "10")
    0.0
    >>> relaxed_accuracy(" Yes", "yes")
    1.0
    """
    pred_number, ref_number = _to_number(pred), _to_number(ref)
    if pred_number is not None and ref_number:
        return float(abs(pred_number - ref_number) / abs(ref_number) <= tolerance)
    return float(normalize_text(pred) == normalize_text(ref))


def exact_match(pred: str, ref: str, normalize: bool = True) -> float:
    """1.0 if the answers are equal, else 0.0; with `normalize`, compared after `normalize_text`.

    >>> exact_match("Red ", "red")
    1.0
    >>> exact_match("Red", "red", normalize=False)
    0.0
    """
    if normalize:
        pred, ref = normalize_text(pred), normalize_text(ref)
    return float(pred == ref)


def summarize(per_sample: list[dict]) -> dict[str, float]:
    """Mean of every numeric field over the samples that have it, in first-seen key order.

    Numbers and booleans are averaged (a boolean as 0/1); None means "not scored" and is skipped;
    fields holding only other values (ids, texts) are left out. A field mixing numbers with other
    values raises ValueError. An empty list gives an empty dict.

    >>> summarize([{"id": "a", "ned": 0.25, "em": True}, {"id": "b", "ned": 0.75, "em": False, "anls": None}])
    {'ned': 0.5, 'em': 0.5}
    """
    columns: dict[str, list] = {}
    for sample in per_sample:
        for key, value in sample.items():
            if value is not None:
                columns.setdefault(key, []).append(value)
    summary = {}
    for key, values in columns.items():
        numeric = [isinstance(v, (int, float)) for v in values]
        if all(numeric):
            summary[key] = sum(float(v) for v in values) / len(values)
        elif any(numeric):
            example = next(v for v, ok in zip(values, numeric) if not ok)
            raise ValueError(f"field {key!r} mixes numbers with {type(example).__name__} values such as "
                             f"{example!r}; store scores as numbers (or None when not scored)")
    return summary
