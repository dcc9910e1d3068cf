"""AlphaFlow (Zhang et al. 2025): a curriculum from trajectory flow matching to MeanFlow without
a JVP until the end.

For r != t samples, with s = alpha r + (1 - alpha) t::

    u_tgt = alpha v_g + (1 - alpha) stopgrad(u(z_t - (t - s) v_g, r, s))      clamped to [-c, c]

where u(z, r, s) is the average velocity over [r, s]: the net is called as (z, time=s, h=s - r).
alpha = 1 is trajectory flow matching (every sample regressed on v_g); alpha = 0 is MeanFlow and
uses its JVP target. alpha follows a sigmoid from 1 to 0 over a window of training progress:
``alpha = 1 - sigmoid(gamma (p - mid) / (p1 - p0))`` with gamma = 25, snapped to 1 (0) within
``snap`` of 1 (0) (Zhang et al. 2025, Alg. 2). Our reading: r = t samples always regress on v_g
(the formula is 0/0 there), as in MeanFlow.

Weighting: the authors' code weights the rows with the discrete target by ``alpha / (err + c)``.
The factor alpha is returned as ``loss_scale`` (alpha on the r != t rows, 1 elsewhere), which the
trainer multiplies in after the loss weighting, so with adaptive weighting (p = 1) a discrete row
contributes ``alpha err / (err + c)``. Folding alpha into ``err`` instead would not work: the
adaptive weight ``1 / (alpha err + c)`` would cancel it.
"""
from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

from mfrecipes.objectives.base import (
    ObjectiveOutput,
    as_batch,
    sum_sq,
    to_floats,
)
from mfrecipes.objectives.meanflow import MeanFlowBased
from mfrecipes.registry import OBJECTIVES

__all__ = ["AlphaFlow"]


@OBJECTIVES.register("alphaflow")
@attrs.frozen
class AlphaFlow(MeanFlowBased):
    """AlphaFlow: alpha-interpolated consistency target, sigmoid curriculum from FM to MeanFlow.

    Parameters
    ----------
    alpha: a constant alpha in [0, 1] (ablations); None follows the sigmoid schedule.
    alpha_start, alpha_end: the progress window of the sigmoid (alpha = 1 before, 0 after).
    gamma: sigmoid sharpness (paper: 25). snap: alpha within this of 0 or 1 is set to 0 or 1.
    target_clamp: |u_tgt| bound on the r != t samples (paper configs: 4.0); None: no clamp.
    weight_by_alpha: weight the r != t rows by alpha on top of the loss weighting (the authors'
        ``alpha / (err + c)``; ``loss_scale`` of the output). False: every row weighs 1.
    selective, jvp_impl, jvp_dtype: passed to the MeanFlow target used at alpha = 0.
    omega, kappa, t_start, t_end, class_dropout: training-time guidance as in MeanFlow
        (Geng et al. 2025); see ``Guidance``.
    num_classes: set by the framework from the dataset (None: unconditional).
    """

    alpha: Optional[float] = None
    alpha_start: float = 0.0
    alpha_end: float = 1.0
    gamma: float = 25.0
    snap: float = 5e-3
    target_clamp: Optional[float] = 4.0
    weight_by_alpha: bool = True

    def __attrs_post_init__(self) -> None:
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] or None (schedule), got {self.alpha!r}")
        if not 0 <= self.alpha_start <= self.alpha_end <= 1:
            raise ValueError(f"need 0 <= alpha_start <= alpha_end <= 1, got "
                             f"alpha_start={self.alpha_start!r}, alpha_end={self.alpha_end!r}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")
        if not 0 <= self.snap < 0.5:
            raise ValueError(f"snap must be in [0, 0.5), got {self.snap!r}")
        if self.target_clamp is not None and not self.target_clamp > 0:
            raise ValueError(f"target_clamp must be > 0 or None, got {self.target_clamp!r}")
        if not isinstance(self.weight_by_alpha, bool):
            raise ValueError(f"weight_by_alpha must be true or false, got "
                             f"{self.weight_by_alpha!r}")

    def alpha_at(self, progress: float) -> float:
        """alpha at ``progress``: sigmoid from 1 to 0 over [alpha_start, alpha_end]
        (Zhang et al. 2025, Alg. 2)."""
        if self.alpha is not None:
            a = self.alpha
        elif self.alpha_end == self.alpha_start:
            a = 1.0 if progress < self.alpha_start else 0.0
        else:
            mid = 0.5 * (self.alpha_start + self.alpha_end)
            x = self.gamma * (progress - mid) / (self.alpha_end - self.alpha_start)
            a = 1.0 - 1.0 / (1.0 + math.exp(-x))
        if a > 1 - self.snap:
            return 1.0
        if a < self.snap:
            return 0.0
        return a

    def __call__(self, net, x: torch.Tensor, y: Optional[torch.Tensor], t: torch.Tensor,
                 r: torch.Tensor, noise: torch.Tensor, *, progress: float, ema_net=None,
                 generator: Optional[torch.Generator] = None) -> ObjectiveOutput:
        """x, noise [B, ...]; y [B] or None; t, r [B] with r <= t; ``generator`` drives class
        dropout (default: the global RNG)."""
        alpha = self.alpha_at(progress)
        if alpha == 0:
            out = self._meanflow(net, x, y, t, r, noise, progress=progress, ema_net=ema_net,
                                 generator=generator)
            out.diagnostics["alpha"] = 0.0
            return out

        z, v, h, is_avg, y, fwd = self._plain_forward(net, x, y, t, r, noise, generator)
        u, v_g = fwd.u, fwd.v_g
        avg_idx = is_avg.nonzero().squeeze(1)
        # r = t rows: flow matching (Kim et al. 2025, Eq. 5)
        target = v_g.clone()
        if len(avg_idx):
            tgt = v_g[avg_idx]
            if alpha < 1:
                s = alpha * r + (1 - alpha) * t           # [B], r <= s <= t
                z_s = z - as_batch(t - s, z) * v_g        # step back along v_g to time s
                ya = None if y is None else y[avg_idx]
                with torch.no_grad():
                    # u(z_s, r, s): the average velocity over [r, s] (time s, h = s - r)
                    u_s = net(z_s[avg_idx], s[avg_idx], (s - r)[avg_idx], ya).to(z.dtype)
                tgt = alpha * tgt + (1 - alpha) * u_s     # AlphaFlow target
            if self.target_clamp is not None:
                tgt = tgt.clamp(-self.target_clamp, self.target_clamp)
            target[avg_idx] = tgt
        target = target.detach()

        err = sum_sq(u - target)                          # [B]
        # The authors' weight alpha / (err + c) on the discrete rows: alpha leaves err alone and
        # multiplies the weight after the loss weighting (inside err, 1 / (err + c) cancels it).
        scale = torch.ones_like(err.detach())
        if self.weight_by_alpha:
            scale = torch.where(is_avg, torch.full_like(scale, alpha), scale)
        stats = {"alpha": alpha, **fwd.diagnostics(err, v, is_avg)}
        return ObjectiveOutput(err=err, is_average=is_avg, u=u.detach(), target=target,
                               diagnostics=to_floats(stats), loss_scale=scale)
