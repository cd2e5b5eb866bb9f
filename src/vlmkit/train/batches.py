"""The data order of training: an endless, seeded, resumable stream of collated batches.

    batches = ShuffledBatches(examples, batch_size=8, pad_id=0, seed=0)
    batches = ShuffledBatches(examples, batch_size=8, pad_id=0, seed=0, workers=2)   # built in 2 processes
    batches.seek(sample_index)          # on resume: continue exactly where a checkpoint stopped

Under torchrun every rank builds it with rank= and world_size= and collates only its slice of each global
batch. Importable from vlmkit.train.loop as well, where train() consumes it.

The batches come through a torch.utils.data.DataLoader over `BatchesAt`, whose item k is this rank's part of
the global batch that starts at sample k of the stream: a pure function of k (the epoch's order is
torch.randperm under seed + epoch, and an example is built from its sample alone), so the stream is the same
batch for batch whichever process builds it. workers=0 builds them in this process as they are needed;
workers=N in N worker processes (the platform's start method: fork on Linux), which read the images and plan
them while the model trains, up to 2 x N batches ahead, handed out in order. The loader's seed comes from a
generator seeded with `seed`, never from torch's global RNG, so starting the stream leaves the training RNGs
(dropout, ...) as they were and a resumed run draws what an uninterrupted one draws.

An example that cannot be built while training (its image was deleted or rewritten after the run checked
it) stops the stream with a `DataError` naming the example, the stream position and the cause, with any
number of workers (the worker hands the error back as a value, so no worker traceback stands in for it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from vlmkit.data.collate import collate, pack
from vlmkit.data.labels import TrainingExample
from vlmkit.train.distributed import World, shard_bounds

Batch = dict[str, torch.Tensor]
PREFETCH = 2  # batches each worker builds ahead (DataLoader's prefetch_factor)


class DataError(ValueError):
    """An example of the training data could not be built while training; the message says which and why."""


@dataclass(frozen=True)
class _Failed:
    """What a loader's worker hands back instead of a batch whose example raised: the message, made there."""

    message: str


class ShuffledBatches:
    """An endless, seeded stream of collated batches: epoch e visits the examples in the order of
    torch.randperm(n) under seed + e; batches run across epoch ends. `sample_index` counts the samples
    handed out so far, and seek(sample_index) continues the stream exactly from there (for resume).
    pack_len packs each batch's examples into rows of at most pack_len tokens instead of padding.
    workers > 0 builds the batches in that many DataLoader worker processes (see the module docstring);
    the stream is the same with any number.

    For data-parallel training, batch_size is the global batch: the process of rank r out of world_size
    collates only its contiguous slice [r * b, (r + 1) * b) of each global batch (b = batch_size /
    world_size), while sample_index keeps counting global samples. examples may be any sequence (e.g.
    one that builds each example when it is read); only the slice's examples are read."""

    def __init__(self, examples: Sequence[TrainingExample], batch_size: int, pad_id: int, seed: int = 0,
                 pack_len: int | None = None, rank: int = 0, world_size: int = 1, workers: int = 0) -> None:
        examples = examples if isinstance(examples, Sequence) else list(examples)
        if len(examples) == 0:
            raise ValueError("no training examples; pass at least one TrainingExample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0 builds the batches in this process), got {workers}")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.pack_len, self.workers = seed, pack_len, workers
        self.rank, self.world_size = rank, world_size
        self._slice = shard_bounds(batch_size, World(rank, world_size))
        self.sample_index = 0
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def seek(self, sample_index: int) -> None:
        """Continue from the sample_index-th sample of the stream."""
        self.sample_index = sample_index

    def _example(self, i: int) -> TrainingExample:
        """The i-th example of the stream (across epochs)."""
        epoch, pos = divmod(i, len(self.examples))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        index = int(self._order[pos])
        try:
            return self.examples[index]
        except ValueError as e:  # an image that no longer loads, a conversation that no longer labels, ...
            raise DataError(f"example {index} of the training data (sample {i} of the stream) could not be "
                            f"built: {e}") from e

    def batch_at(self, start: int) -> Batch:
        """This rank's part of the global batch whose first sample is sample `start` of the stream."""
        first, stop = self._slice
        chunk = [self._example(i) for i in range(start + first, start + stop)]
        return pack(chunk, self.pack_len, self.pad_id) if self.pack_len else collate(chunk, self.pad_id)

    def loader(self) -> DataLoader:
        """The DataLoader over the batches from sample_index on (BatchesAt, in order, workers processes)."""
        return DataLoader(BatchesAt(self), batch_size=None, sampler=_Starts(self.sample_index, self.batch_size),
                          num_workers=self.workers, collate_fn=_as_is,
                          prefetch_factor=PREFETCH if self.workers else None,
                          generator=torch.Generator().manual_seed(self.seed))

    def __iter__(self) -> Iterator[Batch]:
        """This rank's part of each global batch from sample_index on, without end. Raises DataError when an
        example cannot be built."""
        for batch in self.loader():
            if isinstance(batch, _Failed):
                raise DataError(batch.message)
            self.sample_index += self.batch_size
            yield batch


class BatchesAt(Dataset):
    """The batches of a ShuffledBatches by the stream position of their first sample (the DataLoader's
    dataset): item k is batches.batch_at(k), or a _Failed carrying the DataError's message."""

    def __init__(self, batches: ShuffledBatches) -> None:
        self.batches = batches

    def __getitem__(self, start: int) -> Batch | _Failed:
        try:
            return self.batches.batch_at(start)
        except DataError as e:  # handed back as a value: the main process raises it without a worker traceback
            return _Failed(str(e))


class _Starts:
    """The DataLoader's sampler: the first sample of every batch from `start` on, without end."""

    def __init__(self, start: int, step: int) -> None:
        self.start, self.step = start, step

    def __iter__(self) -> Iterator[int]:
        start = self.start
        while True:
            yield start
            start += self.step


def _as_is(batch: Batch | _Failed) -> Batch | _Failed:
    """The DataLoader's collate_fn: the item unchanged (BatchesAt's items are batches already)."""
    return batch
