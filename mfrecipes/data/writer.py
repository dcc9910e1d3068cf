"""Write arrays into WebDataset shards plus their ``manifest.json`` (a local folder)."""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

import numpy as np

from mfrecipes.data.manifest import FILENAME, Manifest, ShardEntry, write_manifest
from mfrecipes.data.npy import encode_npy
from mfrecipes.data.tar import TarWriter

SHARD_PATTERN = "shard-{:06d}.tar"


def shard_pattern(prefix: str = "shard") -> str:
    """The file name pattern ``<prefix>-000000.tar``, ... (a ``str.format`` template)."""
    if not prefix or "/" in prefix or "{" in prefix or "}" in prefix:
        raise ValueError(f"shard name prefix {prefix!r} must be a non-empty file name part")
    return prefix + "-{:06d}.tar"


class ShardWriter:
    """Stream samples into ``shard-000000.tar``, ... in a local folder.

    A shard is closed when it holds ``samples_per_shard`` samples or, with ``max_bytes``, when
    the next sample would make it larger than that (a shard always holds at least one sample).
    Files are named ``<prefix>-000000.tar``, ...
    ``on_close(path, entry)`` runs after each shard is complete on disk (e.g. to upload it and
    delete the local copy). ``close()`` returns the ``ShardEntry`` list.
    """

    def __init__(self, directory: str, *, samples_per_shard: Optional[int] = None,
                 max_bytes: Optional[int] = None,
                 on_close: Optional[Callable[[str, ShardEntry], None]] = None,
                 prefix: str = "shard"):
        if samples_per_shard is None and max_bytes is None:
            raise ValueError("give samples_per_shard or max_bytes")
        if samples_per_shard is not None and samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self._pattern = shard_pattern(prefix)
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._per, self._max_bytes, self._on_close = samples_per_shard, max_bytes, on_close
        self.entries: list[ShardEntry] = []
        self._writer: Optional[TarWriter] = None
        self._file = None

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, self._pattern.format(index))

    def _close_shard(self) -> None:
        self._writer.close()
        self._file.close()
        path = self._path(len(self.entries))
        entry = ShardEntry(os.path.basename(path), self._writer.count, os.path.getsize(path))
        self.entries.append(entry)
        self._writer = self._file = None
        if self._on_close is not None:
            self._on_close(path, entry)

    def write(self, sample: dict) -> None:
        """Write one sample (``{"__key__": str, suffix: bytes | str, ...}``)."""
        w = self._writer
        if w is not None:
            full = self._per is not None and w.count >= self._per
            if not full and self._max_bytes is not None:
                size = sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items()
                           if not k.startswith("__"))
                full = self._file.tell() + size + 1024 > self._max_bytes  # + end marker
            if full:
                self._close_shard()
        if self._writer is None:
            self._file = open(self._path(len(self.entries)), "wb")
            self._writer = TarWriter(self._file)
        self._writer.write(sample)

    def close(self) -> list[ShardEntry]:
        if self._writer is not None:
            self._close_shard()
        return list(self.entries)


def array_sample(index: int, x: np.ndarray, y: Optional[int], key: str = "x.npy") -> dict:
    """The WebDataset sample ``{"__key__": "%08d" % index, key: .npy bytes, "cls": y}``."""
    sample = {"__key__": f"{index:08d}", key: encode_npy(x)}
    if y is not None:
        sample["cls"] = str(int(y))
    return sample


def write_shards(directory: str, samples: Iterable[tuple[np.ndarray, Optional[int]]], *,
                 name: str, samples_per_shard: int, key: str = "x.npy", modality: str,
                 sample_shape: tuple, num_classes: Optional[int] = None,
                 latent_scale: Optional[float] = None, vae: Optional[str] = None,
                 params: Optional[dict] = None) -> Manifest:
    """Write ``(x, y)`` pairs as ``shard-000000.tar``, ... and ``manifest.json`` in ``directory``.

    Each sample is ``{"__key__": "%08d" % index, key: x as float32 .npy, "cls": y}`` (``cls`` only
    when ``y`` is not None). Shards hold ``samples_per_shard`` samples (the last one fewer).
    """
    writer = ShardWriter(directory, samples_per_shard=samples_per_shard)
    shape = tuple(sample_shape)
    for index, (x, y) in enumerate(samples):
        x = np.asarray(x, dtype=np.float32)
        if x.shape != shape:
            raise ValueError(f"sample {index} has shape {x.shape}, expected {shape}")
        writer.write(array_sample(index, x, y, key))
    manifest = Manifest(name=name, key=key, modality=modality, sample_shape=shape,
                        num_classes=num_classes, shards=writer.close(), latent_scale=latent_scale,
                        vae=vae, params=dict(params or {}))
    write_manifest(os.path.join(directory, FILENAME), manifest)
    return manifest
