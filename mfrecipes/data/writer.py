"""Write arrays into WebDataset shards plus their ``manifest.json`` (a local folder)."""
from __future__ import annotations

import os
from typing import Iterable, Optional

import numpy as np

from mfrecipes.data.manifest import FILENAME, Manifest, ShardEntry, write_manifest
from mfrecipes.data.npy import encode_npy
from mfrecipes.data.tar import TarWriter

SHARD_PATTERN = "shard-{:06d}.tar"


def write_shards(directory: str, samples: Iterable[tuple[np.ndarray, Optional[int]]], *,
                 name: str, samples_per_shard: int, key: str = "x.npy", modality: str,
                 sample_shape: tuple, num_classes: Optional[int] = None,
                 latent_scale: Optional[float] = None, vae: Optional[str] = None,
                 params: Optional[dict] = None) -> Manifest:
    """Write ``(x, y)`` pairs as ``shard-000000.tar``, ... and ``manifest.json`` in ``directory``.

    Each sample is ``{"__key__": "%08d" % index, key: x as float32 .npy, "cls": y}`` (``cls`` only
    when ``y`` is not None). Shards hold ``samples_per_shard`` samples (the last one fewer).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    os.makedirs(directory, exist_ok=True)
    shape = tuple(sample_shape)
    entries: list[ShardEntry] = []
    writer: TarWriter | None = None
    fileobj = None

    def close_shard() -> None:
        writer.close()
        fileobj.close()
        fname = SHARD_PATTERN.format(len(entries))
        entries.append(ShardEntry(fname, writer.count,
                                  os.path.getsize(os.path.join(directory, fname))))

    for index, (x, y) in enumerate(samples):
        x = np.asarray(x, dtype=np.float32)
        if x.shape != shape:
            raise ValueError(f"sample {index} has shape {x.shape}, expected {shape}")
        if writer is not None and writer.count == samples_per_shard:
            close_shard()
            writer = None
        if writer is None:
            fileobj = open(os.path.join(directory, SHARD_PATTERN.format(len(entries))), "wb")
            writer = TarWriter(fileobj)
        sample = {"__key__": f"{index:08d}", key: encode_npy(x)}
        if y is not None:
            sample["cls"] = str(int(y))
        writer.write(sample)
    if writer is not None:
        close_shard()
    manifest = Manifest(name=name, key=key, modality=modality, sample_shape=shape,
                        num_classes=num_classes, shards=entries, latent_scale=latent_scale,
                        vae=vae, params=dict(params or {}))
    write_manifest(os.path.join(directory, FILENAME), manifest)
    return manifest
