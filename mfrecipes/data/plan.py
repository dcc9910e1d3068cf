"""Which shard parts each rank and worker reads in each epoch: pure, seeded arithmetic.

A *part* is a shard, or a slice of one: when there are fewer shards than readers
(``world_size * num_workers``), each shard is read as ``num_slices`` interleaved slices (slice
``j`` keeps the samples whose index in the shard is ``j`` mod ``num_slices``), so every reader has
work and the readers still partition the data.

Epoch ``e``: all parts are permuted with a generator seeded by ``(seed, e)`` - the same on every
rank - and rank ``r`` takes ``perm[r::world_size]``: ranks are disjoint and together cover the
set once. With ``resampled=True`` (multi-node, when exact epochs do not matter) each rank instead
draws its ``ceil(parts / world_size)`` parts with replacement from ``(seed, e, rank)``. Within a
rank, logical worker ``w`` of ``num_workers`` takes every ``num_workers``-th of the rank's parts.
"""
from __future__ import annotations

import math

import attrs
import numpy as np

# Domain tags keep the generators of different decisions independent for the same run seed.
SHARD_ORDER, SAMPLE_ORDER, RESAMPLE = 0x5A4D01, 0x5A4D02, 0x5A4D03


def seeded_rng(*keys: int) -> np.random.Generator:
    """A numpy Generator from integer keys (any sign or size), stable across platforms."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & (2**64 - 1) for k in keys]))


@attrs.frozen
class Part:
    shard: int       # index into the expanded URL list
    slice: int = 0   # keep in-shard sample indices i with i % num_slices == slice
    num_slices: int = 1

    def count(self, shard_count: int) -> int:
        """Samples of this part in a shard of ``shard_count`` samples."""
        return len(range(self.slice, shard_count, self.num_slices))


@attrs.frozen
class EpochPlan:
    num_shards: int = attrs.field(validator=attrs.validators.ge(1))
    seed: int = 0
    rank: int = 0
    world_size: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    num_workers: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    resampled: bool = False

    def __attrs_post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")

    @property
    def num_slices(self) -> int:
        return max(1, math.ceil(self.world_size * self.num_workers / self.num_shards))

    def parts(self) -> list[Part]:
        m = self.num_slices
        return [Part(s, j, m) for s in range(self.num_shards) for j in range(m)]

    def rank_parts(self, epoch: int) -> list[Part]:
        parts = self.parts()
        if self.resampled:
            rng = seeded_rng(self.seed, RESAMPLE, epoch, self.rank)
            idx = rng.integers(0, len(parts), size=math.ceil(len(parts) / self.world_size))
            return [parts[i] for i in idx]
        perm = seeded_rng(self.seed, SHARD_ORDER, epoch).permutation(len(parts))
        return [parts[i] for i in perm[self.rank::self.world_size]]

    def worker_parts(self, epoch: int, worker: int) -> list[Part]:
        return self.rank_parts(epoch)[worker::self.num_workers]

    def sample_rng(self, epoch: int, worker: int, position: int) -> np.random.Generator:
        """The in-shard shuffle generator of the ``position``-th part a worker reads in
        ``epoch``."""
        return seeded_rng(self.seed, SAMPLE_ORDER, epoch, self.rank, worker, position)
