"""Multi-process data-parallel training under `torchrun`: one process per rank, gloo on CPU.

    torchrun --nproc_per_node 2 -m vlmkit.cli train --model tiny-random --data synth/data.json --out run
    world = init_distributed()          # reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
    ...                                 # train.loop.train() sees the process group and wraps the model in DDP
    shutdown()

How a run splits (what `train.loop.train` does with the helpers here):
- Data: every rank walks the same seeded global order (`ShuffledBatches(..., rank=, world_size=)`) and
  takes its contiguous slice of each global batch, so the global batch is the single-process batch.
- Gradients: the model is wrapped in DistributedDataParallel, which averages gradients over ranks.
  Each rank's micro-batch loss is weighted by (its labelled tokens / the global labelled tokens) x
  world size, so after the average the gradient is the single-process token-weighted mean. The global
  token count is one all-reduce per step; micro-batches before the last of a step skip DDP's sync
  (`no_sync`). Clipping then sees the same gradients on every rank.
- Files: only rank 0 writes checkpoints, metrics and the loss curve and shows progress; the ranks meet
  at a barrier after each checkpoint and at the end. A checkpoint holds every rank's RNG state (gathered
  to rank 0); on resume every rank reads the same checkpoint and takes back its own RNG state, the data
  position is the global sample count (each rank seeks to it and takes its slice again), and a run with
  another number of processes is refused (its ranks' RNG streams could not continue exactly).
The result equals single-process training up to the order of float additions: an all-reduce sums the
ranks' partial gradients in another order than one backward over the whole batch.

Sharded training (`--fsdp`, `shard_model`): instead of DDP's full copy per rank, PyTorch's FSDP2
(`torch.distributed.fsdp.fully_shard`) splits every parameter, its gradient and its AdamW states over the
ranks (dim 0, ~1/N each). The units are the layers activation checkpointing recomputes (`layer_units`:
every decoder layer and every vision layer), then the root, which holds the rest (embeddings, norms,
projector, head): a unit's full weights exist only while it runs. Gradients are reduce-scattered with
the mean over ranks, so the loss weighting above holds unchanged. With bf16 the policy gathers the
parameters in bfloat16 and reduces gradients in float32; the sharded master weights and optimizer states
stay float32. The same data split, the same checkpoint contents (as `torch.distributed.checkpoint`
shards, train.checkpoint.save_sharded_checkpoint) and the same final model folder (full weights gathered
to rank 0) as DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank in 0..size-1 (rank 0 writes the files)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    """True when the environment holds torchrun's variables (WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> World:
    """Join the process group torchrun describes in the environment and return this rank's World.

    Outside torchrun (no WORLD_SIZE / RANK) this returns World() and starts nothing. backend defaults to
    gloo (CPU tensors); a collective that waits longer than timeout_minutes raises instead of hanging."""
    if not launched_by_torchrun():
        return World()
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"the environment has WORLD_SIZE and RANK but not {missing}; launch with torchrun, "
                         "which sets them all")
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group(backend or "gloo", rank=world.rank, world_size=world.size,
                                timeout=timedelta(minutes=timeout_minutes))
    return world


def current_world() -> World:
    """The World of the initialized process group, else World() (a single process)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def shutdown(wait: bool = True) -> None:
    """Leave the process group if one was joined, after a last barrier when wait (on an error the other
    ranks may never reach it: pass wait=False; torchrun then stops them)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """The element-wise sum of values over the ranks (float64), values unchanged in a single process."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_to_main(value: Any, world: World) -> list[Any] | None:
    """Every rank's value (any picklable object) in rank order on rank 0, None on the other ranks; [value]
    in a single process. Every rank must call it."""
    if not world.distributed:
        return [value]
    gathered: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def wrap_model(model: nn.Module, world: World) -> nn.Module:
    """model in DistributedDataParallel when world is distributed, else model itself.

    find_unused_parameters is on: a trained group may hold parameters a forward never reaches (a
    vision tower's layers after its select_layer); DDP would otherwise wait for their gradients."""
    if not world.distributed:
        return model
    return DistributedDataParallel(model, find_unused_parameters=True)


def shard_bounds(batch_size: int, world: World) -> tuple[int, int]:
    """[start, stop) of this rank's slice of a global batch of batch_size samples."""
    if batch_size % world.size:
        raise ValueError(f"the global batch size {batch_size} does not split evenly over {world.size} processes; "
                         f"use a multiple of {world.size}")
    per_rank = batch_size // world.size
    return world.rank * per_rank, (world.rank + 1) * per_rank


def broadcast_from_main(value: Any, world: World) -> Any:
    """Rank 0's value (any picklable object) on every rank; value itself in a single process."""
    if not world.distributed:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


LAYER_LISTS = ("layers", "blocks")  # the ModuleList attribute of a layer stack


def layer_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units of a model below its root: every layer of every layer stack, in module order. A layer
    stack is a module with a `gradient_checkpointing` flag (the LM's decoder, a ViT or SAM vision tower:
    the stacks activation checkpointing recomputes layer by layer), or one of their kin holding a `layers` /
    `blocks` ModuleList (Qwen2-VL's vision blocks, a resampler's layers)."""
    units = []
    for module in model.modules():
        for attr in LAYER_LISTS:
            stack = getattr(module, attr, None)
            if isinstance(stack, nn.ModuleList):
                units.extend(stack)
    return units


def check_shardable(world: World) -> None:
    """Refuse sharding in a single process (nothing to shard over): --fsdp needs torchrun with N >= 2."""
    if not world.distributed:
        raise ValueError("--fsdp shards the model over the processes torchrun starts, but this is a single "
                         "process: launch with torchrun --nproc_per_node N (N >= 2), or leave --fsdp out to "
                         "train in one")


def shard_model(model: nn.Module, world: World, bf16: bool = False) -> nn.Module:
    """Shard model in place over the ranks of world with FSDP2: one fully_shard unit per layer (layer_units),
    then the root. bf16: parameters gathered in bfloat16 for compute, gradients reduced in float32. Every
    parameter becomes a DTensor holding this rank's rows; build the optimizer after this. Returns model."""
    check_shardable(world)
    device = next(model.parameters()).device
    if device.index is not None:  # a GPU: NCCL's collectives run on the current device
        torch.accelerator.set_device_index(device.index)
    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for unit in layer_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether model was sharded by shard_model (its parameters are DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_numel(tensor: torch.Tensor) -> int:
    """The elements of tensor this rank holds: a DTensor's local shard, else the whole tensor."""
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it), any other tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
