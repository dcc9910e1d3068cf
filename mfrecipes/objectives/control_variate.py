"""Control-variate coefficient beta_cv for the JVP tangent (Lu & Wang 2026; METHOD.md section 7).

v (or v_g) is both the regression target and the JVP tangent. Only the tangent is mixed with a
deterministic proxy of the marginal velocity::

    tangent_z = (1 - beta_cv) v_g + beta_cv stopgrad(u_src(z_t, t, h=0, y))

with u_src the EMA network (or the current one); the regression target keeps v_g. beta_cv = 0 is
plain MeanFlow, beta_cv = 1 replaces the tangent by the proxy.
"""
from __future__ import annotations

import math

import attrs

__all__ = ["ControlVariate", "CV_SOURCES", "CV_SCHEDULES"]

CV_SOURCES = ("ema", "current")
CV_SCHEDULES = ("constant", "linear", "cosine", "step")


@attrs.frozen
class ControlVariate:
    """beta_cv and its schedule over training progress.

    ``constant``: beta_cv throughout. ``linear`` / ``cosine``: 0 until progress s0, a ramp to
    beta_cv at s1, beta_cv after. ``step``: 0 before s0, beta_cv from s0 on.
    """

    beta: float = 0.0
    source: str = "ema"
    schedule: str = "constant"
    s0: float = 0.0
    s1: float = 1.0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.beta <= 1:
            raise ValueError(f"beta_cv must be in [0, 1] (0 = plain MeanFlow), got {self.beta!r}")
        if self.source not in CV_SOURCES:
            raise ValueError(f"beta_cv_source must be one of {CV_SOURCES}, got {self.source!r}")
        if self.schedule not in CV_SCHEDULES:
            raise ValueError(f"beta_cv_schedule must be one of {CV_SCHEDULES}, "
                             f"got {self.schedule!r}")
        if not 0 <= self.s0 <= self.s1 <= 1:
            raise ValueError(f"need 0 <= beta_cv_s0 <= beta_cv_s1 <= 1, got s0={self.s0!r}, "
                             f"s1={self.s1!r}")
        if self.schedule in ("linear", "cosine") and self.s0 == self.s1:
            raise ValueError(f"beta_cv_schedule {self.schedule!r} ramps from beta_cv_s0 to "
                             f"beta_cv_s1 and needs s0 < s1, got both {self.s0!r}")

    def at(self, progress: float) -> float:
        """beta_cv at ``progress`` in [0, 1]."""
        if self.beta == 0 or self.schedule == "constant":
            return self.beta
        if self.schedule == "step":
            return self.beta if progress >= self.s0 else 0.0
        frac = min(max((progress - self.s0) / (self.s1 - self.s0), 0.0), 1.0)
        if self.schedule == "cosine":
            frac = 0.5 * (1 - math.cos(math.pi * frac))
        return self.beta * frac
