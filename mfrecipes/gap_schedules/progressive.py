"""Progressive gap weighting of the u-loss (Kim et al., Sec. 5, Eqs. 8-9).

``beta(dt, s) = 1 - s + lambda * s * (1 - dt)`` on the ``r != t`` samples (``dt = t - r``) and 1
on the ``r = t`` samples, with ``s = 1 - progress^k``: at the start (s = 1) short gaps are favoured,
``beta = lambda (1 - dt)``; at the end (s = 0) ``beta = 1``, plain MeanFlow. k = 1 is best
(Kim et al., Table 4).

``lambda = 1 / E[1 - dt]`` over the ``r != t`` samples keeps the initial mean weight at 1. Our
reading: a constant of the timestep sampler, estimated once at construction by Monte Carlo at
progress 0 with a fixed seed, and logged (``lambda_estimate``, ``describe()``). For DTD the
``r != t`` samples keep a fixed logit-normal law (its ``apply_to: v`` reading), so the constant
holds for the whole run; with ``apply_to: all`` it is the first stage's value.
"""
from __future__ import annotations

import attrs
import torch

from mfrecipes.registry import GAP_SCHEDULES
from mfrecipes.validate import integer, number, optional_number
from mfrecipes.timestep_samplers.monte_carlo import branch_mean

__all__ = ["ProgressiveGapWeighting"]


@GAP_SCHEDULES.register("progressive")
@attrs.frozen(kw_only=True)
class ProgressiveGapWeighting:
    """beta(dt, s) = 1 - s + lambda s (1 - dt) on r != t samples, s = 1 - progress^k."""

    k: float = attrs.field(default=1.0, validator=number(0.0, lo_open=True))
    lambda_: float | None = attrs.field(default=None, validator=optional_number(0.0, lo_open=True))
    mc_draws: int = attrs.field(default=1_000_000, validator=integer(1000, 10**8))
    seed: int = attrs.field(default=0, validator=integer(0, 2**32 - 1))
    timestep_sampler: object = attrs.field(default=None, repr=False, eq=False)
    lambda_estimate: float = attrs.field(init=False)  # the lambda in use (given or estimated)
    mean_one_minus_gap: float | None = attrs.field(init=False)  # E[1 - dt | r != t], if estimated

    def __attrs_post_init__(self):
        if self.lambda_ is not None:
            lam, mean = float(self.lambda_), None
        elif self.timestep_sampler is None:
            raise ValueError("lambda_ is null, so it is estimated from the timestep sampler, but "
                             "none was given; set lambda_ to a number > 0")
        else:
            mean, count = branch_mean(self.timestep_sampler, lambda t, r: 1.0 - (t - r),
                                      branch="u", draws=self.mc_draws, seed=self.seed)
            if count == 0:
                # No r != t samples (fm_ratio = 1): beta never applies, so lambda is moot.
                lam, mean = 1.0, None
            elif not mean > 0:
                raise ValueError(f"E[1 - dt] over the r != t samples is {mean}, so "
                                 f"lambda = 1 / E[1 - dt] is undefined; set lambda_ explicitly")
            else:
                lam = 1.0 / mean
        object.__setattr__(self, "lambda_estimate", lam)
        object.__setattr__(self, "mean_one_minus_gap", mean)

    def describe(self) -> dict:
        """The constants, for logging."""
        out = {"lambda": self.lambda_estimate, "k": self.k,
               "lambda_source": "given" if self.lambda_ is not None else "monte_carlo"}
        if self.mean_one_minus_gap is not None:
            out["mean_one_minus_gap"] = self.mean_one_minus_gap
            out["mc_draws"] = self.mc_draws
        return out

    def s(self, progress: float) -> float:
        """``s = 1 - progress^k``, progress clamped to [0, 1]."""
        return 1.0 - min(max(float(progress), 0.0), 1.0) ** self.k

    def weights(self, t: torch.Tensor, r: torch.Tensor, progress: float) -> torch.Tensor:
        """``t, r  # [B]`` -> ``beta  # [B]`` (1 on r = t samples; no gradient)."""
        s = self.s(progress)
        with torch.no_grad():
            dt = t.detach() - r.detach()
            # beta(dt, s) (Kim et al. 2025, Sec. 5; weights L_u in Eqs. 8-9)
            beta = 1.0 - s + self.lambda_estimate * s * (1.0 - dt)
            return torch.where(r == t, torch.ones_like(beta), beta)
