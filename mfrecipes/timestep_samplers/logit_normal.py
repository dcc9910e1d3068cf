"""Logit-normal (t, r) sampler: the MeanFlow ImageNet sampler and the CIFAR-style variant.

``LN(mu, sigma) = sigmoid(N(mu, sigma))`` (mfrecipes/METHOD.md, section 5).

- ImageNet (default): two draws from ``LN(mu, sigma)``, ``t = max``, ``r = min``; mu = -0.4,
  sigma = 1.0, 75 % of the samples get ``r = t``.
- CIFAR-style (``mu_r`` and ``sigma_r`` given): ``t ~ LN(mu, sigma)``, ``r ~ LN(mu_r, sigma_r)``,
  ``r = min(t, r)``; the published setting is mu = -0.6, sigma = 1.6, mu_r = -4.0, sigma_r = 1.6
  with 75 % ``r != t`` (``fm_ratio: 0.25``).
"""
from __future__ import annotations

import attrs
import torch

from mfrecipes.registry import TIMESTEP_SAMPLERS
from mfrecipes.timestep_samplers.base import PairSampler
from mfrecipes.validate import number, optional_number

__all__ = ["LogitNormal", "logit_normal"]


def logit_normal(n: int, mu: float, sigma: float, *, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """``n`` draws of ``sigmoid(N(mu, sigma))``, ``[n]`` float32."""
    return torch.sigmoid(mu + sigma * torch.randn(n, generator=generator, device=device))


@TIMESTEP_SAMPLERS.register("logit_normal")
@attrs.frozen(kw_only=True)
class LogitNormal(PairSampler):
    """Logit-normal (t, r): two draws ordered (ImageNet), or separate t and r laws (CIFAR-style)."""

    mu: float = attrs.field(default=-0.4, validator=number(-20.0, 20.0))
    sigma: float = attrs.field(default=1.0, validator=number(0.0, 20.0, lo_open=True))
    mu_r: float | None = attrs.field(default=None, validator=optional_number(-20.0, 20.0))
    sigma_r: float | None = attrs.field(default=None,
                                        validator=optional_number(0.0, 20.0, lo_open=True))

    def __attrs_post_init__(self):
        if (self.mu_r is None) != (self.sigma_r is None):
            raise ValueError(f"mu_r and sigma_r must be given together (a separate r law) or both "
                             f"left null (two draws of the t law), got mu_r={self.mu_r!r}, "
                             f"sigma_r={self.sigma_r!r}")

    def _pair(self, n, *, progress, generator, device):
        a = logit_normal(n, self.mu, self.sigma, generator=generator, device=device)
        if self.mu_r is None:
            b = logit_normal(n, self.mu, self.sigma, generator=generator, device=device)
            return torch.maximum(a, b), torch.minimum(a, b)
        b = logit_normal(n, self.mu_r, self.sigma_r, generator=generator, device=device)
        return a, torch.minimum(a, b)
