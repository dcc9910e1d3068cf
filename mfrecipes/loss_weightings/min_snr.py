"""MinSNR weighting of the v-loss on top of the adaptive weighting (Kim et al., Sec. 5, Eqs. 8-9).

``w = adaptive(err) * alpha(t)`` on the ``r = t`` samples and ``w = adaptive(err)`` on the others:
the weights are applied after the adaptive normalisation (Kim et al. 2025, Eqs. 8-9).

``alpha(t)`` is MinSNR (Hang et al. 2023, gamma = 5) rewritten for a velocity target on the path
``z_t = (1 - t) x + t e``: the x-error is ``-t (v_hat - v)``, so
``alpha(t) = t^2 min(SNR(t), gamma) = min((1 - t)^2, gamma t^2)`` with ``SNR = ((1 - t) / t)^2``
(our reading, mfrecipes/METHOD.md, section 6).

``normalize: true`` (the default) divides alpha by its mean over the ``r = t`` samples of the
timestep sampler in use, estimated once by Monte Carlo (``alpha_mean``); for a curriculum sampler
(DTD) that is the law once the curriculum has ended (progress 1), the law most of training sees
(normalising by the first stage's law, t in [0.8, 1] where alpha is tiny, would blow alpha up
about 40-fold once the hard clusters open). Why: unnormalised, ``E[alpha] ~ 0.22`` under the ImageNet
law (at most 0.48 anywhere), so the raw weight would cut the v-loss's share of the gradient about
five-fold against the u-loss, the opposite of the paper's aim of accelerating the learning of v
(Kim et al. 2025, Sec. 5). Normalised, MinSNR only reshapes the v-loss over t, as it does in
diffusion training. ``normalize: false`` keeps the raw ``alpha(t)``.
"""
from __future__ import annotations

import attrs
import torch

from mfrecipes.loss_weightings.adaptive import adaptive_weights
from mfrecipes.registry import LOSS_WEIGHTINGS
from mfrecipes.validate import integer, number
from mfrecipes.timestep_samplers.monte_carlo import branch_mean

__all__ = ["MinSNRWeighting", "min_snr_alpha"]


def min_snr_alpha(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """``alpha(t) = min((1 - t)^2, gamma t^2)``, ``[B]``."""
    # MinSNR for a velocity target: t^2 * min(SNR(t), gamma) (Kim et al., Sec. 5; Hang et al. 2023)
    return torch.minimum((1.0 - t) ** 2, gamma * t ** 2)


@LOSS_WEIGHTINGS.register("min_snr")
@attrs.frozen(kw_only=True)
class MinSNRWeighting:
    """Adaptive weighting times MinSNR alpha(t) = min((1 - t)^2, gamma t^2) on the r = t samples."""

    gamma: float = attrs.field(default=5.0, validator=number(0.0, lo_open=True))
    p: float = attrs.field(default=1.0, validator=number(0.0))
    c: float = attrs.field(default=0.01, validator=number(0.0, lo_open=True))
    normalize: bool = attrs.field(default=True)
    mc_draws: int = attrs.field(default=1_000_000, validator=integer(1000, 10**8))
    seed: int = attrs.field(default=0, validator=integer(0, 2**32 - 1))
    timestep_sampler: object = attrs.field(default=None, repr=False, eq=False)
    alpha_mean: float = attrs.field(init=False)  # E[alpha(t) | r = t], 1.0 if not normalising

    @normalize.validator
    def _check_normalize(self, attribute, value):
        if not isinstance(value, bool):
            raise ValueError(f"normalize must be true or false, got {value!r}")

    def __attrs_post_init__(self):
        mean = 1.0
        if self.normalize:
            if self.timestep_sampler is None:
                raise ValueError("normalize=true needs the timestep sampler to estimate "
                                 "E[alpha(t)]; none was given (set normalize: false)")
            mean, count = branch_mean(self.timestep_sampler,
                                      lambda t, r: min_snr_alpha(t, self.gamma), branch="v",
                                      draws=self.mc_draws, seed=self.seed, progress=1.0)
            if count == 0 or not mean > 0:
                raise ValueError(f"normalize=true needs r = t samples with alpha > 0 under the "
                                 f"timestep sampler (its fm_ratio must be > 0); got {count} "
                                 f"such samples in {self.mc_draws} draws, mean alpha {mean}")
        object.__setattr__(self, "alpha_mean", float(mean))

    def describe(self) -> dict:
        """Constants for logging."""
        return {"gamma": self.gamma, "alpha_mean": self.alpha_mean, "normalize": self.normalize}

    def weights(self, err: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``err, t, r  # [B]`` -> ``w  # [B]`` (no gradient)."""
        with torch.no_grad():
            alpha = min_snr_alpha(t.detach(), self.gamma) / self.alpha_mean
            # Weights after the adaptive normalisation (Kim et al., Eqs. 8-9); alpha on r = t only.
            alpha = torch.where(r == t, alpha, torch.ones_like(alpha))
            return adaptive_weights(err, self.p, self.c) * alpha.to(err.dtype)
