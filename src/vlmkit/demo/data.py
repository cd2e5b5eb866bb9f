"""The demo's data: rendered text lines, 3-line paragraphs and easy-VQA shape questions, as DemoVLM batches.

Every sample is a pure function of (seed, task, split, index): text lines and paragraphs are rendered on the
fly by vlmkit.data.synth_text from np.random.default_rng([seed, task, split, index]), so the held-out split
(split 1) never meets training (split 0) and a stream can seek (exact resume). Shape questions are
easy-VQA's (PyPI `easy-vqa`, images and questions shipped in the package): training draws from its train
split, evaluation uses its test split (different images).

A sample becomes one LM row:  <s> <image>*T  question "\\n"  reply </s>   (labels on reply and </s>)
plus CTC targets for text images (the answer's characters; a paragraph's line breaks count as one
character each, a space in the CTC alphabet). The reply is the answer, or, for a yes/no shape question
trained with a rationale, the image's description then the answer: "red circle. no" (rationale_reply;
reply_answer takes the answer back out of a generated reply, the one place that parses replies).

Pixels: text images become each channel's distance from its median (vlmkit.train.ctc.line_pixels: text
bright on dark whatever the colours); shape images keep their colours. Both end in [-1, 1].
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from vlmkit.config import SIGLIP_MEAN, SIGLIP_STD
from vlmkit.data.synth_text import (DEFAULT_ALPHABET, MIN_FONT_SIZE, TextStyle, load_font, random_style, random_text,
                                    render_text)
from vlmkit.demo.layout import stack_lines
from vlmkit.models.ctc import BLANK
from vlmkit.models.lm import IGNORE_INDEX
from vlmkit.text.tokenizer import CharTokenizer, Tokenizer
from vlmkit.train.ctc import CTCVocab, line_pixels

TRAIN, HELDOUT = 0, 1
TASK_IDS = {"line": 1, "paragraph": 2, "shape": 3}
LINE_SIZE = (256, 32)  # (width, height): 64 image tokens
COLUMN_PIXELS = 4  # pixels per token column of the demo tower
PARAGRAPH_SIZE = (256, 96)  # three token rows of 32
LINE_CHARS = (8, 24)  # random lines of 8-24 characters; the demo's target is line NED <= 0.03 on held-out ones
PARAGRAPH_LINES = 3
READ_PROMPT = "Read the text."
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
Batch = dict[str, torch.Tensor]


class Prompted(Protocol):
    """What prompt building needs from the model: its placeholder id and tokens per image size."""

    image_token_id: int

    def num_image_tokens(self, height: int, width: int) -> int: ...


@dataclass
class Sample:
    """One question about one image: pixels (3, H, W), the question, the reference answer, the task;
    for rendered lines also each character's centre column (pixels from the left edge)."""

    pixels: torch.Tensor
    question: str
    answer: str
    task: str
    image: Image.Image | None = None  # kept for the report's pictures
    centres: list[tuple[float, float]] | None = None  # each character's (centre x, advance width)
    labels: tuple[int, int] | None = None  # a shape image's (colour, shape) class, IGNORE_INDEX where unknown
    target: str | None = None  # what training teaches when it is not the answer itself (rationale_reply)

    def reply(self) -> str:
        """The text the LM is trained to write: the target if there is one, else the answer."""
        return self.answer if self.target is None else self.target


def demo_tokenizer() -> CharTokenizer:
    """The demo LM's character vocabulary: the line alphabet, space, newline and the questions' characters."""
    return CharTokenizer(DEFAULT_ALPHABET + string.ascii_lowercase + " \n?.-'", special_tokens=SPECIAL_TOKENS,
                         chat_template=None)


def ctc_vocab() -> CTCVocab:
    """The CTC classes: blank, then the line alphabet and the space."""
    return CTCVocab(DEFAULT_ALPHABET)


def ctc_to_lm(vocab: CTCVocab, tokenizer: CharTokenizer) -> tuple[int, ...]:
    """LM token id of each CTC class 1..V-1 (the CTC's space stands for the space)."""
    return tuple(tokenizer.encode(vocab.decode([k]))[0] for k in range(1, vocab.size))


def text_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) pixels of a text image in [-1, 1]."""
    return line_pixels(image, SIGLIP_MEAN, SIGLIP_STD)


def colour_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) pixels of a colour image in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).contiguous()


def task_pixels(task: str, image: Image.Image) -> torch.Tensor:
    """(3, H, W) model input of an image of a task, the one way the demo prepares them (training, evaluation
    and a loaded demo model alike): a line as text pixels, a paragraph with its lines stacked first
    (demo.layout.stack_lines), an easy-VQA shape image in colour."""
    if task == "shape":
        return colour_pixels(image)
    return text_pixels(stack_lines(image) if task == "paragraph" else image)


def _rng(seed: int, task: str, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASK_IDS[task], split, index])


def char_centres(text: str, style: TextStyle, size: tuple[int, int]) -> list[tuple[float, float]]:
    """(centre x, width) of each character in render_text([text], style, size), from the same layout rules:
    the font shrinks until the tilted line fits, characters advance by their length + spacing from x = 1
    of the text mask, the mask turns about its centre (expanding) and is placed at the style's offset."""
    width, height = size
    for font_size in range(style.size, MIN_FONT_SIZE - 1, -1):
        font = load_font(style.font, font_size)
        advances = [font.getlength(c) for c in text]
        mask_w = int(np.ceil(sum(advances) + style.spacing * max(len(text) - 1, 0))) + 2
        ascent, descent = font.getmetrics()
        mask_h = ascent + descent + 2
        rot_w, rot_h = Image.new("L", (mask_w, mask_h)).rotate(style.angle, expand=True).size
        if rot_w <= width - 4 and rot_h <= height - 4:
            break
    else:
        raise ValueError(f"{text!r} does not fit {size} (render_text would have raised)")
    x0 = 2 + round(style.offset[0] * (width - 4 - rot_w))
    cos = float(np.cos(np.radians(style.angle)))
    centres, x = [], 1.0
    for advance in advances:
        u = x + advance / 2 - mask_w / 2  # from the mask's centre, along the line
        centres.append((x0 + rot_w / 2 + u * cos, advance * cos))
        x += advance + style.spacing
    return centres


def line_item(seed: int, split: int, index: int, keep_image: bool = False) -> Sample:
    """Text line number index of a split: 8-24 random letters/digits/spaces on a 256x32 image."""
    rng = _rng(seed, "line", split, index)
    text = random_text(rng, *LINE_CHARS)
    style = random_style(rng, LINE_SIZE)
    image = render_text([text], style, LINE_SIZE)
    return Sample(task_pixels("line", image), READ_PROMPT, text, "line", image if keep_image else None,
                  char_centres(text, style, LINE_SIZE))


def frame_targets(targets: Sequence[int], centres: Sequence[tuple[float, float]], steps: int,
                  step_width: float) -> list[int]:
    """Per-step classes of a line, the peaky alignment CTC itself converges to: each character's class at
    the step holding its centre (a taken step moves it to the next free one, so doubled letters stay two),
    IGNORE_INDEX on the other steps the character covers (no penalty for the peak's exact place), blank on
    the steps between and around characters.

    >>> frame_targets([5, 5, 7], [(3.0, 2.0), (5.0, 2.0), (14.0, 12.0)], steps=6, step_width=4)
    [5, 5, -100, 7, -100, 0]
    """
    frames = [BLANK] * steps
    for step in range(steps):
        middle = (step + 0.5) * step_width
        if any(abs(middle - x) < width / 2 for x, width in centres):
            frames[step] = IGNORE_INDEX
    last = -1
    for cls, (x, _) in zip(targets, centres):
        step = min(steps - 1, max(last + 1, int(x // step_width)))
        frames[step] = cls
        last = step
    return frames


def paragraph_item(seed: int, split: int, index: int, keep_image: bool = False) -> Sample:
    """Paragraph number index of a split: 3 random lines of 8-24 characters on a 256x96 image. The model
    sees its lines stacked as 32-pixel bands (demo.layout.stack_lines: deskew, line finding)."""
    rng = _rng(seed, "paragraph", split, index)
    lines = [random_text(rng, *LINE_CHARS) for _ in range(PARAGRAPH_LINES)]
    image = render_text(lines, random_style(rng, PARAGRAPH_SIZE, len(lines)), PARAGRAPH_SIZE)
    return Sample(task_pixels("paragraph", image), READ_PROMPT, "\n".join(lines), "paragraph",
                  image if keep_image else None)


class ShapeQuestions:
    """easy-VQA's questions of one split with its 64x64 images decoded once (uint8)."""

    def __init__(self, split: int) -> None:
        try:
            from easy_vqa import easy_vqa
        except ImportError as e:
            raise ImportError("the demo's shape questions come from easy-VQA: pip install easy-vqa") from e
        if split == TRAIN:
            questions, answers, image_ids = easy_vqa.get_train_questions()
            paths = easy_vqa.get_train_image_paths()
        else:
            questions, answers, image_ids = easy_vqa.get_test_questions()
            paths = easy_vqa.get_test_image_paths()
        self.split = split
        self.questions, self.answers, self.image_ids = questions, answers, image_ids
        self.paths = paths
        self.images = {i: np.asarray(Image.open(paths[i]).convert("RGB")) for i in sorted(set(image_ids))}
        self.labels = image_labels(questions, answers, image_ids)

    def __len__(self) -> int:
        return len(self.questions)

    def description(self, index: int) -> str | None:
        """The "colour shape" words of question index's image (image_description), None when unknown."""
        return image_description(self.labels.get(self.image_ids[index]))

    def item(self, index: int, keep_image: bool = False, rationale: bool = False) -> Sample:
        """Question index as a Sample; with rationale, a yes/no question's training target is
        rationale_reply(the image's description, the answer) (ValueError if the image's class is unknown)."""
        array = self.images[self.image_ids[index]]
        image = Image.fromarray(array)
        question, answer = self.questions[index], self.answers[index]
        target = None
        if rationale and answer in YES_NO:
            description = self.description(index)
            if description is None:
                raise ValueError(f"question {index} ({question!r}) of easy-VQA split {self.split}: its image's colour "
                                 "and shape are not both known from its questions, so no rationale can be built")
            target = rationale_reply(description, answer)
        return Sample(task_pixels("shape", image), question, answer, "shape", image if keep_image else None,
                      labels=self.labels.get(self.image_ids[index]), target=target)


SHAPE_COLOURS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
SHAPE_NAMES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
RATIONALE_END = ". "  # between a yes/no reply's rationale and its answer (characters of the demo vocabulary)
SHAPE_REPLY_CHARS = max(map(len, SHAPE_COLOURS)) + 1 + max(map(len, SHAPE_NAMES)) + len(RATIONALE_END) + 3


def image_labels(questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
                 ) -> dict[int, tuple[int, int]]:
    """Each image's (colour, shape) class as its own questions tell it (IGNORE_INDEX where they do not): the
    shape vocabulary of the tower and the rationale's description. easy-VQA ships no class per image, so it
    is read off every question of the image:
    - a "what" question's answer is its class; a class word in it describes the same image
      ("what color is the circle?" -> "red": red and circle);
    - a yes/no question states that its class word is present (answer "yes" and not negated, or "no" and
      negated: the class) or absent (the class is excluded); a class left alone when all others of its
      kind are excluded is the class.
    Contradicting evidence raises ValueError (the questions would not describe one image)."""
    known: dict[int, list[set[str]]] = {}
    excluded: dict[int, list[set[str]]] = {}
    for question, answer, image in zip(questions, answers, image_ids):
        words = set(question.rstrip("?").split())
        named = [[c for c in SHAPE_COLOURS if c in words], [k for k in SHAPE_NAMES if k in words]]
        seen, ruled_out = known.setdefault(image, [set(), set()]), excluded.setdefault(image, [set(), set()])
        if question.startswith("what"):
            for kind, classes in enumerate((SHAPE_COLOURS, SHAPE_NAMES)):
                seen[kind].update(named[kind] + ([answer] if answer in classes else []))
        elif answer in YES_NO:
            present = (answer == "yes") != is_negated(question)
            for kind in (0, 1):
                (seen if present else ruled_out)[kind].update(named[kind])
    labels = {}
    for image, seen in known.items():
        label = []
        for kind, classes in enumerate((SHAPE_COLOURS, SHAPE_NAMES)):
            left = [c for c in classes if c not in excluded[image][kind]]
            if len(seen[kind]) > 1 or seen[kind] - set(left):
                raise ValueError(f"easy-VQA image {image}: its questions contradict each other on its "
                                 f"{('colour', 'shape')[kind]} (named {sorted(seen[kind])}, excluded "
                                 f"{sorted(excluded[image][kind])})")
            chosen = next(iter(seen[kind])) if seen[kind] else (left[0] if len(left) == 1 else None)
            label.append(IGNORE_INDEX if chosen is None else classes.index(chosen))
        labels[image] = (label[0], label[1])
    return labels


def image_description(label: tuple[int, int] | None) -> str | None:
    """"colour shape" words of an image_labels class ("red circle"), None unless both are known."""
    if label is None or IGNORE_INDEX in label:
        return None
    return f"{SHAPE_COLOURS[label[0]]} {SHAPE_NAMES[label[1]]}"


def rationale_reply(description: str, answer: str) -> str:
    """A yes/no question's reply with its rationale: the image's description, RATIONALE_END, the answer."""
    return f"{description}{RATIONALE_END}{answer}"


def reply_answer(task: str, reply: str) -> str:
    """The answer in a generated reply: a shape reply's text after its last RATIONALE_END (all of it when
    there is none); a text task's reply whole. Evaluation, the report and the tests all parse replies here."""
    return reply.rpartition(RATIONALE_END)[2] if task == "shape" else reply


def reply_rationale(reply: str) -> str | None:
    """The rationale of a shape reply (the text before its last RATIONALE_END), None when it has none."""
    rationale, end, _ = reply.rpartition(RATIONALE_END)
    return rationale if end else None


def class_words(tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """The LM token ids of each colour then shape word (DemoConfig.class_words, the order of the shape head)."""
    return tuple(tuple(tokenizer.encode(word)) for word in SHAPE_COLOURS + SHAPE_NAMES)


def letter_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The LM token ids of the letters a-z and A-Z that are single tokens (DemoConfig.letter_ids: word bounds)."""
    letters = string.ascii_letters
    return tuple(ids[0] for ids in map(tokenizer.encode, letters) if len(ids) == 1)


def encode_row(tokenizer: Tokenizer, image_token_id: int, num_image_tokens: int, question: str,
               answer: str | None) -> tuple[list[int], list[int]]:
    """(ids, labels) of one row; without an answer, the prompt only (for generation). The newline is encoded
    on its own, so it is one token whatever the tokenizer (the model finds the question's end by it)."""
    prompt = ([tokenizer.bos_token_id] + [image_token_id] * num_image_tokens + tokenizer.encode(question)
              + tokenizer.encode("\n"))
    if answer is None:
        return prompt, [IGNORE_INDEX] * len(prompt)
    reply = tokenizer.encode(answer) + [tokenizer.eos_token_id]
    return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply


def collate_samples(samples: Sequence[Sample], tokenizer: Tokenizer, vocab: CTCVocab, model: Prompted) -> Batch:
    """A DemoVLM training batch: pixel_values (B, 3, H, W) (shorter images padded at the bottom), input_ids
    and labels (B, L) right-padded, ctc_targets (B, S) padded with BLANK, ctc_lengths (B,) (0 for non-text
    images), ctc_frames (B, T) per-step classes of single lines (IGNORE_INDEX elsewhere).
    model gives the image placeholder id and the image-token count of an image size."""
    pixels = _stack_padded([s.pixels for s in samples])  # (B, 3, H, W)
    num_image_tokens = model.num_image_tokens(pixels.shape[2], pixels.shape[3])
    rows = [encode_row(tokenizer, model.image_token_id, num_image_tokens, s.question, s.reply())
            for s in samples]
    L = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, :len(lab)] = torch.tensor(lab)
    targets = [vocab.encode(s.answer.replace("\n", " ")) if s.task != "shape" else [] for s in samples]
    S = max(1, max(len(t) for t in targets))
    ctc_targets = torch.full((len(rows), S), BLANK, dtype=torch.long)
    for r, t in enumerate(targets):
        ctc_targets[r, :len(t)] = torch.tensor(t, dtype=torch.long)
    steps = pixels.shape[-1] // COLUMN_PIXELS
    frames = torch.full((len(rows), steps), IGNORE_INDEX, dtype=torch.long)
    for r, (s, t) in enumerate(zip(samples, targets)):
        if s.centres is not None and pixels.shape[-2] == LINE_SIZE[1]:
            frames[r] = torch.tensor(frame_targets(t, s.centres, steps, COLUMN_PIXELS))
    shape_targets = torch.tensor([s.labels or (IGNORE_INDEX, IGNORE_INDEX) for s in samples], dtype=torch.long)
    return {"pixel_values": pixels, "input_ids": input_ids, "labels": labels, "ctc_targets": ctc_targets,
            "ctc_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long), "ctc_frames": frames,
            "shape_targets": shape_targets}


def _stack_padded(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack (3, H_i, W) images, padding shorter ones at the bottom with -1 (background after text_pixels)."""
    H = max(p.shape[1] for p in pixels)
    return torch.stack([torch.nn.functional.pad(p, (0, 0, 0, H - p.shape[1]), value=-1.0) for p in pixels])


def is_negated(question: str) -> bool:
    """Whether an easy-VQA question asks for absence ("is there not a ...", "is no circle present?")."""
    return bool({"not", "no"} & set(question.rstrip("?").split()))


def shape_question_pool(questions: Sequence[str], answers: Sequence[str], yes_no_repeat: int, balance: bool,
                        rng: np.random.Generator) -> np.ndarray:
    """Question indices to train on: every non-yes/no question once, and yes_no_repeat x (the number of
    yes/no questions) draws of yes/no questions. Without balance each yes/no question is drawn yes_no_repeat
    times; with balance the draws are split equally between the four (negated?, answer) groups, each group
    cycled in a seeded order, so that in every question form "yes" is as likely as "no"."""
    if not balance:
        return np.array([i for i, answer in enumerate(answers)
                         for _ in range(yes_no_repeat if answer in YES_NO else 1)], dtype=np.int64)
    groups: dict[tuple[bool, str], list[int]] = {}
    other = []
    for i, (question, answer) in enumerate(zip(questions, answers)):
        if answer in YES_NO:
            groups.setdefault((is_negated(question), answer), []).append(i)
        else:
            other.append(i)
    if len(groups) < 4:
        raise ValueError(f"balancing yes/no questions needs each of yes/no with and without negation; found only "
                         f"{sorted(groups)}")
    per_group = yes_no_repeat * sum(len(g) for g in groups.values()) // len(groups)
    drawn = [np.resize(rng.permutation(np.array(groups[key])), per_group) for key in sorted(groups)]
    return np.concatenate([np.array(other, dtype=np.int64)] + drawn)


class DemoBatches:
    """An endless, seeded stream of one-task batches for vlmkit.train.loop.train.

    `pattern` lists the task of each batch in a repeating cycle (e.g. ("line", "line", "shape")); batch k
    of the stream has the task pattern[k % len(pattern)] and takes that task's next batch_size samples.
    seek(sample_index) continues exactly (sample_index counts every sample handed out). Shape questions come
    in a seeded order of shape_question_pool: yes/no questions yes_no_repeat times as often as the rest (the
    harder kind), optionally balanced. Balancing matters because easy-VQA's yes/no answers follow the
    question's form (about 85% of "is there a X?" are "no", 83% of "is there not a X?" are "yes"): a model
    trained on them as they come can score 85% on them from that prior without looking at the image.
    With rationale, yes/no questions are trained to reply with the image's description first
    (rationale_reply: "red circle. no"), so the answer compares the question's word with text the model
    has just written; yes/no questions whose image's colour or shape its questions do not tell
    (image_labels) are left out of the order then."""

    def __init__(self, model: Prompted, tokenizer: Tokenizer, vocab: CTCVocab,
                 batch_size: int, pattern: Sequence[str], seed: int = 0, shapes: ShapeQuestions | None = None,
                 yes_no_repeat: int = 1, balance_yes_no: bool = False, rationale: bool = False) -> None:
        if batch_size < 1 or not pattern or yes_no_repeat < 1:
            raise ValueError(f"need batch_size >= 1, a non-empty task pattern and yes_no_repeat >= 1, got "
                             f"{batch_size}, {pattern}, {yes_no_repeat}")
        unknown = sorted(set(pattern) - set(TASK_IDS))
        if unknown:
            raise ValueError(f"unknown demo tasks {unknown}; valid: {sorted(TASK_IDS)}")
        if "shape" in pattern and shapes is None:
            raise ValueError("a pattern with 'shape' batches needs the easy-VQA train questions (shapes=...)")
        self.model, self.tokenizer, self.vocab = model, tokenizer, vocab
        self.batch_size, self.pattern, self.seed, self.shapes = batch_size, tuple(pattern), seed, shapes
        self.sample_index, self.rationale = 0, rationale
        if shapes is not None:
            rng = np.random.default_rng([seed, TASK_IDS["shape"]])
            pool = shape_question_pool(shapes.questions, shapes.answers, yes_no_repeat, balance_yes_no, rng)
            if rationale:
                pool = np.array([i for i in pool if shapes.answers[i] not in YES_NO or shapes.description(i)],
                                dtype=np.int64)
            self._order = rng.permutation(pool)

    def seek(self, sample_index: int) -> None:
        self.sample_index = sample_index

    def _position(self) -> tuple[str, int]:
        """The task of the next batch and how many samples of that task came before it."""
        batch = self.sample_index // self.batch_size
        cycle, k = divmod(batch, len(self.pattern))
        task = self.pattern[k]
        before = cycle * self.pattern.count(task) + self.pattern[:k].count(task)
        return task, before * self.batch_size

    def samples(self, task: str, start: int) -> list[Sample]:
        indices = range(start, start + self.batch_size)
        if task == "line":
            return [line_item(self.seed, TRAIN, i) for i in indices]
        if task == "paragraph":
            return [paragraph_item(self.seed, TRAIN, i) for i in indices]
        n = len(self._order)
        return [self.shapes.item(int(self._order[i % n]), rationale=self.rationale) for i in indices]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            task, start = self._position()
            self.sample_index += self.batch_size
            yield collate_samples(self.samples(task, start), self.tokenizer, self.vocab, self.model)
