"""Training checkpoints that resume exactly, written atomically and without pickle.

    path = save_checkpoint(out_dir, model, optimizer, TrainState(step, sample_index, schedule))
    state = load_checkpoint(latest_checkpoint(out_dir), model, optimizer)   # also restores the RNGs

A checkpoint is a directory `step-000123/`:
    model.safetensors      the weights (tied tensors stored once)
    optimizer.safetensors  every tensor of the optimizer state, keyed `<param index>.<name>`
    rng.safetensors        torch's CPU generator state of every process (rank 0: `torch`, rank r: `torch.rankR`)
    state.json             step, data position (sample index), schedule, the number of metrics.csv rows
                           it covers, optimizer hyper-parameters and the names of its parameters,
                           python's and numpy's RNG states of every process
    config.json            the model config, when the model has one (VLMConfig / LMConfig)
A sharded run (`--fsdp`, every rank holding a slice of each tensor) writes the weights and optimizer
state as `torch.distributed.checkpoint` shards instead (`save_sharded_checkpoint`, every rank its own):
    sharded/               .metadata + one __R_0.distcp file per rank: model and optimizer state, by name
and the same rng.safetensors, state.json (its "format" is "sharded") and config.json.
It is first written to a hidden temporary directory beside it, every file fsynced, then renamed into
place, so a crash leaves either the previous checkpoints or the complete new one, never half of one
(plus a hidden `.step-*.tmp-*` directory, which vlmkit.files.remove_temporaries deletes when the run starts
again); a save that fails (a full disk, a folder turned read-only) deletes its temporary directory itself.

`reporting_write_errors` turns such a failure of any write of the run folder into a `RunFolderError`
that says what could not be written, why, and which checkpoint is safe to --resume from.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from vlmkit.decoding import model_device
from vlmkit.files import temporary_path
from vlmkit.train.distributed import World, barrier, broadcast_from_main

PREFIX = "step-"
SHARDED_DIR = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint directory


class RunFolderError(ValueError):
    """A run's folder could not be written (a full disk, a folder turned read-only or not writable): the
    message says what was being written, the cause, and which checkpoint is complete and safe."""


@dataclass
class TrainState:
    """Where a run stands: optimizer steps done, samples consumed from the data order, the schedule, and
    how many metrics rows (one per step) were written with it (None: not recorded)."""

    step: int
    sample_index: int
    schedule: dict[str, Any] = field(default_factory=dict)
    metric_rows: int | None = None


def is_checkpoint(path: str | Path) -> bool:
    """Whether path is a checkpoint directory (its state.json and optimizer.safetensors, or a sharded one's
    torch.distributed.checkpoint metadata, are there)."""
    path = Path(path)
    return (path / "state.json").is_file() and ((path / "optimizer.safetensors").is_file()
                                                or (path / SHARDED_DIR / ".metadata").is_file())


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"{PREFIX}{step:06d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint of out_dir with the most steps, or None when there is none."""
    found = [p for p in Path(out_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return max(found, key=lambda p: int(p.name[len(PREFIX):]), default=None)


def prune_checkpoints(out_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints of out_dir (keep 0 keeps all); returns the deleted ones."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
    found = sorted((p for p in Path(out_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()),
                   key=lambda p: int(p.name[len(PREFIX):]))
    old = found[:-keep] if keep else []
    for path in old:
        shutil.rmtree(path)
    return old


@contextlib.contextmanager
def reporting_write_errors(out_dir: str | Path, what: str) -> Iterator[None]:
    """Run a write of `what` into the run folder out_dir; an OSError or SafetensorError it raises becomes a
    RunFolderError naming what, the cause, and the newest complete checkpoint (the one to --resume from)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise RunFolderError(_write_failure(Path(out_dir), what, e)) from e


def _write_failure(out: Path, what: str, error: OSError | SafetensorError) -> str:
    """The message of a failed write: what, the cause (with the file it was writing), what is safe."""
    if isinstance(error, OSError) and error.strerror:
        cause = error.strerror + (f" ({error.filename})" if error.filename else "")
    else:
        cause = str(error)
    safe = latest_checkpoint(out)
    if safe is None:
        after = ("no checkpoint had been written yet: free space or make the folder writable, then start the "
                 "run again")
    else:
        after = (f"the last checkpoint, {safe}, is complete and safe: free space or make the folder writable, "
                 "then continue the run with --resume")
    return f"could not write {what} in {out}: {cause}; {after}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class RngState:
    """One process's RNG states: torch's CPU generator (a uint8 tensor), python's and numpy's (JSON-able)."""

    torch_cpu: torch.Tensor
    python: list[Any]
    numpy: list[Any]


def rng_state() -> RngState:
    """This process's torch / python / numpy RNG states."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return RngState(torch.get_rng_state(), [version, list(mt), gauss],
                    [name, keys.tolist(), int(pos), int(has_gauss), float(cached)])


def _set_rng_state(state: RngState) -> None:
    torch.set_rng_state(state.torch_cpu)
    version, mt, gauss = state.python
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state.numpy
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _rng_key(rank: int) -> str:
    """rng.safetensors key of a rank's torch state: `torch` for rank 0 (as a single process writes it)."""
    return "torch" if rank == 0 else f"torch.rank{rank}"


def _rng_parts(states: list[RngState]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-rank RNG states split into tensors (rng.safetensors) and JSON (state.json "rng"): rank 0's python
    and numpy states at the top, those of ranks 1.. under "ranks" (absent for a single process)."""
    tensors = {_rng_key(r): s.torch_cpu for r, s in enumerate(states)}
    meta: dict[str, Any] = {"python": states[0].python, "numpy": states[0].numpy}
    if len(states) > 1:
        meta["ranks"] = [{"python": s.python, "numpy": s.numpy} for s in states[1:]]
    return tensors, meta


def _rank_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], rank: int, world_size: int,
              path: Path) -> RngState:
    """The RNG state rank saved in a checkpoint; raises when it was saved by another number of processes."""
    saved = 1 + len(meta.get("ranks", []))
    if saved != world_size:
        raise ValueError(f"{path} holds the RNG states of {saved} process(es) but this run has {world_size}; "
                         f"resume it with the same number of processes (torchrun --nproc_per_node {saved}, "
                         "or no torchrun for 1) so it continues exactly")
    own = meta if rank == 0 else meta["ranks"][rank - 1]
    return RngState(tensors[_rng_key(rank)], own["python"], own["numpy"])


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer state split into tensors (for safetensors) and everything else (for JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, extra: dict[str, Any] | None = None,
                    rng_states: list[RngState] | None = None) -> Path:
    """Write the checkpoint of state.step atomically under out_dir; returns its directory.
    extra is stored in state.json (e.g. the stage) for the record. rng_states: every rank's RNG state in rank
    order (under torchrun, gathered to rank 0, which writes); default this process's alone."""
    final = checkpoint_dir(out_dir, state.step)
    tmp = _fresh_temporary(final)
    try:
        _write_checkpoint(tmp, model, optimizer, state, extra, rng_states)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # frees a full disk; the error itself goes on
        raise
    return _move_into_place(tmp, final)


def _fresh_temporary(final: Path) -> Path:
    """The hidden temporary directory a checkpoint is written to (parents made, an old one removed)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _move_into_place(tmp: Path, final: Path) -> Path:
    """Rename the complete checkpoint tmp to final (replacing a checkpoint of the same step) and fsync."""
    if final.exists():  # the same step saved again: move the old one aside, then drop it
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(final.parent)
    return final


def _write_checkpoint(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                      extra: dict[str, Any] | None, rng_states: list[RngState] | None) -> None:
    """Write a checkpoint's files into the new directory tmp, each fsynced."""
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_parts(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    _write_run_state(tmp, model, state, extra, rng_states, opt_meta)


def _write_run_state(tmp: Path, model: nn.Module, state: TrainState, extra: dict[str, Any] | None,
                     rng_states: list[RngState] | None, opt_meta: dict[str, Any], fmt: str | None = None) -> None:
    """Write rng.safetensors, state.json (with the optimizer's JSON part opt_meta) and config.json into tmp,
    then fsync every file of tmp and tmp itself."""
    rng_tensors, rng_meta = _rng_parts(rng_states if rng_states is not None else [rng_state()])
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    meta = {"step": state.step, "sample_index": state.sample_index, "schedule": state.schedule,
            "metric_rows": state.metric_rows, "optimizer": opt_meta, "rng": rng_meta, "extra": extra or {}}
    if fmt is not None:
        meta["format"] = fmt
    (tmp / "state.json").write_text(json.dumps(meta) + "\n")
    cfg = getattr(model, "cfg", None)
    if hasattr(cfg, "to_dict"):
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(tmp)


def _group_names(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's parameter groups without their parameters (what a sharded checkpoint's state.json
    records of them: names, lrs, hyper-parameters)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def save_sharded_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: TrainState, world: World, extra: dict[str, Any] | None = None,
                            rng_states: list[RngState] | None = None) -> Path | None:
    """The checkpoint of a sharded (FSDP) model: every rank calls it and writes its own shards of the weights
    and optimizer state (torch.distributed.checkpoint, into SHARDED_DIR); rank 0 writes the rest (rng_states:
    every rank's, gathered to it) and renames the directory into place, atomically as save_checkpoint.
    world is the run's train.distributed.World. Returns the directory on rank 0, None on the others."""
    final = checkpoint_dir(out_dir, state.step)
    tmp = broadcast_from_main(_fresh_temporary(final) if world.is_main else None, world)
    barrier(world)  # an old temporary is gone before any rank writes
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / SHARDED_DIR)
        if world.is_main:
            _write_run_state(tmp, model, state, extra, rng_states, {"param_groups": _group_names(optimizer)},
                             fmt="sharded")
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(world)  # every rank's shards are written
    return _move_into_place(tmp, final) if world.is_main else None


def _read_state(path: Path) -> dict[str, Any]:
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} not found: pass a checkpoint directory (step-NNNNNN/) "
                                "written by save_checkpoint")
    return json.loads(state_file.read_text())


def _check_groups(path: Path, saved_groups: list[dict[str, Any]], optimizer: torch.optim.Optimizer) -> None:
    saved = [g.get("param_names") for g in saved_groups]
    current = [g.get("param_names") for g in optimizer.param_groups]
    if saved != current:
        raise ValueError(f"{path} holds the optimizer of other parameter groups than this run's "
                         f"({[g.get('name') for g in saved_groups]} vs "
                         f"{[g.get('name') for g in optimizer.param_groups]}); resume with the same model and stage")


def _check_format(path: Path, meta: dict[str, Any], sharded: bool) -> None:
    if (meta.get("format") == "sharded") != sharded:
        saved, now = ("a sharded (--fsdp)", "without") if not sharded else ("an unsharded", "with")
        raise ValueError(f"{path} is {saved} checkpoint but this run trains {now} --fsdp; resume it as it was "
                         "started")


def load_sharded_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
                            restore_rng: bool = True) -> TrainState:
    """Load a checkpoint of save_sharded_checkpoint into a model sharded the same way and its optimizer
    (every rank calls it and reads its own shards), restore this rank's RNGs, and return its TrainState.
    Raises as load_checkpoint for another number of processes or other parameter groups."""
    path = Path(path)
    meta = _read_state(path)
    _check_format(path, meta, sharded=True)
    rng = None
    if restore_rng:
        rng = _rank_rng(load_file(str(path / "rng.safetensors")), meta["rng"], world.rank, world.size, path)
    _check_groups(path, meta["optimizer"]["param_groups"], optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)  # a fresh optimizer: a state for every parameter
    # ... but the checkpoint has none for a parameter that never had a gradient (a vision layer past the one the
    # projector reads): leave those out, so the optimizer is the one that was saved
    saved = dcp.FileSystemReader(str(path / SHARDED_DIR)).read_metadata().state_dict_metadata
    optim_state["state"] = {name: entry for name, entry in optim_state["state"].items()
                            if any(f"optimizer.state.{name}.{key}" in saved for key in entry)}
    dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=path / SHARDED_DIR)
    # strict=False lets those parameters stay without a state; the model's keys are all there (dcp.load raises
    # for a key of model_state the checkpoint lacks, and model_state has every key of the model)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(strict=False))
    if rng is not None:
        _set_rng_state(rng)
    return TrainState(meta["step"], meta["sample_index"], meta["schedule"], meta.get("metric_rows"))


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    restore_rng: bool = True, rank: int = 0, world_size: int = 1) -> TrainState:
    """Load weights and optimizer state from a checkpoint directory into model and optimizer (built the same
    way as when it was saved), restore the torch / python / numpy RNGs this rank saved, and return its
    TrainState. A checkpoint of a run with another number of processes than world_size raises ValueError
    when restore_rng (the ranks' RNG streams cannot be carried over exactly)."""
    path = Path(path)
    meta = _read_state(path)
    _check_format(path, meta, sharded=False)
    rng = None  # checked before anything is loaded, so a refused checkpoint leaves model and optimizer as they were
    if restore_rng:
        rng = _rank_rng(load_file(str(path / "rng.safetensors")), meta["rng"], rank, world_size, path)
    _check_groups(path, meta["optimizer"]["param_groups"], optimizer)
    load_model(model, str(path / "model.safetensors"), device=str(model_device(model)))  # straight onto its device
    optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]))
    if rng is not None:
        _set_rng_state(rng)
    return TrainState(meta["step"], meta["sample_index"], meta["schedule"], meta.get("metric_rows"))
