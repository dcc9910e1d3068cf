"""Constant gap schedule: weight 1 for every sample (plain MeanFlow)."""
from __future__ import annotations

import attrs
import torch

from mfrecipes.registry import GAP_SCHEDULES

__all__ = ["ConstantGapWeighting"]


@GAP_SCHEDULES.register("constant")
@attrs.frozen(kw_only=True)
class ConstantGapWeighting:
    """beta = 1 for every sample and every progress (plain MeanFlow)."""

    def weights(self, t: torch.Tensor, r: torch.Tensor, progress: float) -> torch.Tensor:
        """``t, r  # [B]`` -> ``[B]`` ones."""
        return torch.ones_like(t.detach())
