"""Distributed, aspect-ratio grouped, resumable batch sampler.

Combines mmengine's ``DefaultSampler`` (per-epoch shuffle seeded by ``seed + epoch``, padded to
a multiple of the world size, rank ``r`` takes ``indices[r::world]``) with mmdetection's
``AspectRatioBatchSampler`` (``mmdet/datasets/samplers/batch_sampler.py``: two buckets, w >= h
and w < h; a batch is yielded when its bucket is full; leftovers are batched together at the
end). Every rank yields the same number of batches, ``ceil(per_rank / batch_size)``.

Resuming: :meth:`set_position` starts an epoch at a batch index, giving exactly the batches the
uninterrupted run would have seen next.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one rank.

    Args:
        groups: aspect group (0 or 1) of every dataset index.
        batch_size: images per batch (per GPU).
        world_size / rank: this process's place in the job.
        seed: shuffle seed, shared by all ranks.
        shuffle: shuffle each epoch (training) or keep the order.
    """

    def __init__(
        self,
        groups: Sequence[int],
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not groups:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def per_rank(self) -> int:
        return math.ceil(len(self.groups) / self.world_size)

    def batches_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Start ``epoch`` at batch ``start_batch`` (used when resuming mid-epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch():
            raise ValueError(f"start batch {start_batch} outside 0..{self.batches_per_epoch()}")
        self.epoch = epoch
        self.start_batch = start_batch

    def rank_indices(self) -> list[int]:
        n = len(self.groups)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        total = self.per_rank * self.world_size
        indices = (indices * math.ceil(total / n))[:total]
        return indices[self.rank : total : self.world_size]

    def all_batches(self) -> list[list[int]]:
        buckets: list[list[int]] = [[], []]
        batches: list[list[int]] = []
        for idx in self.rank_indices():
            bucket = buckets[self.groups[idx]]
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                batches.append(bucket[:])
                bucket.clear()
        left = buckets[0] + buckets[1]
        while left:
            batches.append(left[: self.batch_size])
            left = left[self.batch_size :]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.all_batches()[self.start_batch :]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch
