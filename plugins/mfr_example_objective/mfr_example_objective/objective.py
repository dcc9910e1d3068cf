"""MeanFlow with a norm-clipped JVP correction, registered from outside mfrecipes.

Built on the forward planner (``mfrecipes.objectives.planner``): the objective states which rows
need du/dt (r != t) and assembles the target; the planner makes every network call.
"""
from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

from mfrecipes.objectives.base import (
    ObjectiveOutput,
    apply_class_dropout,
    as_batch,
    check_inputs,
    interpolate,
    masked_mean,
    sum_sq,
    to_floats,
)
from mfrecipes.objectives.guidance import Guidance
from mfrecipes.objectives.jvp import JVP_IMPLS
from mfrecipes.objectives.planner import ForwardPlanner, Tangent
from mfrecipes.registry import OBJECTIVES


def _positive(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{attribute.name} must be a number > 0 (.inf: no clipping), "
                         f"got {value!r}")


def _probability(inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value!r}")


@OBJECTIVES.register("meanflow_clipped")
@attrs.frozen
class ClippedMeanFlow:
    """MeanFlow whose correction (t - r) du/dt is clipped to ``max_ratio ||v_g||`` per sample.

    max_ratio: the largest allowed ``||(t - r) du/dt|| / ||v_g||``; ``.inf`` is plain MeanFlow.
    omega: training-time guidance scale (1: none; needs a class-conditional dataset otherwise).
    class_dropout: share of labels replaced by the null class (conditional datasets only).
    jvp_impl: "auto", "torch_func" or "manual", as for ``meanflow``.
    num_classes: set by the framework from the dataset (None: unconditional).
    """

    max_ratio: float = attrs.field(default=1.0, validator=_positive)
    omega: float = 1.0
    class_dropout: float = attrs.field(default=0.0, validator=_probability)
    jvp_impl: str = attrs.field(default="auto", validator=attrs.validators.in_(JVP_IMPLS))
    num_classes: Optional[int] = None
    _planner: ForwardPlanner = attrs.field(init=False, repr=False, eq=False)

    @_planner.default
    def _make_planner(self) -> ForwardPlanner:
        guidance = Guidance(omega=self.omega, class_dropout=self.class_dropout)
        guidance.check_labels(self.num_classes)      # guidance or dropout without labels: refused
        return ForwardPlanner(guidance, self.num_classes, jvp_impl=self.jvp_impl)

    def __call__(self, net, x: torch.Tensor, y: Optional[torch.Tensor], t: torch.Tensor,
                 r: torch.Tensor, noise: torch.Tensor, *, progress: float, ema_net=None,
                 generator: Optional[torch.Generator] = None) -> ObjectiveOutput:
        """x, noise [B, ...]; y [B] or None; t, r [B] with r <= t."""
        check_inputs(x, t, r, noise, y)
        z, v = interpolate(x, noise, t)                   # [B, ...]
        h = t - r                                         # [B]
        is_avg = h != 0                                   # [B]: the rows that need du/dt
        y, dropped = apply_class_dropout(y, self.class_dropout, self.num_classes, generator)
        # du/dt along (v_g, dt = 1, dh = 1) on the r != t rows; the planner makes every call
        fwd = self._planner(net, z, v, t, h, y, dropped, Tangent(rows=is_avg))
        corr = as_batch(h, fwd.dudt) * fwd.dudt           # [B, ...] MeanFlow's correction
        scale = torch.ones_like(h)
        if math.isfinite(self.max_ratio):
            limit = self.max_ratio * fwd.v_g.flatten(1).norm(dim=1)      # [B]
            size = corr.flatten(1).norm(dim=1)                           # [B]
            scale = torch.where(size > limit, limit / size.clamp_min(1e-30), scale)
        target = fwd.assemble(fwd.v_g - as_batch(scale, corr).to(corr.dtype) * corr)
        err = sum_sq(fwd.u - target)                      # [B]
        stats = fwd.diagnostics(err, v, is_avg)
        stats["clip_share"] = masked_mean((scale < 1).float(), is_avg)
        return ObjectiveOutput(err=err, is_average=is_avg, u=fwd.u.detach(), target=target,
                               diagnostics=to_floats(stats))
