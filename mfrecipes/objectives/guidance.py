"""Training-time guidance: the CFG-mixed velocity v_g (mfrecipes/METHOD.md, section 4).

The network's own instantaneous velocities, without gradient::

    u_cond   = net(z_t, t, h=0, y)
    u_uncond = net(z_t, t, h=0, null)

mix into the velocity that replaces v in the target and the JVP tangent::

    kappa = 0:  v_g = u_uncond + omega (v - u_uncond)
    kappa > 0:  v_g = omega v + kappa u_cond + (1 - omega - kappa) u_uncond

(Geng et al. 2025, Eq. 19 for kappa = 0 and Eq. 20 for kappa > 0), only where
``t_start <= t <= t_end`` and the label was not dropped; elsewhere ``v_g = v``.
"""
from __future__ import annotations

from typing import Optional

import attrs
import torch

from mfrecipes.objectives.base import as_batch, check_guidance_needs_labels
from mfrecipes.validate import check_probability, check_real

__all__ = ["Guidance"]


@attrs.frozen
class Guidance:
    """CFG settings of the objectives that mix targets; ``omega=1, kappa=0`` is no guidance."""

    omega: float = 1.0
    kappa: float = 0.0
    t_start: float = 0.0
    t_end: float = 1.0
    class_dropout: float = 0.0

    def __attrs_post_init__(self) -> None:
        for name in ("omega", "kappa", "t_start", "t_end"):
            check_real(name, getattr(self, name))
        if not self.omega >= 0:
            raise ValueError(f"omega must be >= 0 (1.0 = no guidance), got {self.omega!r}")
        if not 0 <= self.kappa < 1:
            raise ValueError(f"kappa must be in [0, 1) (0 = the form of Geng et al. 2025, Eq. 19), "
                             f"got {self.kappa!r}")
        if not 0 <= self.t_start <= self.t_end <= 1:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got t_start={self.t_start!r}, "
                             f"t_end={self.t_end!r}")
        check_probability("class_dropout", self.class_dropout)

    @property
    def active(self) -> bool:
        """Whether mixing changes anything (else no extra forwards are run)."""
        return not (self.omega == 1.0 and self.kappa == 0.0)

    @property
    def needs_cond(self) -> bool:
        """Whether v_g needs u_cond (only the kappa > 0 form does)."""
        return self.kappa > 0

    def check_labels(self, num_classes: Optional[int]) -> None:
        check_guidance_needs_labels(num_classes, omega=(self.omega, 1.0),
                                    kappa=(self.kappa, 0.0),
                                    class_dropout=(self.class_dropout, 0.0))

    def mask(self, t: torch.Tensor, y: Optional[torch.Tensor],
             dropped: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``[B]`` bool: samples whose target is mixed; ``None`` when no sample is."""
        if y is None or not self.active:
            return None
        guided = (t >= self.t_start) & (t <= self.t_end)  # inclusive, as the official code
        if dropped is not None:
            guided = guided & ~dropped  # a dropped sample keeps the plain v
        return guided

    def mix(self, v: torch.Tensor, u_cond: Optional[torch.Tensor], u_uncond: torch.Tensor,
            guided: torch.Tensor) -> torch.Tensor:
        """``v_g [B, ...]``; rows with ``guided = False`` get ``v`` (their u_* may be garbage)."""
        if self.kappa == 0:
            mixed = u_uncond + self.omega * (v - u_uncond)  # Geng et al. 2025, Eq. 19
        else:
            mixed = (self.omega * v + self.kappa * u_cond
                     + (1 - self.omega - self.kappa) * u_uncond)  # Geng et al. 2025, Eq. 20
        return torch.where(as_batch(guided, v), mixed, v)

    @staticmethod
    def forwards(net, z: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor],
                 cond_idx: torch.Tensor, uncond_idx: torch.Tensor, null: Optional[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_cond, u_uncond)``, each ``[B, ...]``, from ONE batched no-grad call.

        Row ``i`` of ``u_cond`` is ``net(z_i, t_i, 0, y_i)`` for ``i`` in ``cond_idx`` and row ``j``
        of ``u_uncond`` is ``net(z_j, t_j, 0, null)`` for ``j`` in ``uncond_idx``; other rows are 0
        (callers mask them out). No call at all when both index sets are empty.
        """
        u_cond, u_uncond = torch.zeros_like(z), torch.zeros_like(z)
        nc, nu = len(cond_idx), len(uncond_idx)
        if nc + nu == 0:
            return u_cond, u_uncond
        rows = torch.cat([cond_idx, uncond_idx])
        labels = None
        if y is not None:
            labels = torch.cat([y[cond_idx], torch.full_like(uncond_idx, null, dtype=y.dtype)])
        with torch.no_grad():
            out = net(z[rows], t[rows], torch.zeros_like(t[rows]), labels)
        u_cond[cond_idx] = out[:nc].to(z.dtype)
        u_uncond[uncond_idx] = out[nc:].to(z.dtype)
        return u_cond, u_uncond
