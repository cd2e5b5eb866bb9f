"""The training loop: one `train()` for every stage and every architecture.

    batches = ShuffledBatches(examples, batch_size=8, pad_id=0, seed=0)     # seeded, resumable (train.batches)
    result = train(model, batches, get_stage("align"), steps=500, out_dir="runs/a", save_every=100)
    result = train(model, batches, stage, steps=500, out_dir="runs/a", resume=latest_checkpoint("runs/a"))

Per optimizer step: `grad_accum` micro-batches, each forward under optional bf16 autocast with
`loss_only=True`; the step's loss is the mean over all labelled tokens of its micro-batches (each
micro-batch's mean is weighted by its token count, so 2 x batch 2 gives the same gradient as batch 4);
gradients clipped to `stage.grad_clip`; AdamW. Weight decay follows nanoGPT's rule: parameters with
2 or more dimensions decay (linear and conv weights, embedding matrices), 1-D ones do not (biases,
norm weights, learned vectors such as image_newline). The learning rate is linear warmup then cosine
decay (`lr_multiplier`). Metrics go to `metrics.csv` (step, loss, lr, samples_per_s, grad_norm) and
the loss curve to `loss.png` in out_dir (both written by train.runlog), and with tensorboard=DIR also to
TensorBoard scalars there; the progress display adds tokens/s.

train() itself is only the loop: `_open_run` checks the arguments and fixes the run's setup, `_restore`
brings a run back from its checkpoint (or `_start_fresh` seeds the RNGs), then every step sets the lr,
`_optimizer_step` takes the step, a metrics row is kept, and `_save` checkpoints every save_every steps
and at the end (metrics.csv first, then the weights, optimizer and every rank's RNG state).

Resume and the metrics file: metrics.csv is rewritten atomically (temporary file + rename) every
log_every steps and right before every checkpoint, and the checkpoint records how many rows it covers.
A resumed run keeps the rows up to its checkpoint's step and redoes the later ones, so a run killed at
any moment and resumed ends with exactly one row per step (and raises if rows the checkpoint covers are
missing, e.g. a deleted CSV). A write of the run folder that fails (a full disk, a folder turned
read-only) raises train.checkpoint.RunFolderError, which names the newest complete checkpoint; the
temporaries a killed run left are deleted when a run starts in the folder again.

Under torchrun (an initialized process group, see train.distributed) the model is wrapped in
DistributedDataParallel, each rank reads its slice of every global batch, the loss is weighted so the
averaged gradient equals the single-process one, and only rank 0 writes files and shows progress. A
checkpoint holds every rank's RNG state; a resumed run must have the same number of processes, and each
rank restores its own RNG state and seeks to the global data position.

With fsdp=True (`--fsdp`, torchrun only) the model is sharded with FSDP2 instead (train.distributed.shard_model:
each rank holds ~1/N of every parameter, gradient and AdamW state), checkpoints are written by every rank as
torch.distributed.checkpoint shards (train.checkpoint.save_sharded_checkpoint), and rank 0 writes
`shards.json` at the end: the parameter and optimizer-state elements each rank held.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vlmkit.decoding import model_device
from vlmkit.devices import autocast_dtype
from vlmkit.models.lm import IGNORE_INDEX
from vlmkit.train.batches import Batch, ShuffledBatches
from vlmkit.files import remove_temporaries, write_text_atomically
from vlmkit.train.checkpoint import (TrainState, checkpoint_dir, load_checkpoint, load_sharded_checkpoint,
                                     prune_checkpoints, reporting_write_errors, rng_state, save_checkpoint,
                                     save_sharded_checkpoint)
from vlmkit.train.distributed import (World, all_reduce_sum, barrier, current_world, full_value, gather_to_main,
                                      is_sharded, local_numel, shard_model, wrap_model)
from vlmkit.train.lora import add_lora, is_adapter
from vlmkit.train.runlog import (METRICS, MetricRow, Progress, TensorBoardLog, check_tensorboard, plot_loss,
                                 read_metrics, write_metrics)
from vlmkit.train.stages import Stage, module_groups

__all__ = ["METRICS", "Batch", "ShuffledBatches", "TrainResult", "build_optimizer", "lr_multiplier", "plot_loss",
           "train", "trainable_parameters"]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Fraction of the peak lr for optimizer step `step` (0-based) of total_steps: (step + 1) / warmup
    during warmup, then a cosine from 1 down towards min_ratio over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 -> 1
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def trainable_parameters(model: nn.Module, stage: Stage) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Set requires_grad as the stage says and return the parameters that train, by group (groups at lr 0
    left out): every parameter of a group with an lr > 0, except in a group holding LoRA adapters
    (train/lora.py), where only the adapters train. Raises ValueError for adapters in a frozen group."""
    trained = {}
    for group, params in module_groups(model, stage).items():
        lr = stage.lrs[group]
        adapters = [(n, p) for n, p in params if is_adapter(n)]
        if adapters and lr == 0:
            raise ValueError(f"stage {stage.name!r} freezes group {group!r} (lr 0), which holds LoRA adapters; "
                             f"give it a learning rate (--group-lr {group}=2e-4) or leave it out of the targets")
        chosen = adapters or (params if lr > 0 else [])
        names = {n for n, _ in chosen}
        for name, p in params:
            p.requires_grad_(name in names)
        if chosen:
            trained[group] = chosen
    return trained


def build_optimizer(model: nn.Module, stage: Stage) -> torch.optim.AdamW:
    """Freeze the stage's lr-0 groups (requires_grad False, left out of the optimizer) and build AdamW over
    the others (trainable_parameters: in a group holding LoRA adapters, only the adapters): per group one
    decayed set (dim >= 2) and one undecayed set (dim < 2). Each optimizer group records its name, its peak
    lr (`base_lr`) and its parameter names."""
    param_groups = []
    for group, params in trainable_parameters(model, stage).items():
        lr = stage.lrs[group]
        for decay in (True, False):
            chosen = [(n, p) for n, p in params if (p.dim() >= 2) == decay]
            if chosen:
                param_groups.append({"params": [p for _, p in chosen], "param_names": [n for n, _ in chosen],
                                     "name": f"{group}.{'decay' if decay else 'no_decay'}", "lr": lr,
                                     "base_lr": lr, "weight_decay": stage.weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, betas=stage.betas, eps=stage.eps)


@dataclass
class TrainResult:
    """What a train() call did: the steps it ran (1-based step numbers), their losses, the last checkpoint."""

    steps: list[int]
    losses: list[float]
    checkpoint: Path | None
    metrics_csv: Path | None
    loss_png: Path | None


@dataclass(frozen=True)
class _Run:
    """What stays fixed over one train() call: the folder of its files (None: no files), this process's
    place among the ranks, the schedule checkpoints record, and the stage's name."""

    out: Path | None
    world: World
    schedule: dict[str, Any]
    stage: str

    @property
    def writes(self) -> bool:
        """Whether this process writes files: only rank 0 does, and only with an out_dir."""
        return self.out is not None and self.world.is_main

    @property
    def metrics_csv(self) -> Path | None:
        """out/metrics.csv, or None without an out_dir."""
        return self.out / "metrics.csv" if self.out is not None else None

    def lr_multiplier(self, step: int) -> float:
        """The schedule's fraction of the peak lr for optimizer step `step` (0-based)."""
        s = self.schedule
        return lr_multiplier(step, s["total_steps"], s["warmup_steps"], s["min_lr_ratio"])


@dataclass
class _Position:
    """Where a run stands: optimizer steps done, samples consumed from the data order, and the metrics rows
    of the steps done (those before a resume only on rank 0, which writes them)."""

    step: int
    sample_index: int
    rows: list[MetricRow]


def train(model: nn.Module, batches: Iterable[Batch], stage: Stage, steps: int, *, grad_accum: int = 1,
          bf16: bool = False, activation_checkpointing: bool = False, seed: int = 0,
          out_dir: str | Path | None = None, save_every: int = 0, resume: str | Path | None = None,
          stop_after: int | None = None, progress: bool = True, log_every: int = 10,
          on_step: Callable[[int, float], None] | None = None, keep_checkpoints: int = 0,
          tensorboard: str | Path | None = None, fsdp: bool = False) -> TrainResult:
    """Train model for `steps` optimizer steps of `stage` on `batches` (collate()/pack() dicts, each one
    micro-batch; grad_accum of them make a step).

    seed seeds torch, python and numpy at the start of a fresh run (a resumed run restores the saved RNG
    states instead), and the LoRA adapters a stage with `lora` adds to model (train/lora.py add_lora; they are
    part of the model's weights from then on, in every checkpoint). out_dir receives metrics.csv, loss.png and,
    every save_every steps and at the end, checkpoints (see train.checkpoint); keep_checkpoints > 0 deletes
    all but that many newest ones.
    resume is a checkpoint directory: the weights, optimizer, schedule, RNGs and the data position
    (ShuffledBatches.seek, else the consumed batches are skipped) are restored and training continues
    from the step after it. stop_after ends this call after that step while the schedule still spans
    `steps` (a time budget, or an interrupted run in tests). on_step(step, loss) is called after every step.
    tensorboard: a folder that receives every metrics row as TensorBoard scalars (runlog.TensorBoardLog;
    needs the tensorboard package).

    Under torchrun (torch.distributed initialized with several processes) the model is trained through
    DistributedDataParallel and batches must be this rank's slice of each global batch (ShuffledBatches
    with rank= and world_size=); the losses returned are the global ones, on every rank. fsdp shards the
    model in place with FSDP2 instead (train.distributed.shard_model; bf16 then also gathers the weights in
    bfloat16): after train() its parameters are DTensors, and the full weights are
    `get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))`.
    """
    if bf16 and autocast_dtype(model_device(model)) is None:  # before out_dir is made
        raise ValueError(f"--bf16: {model_device(model)} cannot run bfloat16 autocast; leave --bf16 out")
    if tensorboard is not None:
        check_tensorboard()
    run = _open_run(batches, stage, steps, grad_accum, out_dir, save_every, resume)
    if stage.lora is not None:
        add_lora(model, stage.lora, seed=seed)  # before the optimizer and a checkpoint's weights; again: no-op
    if fsdp and not is_sharded(model):
        shard_model(model, run.world, bf16)  # before the optimizer, which must hold the sharded parameters
    optimizer = build_optimizer(model, stage)
    at = _restore(resume, model, optimizer, run) if resume is not None else _start_fresh(seed)
    stream = _stream_from(batches, at, grad_accum)
    end = steps if stop_after is None else min(steps, stop_after)
    result = TrainResult([], [], None, run.metrics_csv if run.writes else None, None)
    with (_training(model, activation_checkpointing, run.world) as runner,
          Progress(at.step, steps, progress and run.world.is_main, log_every) as bar,
          _tensorboard(tensorboard, at.rows, run.world) as tb, _closing(stream)):
        for step in range(at.step, end):
            t0 = time.perf_counter()
            lr = _set_lr(optimizer, run.lr_multiplier(step))
            micro = _next_micro_batches(stream, grad_accum, step, steps)
            stats = _optimizer_step(runner, optimizer, micro, step, stage.grad_clip, bf16, run.world)
            at.step, at.sample_index = step + 1, _sample_index_after(batches, at, stats.samples)
            seconds = time.perf_counter() - t0
            samples_per_s = stats.samples / seconds
            at.rows.append({"step": at.step, "loss": stats.loss, "lr": lr, "samples_per_s": round(samples_per_s, 2),
                            "grad_norm": stats.grad_norm})
            if tb is not None:
                tb.write(at.rows[-1])
            result.steps.append(at.step)
            result.losses.append(stats.loss)
            bar.update(at.step, stats.loss, lr, samples_per_s, stats.tokens / seconds)
            if on_step is not None:
                on_step(at.step, stats.loss)
            if run.out is not None and (save_every and at.step % save_every == 0 or at.step == end):
                result.checkpoint = _save(model, optimizer, at, run, keep_checkpoints)
            elif run.writes and at.step % log_every == 0:
                with reporting_write_errors(run.out, run.metrics_csv.name):
                    write_metrics(run.metrics_csv, at.rows)
    if run.writes and at.rows:
        with reporting_write_errors(run.out, f"{run.metrics_csv.name} and loss.png"):
            write_metrics(run.metrics_csv, at.rows)
            result.loss_png = plot_loss(run.metrics_csv, run.out / "loss.png")
    if run.out is not None and is_sharded(model):
        _write_shards(model, optimizer, run)
    barrier(run.world)
    return result


def _open_run(batches: Iterable[Batch], stage: Stage, steps: int, grad_accum: int, out_dir: str | Path | None,
              save_every: int, resume: str | Path | None) -> _Run:
    """Check train()'s arguments against each other and the running processes, create out_dir and delete
    the temporaries a killed run left in it (rank 0), and return the run's fixed setup with its warmup +
    cosine schedule."""
    if steps < 1 or grad_accum < 1:
        raise ValueError(f"steps and grad_accum must be >= 1, got steps={steps}, grad_accum={grad_accum}")
    if (save_every or resume is not None) and out_dir is None:
        raise ValueError("checkpoints need an out_dir; pass out_dir=... with save_every or resume")
    world = current_world()
    if hasattr(batches, "world_size") and batches.world_size != world.size:
        raise ValueError(f"the batches are sharded for {batches.world_size} process(es) but {world.size} are "
                         "running; build ShuffledBatches with rank= and world_size= of this run")
    schedule = {"kind": "warmup_cosine", "total_steps": steps, "warmup_steps": stage.warmup(steps),
                "min_lr_ratio": stage.min_lr_ratio}
    run = _Run(Path(out_dir) if out_dir is not None else None, world, schedule, stage.name)
    if run.writes:
        run.out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(run.out)  # what a killed run left half-written (a checkpoint's, metrics.csv's ...)
    return run


def _start_fresh(seed: int) -> _Position:
    """Seed torch, python and numpy for a new run; it stands at step 0, sample 0, no metrics rows."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return _Position(0, 0, [])


def _restore(resume: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, run: _Run) -> _Position:
    """Load the checkpoint `resume` into model and optimizer (with this rank's RNG states) and check it has
    the run's schedule. Rank 0 then takes back metrics.csv's rows up to the checkpoint's step, which must
    all be there when the checkpoint records them (what a kill left half-written was deleted by _open_run).
    Returns where the checkpoint stands."""
    if is_sharded(model):
        state = load_sharded_checkpoint(resume, model, optimizer, run.world)
    else:
        state = load_checkpoint(resume, model, optimizer, rank=run.world.rank, world_size=run.world.size)
    if state.schedule != run.schedule:
        raise ValueError(f"{resume} was saved with schedule {state.schedule} but this run has {run.schedule}; "
                         "resume with the same stage and steps")
    rows: list[MetricRow] = []
    if run.writes:
        rows = read_metrics(run.metrics_csv, state.step)
        if state.metric_rows is not None and [int(r["step"]) for r in rows] != list(range(1, state.step + 1)):
            raise ValueError(f"{run.metrics_csv} should hold one row per step 1..{state.step} (the checkpoint "
                             f"{resume} covers {state.metric_rows} rows) but holds steps "
                             f"{[int(r['step']) for r in rows][:10]}...; restore the file or start a new run")
    return _Position(state.step, state.sample_index, rows)


def _tensorboard(log_dir: str | Path | None, rows: list[MetricRow], world: World) -> Any:
    """A TensorBoardLog in log_dir on rank 0 (rewriting the rows of the steps done before), else None."""
    if log_dir is None or not world.is_main:
        return contextlib.nullcontext()
    return contextlib.closing(TensorBoardLog(log_dir, rows))


def _closing(stream: Iterator[Batch]) -> Any:
    """Close the stream on exit when it can be closed (a generator: ShuffledBatches' ends its DataLoader's
    worker processes), also when training raised."""
    return contextlib.closing(stream) if hasattr(stream, "close") else contextlib.nullcontext()


def _stream_from(batches: Iterable[Batch], at: _Position, grad_accum: int) -> Iterator[Batch]:
    """An iterator over batches from where the run stands: a stream with seek() (ShuffledBatches) seeks
    to the sample index, any other iterable skips the micro-batches of the steps done."""
    if hasattr(batches, "seek"):
        batches.seek(at.sample_index)
        return iter(batches)
    stream = iter(batches)
    for _ in range(at.step * grad_accum):
        next(stream)
    return stream


def _sample_index_after(batches: Iterable[Batch], at: _Position, samples: float) -> int:
    """The data position after a step of `samples` samples: the stream's own count when it can seek, else
    the position before the step plus its samples."""
    return batches.sample_index if hasattr(batches, "seek") else at.sample_index + int(samples)


@contextlib.contextmanager
def _training(model: nn.Module, activation_checkpointing: bool, world: World) -> Iterator[nn.Module]:
    """model in train mode with every `gradient_checkpointing` flag set to activation_checkpointing,
    yielding the module to call (DDP under torchrun, else model: a sharded model is its own runner); on exit the
    flags and mode are put back."""
    flags = {m: m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")}
    was_training = model.training
    try:
        for module in flags:
            module.gradient_checkpointing = activation_checkpointing
        model.train()
        yield model if is_sharded(model) else wrap_model(model, world)
    finally:
        for module, flag in flags.items():
            module.gradient_checkpointing = flag
        model.train(was_training)


def _set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Set every optimizer group's lr to its peak lr (`base_lr`) x multiplier; returns the largest."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
    return max(g["lr"] for g in optimizer.param_groups)


def _next_micro_batches(stream: Iterator[Batch], grad_accum: int, step: int, steps: int) -> list[Batch]:
    """The grad_accum micro-batches of optimizer step `step` (0-based) of steps; raises if stream runs out."""
    micro = []
    for _ in range(grad_accum):
        try:
            micro.append(next(stream))
        except StopIteration:
            raise ValueError(f"the batches ran out at step {step + 1} of {steps}; pass an endless stream "
                             "(ShuffledBatches) or fewer steps") from None
    return micro


@dataclass(frozen=True)
class _StepStats:
    """One optimizer step over every rank: its loss (the mean over all its labelled tokens), the gradient
    norm before clipping, and the number of samples and of input tokens (padding not counted) it trained on."""

    loss: float
    grad_norm: float
    samples: float
    tokens: float


def _optimizer_step(runner: nn.Module, optimizer: torch.optim.Optimizer, micro: list[Batch], step: int,
                    grad_clip: float, bf16: bool, world: World) -> _StepStats:
    """Take optimizer step `step` (0-based) on this rank's micro-batches: each forward (optionally under bf16
    autocast) and backward with its loss weighted by its share of the global step's labelled tokens, DDP
    syncing gradients on the last micro-batch only; then clip to grad_clip (0: no clipping) and step AdamW."""
    # labelled tokens, samples and input tokens of the global step (summed over ranks); sharded: how many ranks
    # have images
    sharded = is_sharded(runner)
    with_images = [float(any(k.startswith("pixel_values") for k in b)) for b in micro] if sharded else []
    tokens, samples, inputs, *ranks_with_images = all_reduce_sum(
        [sum(_labelled(b) for b in micro), sum(_samples(b) for b in micro), sum(_input_tokens(b) for b in micro),
         *with_images], world)
    if any(0 < n < world.size for n in ranks_with_images):  # the vision layers' all-gathers would never meet
        raise ValueError(f"step {step + 1}: under --fsdp every process's micro-batch must have images or none "
                         f"does, but {int(min(n for n in ranks_with_images if n))} of {world.size} have them; mix "
                         "text-only and image samples without --fsdp (DDP), or give every sample an image")
    if tokens == 0:
        raise ValueError(f"step {step + 1} has no labelled tokens (every label is {IGNORE_INDEX}); "
                         "check the examples' labels")
    loss_sum = 0.0
    device = model_device(runner)
    for i, batch in enumerate(micro):
        batch = batch_to(batch, device)
        with _sync_on_last(runner, i == len(micro) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = runner(**batch, loss_only=True).loss  # mean over this micro-batch's labelled tokens
            weight = _labelled(batch) / tokens
            (loss * (weight * world.size)).backward()  # DDP averages over ranks: x size undoes it
        loss_sum += loss.item() * weight
    loss_sum = all_reduce_sum([loss_sum], world)[0]
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _StepStats(loss_sum, float(full_value(grad_norm)), samples, inputs)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """The batch with its tensors on device (the model's): collate() and pack() make them on the host."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _sync_on_last(runner: nn.Module, last: bool) -> Any:
    """DDP's no_sync() for the micro-batches before a step's last (their gradients only accumulate), else
    a no-op context."""
    if isinstance(runner, torch.nn.parallel.DistributedDataParallel) and not last:
        return runner.no_sync()
    return contextlib.nullcontext()


def _labelled(batch: Batch) -> int:
    """The batch's labelled tokens: positions whose next-token label counts in the loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _input_tokens(batch: Batch) -> int:
    """The batch's input tokens, padding not counted (a packed batch marks its padding with segment 0)."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] > 0).sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def _samples(batch: Batch) -> int:
    """The batch's samples (a packed batch's rows hold several)."""
    if "segment_ids" in batch:  # packed: samples, not rows
        return int(batch["segment_ids"].amax(dim=1).sum())
    return batch["input_ids"].shape[0]


def _save(model: nn.Module, optimizer: torch.optim.Optimizer, at: _Position, run: _Run, keep: int) -> Path | None:
    """Checkpoint the run at `at`: every rank's RNG state is gathered to rank 0, which rewrites metrics.csv
    first (the checkpoint covers its rows), writes the checkpoint and deletes all but the `keep` newest
    (keep 0 keeps every one); then the ranks meet. Returns the checkpoint on rank 0, None on the others."""
    rng_states = gather_to_main(rng_state(), run.world)  # every rank's, in rank order, on rank 0
    path = None
    if is_sharded(model):  # every rank writes its shards
        with reporting_write_errors(run.out, f"checkpoint {checkpoint_dir(run.out, at.step).name}"):
            if run.writes:
                write_metrics(run.metrics_csv, at.rows)
            path = save_sharded_checkpoint(run.out, model, optimizer, _train_state(at, run), run.world,
                                           extra=_checkpoint_extra(run), rng_states=rng_states)
            if run.writes:
                prune_checkpoints(run.out, keep)
    elif run.writes:
        with reporting_write_errors(run.out, f"checkpoint {checkpoint_dir(run.out, at.step).name}"):
            write_metrics(run.metrics_csv, at.rows)
            path = save_checkpoint(run.out, model, optimizer, _train_state(at, run), extra=_checkpoint_extra(run),
                                   rng_states=rng_states)
            prune_checkpoints(run.out, keep)
    barrier(run.world)
    return path


def _train_state(at: _Position, run: _Run) -> TrainState:
    """What a checkpoint at `at` records of where the run stands."""
    return TrainState(at.step, at.sample_index, run.schedule, metric_rows=len(at.rows))


def _checkpoint_extra(run: _Run) -> dict[str, Any]:
    """What a checkpoint records for the reader: the stage and the number of processes."""
    return {"stage": run.stage, "world_size": run.world.size}


SHARDS_FILE = "shards.json"


def _write_shards(model: nn.Module, optimizer: torch.optim.Optimizer, run: _Run) -> None:
    """Rank 0 writes out/shards.json: for every rank the parameter and optimizer-state elements it holds
    (its local shards), beside the model's totals: how the sharded run split the model."""
    held = {"rank": run.world.rank, "parameters": sum(local_numel(p) for p in model.parameters()),
            "optimizer_state": sum(local_numel(v) for state in optimizer.state.values() for v in state.values()
                                   if isinstance(v, torch.Tensor) and v.dim() > 0)}
    ranks = gather_to_main(held, run.world)
    if run.writes:
        report = {"processes": run.world.size, "ranks": ranks,
                  "parameters": sum(p.numel() for p in model.parameters()),  # a DTensor's numel is the full one
                  "optimizer_state": sum(v.numel() for state in optimizer.state.values() for v in state.values()
                                         if isinstance(v, torch.Tensor) and v.dim() > 0)}
        with reporting_write_errors(run.out, SHARDS_FILE):
            write_text_atomically(run.out / SHARDS_FILE, json.dumps(report, indent=1) + "\n")
