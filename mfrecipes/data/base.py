"""What every dataset gives the training loop and the evaluators."""
from __future__ import annotations

from typing import Iterator, Optional, Protocol, runtime_checkable

import attrs
import torch


@attrs.frozen
class DataInfo:
    """Static facts about a dataset, known before any sample is read."""

    name: str
    modality: str = attrs.field(validator=attrs.validators.in_(("points", "image", "latent")))
    sample_shape: tuple = attrs.field(converter=tuple)  # (2,) for points, (C, H, W) otherwise
    num_classes: Optional[int] = None                    # None: unconditional
    latent_scale: Optional[float] = None                 # latents only (SD-VAE: 0.18215)
    vae: Optional[str] = None                            # latents only: VAE id or local path


@runtime_checkable
class Dataset(Protocol):
    """A dataset as the loop sees it.

    ``batches`` is an infinite, deterministic stream for this rank: the same seed and ``start``
    give the same batches, so a resumed run continues with the samples it would have seen.
    ``start`` counts the samples this rank has already consumed.
    """

    info: DataInfo

    def batches(self, batch_size: int, *, start: int = 0
                ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Yield ``(x [B, *sample_shape] float32, y [B] int64 or None)`` forever."""
        ...

    def counters(self) -> dict:
        """Running counters for metrics.jsonl (e.g. ``{"data/skipped": 0}``)."""
        ...

    def reference(self, n: int, seed: int) -> torch.Tensor:
        """``n`` real samples ``[n, *sample_shape]`` for evaluation (fresh draws where possible)."""
        ...
