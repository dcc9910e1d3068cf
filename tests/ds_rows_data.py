"""A test dataset whose split across ranks is known exactly: dataset ``ds_rows``.

A fixed pool of 2-D points; rank k of w reads rows k, k + w, k + 2w, ... of the pool, in order,
cycling. With the loop's rank::world slicing of the step's (t, r, noise), the union of the ranks'
micro batches of step s is exactly the one-process batch of step s, row for row, so a 2-rank run
and a 1-rank run see the same samples with the same draws. (Loaded through a recipe's
``imports:``.)
"""
from __future__ import annotations

from typing import Optional

import attrs
import torch

from mfrecipes.data.base import DataInfo
from mfrecipes.registry import DATASETS


@DATASETS.register("ds_rows")
@attrs.frozen(eq=False)
class Rows:
    num_points: int = 256
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    cache_dir: Optional[str] = None

    @property
    def info(self) -> DataInfo:
        return DataInfo(name="ds_rows", modality="points", sample_shape=(2,))

    @classmethod
    def static_info(cls, **_) -> DataInfo:
        return DataInfo(name="ds_rows", modality="points", sample_shape=(2,))

    def _pool(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(1234)
        return torch.randn(self.num_points, 2, generator=g) * torch.tensor([1.0, 0.5]) + 0.3

    def batches(self, batch_size: int, *, start: int = 0):
        mine = self._pool()[self.rank::self.world_size]  # [N / world, 2]
        pos = start
        while True:
            idx = torch.arange(pos, pos + batch_size) % len(mine)
            pos += batch_size
            yield mine[idx], None

    def counters(self) -> dict:
        return {}

    def reference(self, n: int, seed: int) -> torch.Tensor:
        return self._pool()[:n]
