"""What every objective returns, and the small pieces of the path they share
(mfrecipes/METHOD.md, section 1).

An objective is called as ``objective(net, x, y, t, r, noise, *, progress, ema_net=None)`` and
returns an :class:`ObjectiveOutput`. It owns the target (JVP, CFG mixing, class dropout); it does
not sample ``(t, r)``, weight the loss or step the optimiser.
"""
from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

__all__ = [
    "ObjectiveOutput",
    "as_batch",
    "interpolate",
    "sum_sq",
    "check_inputs",
    "apply_class_dropout",
    "check_guidance_needs_labels",
    "to_floats",
    "masked_mean",
    "draw",
    "randn_like_sample",
    "sample_dim",
]


@attrs.define
class ObjectiveOutput:
    """One objective evaluation on a batch.

    ``err`` carries the autograd graph; everything else is detached. The trainer's loss is
    ``mean(loss_weighting(err) * gap_schedule * loss_scale * err)``.
    """

    err: torch.Tensor          # [B] unweighted per-sample squared error, summed over non-batch dims
    is_average: torch.Tensor   # [B] bool, r != t (the L_u samples); False for the L_v samples
    u: torch.Tensor            # [B, ...] the prediction, detached
    target: torch.Tensor       # [B, ...] the regression target, detached
    diagnostics: dict = attrs.field(factory=dict)  # str -> float, for logging only
    # [B] a per-row factor of the objective's own that the trainer multiplies into the loss
    # weight after the loss weighting and gap schedule (AlphaFlow's alpha); ones by default.
    loss_scale: torch.Tensor = attrs.field(
        default=attrs.Factory(lambda self: torch.ones_like(self.err.detach()), takes_self=True))


def as_batch(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample ``t [B]`` against ``x [B, ...]`` (shape ``[B, 1, ..., 1]``)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_t, v)``: the linear path point and its conditional velocity
    (mfrecipes/METHOD.md, section 1).

    ``z_t = (1 - t) x + t e`` (data at t = 0, noise at t = 1) and ``v = e - x``; both ``[B, ...]``.
    """
    tb = as_batch(t, x)
    return (1 - tb) * x + tb * noise, noise - x


def sum_sq(d: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm ``[B]``: a sum over every non-batch dim (not a mean)."""
    return d.pow(2).flatten(1).sum(dim=1)


def check_inputs(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, noise: torch.Tensor,
                 y: Optional[torch.Tensor]) -> None:
    """Shape agreement between the batch tensors (a wiring bug, not a user error)."""
    b = x.shape[0]
    if noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x shape {tuple(x.shape)}")
    for name, v in (("t", t), ("r", r)) + ((("y", y),) if y is not None else ()):
        if v.shape != (b,):
            raise ValueError(f"{name} must have shape [B] = ({b},), got {tuple(v.shape)}")


def apply_class_dropout(y: Optional[torch.Tensor], p: float, num_classes: Optional[int],
                        generator: Optional[torch.Generator],
                        eligible: Optional[torch.Tensor] = None
                        ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Replace labels by the null class ``num_classes``: a share ``p`` of the batch.

    ``eligible [B]`` bool (or None: every row): only these rows may drop, each with probability
    ``min(1, p B / n_eligible)``, so the expected share of the whole batch stays ``p`` (when
    ``p B <= n_eligible``; otherwise every eligible row drops). One uniform draw per row either
    way, so the two modes use the same random numbers.

    Returns ``(y_in [B] or None, dropped [B] bool or None)``; ``None`` when nothing can be dropped
    (unconditional batch or ``p = 0``), so the caller can skip the mask entirely.
    """
    if y is None or p <= 0:
        return y, None
    u = draw(torch.rand, y.shape, generator, y.device, torch.float32)
    if eligible is None:
        dropped = u < p
    else:
        share = p * y.shape[0] / eligible.sum().clamp_min(1).to(torch.float32)
        dropped = eligible & (u < share)
    return torch.where(dropped, torch.full_like(y, num_classes), y), dropped


def check_guidance_needs_labels(num_classes: Optional[int], **settings: tuple) -> None:
    """Guidance and class dropout need the null label ``num_classes`` (absent if unconditional).
    ``settings`` maps each parameter to ``(value, its no-guidance default)``."""
    active = {k: v for k, (v, default) in settings.items() if v != default}
    if num_classes is None and active:
        names = ", ".join(f"{k}={v!r}" for k, v in active.items())
        raise ValueError(
            f"{names} need a class-conditional model (a null label for the unconditional "
            f"velocity), but the dataset has no classes; leave omega=1.0, kappa=0.0, "
            f"class_dropout=0.0 for unconditional training")


def to_floats(stats: dict) -> dict:
    """Tensor scalars -> Python floats with one device sync for the whole dict."""
    keys = [k for k, v in stats.items() if torch.is_tensor(v)]
    if keys:
        vals = torch.stack([stats[k].detach().float().reshape(()) for k in keys]).tolist()
        stats = {**stats, **dict(zip(keys, vals))}
    return {k: float(v) for k, v in stats.items()}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B]`` over ``mask [B]``; 0 when the mask is empty (keeps logs finite)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


def draw(fn, shape, generator: Optional[torch.Generator], device: torch.device,
         dtype: torch.dtype) -> torch.Tensor:
    """``fn(shape)`` (torch.rand or torch.randn) from ``generator`` on ``device``."""
    where = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=where, dtype=dtype).to(device)


def randn_like_sample(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return draw(torch.randn, x.shape, generator, x.device, x.dtype)


def sample_dim(x: torch.Tensor) -> int:
    """Number of elements of one sample (the ``dim`` of ``k ||v|| n / sqrt(dim)``)."""
    return math.prod(x.shape[1:])
