"""Control-variate coefficient beta_cv for the JVP tangent (Lu & Wang 2026).

v (or v_g) is both the regression target and the JVP tangent. Only the tangent is mixed with a
deterministic proxy of the marginal velocity::

    tangent_z = (1 - beta_cv) v_g + beta_cv stopgrad(u_src(z_t, t, h=0, y))

with u_src the EMA network (or the current one); the regression target keeps v_g. beta_cv = 0 is
plain MeanFlow, beta_cv = 1 replaces the tangent by the proxy.

beta_cv may follow a schedule over training progress p in [0, 1], as the authors write it: from
``start`` (their default 1.0) to ``end`` (their default 0.0) between progress ``s0`` and ``s1``,
with ``f = clip((p - s0) / (s1 - s0), 0, 1)``::

    constant  beta_cv                                     (no schedule; the default)
    linear    start + (end - start) f
    cosine    start + (end - start) (1 - cos(pi f)) / 2
    step      start while p < s1, end from s1 on          (s0 is not used)

So ``schedule: linear, start: 1, end: 0`` is their anneal from the proxy tangent back to plain
MeanFlow, and ``start: 0, end: b`` a warm-up to b.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import attrs
import torch

from mfrecipes.objectives.planner import TangentRows

__all__ = ["ControlVariate", "CV_SOURCES", "CV_SCHEDULES"]

CV_SOURCES = ("ema", "current")
CV_SCHEDULES = ("constant", "linear", "cosine", "step")
DEFAULT_START, DEFAULT_END = 1.0, 0.0  # the authors' anneal


def _in_unit(name: str, value: Optional[float]) -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@attrs.frozen
class ControlVariate:
    """beta_cv and its schedule over training progress (see the module docstring).

    The error messages use the MeanFlow parameter names (``beta_cv``, ``beta_cv_start``, ...).
    """

    beta: float = 0.0
    source: str = "ema"
    schedule: str = "constant"
    s0: float = 0.0
    s1: float = 1.0
    start: Optional[float] = None   # None: 1.0 under a schedule
    end: Optional[float] = None     # None: 0.0 under a schedule

    def __attrs_post_init__(self) -> None:
        _in_unit("beta_cv", self.beta)
        _in_unit("beta_cv_start", self.start)
        _in_unit("beta_cv_end", self.end)
        if self.source not in CV_SOURCES:
            raise ValueError(f"beta_cv_source must be one of {CV_SOURCES}, got {self.source!r}")
        if self.schedule not in CV_SCHEDULES:
            raise ValueError(f"beta_cv_schedule must be one of {CV_SCHEDULES}, "
                             f"got {self.schedule!r}")
        if not 0 <= self.s0 <= self.s1 <= 1:
            raise ValueError(f"need 0 <= beta_cv_s0 <= beta_cv_s1 <= 1, got s0={self.s0!r}, "
                             f"s1={self.s1!r}")
        if self.schedule == "constant":
            if self.start is not None or self.end is not None:
                raise ValueError(
                    f"beta_cv_start / beta_cv_end (got {self.start!r} / {self.end!r}) need a "
                    f"schedule: set beta_cv_schedule to one of {CV_SCHEDULES[1:]}, or give a "
                    f"constant coefficient as beta_cv")
            return
        if self.beta != 0:
            # Before the schedule ran from beta_cv_start to beta_cv_end, linear and cosine ramped
            # from 0 up to beta_cv and step jumped to beta_cv at s0: say how to write those now.
            b = self.beta
            old = (f"beta_cv_start: 0, beta_cv_end: {b}, beta_cv_s1: {self.s0}"
                   if self.schedule == "step" else
                   f"beta_cv_start: 0, beta_cv_end: {b} (same beta_cv_s0 / beta_cv_s1)")
            raise ValueError(
                f"beta_cv={b!r} with beta_cv_schedule={self.schedule!r}: under a schedule "
                f"beta_cv runs from beta_cv_start (default {DEFAULT_START}) to beta_cv_end "
                f"(default {DEFAULT_END}) between beta_cv_s0 and beta_cv_s1, and beta_cv, the "
                f"constant coefficient, stays 0. The former meaning of these keys, a rise from "
                f"0 to beta_cv, is now: beta_cv: 0, {old}")
        if self.schedule in ("linear", "cosine") and self.s0 == self.s1:
            raise ValueError(f"beta_cv_schedule {self.schedule!r} runs from beta_cv_s0 to "
                             f"beta_cv_s1 and needs s0 < s1, got both {self.s0!r}")

    @property
    def start_value(self) -> float:
        return DEFAULT_START if self.start is None else float(self.start)

    @property
    def end_value(self) -> float:
        return DEFAULT_END if self.end is None else float(self.end)

    @property
    def enabled(self) -> bool:
        """Whether beta_cv is ever > 0 (the proxy is computed and beta_cv logged)."""
        if self.schedule == "constant":
            return self.beta > 0
        return max(self.start_value, self.end_value) > 0

    def at(self, progress: float) -> float:
        """beta_cv at ``progress`` in [0, 1]."""
        if self.schedule == "constant":
            return float(self.beta)
        b0, b1 = self.start_value, self.end_value
        if self.schedule == "step":
            return b0 if progress < self.s1 else b1
        f = min(max((progress - self.s0) / (self.s1 - self.s0), 0.0), 1.0)
        if self.schedule == "cosine":
            f = 0.5 * (1 - math.cos(math.pi * f))
        return b0 + (b1 - b0) * f

    def from_net(self, beta: float, ema_net) -> bool:
        """Whether the proxy is the current net's ``u_cond`` (source "current", or "ema" with no
        EMA net at hand: the fallback) rather than an EMA call."""
        return beta > 0 and not (self.source == "ema" and ema_net is not None)

    def tangent_z(self, beta: float, ema_net) -> Optional[Callable[[TangentRows], torch.Tensor]]:
        """The planner's z tangent ``(1 - beta) v_g + beta stopgrad(proxy)`` on the tangent rows
        (None at beta = 0: the tangent is v_g). The proxy is ``ema_net(z_t, t, 0, y)``, or the
        current net's ``u_cond`` when ``from_net`` (the planner must then be told
        ``reads_cond``)."""
        if not beta > 0:
            return None
        from_net = self.from_net(beta, ema_net)

        def mixed(rows: TangentRows) -> torch.Tensor:
            if from_net:
                proxy = rows.u_cond
            else:
                with torch.no_grad():
                    proxy = ema_net(rows.z, rows.t, torch.zeros_like(rows.t),
                                    rows.y).to(rows.z.dtype)
            # only the tangent is mixed; the target keeps v_g (Lu & Wang 2026)
            return (1 - beta) * rows.v_g + beta * proxy

        return mixed
