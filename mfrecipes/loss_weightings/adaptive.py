"""Adaptive loss weighting, ``w = 1 / sg((err + c)^p)``: introduced by MeanFlow (Geng et al. 2025),
written as Kim et al. 2025, Eq. 7."""
from __future__ import annotations

import attrs
import torch

from mfrecipes.registry import LOSS_WEIGHTINGS
from mfrecipes.validate import number

__all__ = ["AdaptiveWeighting", "adaptive_weights"]


def adaptive_weights(err: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """``w  # [B] = 1 / (err + c)^p`` on the detached per-sample error ``err  # [B]``."""
    with torch.no_grad():
        # Adaptive loss weight (Kim et al. 2025, Eq. 7); p = 0 gives constant weights.
        return (err.detach() + c).pow(-p)


@LOSS_WEIGHTINGS.register("adaptive")
@attrs.frozen(kw_only=True)
class AdaptiveWeighting:
    """Adaptive weighting 1 / (err + c)^p (ImageNet p=1, c=0.01; CIFAR p=0.75, c=1e-3)."""

    p: float = attrs.field(default=1.0, validator=number(0.0))
    c: float = attrs.field(default=0.01, validator=number(0.0, lo_open=True))

    def weights(self, err: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``err, t, r  # [B]`` -> ``w  # [B]`` (no gradient)."""
        return adaptive_weights(err, self.p, self.c)
