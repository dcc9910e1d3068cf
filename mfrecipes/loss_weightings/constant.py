"""Constant loss weighting: every sample gets the same weight (plain mean of the errors)."""
from __future__ import annotations

import attrs
import torch

from mfrecipes.registry import LOSS_WEIGHTINGS
from mfrecipes.validate import number

__all__ = ["ConstantWeighting"]


@LOSS_WEIGHTINGS.register("constant")
@attrs.frozen(kw_only=True)
class ConstantWeighting:
    """w = scale for every sample (no adaptive normalisation)."""

    scale: float = attrs.field(default=1.0, validator=number(0.0, lo_open=True))

    def weights(self, err: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``err, t, r  # [B]`` -> ``w  # [B]`` (no gradient)."""
        return torch.full_like(err.detach(), self.scale)
