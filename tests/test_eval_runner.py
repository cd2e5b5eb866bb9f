"""The evaluation runner and `vlmkit eval`: predictions for every sample, scores against the right references,
summary means, batch-independence of greedy answers, the metric registry, and the Tesseract comparison."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
from PIL import Image, ImageDraw, ImageFont

from vlmkit.data.formats import Sample, load_dataset
from vlmkit.data.synth import DATASET_FILE, READ_TEXT, generate_item, synthesize
from vlmkit.eval.metrics import normalized_edit_distance
from vlmkit.eval.runner import (METRICS, PREDICTIONS_FILE, SUMMARY_FILE, evaluate, get_metrics, split_sample,
                                summary_table)
from vlmkit.eval.tesseract import TesseractError, tesseract_available, tesseract_read
from vlmkit.load import tiny_random_model

COUNTS = {"lines": 4, "shapes": 4}
SIZE = (256, 256)  # synthesize's default image size
MAX_NEW = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    synthesize(folder, COUNTS, seed=0, progress=False)
    return folder / DATASET_FILE


@pytest.fixture(scope="module")
def samples(data) -> list[Sample]:
    return load_dataset(data)[0]


@pytest.fixture(scope="module")
def loaded():
    return tiny_random_model()


@pytest.fixture(scope="module")
def run(samples, loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = evaluate(loaded, samples, batch_size=4, max_new_tokens=MAX_NEW, out_dir=out, quiet=True)
    return result, out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]


def test_every_sample_gets_a_prediction_scored_against_its_own_answer(run, samples):
    result, out = run
    rows = _rows(out)
    assert [r["id"] for r in rows] == [s.id for s in samples] == [r["id"] for r in result.per_sample]
    expected = [generate_item(kind, 0, i, SIZE).answer for kind, n in COUNTS.items() for i in range(n)]
    assert [r["reference"] for r in rows] == expected  # the generator's answers, independent of the file
    for row in rows:
        assert isinstance(row["prediction"], str) and row["answers"] == [row["reference"]]
        assert READ_TEXT in row["prompt"] or "?" in row["prompt"]
        assert row["reference"] not in row["prompt"]  # the answer is not shown to the model
        assert {"ned", "cer", "word_precision", "word_recall", "word_f1", "exact_match"} <= set(row)


def test_ned_recomputed_from_the_written_prediction_and_reference(run):
    _, out = run
    row = _rows(out)[1]
    pred, ref = row["prediction"], row["reference"]
    assert row["ned"] == pytest.approx(normalized_edit_distance(pred, ref))
    assert row["exact_match"] == float(pred.strip().lower() == ref.strip().lower())


def test_summary_means_equal_per_sample_means(run):
    result, out = run
    rows = _rows(out)
    written = json.loads((out / SUMMARY_FILE).read_text())
    assert written["num_samples"] == len(rows) == 8 and written["model"] == "tiny-random"
    for key in ("ned", "cer", "word_f1", "exact_match"):
        mean = sum(r[key] for r in rows) / len(rows)
        assert result.summary[key] == pytest.approx(mean) and written["summary"][key] == pytest.approx(mean)
    assert set(result.summary) == {"ned", "cer", "word_precision", "word_recall", "word_f1", "exact_match"}
    assert "ned (lower is better)" in summary_table(result)


def test_batched_greedy_equals_one_prompt_at_a_time(run, samples, loaded):
    result, _ = run
    alone = evaluate(loaded, samples, metrics=["ned"], batch_size=1, max_new_tokens=MAX_NEW, quiet=True)
    assert [r["prediction"] for r in alone.per_sample] == [r["prediction"] for r in result.per_sample]


def test_unknown_metric_raises_listing_the_valid_ones(samples, loaded):
    with pytest.raises(ValueError, match="unknown metric.*'bleu'.*ned, cer"):
        evaluate(loaded, samples, metrics=["ned", "bleu"], quiet=True)
    with pytest.raises(ValueError, match="once"):
        get_metrics(["ned", "ned"])


def test_vqa_accuracy_refuses_single_references_before_generating(samples, loaded):
    with pytest.raises(ValueError, match="vqa_accuracy needs the human answers.*--answer-separator"):
        evaluate(loaded, samples, metrics=["vqa_accuracy"], quiet=True)


def test_several_answers_through_a_separator():
    sample = Sample("q", [], [{"role": "user", "content": [{"type": "text", "text": "How many?"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "2 || two ||2 dogs"}]}])
    prompt, reference, answers = split_sample(sample, "||")
    assert prompt == sample.messages[:1] and reference == "2 || two ||2 dogs" and answers == ["2", "two", "2 dogs"]
    assert split_sample(sample)[2] == ["2 || two ||2 dogs"]
    # single-reference metrics take the best answer: NED 0 against "two", CER 1/3 at best ("twa" vs "two")
    assert METRICS["ned"]("two", answers) == {"ned": 0.0}
    assert METRICS["cer"]("twa", answers) == {"cer": pytest.approx(1 / 3)}
    assert METRICS["exact_match"]("Two", answers) == {"exact_match": 1.0}
    assert METRICS["anls"]("2 dog", answers) == {"anls": pytest.approx(1 - 1 / 6)}  # best: "2 dogs", one edit in 6
    assert METRICS["word_f1"]("2 cats", answers)["word_f1"] == pytest.approx(2 / 3)  # best: vs "2", p = 1/2, r = 1
    with pytest.raises(ValueError, match="empty answer"):
        split_sample(Sample("e", [], [sample.messages[0], {"role": "assistant",
                                                           "content": [{"type": "text", "text": "a||"}]}]), "||")


def test_cli_writes_the_files_and_json(data, tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "vlmkit.cli", "eval", "--model", "tiny-random", "--data", str(data),
                           "--metrics", "ned,cer,exact_match", "--out", str(out), "--batch-size", "4",
                           "--max-new-tokens", "6", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["num_samples"] == 8 and answer["metrics"] == ["ned", "cer", "exact_match"]
    assert answer == json.loads((out / SUMMARY_FILE).read_text())
    rows = _rows(out)
    assert len(rows) == 8 and answer["summary"]["ned"] == pytest.approx(sum(r["ned"] for r in rows) / 8)
    bad = subprocess.run([sys.executable, "-m", "vlmkit.cli", "eval", "--model", "tiny-random", "--data", str(data),
                          "--metrics", "ned,bleu"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown metric(s) ['bleu']" in bad.stderr


def test_tesseract_missing_is_reported_not_silent(samples, loaded, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no tesseract to find
    assert not tesseract_available()
    with pytest.raises(TesseractError, match="not installed"):
        tesseract_read(Image.new("RGB", (64, 16), "white"))
    result = evaluate(loaded, samples[:2], metrics=["ned"], max_new_tokens=2, compare_tesseract=True, quiet=True)
    assert "Tesseract is not installed" in capsys.readouterr().err
    assert result.tesseract_summary is None and "not installed" in result.notes[0]
    assert "not installed" in result.to_json()["notes"][0]


def _clean_line(text: str) -> Image.Image:
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 28)
    image = Image.new("RGB", (720, 56), "white")
    ImageDraw.Draw(image).text((12, 10), text, fill="black", font=font)
    return image


@pytest.mark.skipif(not tesseract_available(), reason="tesseract is not installed (apt-get install tesseract-ocr)")
def test_tesseract_reads_a_clean_line_and_is_reported_beside_the_model(samples, loaded):
    assert tesseract_read(_clean_line("The quick brown fox jumps over the lazy dog")) == \
        "The quick brown fox jumps over the lazy dog"
    result = evaluate(loaded, samples, metrics=["ned", "exact_match"], max_new_tokens=2, compare_tesseract=True,
                      quiet=True)
    assert set(result.tesseract_summary) == set(result.summary) == {"ned", "exact_match"}
    rows = result.per_sample
    assert all(isinstance(r["tesseract_prediction"], str) for r in rows)
    assert result.tesseract_summary["ned"] == pytest.approx(sum(r["tesseract_ned"] for r in rows) / len(rows))
    line_ned = [r["tesseract_ned"] for r in rows if r["id"].startswith("lines")]
    assert sum(line_ned) / len(line_ned) < 0.2  # clean rendered lines are Tesseract's home ground
    assert "tesseract" in summary_table(result).splitlines()[0]
