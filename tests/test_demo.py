"""`vlmkit demo`: the pieces against hand-computed values and rendered pixels, cached generation against the
library's no-cache reference path, an end-to-end run at a tiny budget, and (slow) the default demo against
its targets: on 2 threads within 12 minutes, line NED <= 0.03 and shape accuracy >= 90%.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_demo.py   (-m demo_full runs the full 12-minute demo)
"""

from __future__ import annotations

import collections
import json

import numpy as np

import pytest
import torch

from vlmkit.cli import build_parser
from vlmkit.demo import data as D
from vlmkit.demo.layout import BAND, line_bands, stack_lines
from vlmkit.demo.model import DemoConfig, DemoVLM, soft_char_count
from vlmkit.demo.report import terminal_text
from vlmkit.demo.run import JSON_KEYS, DemoSettings, Schedule, run_demo
from vlmkit.generate import generate, generate_naive
from vlmkit.models.ctc import BLANK
from vlmkit.models.lm import IGNORE_INDEX
from vlmkit.sampling import GenerationConfig


def _ink_columns(sample: D.Sample) -> np.ndarray:
    """Columns of a rendered line that hold ink (text pixels are bright after text_pixels)."""
    return np.nonzero((sample.pixels.amax(0) > -0.5).any(0).numpy())[0]


def test_char_centres_sit_on_the_rendered_glyphs():
    # The oracle is the rendered image: every non-space character's centre column must hold ink within 2 px,
    # and the first/last centres lie inside the inked span.
    for i in range(12):
        sample = D.line_item(0, D.HELDOUT, i)
        ink = _ink_columns(sample)
        for char, (x, width) in zip(sample.answer, sample.centres):
            if char != " ":
                assert np.abs(ink - x).min() <= 2, (i, sample.answer, char, x)
        assert ink[0] - 2 <= sample.centres[0][0] and sample.centres[-1][0] <= ink[-1] + 2


def test_frame_targets_by_hand():
    # steps of 4 px: centres 3 and 5 fall in steps 0 and 1; the 12-px-wide third character (centre 14) covers
    # steps 2..4 (middles 10, 14, 18): peak at step 3, the others ignored; step 5 is blank.
    assert D.frame_targets([5, 5, 7], [(3.0, 2.0), (5.0, 2.0), (14.0, 12.0)], 6, 4) == [5, 5, IGNORE_INDEX, 7,
                                                                                         IGNORE_INDEX, BLANK]
    # a doubled letter whose centres share a step keeps two peaks
    assert D.frame_targets([2, 2], [(5.0, 1.0), (6.0, 1.0)], 4, 4) == [BLANK, 2, 2, BLANK]


def test_shape_labels_from_the_questions():
    questions = ["what color is the shape?", "is there a red shape?", "what shape is in the image?",  # image 7
                 "what is the blue shape?",  # image 9: the question's colour word describes it too
                 "is there not a circle?", "does the image contain a green shape?",  # image 4: a circle, colour ?
                 "is there a circle?", "is no triangle present?", "is there a red shape?"]  # image 5
    answers = ["teal", "no", "circle", "rectangle", "no", "no", "no", "yes", "yes"]
    labels = D.image_labels(questions, answers, [7, 7, 7, 9, 4, 4, 5, 5, 5])
    colour, shape = D.SHAPE_COLOURS.index, D.SHAPE_NAMES.index
    assert labels == {7: (colour("teal"), shape("circle")), 9: (colour("blue"), shape("rectangle")),
                      4: (IGNORE_INDEX, shape("circle")),
                      5: (colour("red"), shape("rectangle"))}  # neither circle nor triangle: the rectangle
    assert D.image_description(labels[9]) == "blue rectangle" and D.image_description(labels[4]) is None
    with pytest.raises(ValueError, match="image 3: its questions contradict each other on its colour"):
        D.image_labels(["what color is the shape?", "is there a red shape?"], ["red", "no"], [3, 3])


def test_yes_no_target_is_the_images_description_then_the_answer():
    # easy-VQA test question 3, "does the image contain a circle?" -> "no"; its image's questions 0 and 1 say
    # "what is the red shape?" -> "triangle", "what is the color of the triangle?" -> "red"
    shapes = D.ShapeQuestions(D.HELDOUT)
    assert (shapes.questions[3], shapes.answers[3]) == ("does the image contain a circle?", "no")
    sample = shapes.item(3, rationale=True)
    assert sample.answer == "no" and sample.reply() == "red triangle. no"
    assert shapes.item(3).reply() == "no" and shapes.item(0, rationale=True).reply() == "triangle"  # "what": plain
    model, tokenizer = _tiny_model()
    batch = D.collate_samples([sample], tokenizer, D.ctc_vocab(), model)
    row, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tokenizer.decode([t for t, lab in zip(row, labels) if lab != IGNORE_INDEX]) == "red triangle. no</s>"
    # the answer is taken out of a reply after its rationale, by one function used by evaluation
    from vlmkit.demo.evaluate import score
    assert D.reply_answer("shape", "red triangle. no") == "no" and D.reply_answer("shape", "triangle") == "triangle"
    assert D.reply_rationale("red triangle. no") == "red triangle" and D.reply_rationale("no") is None
    assert D.reply_answer("line", "ab. cd") == "ab. cd"
    assert score(sample, "red triangle. no") == 1.0 and score(sample, "red circle. yes") == 0.0


def test_soft_char_count_by_hand():
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])  # blank, "a", "b" classes
    # step 0: new = 0.5; step 1: 0.5 * (1 - 0.5) = 0.25; step 2: 1 * (1 - 0) = 1
    assert soft_char_count(p).tolist() == [[0.5, 0.75, 1.75]]


def test_stack_lines_puts_each_rendered_line_in_its_band():
    for i in range(6):
        sample = D.paragraph_item(0, D.HELDOUT, i, keep_image=True)
        stacked = stack_lines(sample.image)
        assert stacked.size == (256, 3 * BAND)
        ink = (sample.pixels.amax(0) > -0.5).numpy()  # (96, 256)
        bands = line_bands(ink)
        assert len(bands) == 3 and all(0 <= a and b <= ink.shape[0] for a, b in bands)
        for k in range(3):  # every band has ink, none at its top and bottom rows (lines do not spill over)
            band = ink[k * BAND:(k + 1) * BAND]
            assert band.any() and not band[0].any() and not band[-1].any()


def _tiny_model(seed: int = 0) -> tuple[DemoVLM, object]:
    tokenizer, vocab = D.demo_tokenizer(), D.ctc_vocab()
    cfg = DemoConfig(lm_vocab_size=len(tokenizer.vocab), ctc_to_lm=D.ctc_to_lm(vocab, tokenizer),
                     image_token_id=tokenizer.encode("<image>")[0], prompt_end_id=tokenizer.encode("\n")[0],
                     width=32, vision_layers=1, vision_heads=2, stem_channels=(8, 8, 16), lm_width=32, lm_layers=2,
                     lm_heads=2, lm_intermediate=64)
    torch.manual_seed(seed)
    return DemoVLM(cfg).eval(), tokenizer


def test_cached_generation_equals_the_naive_reference():
    # generate_naive reruns the whole sequence (image included) every step without a cache: the aligned image
    # positions must not depend on how much of the answer exists, so both paths give the same tokens.
    model, tokenizer = _tiny_model()
    with torch.no_grad():
        for p in model.ctc.parameters():  # a sharp CTC head, so the soft counts vary along the line
            p.mul_(30)
    samples = [D.line_item(0, D.HELDOUT, i) for i in range(3)]
    tokens = model.num_image_tokens(32, 256)
    assert tokens == 64
    prompts = [D.encode_row(tokenizer, model.image_token_id, tokens, s.question, None)[0] for s in samples]
    pixels = torch.stack([s.pixels for s in samples])
    cfg = GenerationConfig(max_new_tokens=12, seed=0)
    fast = generate(model, prompts, cfg, prefill_inputs={"pixel_values": pixels}, tokenizer=tokenizer)
    slow = generate_naive(model, prompts, cfg, prefill_inputs={"pixel_values": pixels}, tokenizer=tokenizer)
    assert fast.token_ids == slow.token_ids


def test_class_vectors_start_as_word_embeddings_and_join_every_image_token():
    tokenizer, vocab = D.demo_tokenizer(), D.ctc_vocab()
    words = D.class_words(tokenizer)
    assert tokenizer.decode(list(words[0])) == "red" and tokenizer.decode(list(words[-1])) == "triangle"
    cfg = DemoConfig(lm_vocab_size=len(tokenizer.vocab), ctc_to_lm=D.ctc_to_lm(vocab, tokenizer),
                     image_token_id=tokenizer.encode("<image>")[0], prompt_end_id=tokenizer.encode("\n")[0],
                     width=32, vision_layers=1, vision_heads=2, stem_channels=(8, 8, 16), lm_width=32, lm_layers=2,
                     lm_heads=2, lm_intermediate=64, class_words=words)
    torch.manual_seed(0)
    model = DemoVLM(cfg).eval()
    E = model.lm.embed.weight
    red = (E[tokenizer.encode("r")[0]] + E[tokenizer.encode("e")[0]] + E[tokenizer.encode("d")[0]]) / 3
    assert torch.allclose(model.class_embed[0], red)
    features, logits = torch.randn(2, 5, 32), torch.randn(2, 5, cfg.ctc_vocab_size)
    shape_logits = torch.full((2, 11), -30.0)
    shape_logits[0, [0, 8]] = 30.0  # red circle
    shape_logits[1, [3, 10]] = 30.0  # yellow triangle
    with torch.no_grad():
        tokens, _, classes = model.image_tokens(features, logits, shape_logits)
        expected = torch.tensor([1.0] + [0.0] * 7 + [1.0, 0.0, 0.0])  # a softmax over each kind
        assert torch.allclose(classes[0], expected, atol=1e-6)
        table = torch.cat([model.blank_embed[None], E[model.ctc_to_lm]])
        base = model.projector(features) + logits.softmax(-1) @ table
        W = model.class_embed
        assert torch.allclose(tokens[0], base[0] + W[0] + W[8], atol=1e-5)
        assert torch.allclose(tokens[1], base[1] + W[3] + W[10], atol=1e-5)
    with pytest.raises(ValueError, match="class_words"):
        DemoVLM(DemoConfig(**{**cfg.__dict__, "class_words": words[:3]}))


def test_negated_questions():
    assert D.is_negated("is there not a red shape?") and D.is_negated("is no circle present?")
    assert D.is_negated("does the image not contain a triangle?")
    assert not D.is_negated("is there a circle?") and not D.is_negated("does the image contain a note?")


def test_yes_no_questions_balanced_per_form():
    class Questions:  # item(i) returns a sample with question i and its answer
        questions = ["is there a circle?", "is a circle present?", "is there a circle?", "is there not a circle?",
                     "what shape is it?", "is no circle present?", "does it not contain a red shape?"]
        answers = ["no", "no", "yes", "yes", "circle", "no", "yes"]

        def __len__(self):
            return len(self.questions)

        def item(self, index, rationale=False):
            assert not rationale
            return D.Sample(torch.zeros(3, 64, 64), self.questions[index], self.answers[index], "shape")

    # 6 yes/no questions x 2 = 12 draws, 3 for each (negated?, answer) group; the "what" question once
    model, tokenizer = _tiny_model()
    batches = D.DemoBatches(model, tokenizer, D.ctc_vocab(), 13, ["shape"], shapes=Questions(), yes_no_repeat=2,
                            balance_yes_no=True)
    cycle = batches.samples("shape", 0)  # one full cycle of the order
    groups = {}
    for s in cycle:
        groups.setdefault("what" if s.answer == "circle" else (D.is_negated(s.question), s.answer), []).append(s)
    assert {key: len(v) for key, v in groups.items()} == {"what": 1, (False, "no"): 3, (False, "yes"): 3,
                                                          (True, "no"): 3, (True, "yes"): 3}
    # a two-question group is cycled: both questions are drawn
    assert {s.question for s in groups[(False, "no")]} == {"is there a circle?", "is a circle present?"}
    assert {s.question for s in groups[(True, "yes")]} == {"is there not a circle?", "does it not contain a red shape?"}
    with pytest.raises(ValueError, match="yes_no_repeat"):
        D.DemoBatches(model, tokenizer, D.ctc_vocab(), 5, ["shape"], shapes=Questions(), yes_no_repeat=0)
    Questions.answers = ["no", "no", "yes", "yes", "circle", "yes", "yes"]  # no negated "no" left
    with pytest.raises(ValueError, match="negation"):
        D.DemoBatches(model, tokenizer, D.ctc_vocab(), 5, ["shape"], shapes=Questions(), balance_yes_no=True)
    # unbalanced: each yes/no question twice, the "what" question once
    batches = D.DemoBatches(model, tokenizer, D.ctc_vocab(), 13, ["shape"], shapes=Questions(), yes_no_repeat=2)
    counts = collections.Counter(s.question + s.answer for s in batches.samples("shape", 0))
    assert sorted(counts.values()) == [1] + [2] * 6


def test_training_batch_layout():
    model, tokenizer = _tiny_model()
    vocab = D.ctc_vocab()
    samples = [D.line_item(0, D.TRAIN, 0), D.paragraph_item(0, D.TRAIN, 0)]
    batch = D.collate_samples(samples, tokenizer, vocab, model)
    assert batch["pixel_values"].shape == (2, 3, 96, 256)  # the line padded to the paragraph's height
    image_id = tokenizer.encode("<image>")[0]
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [192, 192]
    row = batch["input_ids"][0].tolist()
    answer = tokenizer.decode([t for t, lab in zip(row, batch["labels"][0].tolist()) if lab != IGNORE_INDEX])
    assert answer == samples[0].answer + "</s>"
    assert batch["ctc_lengths"].tolist() == [len(samples[0].answer), len(samples[1].answer)]
    paragraph_targets = batch["ctc_targets"][1, :batch["ctc_lengths"][1]].tolist()
    assert vocab.decode(paragraph_targets) == samples[1].answer.replace("\n", " ")
    model.train()
    loss = model(**batch, loss_only=True).loss
    assert torch.isfinite(loss)


def test_cli_flags():
    args = build_parser().parse_args(["demo", "--minutes", "3", "--llm", "smollm2", "--json", "--out", "r",
                                      "--seed", "4", "--threads", "1"])
    assert (args.minutes, args.llm, args.json, args.out, args.seed, args.threads) == (3.0, "smollm2", True, "r", 4, 1)


def test_demo_end_to_end_tiny(tmp_path):
    """The whole demo at a tiny schedule: report folder, JSON keys, and held-out data disjoint from training."""
    schedule = Schedule(warmup_steps=2, read_steps=2, joint_steps=5, batch_size=4)
    settings = DemoSettings(minutes=5, threads=1, out=str(tmp_path / "report"), schedule=schedule, eval_lines=4,
                            eval_paragraphs=2, eval_shapes=6, quiet=True)
    result = run_demo(settings)
    summary = result.summary
    assert set(JSON_KEYS) <= set(summary)
    assert 0 <= summary["line_ned"] <= 1 and 0 <= summary["paragraph_ned"] <= 1
    assert 0 <= summary["shape_accuracy"] <= 1 and summary["wall_minutes"] > 0
    assert summary["steps"] == {"warmup": 2, "read": 2, "joint": 5}
    json.loads(json.dumps(summary))
    for name in ("report.md", "loss.png", "samples.png", "results.json", "predictions.jsonl", "curve.csv"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "| text lines" in (tmp_path / "report" / "report.md").read_text()
    assert "sample answers" in terminal_text(result)
    assert len(result.curve) == 9
    # held-out text never meets training: the lines and paragraphs training drew (seeds 0-2, split 0)
    trained = {D.line_item(s, D.TRAIN, i).answer for s in (0, 1, 2) for i in range(40)}
    trained |= {D.paragraph_item(2, D.TRAIN, i).answer for i in range(8)}
    heldout = {e["answer"] for e in result.examples if e["task"] != "shape"}
    assert not trained & heldout
    # shape questions come from easy-VQA's test split, whose images differ from every train image
    train_images = D.ShapeQuestions(D.TRAIN).images.values()
    test_images = [e for e in result.examples if e["task"] == "shape"]
    assert len(test_images) == 6
    seen = {a.tobytes() for a in train_images}
    assert not any(a.tobytes() in seen for a in D.ShapeQuestions(D.HELDOUT).images.values())


@pytest.mark.demo_full
def test_default_demo_reaches_the_issue_targets(tmp_path):
    """The demo's targets: on 2 threads within 12 minutes, line NED <= 0.03 and shape accuracy >= 90%."""
    result = run_demo(DemoSettings(out=str(tmp_path / "report"), quiet=True))
    s = result.summary
    assert s["wall_minutes"] <= 12.0, s
    assert s["line_ned"] <= 0.03, s
    assert s["shape_accuracy"] >= 0.90, s


def test_shape_breakdown_by_hand():
    from vlmkit.demo.evaluate import shape_breakdown

    red_circle = (D.SHAPE_COLOURS.index("red"), D.SHAPE_NAMES.index("circle"))

    def sample(question, answer, labels=red_circle):
        return D.Sample(torch.zeros(3, 64, 64), question, answer, "shape", labels=labels)

    # training forms: plain questions mostly "no" (2 of 3), negated mostly "yes" (2 of 3)
    train_q = ["is there a circle?", "is a red shape present?", "is there a triangle?",
               "is there not a circle?", "is no red shape present?", "is there not a blue shape?", "what shape?"]
    train_a = ["no", "no", "yes", "yes", "yes", "no", "circle"]
    held = [sample("is there a circle?", "yes"), sample("is there a blue shape?", "no"),
            sample("is there not a circle?", "no"), sample("is no triangle present?", "yes", (IGNORE_INDEX, 2)),
            sample("what color is the shape?", "red"), sample("what shape is it?", "circle"),
            D.Sample(torch.zeros(3, 32, 256), "Read the text.", "ab", "line")]
    answers = ["yes", "yes", "yes", "yes", "red", "triangle", "ab"]
    parts = shape_breakdown(held, answers, train_q, train_a)
    assert parts["what"] == 0.5  # red right, triangle wrong; the text line is not a shape question
    assert parts["yes_no"] == 0.5  # yes/yes right, yes/no wrong, yes/no wrong, yes/yes right
    assert parts["yes_no_form_majority"] == 0.5  # no/yes, no/no, yes/no, yes/yes
    assert parts["rationale"] is None and parts["rationale_scored"] == 3  # no reply gave one
    # replies with rationales: the answer after it is scored; the rationale against "red circle" (3 known)
    answers = ["red circle. yes", "blue circle. yes", "red circle. no", "gray triangle. yes", "red", "triangle", "ab"]
    parts = shape_breakdown(held, answers, train_q, train_a)
    assert parts["what"] == 0.5 and parts["yes_no"] == 0.75  # yes, yes (wrong), no, yes
    assert parts["rationale"] == 2 / 3  # red circle, blue circle (wrong), red circle; the 4th image unknown


def test_question_class_words_marks_whole_class_words_of_the_question_only():
    """Hand-marked: in "is redcircle red? a triangle" only the whole words "red" (colour 0 -> mark 1) and
    "triangle" (shape 2 -> mark 8 + 2 + 1 = 11) are marked, on each of their characters; "red" inside
    "redcircle", the image tokens, the newline and the answer "red" are not."""
    from vlmkit.demo.run import build_model
    model, tokenizer, _ = build_model(0, mark_class_words=True)
    assert model.cfg.mark_class_words and len(model.cfg.letter_ids) == 52
    question = "is redcircle red? a triangle"
    ids, _ = D.encode_row(tokenizer, model.image_token_id, 4, question, "red")
    expected_question = [0] * len("is redcircle ") + [1] * 3 + [0] * len("? a ") + [11] * len("triangle")
    # <s>, 4 image tokens, the question, the newline, the answer, </s>
    expected = [0] + [0] * 4 + expected_question + [0] + [0] * len("red") + [0]
    ids = torch.tensor([ids])
    marks = model.question_class_words(ids, ids == model.image_token_id)
    assert marks[0].tolist() == expected
    classes = torch.zeros(1, 11)
    vectors = model.question_class_vectors(ids, ids == model.image_token_id, classes)  # (1, L, C)
    assert torch.equal(vectors[0, 1 + 4 + len("is redcircle ")], model.class_embed[0])
    assert torch.equal(vectors[0, -4], torch.zeros(model.cfg.lm_width))  # the answer's "r"


def test_grounded_class_words_carry_the_images_probability_of_their_class():
    """With ground_class_words a marked character gets W's row plus (2 p - 1) * match_embed, p the image's
    probability of the word's class: hand-set probabilities red 0.9 (colours) and triangle 0.1 (shapes)
    give +0.8 and -0.8 times match_embed; an image row with other probabilities gives other vectors."""
    from vlmkit.demo.run import build_model
    model, tokenizer, _ = build_model(0, mark_class_words=True, ground_class_words=True)
    ids, _ = D.encode_row(tokenizer, model.image_token_id, 4, "is there a red triangle?", None)
    ids = torch.tensor([ids, ids])
    classes = torch.zeros(2, 11)
    classes[0, 0], classes[0, 3], classes[0, 8 + 2], classes[0, 8] = 0.9, 0.1, 0.1, 0.9
    classes[1, 0], classes[1, 8 + 2] = 0.2, 0.6
    with torch.no_grad():
        vectors = model.question_class_vectors(ids, ids == model.image_token_id, classes)
    W, m = model.class_embed.detach(), model.match_embed.detach()
    red, triangle = 1 + 4 + len("is there a "), 1 + 4 + len("is there a red ")
    assert torch.allclose(vectors[0, red], W[0] + 0.8 * m) and torch.allclose(vectors[0, red + 2], W[0] + 0.8 * m)
    assert torch.allclose(vectors[0, triangle + 7], W[10] - 0.8 * m)
    assert torch.allclose(vectors[1, red], W[0] - 0.6 * m) and torch.allclose(vectors[1, triangle], W[10] + 0.2 * m)
    assert torch.equal(vectors[:, :red], torch.zeros(2, red, model.cfg.lm_width))  # <s>, image, "is there a "
    grounded_only, _, _ = build_model(0, ground_class_words=True)
    with torch.no_grad():
        plain = grounded_only.question_class_vectors(ids, ids == model.image_token_id, classes)
    assert torch.allclose(plain[0, red], 0.8 * grounded_only.match_embed)  # no W row without mark_class_words


def test_class_words_need_the_character_level_lm():
    """Class words are found by their characters: asking for them with SmolLM2's BPE tokens is refused before
    any model is built (left unset they are off there, and on with the tiny LM)."""
    for flag in ("mark_class_words", "ground_class_words"):
        with pytest.raises(ValueError, match="character-level LM"):
            run_demo(DemoSettings(llm="smollm2", out=None, quiet=True, **{flag: True}))
