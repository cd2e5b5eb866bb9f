"""The data order of training: an endless, seeded, resumable stream of collated batches.

    batches = ShuffledBatches(examples, batch_size=8, pad_id=0, seed=0)
    batches.seek(sample_index)          # on resume: continue exactly where a checkpoint stopped

Under torchrun every rank builds it with rank= and world_size= and collates only its slice of each global
batch. Importable from vlmkit.train.loop as well, where train() consumes it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from vlmkit.data.collate import collate, pack
from vlmkit.data.labels import TrainingExample
from vlmkit.train.distributed import World, shard_bounds

Batch = dict[str, torch.Tensor]


class ShuffledBatches:
    """An endless, seeded stream of collated batches: epoch e visits the examples in the order of
    torch.randperm(n) under seed + e; batches run across epoch ends. `sample_index` counts the samples
    handed out so far, and seek(sample_index) continues the stream exactly from there (for resume).
    pack_len packs each batch's examples into rows of at most pack_len tokens instead of padding.

    For data-parallel training, batch_size is the global batch: the process of rank r out of world_size
    collates only its contiguous slice [r * b, (r + 1) * b) of each global batch (b = batch_size /
    world_size), while sample_index keeps counting global samples. examples may be any sequence (e.g.
    one that builds each example when it is read); only the slice's examples are read."""

    def __init__(self, examples: Sequence[TrainingExample], batch_size: int, pad_id: int, seed: int = 0,
                 pack_len: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        examples = examples if isinstance(examples, Sequence) else list(examples)
        if len(examples) == 0:
            raise ValueError("no training examples; pass at least one TrainingExample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.pack_len = seed, pack_len
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
        return self.examples[int(self._order[pos])]

    def __iter__(self) -> Iterator[Batch]:
        """This rank's part of each global batch from sample_index on, without end."""
        while True:
            first, stop = self._slice
            chunk = [self._example(i) for i in range(self.sample_index + first, self.sample_index + stop)]
            self.sample_index += self.batch_size
            yield pack(chunk, self.pack_len, self.pad_id) if self.pack_len else collate(chunk, self.pad_id)
