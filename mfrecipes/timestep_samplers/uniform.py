"""Uniform (t, r) sampler: two uniforms on [0, 1], ``t = max``, ``r = min``."""
from __future__ import annotations

import attrs
import torch

from mfrecipes.registry import TIMESTEP_SAMPLERS
from mfrecipes.timestep_samplers.base import PairSampler

__all__ = ["Uniform"]


@TIMESTEP_SAMPLERS.register("uniform")
@attrs.frozen(kw_only=True)
class Uniform(PairSampler):
    """Two uniforms on [0, 1], ordered: t = max, r = min (density of t is 2t, E[t - r] = 1/3)."""

    def _pair(self, n, *, progress, generator, device):
        a = torch.rand(n, generator=generator, device=device)
        b = torch.rand(n, generator=generator, device=device)
        return torch.maximum(a, b), torch.minimum(a, b)
