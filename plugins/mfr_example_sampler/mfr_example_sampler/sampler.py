"""A Beta(a, b) timestep sampler, registered from outside mfrecipes."""
from __future__ import annotations

import attrs
import torch

from mfrecipes.registry import TIMESTEP_SAMPLERS


def _positive(inst, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _probability(inst, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value!r}")


@TIMESTEP_SAMPLERS.register("beta")
@attrs.frozen
class BetaSampler:
    """t, r = max and min of two Beta(a, b) draws; r = t with probability fm_ratio."""

    a: float = attrs.field(default=2.0, validator=_positive)
    b: float = attrs.field(default=2.0, validator=_positive)
    fm_ratio: float = attrs.field(default=0.75, validator=_probability)

    def sample(self, batch_size, *, progress, generator, device):
        # torch.distributions draws from the global RNG and takes no generator: seed a private
        # fork of it from the run's generator, so the draws are reproducible and global state
        # is left alone.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dist = torch.distributions.Beta(torch.tensor(self.a), torch.tensor(self.b))
            draws = dist.sample((2, batch_size))
        t, r = draws.max(0).values, draws.min(0).values
        same = torch.rand(batch_size, generator=g) < self.fm_ratio
        r = torch.where(same, t, r)
        return t.to(device), r.to(device)
