"""The discrete MeanFlow curriculum (Hsu & Wood 2026; mfrecipes/METHOD.md, section 7): MeanFlow
without a JVP until the last stage.

A finite difference along the path replaces the total derivative in the MeanFlow identity,
``du/dt ~ [u(z_t, r, t) - u(z_t - v D, r, t - D)] / D``; solving ``u = v - (t - r) du/dt`` for u
gives the target (Hsu & Wood 2026)::

    u_tgt = [v_g D + (t - r) stopgrad(u(z_t - v_g D, r, t - D))] / (D + t - r)

where ``u(z, r, s)`` is the average velocity over [r, s]: the net is called as
``net(z, time = t - D, h = (t - D) - r, y)``. The curriculum has K stages with equal budgets,
stage ``i = min(floor(progress K), K - 1)``:

- stage 0: ``D_0 = t - r``: the back step lands on r, the target is v_g (flow matching);
- stages 1 .. K - 2: ``D_i = (t - r) / q^i``, the gap shrinking geometrically;
- stage K - 1: continuous MeanFlow with its JVP target (delegated to ``meanflow``).

DMF-dagger shrinks the gap in ``Phi(t) = t / (1 - t)`` instead (finer steps at high noise)::

    s' = Phi(t) - (Phi(t) - Phi(r)) / q^i,    t' = s' / (1 + s'),    D_i = t - t'

Our reading, where the sources are silent:

- At the boundary (the back step lands on r, ``h = (t - D) - r = 0``) ``u(z_r, r, r)`` is the
  instantaneous velocity, which flow matching regresses on the conditional v; the target uses
  v_g there, so ``D = t - r`` gives exactly ``u_tgt = v_g`` with no extra network call.
- Phi blows up at t = 1: dagger computes Phi at ``min(t, 1 - eps)`` and ``min(r, 1 - eps)`` and
  keeps ``t' >= r``; samples with t <= 1 - eps are unaffected.
- r = t samples regress on v_g in every stage (the formula is 0 / 0 there), as in MeanFlow.
- CFG mixing, class dropout and the r = t handling are MeanFlow's; the back step follows v_g.
- K = 6, q = 2 are unpublished values (the papers give neither).

To first order in D the residual is a shrunk MeanFlow residual,
``u - u_tgt = D / (D + t - r) (u - u_tgt_MF) + O(D^2)``, so the error scale falls by about
``q^-2i`` per stage: adaptive weighting (p = 1) normalises it away, a constant weighting does not.
"""
from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

from mfrecipes.objectives.base import (
    ObjectiveOutput,
    as_batch,
    masked_mean,
    sum_sq,
    to_floats,
)
from mfrecipes.objectives.meanflow import MeanFlowBased
from mfrecipes.registry import OBJECTIVES

__all__ = ["DiscreteMeanFlow", "back_time"]


def back_time(t: torch.Tensor, r: torch.Tensor, i: int, q: float, *, dagger: bool = False,
              eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, h_back)``, each ``[B]``: the stage-i step back from t and the gap ``(t - D) - r``
    left at the earlier point. ``0 <= D <= t - r``; ``i = 0`` gives exactly D = t - r.
    """
    h = t - r
    if i == 0:
        return h, torch.zeros_like(h)                    # exact: the back step lands on r
    shrink = q ** -i
    if not dagger:
        d = h * shrink                                   # D_i = (t - r) / q^i
        return d, h - d
    tc, rc = t.clamp(max=1 - eps), r.clamp(max=1 - eps)  # Phi(1) is infinite
    phi_t, phi_r = tc / (1 - tc), rc / (1 - rc)          # Phi(t) = t / (1 - t)
    s = phi_t - (phi_t - phi_r) * shrink                 # s' (DMF-dagger)
    t_back = torch.minimum(torch.maximum(s / (1 + s), r), t)  # t' = Phi^-1(s'), in [r, t]
    return t - t_back, t_back - r


@OBJECTIVES.register("discrete_meanflow")
@attrs.frozen
class DiscreteMeanFlow(MeanFlowBased):
    """Discrete MeanFlow curriculum: FM, then finite-difference targets, then MeanFlow (no JVP
    before the last stage).

    Parameters
    ----------
    K: number of stages with equal budgets (>= 2): stage 0 flow matching, 1 .. K - 2 discrete,
        K - 1 continuous MeanFlow. The stage follows progress: ``min(floor(progress K), K - 1)``.
    q: gap shrink factor per stage (> 1): ``D_i = (t - r) / q^i``.
    dagger: shrink the gap in ``Phi(t) = t / (1 - t)`` (DMF-dagger) instead of in t.
    eps: dagger only: Phi is evaluated at ``min(t, 1 - eps)`` (Phi(1) is infinite).
    stage: pin the stage (0 .. K - 1) instead of following progress (stage-wise recipes, tests).
    selective, jvp_impl, jvp_dtype: passed to the MeanFlow target of the last stage.
    omega, kappa, t_start, t_end, class_dropout: training-time guidance
        (mfrecipes/METHOD.md, section 4), used in every stage.
    num_classes: set by the framework from the dataset (None: unconditional).
    """

    K: int = 6
    q: float = 2.0
    dagger: bool = False
    eps: float = 1e-3
    stage: Optional[int] = None

    def __attrs_post_init__(self) -> None:
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 2:
            raise ValueError(f"K must be an integer >= 2 (stage 0 flow matching, stage K - 1 "
                             f"MeanFlow), got {self.K!r}")
        if not (isinstance(self.q, (int, float)) and self.q > 1):
            raise ValueError(f"q must be a number > 1 (the gap shrinks by q per stage), "
                             f"got {self.q!r}")
        if not isinstance(self.dagger, bool):
            raise ValueError(f"dagger must be true or false, got {self.dagger!r}")
        if not 0 < self.eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {self.eps!r}")
        if self.stage is not None and (isinstance(self.stage, bool)
                                       or not isinstance(self.stage, int)
                                       or not 0 <= self.stage < self.K):
            raise ValueError(f"stage must be null (follow progress) or an integer in "
                             f"[0, K - 1] = [0, {self.K - 1}], got {self.stage!r}")

    def stage_at(self, progress: float) -> int:
        """The curriculum stage at ``progress`` in [0, 1] (equal budgets), or the pinned one."""
        if self.stage is not None:
            return self.stage
        return min(max(math.floor(progress * self.K), 0), self.K - 1)

    def describe(self) -> dict:
        """The stage boundaries in progress, for logging."""
        return {"K": self.K, "q": self.q, "dagger": self.dagger, "pinned_stage": self.stage,
                "stage_starts": [i / self.K for i in range(self.K)]}

    def __call__(self, net, x: torch.Tensor, y: Optional[torch.Tensor], t: torch.Tensor,
                 r: torch.Tensor, noise: torch.Tensor, *, progress: float, ema_net=None,
                 generator: Optional[torch.Generator] = None) -> ObjectiveOutput:
        """x, noise [B, ...]; y [B] or None; t, r [B] with r <= t; ``generator`` drives class
        dropout (default: the global RNG)."""
        stage = self.stage_at(progress)
        if stage == self.K - 1:
            out = self._meanflow(net, x, y, t, r, noise, progress=progress, ema_net=ema_net,
                                 generator=generator)
            out.diagnostics["stage"] = float(stage)
            return out

        z, v, h, is_avg, y, fwd = self._plain_forward(net, x, y, t, r, noise, generator)
        u, v_g = fwd.u, fwd.v_g
        d, h_back = back_time(t, r, stage, self.q, dagger=self.dagger, eps=self.eps)  # [B]
        # u(z_r, r, r) at the boundary is the instantaneous velocity: v_g (our reading)
        u_back = v_g.clone()                              # [B, ...]
        call_idx = (is_avg & (h_back > 0)).nonzero().squeeze(1)
        if len(call_idx):
            z_back = z - as_batch(d, z) * v_g             # Euler step back to t - D along v_g
            yc = None if y is None else y[call_idx]
            with torch.no_grad():
                # u(z_t - v_g D, r, t - D): time t - D, h = (t - D) - r
                u_back[call_idx] = net(z_back[call_idx], (t - d)[call_idx], h_back[call_idx],
                                       yc).to(z.dtype)
        db, hb = as_batch(torch.where(is_avg, d, 1.0), z), as_batch(h, z)
        # discrete MeanFlow target (Hsu & Wood 2026)
        dmf = (v_g * db + hb * u_back) / (db + hb)
        # r = t rows and boundary rows (D = t - r): exactly v_g, flow matching
        # (Kim et al. 2025, Eq. 5)
        discrete = as_batch(is_avg & (h_back > 0), z)
        target = torch.where(discrete, dmf, v_g).detach()

        err = sum_sq(u - target)                          # [B]
        stats = {"stage": float(stage), "dmf_D": masked_mean(d, is_avg),
                 **fwd.diagnostics(err, v, is_avg)}
        return ObjectiveOutput(err=err, is_average=is_avg, u=u.detach(), target=target,
                               diagnostics=to_floats(stats))
