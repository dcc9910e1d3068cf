"""Datasets that need no download (``toy2d``, ``digits``), read through the real shard path.

On first use each is written into local WebDataset shards in the cache folder (``cache.py``:
``<cache_dir>/digits-r8/``, ``<cache_dir>/toy2d-checkerboard-n50000-s0/``) and then read back by
the same ``Shards`` reader that reads ``s3://`` shards, so small runs exercise the path large runs
depend on. ``reference`` gives evaluation data: fresh draws for toys, the real images for digits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import attrs
import torch

from mfrecipes.data.base import DataInfo
from mfrecipes.data.cache import ensure_cached
from mfrecipes.data.manifest import Manifest, read_manifest
from mfrecipes.data.plan import seeded_rng
from mfrecipes.data.shards import Shards
from mfrecipes.data.toy2d import TOYS, sample_toy
from mfrecipes.data.writer import write_shards
from mfrecipes.errors import DataError
from mfrecipes.registry import DATASETS

NUM_DIGITS = 1797
DIGITS_RESOLUTIONS = (8, 16, 32)
_REFERENCE = 0x5A4D10  # domain tag: reference draws never reuse the training pool's generator


def toy2d_name(kind: str, num_points: int, data_seed: int) -> str:
    return f"toy2d-{kind}-n{num_points}-s{data_seed}"


def build_toy2d(directory: str, kind: str, num_points: int, data_seed: int,
                num_shards: int = 8) -> Manifest:
    """Write the toy's fixed pool (``num_points`` points drawn with ``data_seed``) as shards."""
    _valid_kind(None, None, kind)
    name = toy2d_name(kind, num_points, data_seed)
    g = torch.Generator().manual_seed(data_seed)
    pool = sample_toy(kind, num_points, g).numpy()  # [N, 2]
    return write_shards(directory, ((p, None) for p in pool), name=name,
                        samples_per_shard=math.ceil(num_points / num_shards), modality="points",
                        sample_shape=(2,), params={"kind": kind, "num_points": num_points,
                                                   "data_seed": data_seed})


def build_digits(directory: str, resolution: int = 8, num_shards: int = 4) -> Manifest:
    """Write scikit-learn's 1,797 digits at ``resolution`` (``[1, R, R]`` in [-1, 1]) as shards."""
    from mfrecipes.data.digits import load_digits_tensors

    Digits._check_resolution(None, None, resolution)
    x, y = load_digits_tensors(resolution)  # [N, 1, R, R] in [-1, 1], [N]
    return write_shards(directory, zip(x.numpy(), y.tolist()), name=f"digits-r{resolution}",
                        samples_per_shard=math.ceil(NUM_DIGITS / num_shards), modality="image",
                        sample_shape=(1, resolution, resolution), num_classes=10,
                        params={"resolution": resolution})


class _Embedded:
    """Shared part of the embedded sets: a cached shard folder read by a ``Shards`` reader."""

    _reader: Shards

    @property
    def info(self) -> DataInfo:
        return self._info

    @property
    def folder(self) -> Path:
        return self._folder

    def batches(self, batch_size: int, *, start: int = 0
                ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        return self._reader.batches(batch_size, start=start)

    def counters(self) -> dict:
        return self._reader.counters()

    def _open_reader(self, name: str, build, total: int, per_shard: int, **reader_kw) -> None:
        folder = ensure_cached(self.cache_dir, name, build, expect_total=total)
        manifest = read_manifest(str(folder))
        reader = Shards(urls=[str(folder / s.name) for s in manifest.shards],
                        shuffle_buffer=per_shard, seed=self.seed, rank=self.rank,
                        world_size=self.world_size, **reader_kw)
        object.__setattr__(self, "_folder", folder)
        object.__setattr__(self, "_reader", reader)


def _valid_kind(_, __, kind):
    if kind not in TOYS:
        raise DataError(f"unknown 2-D toy {kind!r}; valid: {', '.join(sorted(TOYS))}",
                        path="data.params.kind")


@DATASETS.register("toy2d")
@attrs.frozen(eq=False)
class Toy2D(_Embedded):
    """2-D toy points: a fixed pool of ``num_points`` drawn with ``data_seed``, cached as shards."""

    kind: str = attrs.field(default="checkerboard", validator=_valid_kind)
    num_points: int = attrs.field(default=50_000, validator=[attrs.validators.instance_of(int), attrs.validators.ge(1), attrs.validators.le(10**8)])
    data_seed: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    cache_dir: Optional[str] = None

    _folder: Path = attrs.field(init=False, repr=False)
    _reader: Shards = attrs.field(init=False, repr=False)
    _info: DataInfo = attrs.field(init=False, repr=False)

    NUM_SHARDS = 8

    @classmethod
    def static_info(cls, kind: str = "checkerboard", **_) -> DataInfo:
        """What the data will be, without touching the cache (used by ``mfr check``)."""
        _valid_kind(None, None, kind)
        return DataInfo(name=f"toy2d/{kind}", modality="points", sample_shape=(2,))

    def __attrs_post_init__(self):
        name = toy2d_name(self.kind, self.num_points, self.data_seed)
        per_shard = math.ceil(self.num_points / self.NUM_SHARDS)

        def build(tmp: str) -> Manifest:
            return build_toy2d(tmp, self.kind, self.num_points, self.data_seed, self.NUM_SHARDS)

        self._open_reader(name, build, self.num_points, per_shard, conditional=False)
        object.__setattr__(self, "_info", attrs.evolve(self._reader.info,
                                                       name=f"toy2d/{self.kind}"))

    def reference(self, n: int, seed: int) -> torch.Tensor:
        """``n`` fresh points ``[n, 2]`` from the exact sampler (not the training pool)."""
        g = torch.Generator().manual_seed(int(seeded_rng(seed, _REFERENCE).integers(2**62)))
        return sample_toy(self.kind, n, g)


@DATASETS.register("digits")
@attrs.frozen(eq=False)
class Digits(_Embedded):
    """scikit-learn's handwritten digits (1,797 images, 10 classes) at ``resolution``, cached."""

    resolution: int = attrs.field(default=8)
    conditional: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    cache_dir: Optional[str] = None

    _folder: Path = attrs.field(init=False, repr=False)
    _reader: Shards = attrs.field(init=False, repr=False)
    _info: DataInfo = attrs.field(init=False, repr=False)

    NUM_SHARDS = 4

    @resolution.validator
    def _check_resolution(self, _, value):
        if value not in DIGITS_RESOLUTIONS:
            raise DataError(f"digits resolution {value!r} is not supported; valid: "
                            f"{', '.join(map(str, DIGITS_RESOLUTIONS))}",
                            path="data.params.resolution")

    @classmethod
    def static_info(cls, resolution: int = 8, conditional: bool = True, **_) -> DataInfo:
        """What the data will be, without touching the cache (used by ``mfr check``)."""
        cls._check_resolution(None, None, resolution)
        return DataInfo(name="digits", modality="image", sample_shape=(1, resolution, resolution),
                        num_classes=10 if conditional else None)

    def __attrs_post_init__(self):
        r = self.resolution
        per_shard = math.ceil(NUM_DIGITS / self.NUM_SHARDS)

        def build(tmp: str) -> Manifest:
            return build_digits(tmp, r, self.NUM_SHARDS)

        self._open_reader(f"digits-r{r}", build, NUM_DIGITS, per_shard,
                          conditional=self.conditional)
        object.__setattr__(self, "_info", attrs.evolve(self._reader.info, name="digits"))

    def reference(self, n: int, seed: int) -> torch.Tensor:
        """``[min(n, 1797), 1, R, R]`` real digits: all of them, or a ``seed``-ed subset."""
        from mfrecipes.data.digits import load_digits_tensors

        x, _ = load_digits_tensors(self.resolution)
        if n >= len(x):
            return x
        g = torch.Generator().manual_seed(int(seeded_rng(seed, _REFERENCE).integers(2**62)))
        return x[torch.randperm(len(x), generator=g)[:n]]
