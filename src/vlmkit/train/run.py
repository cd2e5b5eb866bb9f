"""`vlmkit train`: train a model on a LLaVA JSON / JSONL dataset with one stage and write a run folder.

    vlmkit data synth --out synth --shapes 64 --image-size 32x32
    vlmkit train --model tiny-random --data synth/data.json --stage full --steps 200 --out run
    vlmkit generate --model run --image synth/images/shapes-000000.png --prompt "What shape is this?"
    torchrun --nproc_per_node 2 -m vlmkit.cli train ...      # the same flags; the global batch is --batch-size
    torchrun --nproc_per_node 2 -m vlmkit.cli train ... --fsdp   # each process holds half the model (FSDP2)

    result = run_training(RunConfig(model="tiny-random", data="synth/data.json", out="run", steps=200))

The model is a model directory (loaded with vlmkit.load.load_model, its tokenizer kept) or the name of
a small preset built with random weights (`FRESH_PRESETS`: `tiny-random`, `bench-tiny` and every `*-small`
twin): such a fresh model gets a CharTokenizer over the printable ASCII characters plus every character of
the dataset's conversations and the special tokens its image scheme's prompt format needs
(`fresh_special_tokens`: the scheme's `placeholders`, e.g. Qwen2-VL's `<|vision_start|>`, `<|vision_end|>`,
`<|image_pad|>`, `<|video_pad|>` with its built-in `qwen2_vl` chat template; `<image>` and chatml for the
others), and its vocabulary and placeholder ids are sized to it (for ASCII data `tiny-random` is exactly
vlmkit.load's tiny-random model at the same seed).

The stage (`--stage`, `resolve_stage`) is one of
    NAME           a stage of the model's recipe (train/recipes.py), e.g. `align` for llava-1.5-small or
                   `vision-pretrain` for qwen2-vl-small, else a built-in stage of train/stages.py (sft, align, full)
    recipe:N       the N-th stage (1-based) of the model's recipe
    PRESET:NAME    a stage of another preset's recipe by name or number, e.g. `qwen2-vl:2`
The model's recipe is its preset's: --model PRESET, or a run folder of `vlmkit train` whose run.json names
a preset (so `--model RUN --stage recipe:2` continues a preset's recipe); a model directory from elsewhere
has none (use PRESET:NAME or a built-in stage).

The run folder is created and a test file written in it first, so a folder that cannot be written is
refused before the data is prepared. The data is read and validated by data.formats.load_dataset; then
every sample it passes is made into a training example once (`build_example`: images decoded and planned,
labels built; the length is checked against the model's context), so a bad sample is found before training
starts. Both lists of problems make one: --data-policy fail stops with every problem listed (the records'
form, their images and their length at once); skip drops the bad records, prints them and writes them to
skipped.txt. During training an
example is built again when it is read (a pure function of its sample), so the pixels of the dataset are
never all in memory: a real dataset's images would not fit (1.3 MiB per 336x336 image). --workers N builds
the batches in N DataLoader processes while the model trains (train.batches; the same batches in the same
order with any N, resumable exactly); a record whose files change during the run stops it with a DataError
naming the record, whichever --data-policy (skipping it then would change the data order). Under torchrun every
rank prepares every sample (all ranks must agree on which samples are good).

The run folder (--out):
    run.json                  the run's settings; --resume refuses a run whose settings differ
    metrics.csv, loss.png     one row per optimizer step (train.loop)
    TensorBoard events        the same rows as scalars, in the --tensorboard DIR (OUT/tensorboard when no DIR)
    step-NNNNNN/              checkpoints (train.checkpoint); the newest --keep-checkpoints are kept
    skipped.txt               the problems of the records --data-policy skip dropped
    config.json, model.safetensors, tokenizer files   the final model: `vlmkit generate --model OUT` loads it
    generation_config.json    its eos_token_id: the ids that end an answer (the template's turn end, the eos)
    shards.json               with --fsdp: the parameter and optimizer-state elements each process held
    adapter.safetensors, lora.json   with --lora: the adapters beside the base model (train/lora.py); load_model
                              adds them back, `vlmkit export OUT --merge --out DIR` folds them into the weights;
                              with --quantize nf4 (QLoRA, train/qlora.py) the base model is the NF4 weights
                              dequantized: what training computed with, in full precision
run.json records --data, --image-root and a --model directory relative to the run folder, and not --out,
so a run folder moved (with its data) resumes. A write of the folder that fails (a full disk, a folder
turned read-only) stops the run with a RunFolderError naming the last complete checkpoint, from which
--resume continues; the temporaries of a killed write are deleted when a run starts in the folder again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vlmkit.data.formats import POLICIES, DatasetError, Problem, Sample, load_dataset, print_problems
from vlmkit.data.labels import TrainingExample, build_training_example
from vlmkit.devices import resolve_device
from vlmkit.hub import is_hub_spec
from vlmkit.image.load import load_image
from vlmkit.load import LoadedModel, load_model, not_a_model_error
from vlmkit.models.image_model import build_model
from vlmkit.presets import PRESETS, Preset, get_preset
from vlmkit.schemes import get_scheme
from vlmkit.text.chat import BUILTIN_TEMPLATES, chat_template_for
from vlmkit.text.tokenizer import DEFAULT_SPECIAL_TOKENS, CharTokenizer
from vlmkit.files import temporary_path, write_text_atomically
from vlmkit.train.checkpoint import latest_checkpoint, reporting_write_errors
from vlmkit.train.distributed import World, check_shardable, current_world
from vlmkit.train.lora import add_lora, parse_lora
from vlmkit.train.qlora import QUANTIZE_CHOICES, frozen_linears, quantize_frozen
from vlmkit.train.loop import ShuffledBatches, TrainResult, train, trainable_parameters
from vlmkit.train.recipes import RECIPES, SMALL_SUFFIX, recipe
from vlmkit.train.runlog import check_tensorboard
from vlmkit.train.stages import STAGES, Stage, available_groups, module_groups
from vlmkit.weights.materialize import LayerQuantizer

RUN_FILE = "run.json"
SKIPPED_FILE = "skipped.txt"
FRESH_PRESETS = tuple(n for n in PRESETS if n.endswith(SMALL_SUFFIX) or n in ("tiny-random", "bench-tiny"))
RECIPE_PREFIX = "recipe"  # --stage recipe:N
# Settings that may change between a run and its resumption (they do not change the result; a run may resume
# on another device, whose float arithmetic may round differently: checkpoints load onto any device).
RESUMABLE_CHANGES = ("resume", "progress", "checkpoint_every", "keep_checkpoints", "log_every", "threads", "device",
                     "workers", "tensorboard")
PATH_SETTINGS = ("data", "image_root", "model")  # run.json holds them relative to the run folder


@dataclass
class RunConfig:
    """The settings of one `vlmkit train` run (the CLI flags).

    lr: peak learning rate of every group the stage trains (None: the stage's own); group_lrs then sets
    single groups, e.g. {"vision": 1e-4} (0 freezes). warmup: warmup steps (None: the stage's rule).
    resume: None (a fresh run), "latest" (the newest checkpoint in out) or a checkpoint directory.
    """

    model: str
    data: str
    out: str
    stage: str = "sft"  # see resolve_stage
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    group_lrs: dict[str, float] = field(default_factory=dict)
    warmup: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    bf16: bool = False
    activation_checkpointing: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    resume: str | None = None
    seed: int = 0
    data_policy: str = "fail"
    image_root: str | None = None
    max_len: int | None = None
    pack_len: int | None = None
    log_every: int = 10
    progress: bool = True
    threads: int | None = None
    workers: int = 0  # --workers: DataLoader processes that build the batches (0: this process); same batches
    tensorboard: str | None = None  # --tensorboard DIR: also write metrics.csv's rows as TensorBoard scalars
    device: str = "auto"  # --device (vlmkit.devices.resolve_device); under torchrun cuda is each rank's own GPU
    lora: str | None = None  # --lora r=16,alpha=32,dropout=0.05,targets=lm.attn,lm.mlp (train/lora.py parse_lora)
    fsdp: bool = False  # --fsdp: shard weights, gradients and optimizer states over the torchrun processes
    quantize: str | None = None  # --quantize nf4: the frozen linear weights stored in NF4 (QLoRA, train/qlora.py)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"--steps, --batch-size and --grad-accum must be >= 1, got {self.steps}, "
                             f"{self.batch_size}, {self.grad_accum}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("--checkpoint-every and --keep-checkpoints must be >= 0 (0 = only at the end / keep all)")
        if self.data_policy not in POLICIES:
            raise ValueError(f"--data-policy must be one of {', '.join(POLICIES)}, got {self.data_policy!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"--lr must be > 0 (freeze groups with --group-lr NAME=0), got {self.lr}")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)} for training, got "
                             f"{self.quantize!r}")
        if self.lora is not None:  # checked now, and kept in one spelling (run.json compares it on --resume)
            self.lora = parse_lora(self.lora).spec()
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0 builds the batches in the training process), got {self.workers}")
        if self.tensorboard is not None:
            check_tensorboard()


@dataclass
class RunResult:
    """What run_training did: the loop's result, the run folder, the samples used and the records skipped."""

    train: TrainResult
    out: Path
    num_samples: int
    skipped: list[Problem]
    model_dir: Path | None


def model_preset(model: str) -> str | None:
    """The preset whose recipe a --model trains by: the preset itself, or the preset named in a run folder's
    run.json (a model trained by `vlmkit train`); None for any other model directory."""
    if model in PRESETS:
        return model
    run_file = Path(model) / RUN_FILE
    if run_file.is_file():
        source = json.loads(run_file.read_text()).get("model")
        return source if source in PRESETS else None
    return None


def _has_recipe(preset: str) -> bool:
    return preset.removesuffix(SMALL_SUFFIX) in RECIPES


def _pick(stages: list[Stage], which: str, owner: str) -> Stage:
    """The stage of owner's recipe named which, or numbered which (1-based)."""
    if which.isdigit() and 1 <= int(which) <= len(stages):
        return stages[int(which) - 1]
    for stage in stages:
        if stage.name == which:
            return stage
    listed = ", ".join(f"{i}={s.name}" for i, s in enumerate(stages, 1))
    raise ValueError(f"--stage: {owner}'s recipe has no stage {which!r}; its stages are {listed} "
                     f"(give a name or a number 1..{len(stages)})")


def resolve_stage(spec: str, model: str) -> Stage:
    """The Stage a --stage value names for --model (see the module docstring: NAME, recipe:N, PRESET:NAME).
    A name in the model's recipe wins over a built-in stage of the same name (qwen2-vl-small's sft freezes
    the ViT and has no projector group). Raises ValueError listing the valid values."""
    preset = model_preset(model)
    own = preset if preset is not None and _has_recipe(preset) else None
    owner, colon, which = spec.partition(":")
    if colon:
        if owner == RECIPE_PREFIX:
            if own is None:
                raise ValueError(f"--stage {spec}: --model {model} has no recipe of its own (it is not a preset nor a "
                                 "run of one); name the recipe's preset, e.g. --stage qwen2-vl:2, or give a built-in "
                                 f"stage: {', '.join(STAGES)}")
            owner = own
        try:
            stages = recipe(owner)
        except ValueError as e:
            raise ValueError(f"--stage {spec}: {e}") from None
        return _pick(stages, which, owner)
    if own is not None and spec in {s.name for s in recipe(own)}:
        return _pick(recipe(own), spec, own)
    if spec in STAGES:
        return STAGES[spec]
    valid = [f"built-in stages {', '.join(STAGES)}"]
    if own is not None:
        stages = recipe(own)
        valid.insert(0, f"{own}'s recipe stages {', '.join(s.name for s in stages)} "
                        f"(or {RECIPE_PREFIX}:1..{RECIPE_PREFIX}:{len(stages)})")
    raise ValueError(f"--stage {spec!r} is not a stage for --model {model}; valid: {'; '.join(valid)}; or "
                     "PRESET:NAME / PRESET:N for a stage of any preset's recipe (e.g. qwen2-vl:sft)")


def build_stage(cfg: RunConfig) -> Stage:
    """The stage --stage names (resolve_stage) with the run's overrides: --lr on every trained group,
    --group-lr per group, --warmup, --weight-decay, --grad-clip, --lora."""
    stage = resolve_stage(cfg.stage, cfg.model)
    lrs = {g: (cfg.lr if cfg.lr is not None and lr > 0 else lr) for g, lr in stage.lrs.items()}
    lrs.update(cfg.group_lrs)
    changes: dict[str, Any] = {"lrs": lrs}
    if cfg.warmup is not None:
        changes["warmup_steps"] = cfg.warmup
    if cfg.weight_decay is not None:
        changes["weight_decay"] = cfg.weight_decay
    if cfg.grad_clip is not None:
        changes["grad_clip"] = cfg.grad_clip
    if cfg.lora is not None:
        changes["lora"] = parse_lora(cfg.lora)
    return dataclasses.replace(stage, **changes)


def conversation_text(samples: Sequence[Sample]) -> str:
    """Every text of the samples' messages, concatenated (the characters a fresh vocabulary needs)."""
    return "".join(part.get("text", "") for s in samples for m in s.messages for part in m["content"])


def fresh_special_tokens(cfg: Preset) -> tuple[tuple[str, ...], str]:
    """(special tokens, chat template) of a fresh CharTokenizer for a preset's prompt format: the scheme's
    prompt format (Phi-3-V's phi3, DeepSeek-VL2's deepseek_vl2, Qwen2-VL's qwen2_vl), else chatml; the special
    tokens are the default ones, then the scheme's placeholder tokens and the template's turn markers."""
    scheme = get_scheme(cfg.image_scheme)
    template = scheme.prompt_format or "chatml"
    extra = [*scheme.placeholders.values(), *BUILTIN_TEMPLATES[template].marker_tokens()]
    return (*DEFAULT_SPECIAL_TOKENS, *dict.fromkeys(t for t in extra if t not in DEFAULT_SPECIAL_TOKENS)), template


def fresh_model(preset: str, chars: str, seed: int) -> LoadedModel:
    """A preset (one of FRESH_PRESETS) with random weights (torch seeded with seed) and a CharTokenizer over
    printable ASCII plus chars and the preset's special tokens; the LM vocabulary and placeholder ids are
    set to the tokenizer's."""
    if preset not in FRESH_PRESETS:
        raise ValueError(f"--model {preset!r}: a preset trained from random weights must be one of "
                         f"{', '.join(FRESH_PRESETS)} (published-size presets have no weights to start from); pass "
                         "a model directory to fine-tune one")
    cfg = get_preset(preset)
    special, template = fresh_special_tokens(cfg)
    tokenizer = CharTokenizer(string.printable + chars, special, chat_template=template)
    ids = {field: tokenizer.token_to_id(text) for field, text in get_scheme(cfg.image_scheme).placeholders.items()}
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=tokenizer.vocab_size), **ids)
    torch.manual_seed(seed)
    return LoadedModel(preset, build_model(cfg), tokenizer, chat_template_for(tokenizer))


def load_for_training(spec: str, samples: Sequence[Sample], seed: int,
                      quantize_layers: Callable[[nn.Module], Mapping[str, LayerQuantizer]] | None = None
                      ) -> LoadedModel:
    """A model directory or hub id (its own tokenizer and template), or a fresh preset (see fresh_model).
    quantize_layers: the layers a directory's model gets quantized as it loads (--quantize nf4: the frozen
    ones, qlora.frozen_linears), so the float model never exists in full; a fresh preset is quantized after
    it is built (quantize_base)."""
    if Path(spec).is_dir() or is_hub_spec(spec):
        return load_model(spec, quantize_layers=quantize_layers)
    if spec in PRESETS:
        return fresh_model(spec, conversation_text(samples), seed)
    raise not_a_model_error(spec, f"nor a preset; give a directory (config.json + safetensors + tokenizer) or "
                                  f"one of {', '.join(FRESH_PRESETS)}")


def build_example(sample: Sample, loaded: LoadedModel) -> TrainingExample:
    """A sample as a TrainingExample: its images decoded and planned under the model's image scheme, its ids
    and labels made by data.labels.build_training_example. Raises ValueError for an image that cannot be read
    or planned and for a conversation that cannot be labelled."""
    plans = loaded.plan_images([load_image(path) for path in sample.images])
    return build_training_example(loaded.tokenizer, loaded.chat_template, sample.messages, loaded.image_token_id,
                                  plans, loaded.segment_special_tokens, **loaded.image_text_hooks)


class TrainingSet(Sequence[TrainingExample]):
    """The samples as TrainingExamples, each built (build_example) when it is read."""

    def __init__(self, samples: Sequence[Sample], loaded: LoadedModel) -> None:
        self.samples, self.loaded = list(samples), loaded

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> TrainingExample:  # type: ignore[override]
        sample = self.samples[index]
        try:
            return build_example(sample, self.loaded)
        except ValueError as e:  # it was built once when the run started (prepare_data): its files changed since
            problem = Problem(sample.file, sample.line, sample.id, str(e))
            raise ValueError(f"{problem} (it passed the check when the run started, so its files changed since; "
                             "--data-policy applies only to that check: restore the file and continue with "
                             "--resume, or drop the record and start again)") from e


def prepare_data(samples: Sequence[Sample], loaded: LoadedModel,
                 max_len: int | None = None) -> tuple[TrainingSet, list[Problem]]:
    """The good samples as a TrainingSet, and the problems of the others: a sample whose images cannot be
    read or planned, whose conversation cannot be labelled, or which is longer than max_len tokens (default:
    the model's context). Each sample is built once here to find them; the caller applies the data policy
    (run_training lists these with the problems load_dataset found)."""
    limit = max_len if max_len is not None else loaded.context_length
    if limit is None:
        raise ValueError(f"{loaded.name} states no context length; give --max-len")
    good, problems = [], []
    for sample in samples:
        try:
            length = len(build_example(sample, loaded))
        except ValueError as e:  # ImageLoadError is a ValueError, as are labelling and planning errors
            problems.append(Problem(sample.file, sample.line, sample.id, str(e)))
            continue
        if length > limit:
            problems.append(Problem(sample.file, sample.line, sample.id,
                                    f"{length} tokens (images included) is over the limit of {limit}; "
                                    "shorten it or raise --max-len up to the model's context"))
            continue
        good.append(sample)
    return TrainingSet(good, loaded), problems


def save_model_dir(loaded: LoadedModel, out: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the trained model to out as a model directory load_model reads: LoadedModel.save_pretrained
    (config.json + safetensors, the tokenizer's files with its chat template, generation_config.json);
    state: its weights when they are not the model's own (a sharded model's, full_state_dict)."""
    return loaded.save_pretrained(out, state)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A sharded (FSDP) model's full weights on the host, by the unsharded model's names, on rank 0 (empty on the
    other ranks); every rank must call it (the shards are gathered)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _is_path(key: str, value: Any) -> bool:
    """Whether a setting's value names a file or folder: --data, --image-root, a --model that is no preset."""
    return key in PATH_SETTINGS and isinstance(value, str) and not (key == "model" and value in PRESETS)


def _settings(cfg: RunConfig) -> dict[str, Any]:
    """The run's settings as run.json records them: without --out (run.json's folder is the run folder) and
    the resume-only flags, with paths relative to the run folder, so a folder moved together with its data
    still resumes."""
    out = os.path.abspath(cfg.out)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in (*RESUMABLE_CHANGES, "out")}
    for key, value in settings.items():
        if _is_path(key, value) and (key != "model" or Path(value).is_dir()):
            settings[key] = Path(os.path.relpath(os.path.abspath(value), out)).as_posix()
    return settings


def _comparable(settings: dict[str, Any], folder: str | os.PathLike) -> dict[str, Any]:
    """settings without --out and with every path made absolute against folder: what two runs' settings are
    compared by. (run.json before this version recorded --out and absolute paths; they compare too.)"""
    return {k: os.path.abspath(os.path.join(folder, v)) if _is_path(k, v) else v
            for k, v in settings.items() if k != "out"}


def _resume_point(cfg: RunConfig, out: Path) -> Path | None:
    """The checkpoint to resume from (None for a fresh run), after checking run.json against cfg."""
    saved = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else None
    if cfg.resume is None:
        if latest_checkpoint(out) is not None:
            raise ValueError(f"{out} already holds checkpoints of a run; pass --resume to continue it, "
                             "or choose another --out")
        return None
    before, now = _comparable(saved or {}, out), _comparable(_settings(cfg), out)
    if saved is not None and before != now:
        diff = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        raise ValueError(f"--resume: the run in {out} was started with other settings ({diff}, as "
                         "(saved, now)); resume with the same flags")
    path = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume)
    if path is None:
        raise FileNotFoundError(f"--resume: {out} holds no checkpoint (step-NNNNNN/) to continue from; "
                                "run without --resume to start")
    return path


def run_training(cfg: RunConfig, world: World | None = None) -> RunResult:
    """Load the data and the model, train cfg.steps steps of the stage, write the run folder (see the module
    docstring). world is this process's rank (default: from the initialized process group, if any)."""
    world = world or current_world()
    if cfg.fsdp:
        check_shardable(world)  # before anything is read or written
    say = print if world.is_main and cfg.progress else (lambda *a, **k: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    stage = build_stage(cfg)
    device = resolve_device(cfg.device, world.local_rank)  # a bad --device fails before the data is read
    resume = _resume_point(cfg, out)
    if world.is_main:
        check_writable(out)
    # every problem of every record in one pass: load_dataset's (the records' form), then prepare_data's
    # (images, labels, length) for the records load_dataset passed; the policy is applied to them all
    samples, problems = load_dataset(cfg.data, image_root=cfg.image_root, policy="skip")
    if cfg.quantize is not None and world.distributed:
        raise ValueError(QUANTIZE_DISTRIBUTED)
    frozen = partial(frozen_linears, stage=stage) if cfg.quantize is not None else None
    loaded = load_for_training(cfg.model, samples, cfg.seed, quantize_layers=frozen)
    loaded.model.to(device)  # built (and seeded) on the host, so every device starts from the same weights
    check_groups(loaded, stage, cfg.group_lrs, cfg.seed)  # before the data is prepared, which takes long
    if cfg.quantize is not None:
        names = quantize_base(loaded, stage, world)
        say(f"--quantize {cfg.quantize}: {len(names)} frozen linear layers stored in NF4", file=sys.stderr, flush=True)
    max_len = cfg.max_len
    if cfg.pack_len is not None and (max_len is None or max_len > cfg.pack_len):
        max_len = cfg.pack_len  # a packed row must hold every sample
    say(f"preparing {len(samples)} samples of {cfg.data}", file=sys.stderr, flush=True)
    examples, more = prepare_data(samples, loaded, max_len)
    problems = sorted(problems + more, key=lambda p: (p.file, p.line))  # in file order (a stable sort)
    if problems and cfg.data_policy == "fail":
        raise DatasetError(problems)
    if world.is_main:
        with reporting_write_errors(out, f"{RUN_FILE} / {SKIPPED_FILE}"):
            write_text_atomically(out / RUN_FILE,  # the other ranks read it (_resume_point)
                                  json.dumps(_settings(cfg), indent=1) + "\n")
            if problems:
                write_text_atomically(out / SKIPPED_FILE, "".join(f"{p}\n" for p in problems))
        if problems:
            print_problems(problems, f" (listed in {out / SKIPPED_FILE})")
    if len(examples) == 0:
        raise ValueError(f"no record of {cfg.data} can be trained on: all {len(problems)} problem(s) are listed "
                         f"in {out / SKIPPED_FILE}")
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    batches = ShuffledBatches(examples, cfg.batch_size, pad_id, seed=cfg.seed, pack_len=cfg.pack_len,
                              rank=world.rank, world_size=world.size, workers=cfg.workers)
    say(f"training {loaded.name} on {len(examples)} samples: stage {stage.name} {stage.lrs}, {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.grad_accum} samples" + (f" over {world.size} processes" if world.distributed else ""),
        file=sys.stderr, flush=True)
    result = train(loaded.model, batches, stage, cfg.steps, grad_accum=cfg.grad_accum, bf16=cfg.bf16,
                   activation_checkpointing=cfg.activation_checkpointing, seed=cfg.seed, out_dir=out,
                   save_every=cfg.checkpoint_every, resume=resume, progress=cfg.progress, log_every=cfg.log_every,
                   keep_checkpoints=cfg.keep_checkpoints, tensorboard=cfg.tensorboard, fsdp=cfg.fsdp)
    # a sharded model's full weights, gathered to rank 0 on the host (every rank takes part), else its own
    state = full_state_dict(loaded.model) if cfg.fsdp else None
    model_dir = None
    if world.is_main:
        with reporting_write_errors(out, "the trained model (config.json, safetensors, tokenizer)"):
            model_dir = save_model_dir(loaded, out, state)
    return RunResult(result, out, len(examples), problems, model_dir)


def check_groups(loaded: LoadedModel, stage: Stage, group_lrs: dict[str, float], seed: int = 0) -> None:
    """Refuse a --group-lr naming a group the model does not have, and a stage whose groups do not cover the
    model (stages.module_groups), with the model's groups listed. With the stage's LoRA, add its adapters
    (train/lora.py add_lora, seeded as train() seeds them) and refuse targets the model does not have or a
    stage that freezes their group (loop.trainable_parameters)."""
    groups = list(dict.fromkeys(available_groups(loaded.model)))
    unknown = [name for name in group_lrs if name not in groups]
    if unknown:
        raise ValueError(f"--group-lr {unknown[0]}={group_lrs[unknown[0]]:g}: {loaded.name} has no group "
                         f"{unknown[0]!r}; its groups are {', '.join(groups)}")
    module_groups(loaded.model, stage)
    if stage.lora is not None:
        try:
            add_lora(loaded.model, stage.lora, seed=seed)
        except ValueError as e:
            raise ValueError(f"--lora: {e}") from None
        trainable_parameters(loaded.model, stage)


QUANTIZE_DISTRIBUTED = ("--quantize nf4 trains in one process only (DistributedDataParallel cannot broadcast NF4 "
                        "weights); run without torchrun, or without --quantize")


def quantize_base(loaded: LoadedModel, stage: Stage, world: World) -> list[str]:
    """QLoRA (--quantize nf4): freeze what the stage freezes (loop.trainable_parameters; with LoRA the adapted
    layers' weights) and store every frozen linear weight in NF4 (train/qlora.py quantize_frozen); returns the
    quantized layers (with those quantized while the model was loaded). Refused under torchrun: DistributedDataParallel does not handle NF4 weights."""
    if world.distributed:
        raise ValueError(QUANTIZE_DISTRIBUTED)
    trainable_parameters(loaded.model, stage)
    names = quantize_frozen(loaded.model)
    if not names:
        raise ValueError(f"--quantize nf4: {loaded.name} has no frozen linear layer to quantize (the stage trains "
                         "them all); freeze groups with --group-lr GROUP=0 or train adapters with --lora")
    return names


def check_writable(out: Path) -> None:
    """Create the run folder and write a test file in it, so a folder that cannot be written is refused
    (RunFolderError) before the data is prepared, not after."""
    probe = temporary_path(out / "write-test")
    with reporting_write_errors(out, "the run folder (--out)"):
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
