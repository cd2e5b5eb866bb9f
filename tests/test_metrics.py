"""Evaluation metrics (vlmkit.eval.metrics) against hand-computed values and the benchmarks' own examples.

Oracles: worked values computed by hand in the comments; the DocVQA ANLS example questions of
the metric card of huggingface/evaluate's `anls`; the VQAv2 leave-one-human-out averaging written
out per subset; and, for the edit distance, the recursive textbook definition on random strings.
"""

import functools
import random

import pytest

from vlmkit.eval.metrics import (anls, character_error_rate, exact_match, levenshtein, normalized_edit_distance,
                                 relaxed_accuracy, summarize, vqa_accuracy, vqa_normalize, word_f1)


def _levenshtein_by_definition(a: str, b: str) -> int:
    """lev(a, b) by its recursive definition, memoised: the oracle for the two-row programme."""
    @functools.cache
    def lev(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(lev(i - 1, j) + 1, lev(i, j - 1) + 1, lev(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return lev(len(a), len(b))


@pytest.mark.parametrize("a, b, distance", [
    ("kitten", "sitting", 3),   # k->s, e->i, +g
    ("flaw", "lawn", 2),        # -f, +n
    ("intention", "execution", 5),
    ("", "", 0),
    ("", "abc", 3),
    ("abc", "", 3),
    ("abc", "abc", 0),
    ("abc", "cba", 2),
    ("aaaa", "aa", 2),          # the prefix/suffix stripping must not over-strip repeats
])
def test_levenshtein_hand_values(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_levenshtein_on_token_lists():
    assert levenshtein("the cat sat on the mat".split(), "the cat sat on a mat".split()) == 1
    assert levenshtein(["a", "b"], ["b", "a"]) == 2
    assert levenshtein((1, 2, 3), (1, 3)) == 1


def test_levenshtein_matches_the_recursive_definition():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        assert levenshtein(a, b) == _levenshtein_by_definition(a, b), (a, b)


def test_unicode_counts_characters_not_bytes():
    assert levenshtein("北京大学", "北京大雪") == 1       # one character, three UTF-8 bytes
    assert levenshtein("你好世界", "你好") == 2
    assert levenshtein("中", "文") == 1
    assert normalized_edit_distance("北京大学", "北京大雪") == 1 / 4
    assert character_error_rate("今天天汽很好", "今天天气很好") == 1 / 6
    assert normalized_edit_distance("naïve café", "naive cafe") == 2 / 10
    assert word_f1(list("我爱北京"), list("我爱上海")) == (0.5, 0.5, 0.5)


def test_normalized_edit_distance_hand_values():
    assert normalized_edit_distance("kitten", "sitting") == 3 / 7
    assert normalized_edit_distance("", "") == 0.0
    assert normalized_edit_distance("", "ab") == 1.0
    assert normalized_edit_distance("abc", "xyz") == 1.0
    assert normalized_edit_distance("Hello", "hello") == 1 / 5   # no case folding


def test_normalized_edit_distance_properties():
    rng = random.Random(1)
    alphabet = "ab 中文"
    for _ in range(300):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        ned = normalized_edit_distance(a, b)
        assert 0.0 <= ned <= 1.0
        assert ned == normalized_edit_distance(b, a)
        assert (ned == 0.0) == (a == b)
        c = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert levenshtein(a, c) <= levenshtein(a, b) + levenshtein(b, c)


def test_character_error_rate():
    assert character_error_rate("sitting", "kitten") == 3 / 6
    assert character_error_rate("kitten", "kitten") == 0.0
    assert character_error_rate("abcdef", "ab") == 4 / 2      # insertions push it above 1
    assert character_error_rate("", "abcd") == 1.0
    assert character_error_rate("", "") == 0.0                # empty reference: denominator 1
    assert character_error_rate("xyz", "") == 3.0


def test_word_f1_hand_values():
    # pred {the:2, cat, hat}, ref {the, cat, sat}: overlap the + cat = 2; P = 2/4, R = 2/3, F1 = 4/7
    precision, recall, f1 = word_f1("the cat the hat", "The cat sat")
    assert (precision, recall) == (0.5, 2 / 3)
    assert f1 == pytest.approx(4 / 7, abs=1e-15)
    assert word_f1("a b c", "c b a") == (1.0, 1.0, 1.0)       # a bag: order does not matter
    assert word_f1("a a a", "a") == (1 / 3, 1.0, 0.5)         # multiset: one "a" of three counts
    assert word_f1("hello,  world", "hello world") == (0.5, 0.5, 0.5)  # punctuation stays on the word
    assert word_f1("", "") == (1.0, 1.0, 1.0)
    assert word_f1("", "a") == (0.0, 0.0, 0.0)
    assert word_f1("x y", "a b") == (0.0, 0.0, 0.0)


def test_anls_docvqa_examples():
    # The three questions of the ANLS metric card (huggingface/evaluate, metrics/anls/README.md)
    scores = [
        anls("Denver Broncos", ["Denver Broncos", "Denver R. Broncos"]),   # exact: 1
        anls("12/15/89", ["12/15/88"]),                                    # 1 edit of 8: 1 - 1/8
        anls("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]),              # case-insensitive: 1
    ]
    assert scores == [1.0, 0.875, 1.0]
    assert sum(scores) / 3 == pytest.approx(2.875 / 3)


def test_anls_threshold_and_normalisation():
    assert anls("Lobo", ["Dear Dr. Lobo", "Dr. Lobo"]) == 0.5   # best: 4 edits of 8 = similarity 0.5, kept
    assert anls("ab", "ac") == 0.5                              # similarity exactly 0.5 is not below 0.5
    assert anls("abcd", "axyz") == 0.0                          # similarity 0.25 < 0.5
    assert anls("abcd", "axyz", threshold=0.2) == 0.25
    assert anls("  ITC   Limited ", ["itc limited"]) == 1.0     # trimmed, spaces collapsed, case folded
    assert anls("", [""]) == 1.0
    with pytest.raises(ValueError, match="at least one reference"):
        anls("x", [])


def test_vqa_accuracy_leave_one_out_values():
    # m of 10 humans gave the answer. Leaving out a matching human leaves m-1 matches, else m:
    # Acc = (m * min((m-1)/3, 1) + (10-m) * min(m/3, 1)) / 10
    #   m=0: 0;  m=1: 9*(1/3)/10 = 0.3;  m=2: (2/3 + 8*2/3)/10 = 0.6;  m=3: (3*2/3 + 7)/10 = 0.9;  m>=4: 1
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 5: 1.0, 10: 1.0}
    for m, accuracy in expected.items():
        answers = ["cat"] * m + ["dog"] * (10 - m)
        assert vqa_accuracy("cat", answers) == pytest.approx(accuracy, abs=1e-12), m


def test_vqa_accuracy_applies_the_answer_processing():
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("the dog", ["dog"] * 3 + ["cat"] * 7) == 0.9
    assert vqa_accuracy("dont know", ["don't know"] * 10) == 1.0
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("yes", ["yes"])


@pytest.mark.parametrize("raw, processed", [
    ("Yes.", "yes"),
    ("two", "2"),
    ("none", "0"),
    ("A dog", "dog"),
    ("an apple and the pear", "apple and pear"),
    ("dont", "don't"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("y'alld've", "y'all'd've"),
    ("2.5", "2.5"),                      # a decimal point stays
    ("3.", "3"),                         # a period not followed by a digit goes
    ("1,000", "1000"),                   # digit-comma-digit: punctuation deleted, no space
    ("red/blue", "red blue"),            # punctuation inside a word: replaced by a space
    ("red / blue", "red blue"),          # punctuation next to a space: deleted
    ("hi !", "hi"),
    ("black-and-white", "black and white"),
    ("10:30", "10:30"),                  # colon and apostrophe are kept
    ("  line\nbreak\t", "line break"),
    ("lets go", "lets go"),              # as the official table: "let's" maps only to itself
])
def test_vqa_normalize(raw, processed):
    assert vqa_normalize(raw) == processed


@pytest.mark.parametrize("pred, ref, correct", [
    ("10.4", "10", 1.0),        # 4% off
    ("9.5", "10", 1.0),         # exactly 5% off: within
    ("10.6", "10", 0.0),        # 6% off
    ("-5.2", "-5", 1.0),        # relative to |ref|
    ("1e3", "1000", 1.0),
    ("12%", "0.12", 1.0),       # "%" divides by 100
    ("12.5%", "12%", 1.0),      # 0.125 vs 0.12: 4.2% off
    ("12%", "12", 0.0),         # 0.12 vs 12
    ("0", "0.0", 0.0),          # zero reference: no relative error, exact string match only
    ("0", "0", 1.0),
    ("Yes", "yes", 1.0),
    (" Canada ", "canada", 1.0),
    ("Cnada", "Canada", 0.0),
    ("ten", "10", 0.0),
    ("nan", "nan", 1.0),        # not a finite number: compared as text
])
def test_relaxed_accuracy(pred, ref, correct):
    assert relaxed_accuracy(pred, ref) == correct


def test_relaxed_accuracy_tolerance_argument():
    assert relaxed_accuracy("11", "10", tolerance=0.1) == 1.0
    assert relaxed_accuracy("10.1", "10", tolerance=0.0) == 0.0


def test_exact_match():
    assert exact_match("  Red  Car", "red car") == 1.0
    assert exact_match("Red", "red", normalize=False) == 0.0
    assert exact_match("red.", "red") == 0.0          # punctuation is not normalised away
    assert exact_match("北京", "北京") == 1.0


def test_summarize_means_numeric_fields():
    per_sample = [
        {"id": "a", "ned": 0.0, "em": True, "anls": 1.0},
        {"id": "b", "ned": 0.5, "em": False, "anls": None},
        {"id": "c", "ned": 1.0, "em": True, "prediction": "x"},
    ]
    assert summarize(per_sample) == {"ned": 0.5, "em": 2 / 3, "anls": 1.0}
    assert summarize([]) == {}


def test_summarize_rejects_mixed_fields():
    with pytest.raises(ValueError, match="'ned' mixes numbers"):
        summarize([{"ned": 0.5}, {"ned": "0.5"}])
