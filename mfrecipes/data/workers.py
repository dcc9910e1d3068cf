"""Reading shards in DataLoader worker processes, with the same resumable positions.

With ``num_workers = W`` the rank's stream is W logical worker streams (``plan.py`` gives each
every W-th part), each cut into whole batches, interleaved round-robin: batch ``i`` comes from
logical worker ``i % W``. The DataLoader also serves its workers round-robin, so to resume at
batch ``b`` its physical worker ``p`` plays logical worker ``(b + p) % W``, which has already
produced ``len(range(logical, b, W))`` batches. Resuming therefore needs ``start`` to be a whole
number of batches (of the same size).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

if TYPE_CHECKING:
    from mfrecipes.data.shards import Shards


class _WorkerStream(IterableDataset):
    def __init__(self, shards: "Shards", batch_size: int, first_batch: int):
        self.shards, self.batch_size, self.first_batch = shards, batch_size, first_batch

    def __iter__(self):
        info = get_worker_info()
        nw = info.num_workers if info is not None else 1
        physical = info.id if info is not None else 0
        logical = (self.first_batch + physical) % nw
        done = len(range(logical, self.first_batch, nw))
        stats = {"skipped": 0}
        plan = self.shards.plan(num_workers=nw)
        records = self.shards._records(plan, logical, done * self.batch_size, stats)
        reported = 0
        for x, y in self.shards._batched(records, self.batch_size, stats):
            yield x, y, stats["skipped"] - reported
            reported = stats["skipped"]


def worker_batches(shards: "Shards", batch_size: int, start: int
                   ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``shards.batches`` through ``shards.num_workers`` DataLoader processes."""
    if start % batch_size:
        raise ValueError(f"with num_workers > 0, start ({start}) must be a multiple of the "
                         f"batch size ({batch_size})")
    stream = _WorkerStream(shards, batch_size, start // batch_size)
    loader = DataLoader(stream, batch_size=None, num_workers=shards.num_workers,
                        prefetch_factor=2)
    for x, y, skipped in loader:
        shards._stats["skipped"] += int(skipped)
        yield x, y
