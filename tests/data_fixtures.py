"""Helpers for the data tests: small shard sets whose samples say who they are.

Sample ``i`` holds ``x = [i, -i]`` (float32) and ``cls = i % 10``, so a stream of batches can be
turned back into the list of sample indices it delivered. Shards are written with WebDataset's own
``TarWriter`` (an implementation independent of the reader under test) unless stated otherwise.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch


def write_wds_shards(folder, n: int, per_shard: int, *, manifest: bool = True,
                     bad: set[int] = frozenset()) -> list[str]:
    """Write ``n`` samples into ``shard-%06d.tar`` files of ``per_shard``; returns the paths.

    ``bad``: indices whose ``x.npy`` is replaced by garbage bytes. ``manifest``: also write a
    ``manifest.json`` (by hand, in the documented format) with the per-shard counts.
    """
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    paths, entries = [], []
    for s, lo in enumerate(range(0, n, per_shard)):
        path = os.path.join(folder, f"shard-{s:06d}.tar")
        with wds.TarWriter(path) as w:
            for i in range(lo, min(n, lo + per_shard)):
                x = b"definitely not an npy file" if i in bad else \
                    np.array([i, -i], dtype=np.float32)
                w.write({"__key__": f"{i:08d}", "x.npy": x, "cls": i % 10})
        paths.append(path)
        entries.append({"name": os.path.basename(path), "count": min(n, lo + per_shard) - lo,
                        "bytes": os.path.getsize(path)})
    if manifest:
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({"format": "mfrecipes-shards", "version": 1, "created_by": "test",
                       "name": "ids", "key": "x.npy", "modality": "points",
                       "sample_shape": [2], "num_classes": 10, "shards": entries}, f)
    return paths


def ids(x: torch.Tensor) -> list[int]:
    """Sample indices of a batch ``x [B, 2]`` written by ``write_wds_shards``."""
    assert torch.equal(x[:, 1], -x[:, 0])
    return [int(v) for v in x[:, 0]]


def take(ds, n: int, *, batch_size: int = 1, start: int = 0) -> list[int]:
    """The indices of the first ``n`` samples of ``ds.batches(batch_size, start=start)``."""
    out: list[int] = []
    for x, y in ds.batches(batch_size, start=start):
        got = ids(x)
        if y is not None:
            assert [i % 10 for i in got] == y.tolist()
        out += got
        if len(out) >= n:
            return out[:n]
    raise AssertionError("stream ended")
