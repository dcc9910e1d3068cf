"""Flow matching: regress the instantaneous velocity u(z_t, t, h=0) on v
(mfrecipes/METHOD.md, section 7).

Equivalent to MeanFlow with every sample at r = t (fm_ratio = 1); r is ignored.
"""
from __future__ import annotations

from typing import Optional

import attrs
import torch

from mfrecipes.objectives.base import (
    ObjectiveOutput,
    apply_class_dropout,
    check_guidance_needs_labels,
    check_inputs,
    interpolate,
    sum_sq,
    to_floats,
)
from mfrecipes.registry import OBJECTIVES
from mfrecipes.validate import check_probability

__all__ = ["FlowMatching"]


@OBJECTIVES.register("flow_matching")
@attrs.frozen
class FlowMatching:
    """Flow matching on the linear path: err = ||net(z_t, t, 0, y) - v||^2 (r is ignored).

    class_dropout: probability that a sample's label is replaced by the null class (so the
    model also learns the unconditional velocity); needs a class-conditional dataset.
    num_classes: set by the framework from the dataset (None: unconditional).
    """

    class_dropout: float = 0.0
    num_classes: Optional[int] = None

    def __attrs_post_init__(self) -> None:
        check_probability("class_dropout", self.class_dropout)
        check_guidance_needs_labels(self.num_classes, class_dropout=(self.class_dropout, 0.0))

    def __call__(self, net, x: torch.Tensor, y: Optional[torch.Tensor], t: torch.Tensor,
                 r: torch.Tensor, noise: torch.Tensor, *, progress: float, ema_net=None,
                 generator: Optional[torch.Generator] = None) -> ObjectiveOutput:
        """x, noise [B, ...]; y [B] or None; t [B]; ``generator`` drives class dropout."""
        check_inputs(x, t, r, noise, y)
        z, v = interpolate(x, noise, t)                       # [B, ...]
        y, dropped = apply_class_dropout(y, self.class_dropout, self.num_classes, generator)
        u = net(z, t, torch.zeros_like(t), y)                 # u(z_t, t, t): h = 0
        err = sum_sq(u - v)                                   # [B], L_v (Kim et al. 2025, Eq. 5)
        stats = {"v_loss": err.detach().mean()}
        if dropped is not None:
            stats["drop_share"] = dropped.float().mean()
        return ObjectiveOutput(err=err, is_average=torch.zeros_like(t, dtype=torch.bool),
                               u=u.detach(), target=v, diagnostics=to_floats(stats))
