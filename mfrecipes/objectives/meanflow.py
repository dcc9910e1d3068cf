"""The MeanFlow objective (mfrecipes/METHOD.md, sections 3, 4 and 7), with CFG-mixed targets.

    (u, du/dt) = jvp(lambda z, t, r: net(z, t, t - r, y), (z_t, t, r), (tangent_z, 1, 0))
    u_tgt      = stopgrad(v_g - (t - r) du/dt)                   (Kim et al. 2025, Eq. 4)
    err        = sum over non-batch dims of (u - u_tgt)^2

The prediction u is the primal output of the JVP call, so one call gives both. Samples with r = t
reduce to flow matching (Kim et al. 2025, Eq. 5): their JVP term is multiplied by 0, so the
selective path runs the tangent pass only on the r != t samples (same loss, same gradients).
With a backbone that takes tangents for leading rows (``jvp_leading_rows``, the built-in DiT and
MLP) the r = t samples ride in the same call as the primal of the r != t samples, so a step costs
one batched forward and backward, as in flow matching, plus a tangent pass on the r != t rows;
other backbones get a separate plain forward for the r = t samples.
"""
from __future__ import annotations

from typing import Optional

import attrs
import torch

from mfrecipes.objectives.base import (
    ObjectiveOutput,
    apply_class_dropout,
    as_batch,
    check_inputs,
    draw,
    interpolate,
    masked_mean,
    randn_like_sample,
    sample_dim,
    sum_sq,
    to_floats,
)
from mfrecipes.objectives.control_variate import ControlVariate
from mfrecipes.objectives.guidance import Guidance
from mfrecipes.objectives.jvp import JVP_IMPLS
from mfrecipes.objectives.planner import ForwardPlanner, Tangent
from mfrecipes.registry import OBJECTIVES
from mfrecipes.validate import check_real

__all__ = ["MeanFlow", "MeanFlowBased", "MeanFlowSettings"]

JVP_DTYPES = (None, "float32")
V_NOISE_SCALES = ("per_element", "per_sample_norm")
DROPOUT_ROWS = ("r_eq_t", "any")


@attrs.frozen
class MeanFlowSettings:
    """The guidance and JVP settings of MeanFlow, shared by name with the objectives built
    around a MeanFlow target (see ``MeanFlowBased``)."""

    selective: bool = True
    jvp_impl: str = "auto"
    jvp_dtype: Optional[str] = None
    omega: float = 1.0
    kappa: float = 0.0
    t_start: float = 0.0
    t_end: float = 1.0
    class_dropout: float = 0.0
    class_dropout_rows: str = "r_eq_t"
    num_classes: Optional[int] = None

    def drop_labels(self, y: Optional[torch.Tensor], t: torch.Tensor, r: torch.Tensor,
                    generator: Optional[torch.Generator]
                    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Class dropout by ``class_dropout_rows``: ``r_eq_t`` (default) drops only among the
        ``r = t`` rows, at ``class_dropout`` of the whole batch, as the official MeanFlow code
        couples them (its dropped rows and its r = t rows are both the first rows of the batch,
        so the null class only learns the instantaneous velocity that guidance uses); ``any``
        drops each row with probability ``class_dropout``."""
        eligible = (t == r) if self.class_dropout_rows == "r_eq_t" else None
        return apply_class_dropout(y, self.class_dropout, self.num_classes, generator,
                                   eligible=eligible)


@OBJECTIVES.register("meanflow")
@attrs.frozen
class MeanFlow(MeanFlowSettings):
    """MeanFlow: JVP target (Kim et al. 2025, Eq. 4), CFG-mixed targets, selective JVP,
    control-variate tangent.

    Parameters
    ----------
    selective: run the tangent pass only on the r != t samples (identical loss; faster).
        ``jvp_dtype`` = None with ``jvp_impl`` "auto" or "manual" on a ``jvp_leading_rows``
        backbone runs all rows in one call; otherwise the r = t rows get their own forward.
    jvp_impl: "auto" (the backbone's ``forward_jvp`` when it has one, else ``torch.func.jvp``),
        "torch_func", or "manual" (``forward_jvp``; falls back to ``torch.func.jvp`` without it).
    jvp_dtype: None keeps the ambient precision; "float32" computes the JVP and the target with
        autocast off and inputs cast to float32 (the official recipe: bf16 rounding in du/dt is
        multiplied by t - r and lands in the target). It costs the JVP's speed and memory savings
        of bf16, and needs float32 module parameters (autocast-style mixed precision, not a module
        stored in bf16).
    omega, kappa, t_start, t_end, class_dropout: training-time guidance
        (mfrecipes/METHOD.md, section 4); omega = 1 and kappa = 0 is no guidance. A dropped
        sample gets the null label and plain v.
    class_dropout_rows: "r_eq_t" (default: labels drop only on r = t rows, at class_dropout of
        the whole batch, the official code's coupling) or "any" (every row may drop).
    v_noise, v_noise_scale: k of the v-target corruption (Kim et al. 2025, Fig. 3), added to the
        target of the r = t samples only, never to the tangent. ``v_noise_scale`` "per_element"
        (default, as the paper writes it: noise "scaled by k ||v||", ``k ||v|| n`` with
        ``n ~ N(0, I)`` per element, ``||v||`` the sample's norm) or "per_sample_norm"
        (``k ||v|| n / sqrt(dim)``: noise of norm about ``k ||v||``, sqrt(dim) times weaker).
    beta_cv, beta_cv_source: control-variate tangent (Lu & Wang 2026; ``ControlVariate``);
        source "ema" uses the ``ema_net`` passed to the call and falls back to the current net
        when there is none (diagnostic ``cv_ema_fallback`` = 1).
    beta_cv_schedule, beta_cv_start, beta_cv_end, beta_cv_s0, beta_cv_s1: "constant" (beta_cv
        throughout) or "linear" / "cosine" / "step" from beta_cv_start (None: 1.0) to
        beta_cv_end (None: 0.0) between progress s0 and s1 (step: drops at s1).
    fm_anchor_weight, fm_anchor_delta: flow-matching anchor
        ``weight ||u(z_t, t, h=delta) - v_g||^2``, delta ~ U[0, fm_anchor_delta] (clipped to t
        so r >= 0), added to ``err`` of every sample, so the loss weightings scale it with the
        sample. Our reading: the anchor regresses on v_g,
        the velocity the rest of the target uses (v when guidance is off). One extra forward.
    tangent_h: the tangent of the gap h = t - r in the JVP. 1 (default) is the method: along the
        trajectory r is fixed and t moves, so dh/dt = 1 (mfrecipes/METHOD.md, section 2). 0 drops
        the du/dh term from du/dt, a mistake some reimplementations made; it exists only as a
        deliberately broken arm for the test bed's controls. Any other value is refused.
    num_classes: set by the framework from the dataset (None: unconditional).
    """

    v_noise: float = 0.0
    v_noise_scale: str = "per_element"
    beta_cv: float = 0.0
    beta_cv_source: str = "ema"
    beta_cv_schedule: str = "constant"
    beta_cv_start: Optional[float] = None
    beta_cv_end: Optional[float] = None
    beta_cv_s0: float = 0.0
    beta_cv_s1: float = 1.0
    fm_anchor_weight: float = 0.0
    fm_anchor_delta: float = 1e-3
    tangent_h: float = 1.0
    _guidance: Guidance = attrs.field(init=False, repr=False, eq=False)
    _cv: ControlVariate = attrs.field(init=False, repr=False, eq=False)
    _planner: ForwardPlanner = attrs.field(init=False, repr=False, eq=False)

    @_guidance.default
    def _make_guidance(self) -> Guidance:
        return Guidance(self.omega, self.kappa, self.t_start, self.t_end, self.class_dropout)

    @_cv.default
    def _make_cv(self) -> ControlVariate:
        return ControlVariate(beta=self.beta_cv, source=self.beta_cv_source,
                              schedule=self.beta_cv_schedule, start=self.beta_cv_start,
                              end=self.beta_cv_end, s0=self.beta_cv_s0, s1=self.beta_cv_s1)

    @_planner.default
    def _make_planner(self) -> ForwardPlanner:
        return ForwardPlanner(self._guidance, self.num_classes, self.jvp_impl, self.jvp_dtype)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.selective, bool):
            raise ValueError(f"selective must be true or false, got {self.selective!r}")
        if self.jvp_impl not in JVP_IMPLS:
            raise ValueError(f"jvp_impl must be one of {JVP_IMPLS}, got {self.jvp_impl!r}")
        if self.jvp_dtype not in JVP_DTYPES:
            raise ValueError(f"jvp_dtype must be one of {JVP_DTYPES}, got {self.jvp_dtype!r}")
        for name in ("v_noise", "fm_anchor_weight", "fm_anchor_delta", "beta_cv", "beta_cv_s0",
                     "beta_cv_s1", "tangent_h"):
            check_real(name, getattr(self, name))
        if not self.v_noise >= 0:
            raise ValueError(f"v_noise must be >= 0, got {self.v_noise!r}")
        if self.v_noise_scale not in V_NOISE_SCALES:
            raise ValueError(f"v_noise_scale must be one of {V_NOISE_SCALES}, "
                             f"got {self.v_noise_scale!r}")
        if self.class_dropout_rows not in DROPOUT_ROWS:
            raise ValueError(f"class_dropout_rows must be one of {DROPOUT_ROWS}, "
                             f"got {self.class_dropout_rows!r}")
        if self.tangent_h not in (0, 1):
            raise ValueError(f"tangent_h must be 1 (the method) or 0 (the broken control that "
                             f"drops du/dh), got {self.tangent_h!r}")
        if not self.fm_anchor_weight >= 0:
            raise ValueError(f"fm_anchor_weight must be >= 0, got {self.fm_anchor_weight!r}")
        if not self.fm_anchor_delta >= 0:
            raise ValueError(f"fm_anchor_delta must be >= 0, got {self.fm_anchor_delta!r}")
        if self.num_classes is not None and not (isinstance(self.num_classes, int)
                                                 and self.num_classes > 0):
            raise ValueError(f"num_classes must be a positive int or None, "
                             f"got {self.num_classes!r}")
        self._guidance.check_labels(self.num_classes)

    def __call__(self, net, x: torch.Tensor, y: Optional[torch.Tensor], t: torch.Tensor,
                 r: torch.Tensor, noise: torch.Tensor, *, progress: float, ema_net=None,
                 generator: Optional[torch.Generator] = None) -> ObjectiveOutput:
        """x, noise [B, ...]; y [B] long or None; t, r [B] with r <= t; ``generator`` drives class
        dropout, v_noise and the anchor's delta (default: the global RNG)."""
        check_inputs(x, t, r, noise, y)
        z, v = interpolate(x, noise, t)                   # [B, ...] z_t and v = e - x
        h = t - r                                         # [B]
        is_avg = h != 0                                   # [B] r != t
        y, dropped = self.drop_labels(y, t, r, generator)
        beta = self._cv.at(progress)
        # du/dt along (v_g or the control-variate tangent, dt = 1, dh = 1): METHOD section 2;
        # on the r = t rows the JVP term is multiplied by 0, so selective skips their tangent
        rows = is_avg if self.selective else torch.ones_like(is_avg)
        tangent = Tangent(rows, dz=self._cv.tangent_z(beta, ema_net), dh=self.tangent_h,
                          reads_cond=self._cv.from_net(beta, ema_net))
        fwd = self._planner(net, z, v, t, h, y, dropped, tangent)
        # u_tgt = stopgrad(v_g - (t - r) du/dt) (Kim et al. 2025, Eq. 4); v_g at r = t (Eq. 5)
        target = fwd.assemble(fwd.v_g - as_batch(h, fwd.dudt) * fwd.dudt)
        if self.v_noise > 0:
            target = target + self._v_corruption(v, is_avg, generator).to(target.dtype)
        err = sum_sq(fwd.u - target)                      # [B]
        stats = {}
        if self.fm_anchor_weight > 0:
            anchor = self._anchor(net, z, t, y, fwd.v_g, generator)
            err = err + self.fm_anchor_weight * anchor.to(err.dtype)
            stats["anchor_err"] = anchor.detach().mean()
        stats.update(fwd.diagnostics(err, v, is_avg))
        if dropped is not None:
            stats["drop_share_u_rows"] = masked_mean(dropped.float(), is_avg)
        if self._cv.enabled:
            stats["beta_cv"] = beta
            stats["cv_ema_fallback"] = float(beta > 0 and self.beta_cv_source == "ema"
                                             and ema_net is None)
        return ObjectiveOutput(err=err, is_average=is_avg, u=fwd.u.detach(), target=target,
                               diagnostics=to_floats(stats))

    def _v_corruption(self, v: torch.Tensor, is_avg: torch.Tensor,
                      generator: Optional[torch.Generator]) -> torch.Tensor:
        """v-target corruption (Kim et al. 2025, Fig. 3) on the r = t targets only: k ||v|| n,
        or k ||v|| n / sqrt(dim) with v_noise_scale per_sample_norm; 0 on the r != t rows."""
        scale = self.v_noise * v.flatten(1).norm(dim=1)
        if self.v_noise_scale == "per_sample_norm":
            scale = scale / sample_dim(v) ** 0.5
        corrupt = as_batch(scale, v) * randn_like_sample(v, generator)
        return torch.where(as_batch(is_avg, v), 0.0, corrupt)

    def _anchor(self, net, z: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor],
                v_g: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Flow-matching anchor ||u(z_t, t, h=delta) - v_g||^2 [B], delta ~ U[0, fm_anchor_delta]
        clipped to t (so r = t - delta >= 0). One extra forward."""
        delta = draw(torch.rand, t.shape, generator, t.device, t.dtype)
        delta = torch.minimum(delta * self.fm_anchor_delta, t)
        return sum_sq(net(z, t, delta, y) - v_g)


@attrs.frozen
class MeanFlowBased(MeanFlowSettings):
    """Base of objectives built around a MeanFlow target (AlphaFlow's alpha = 0 fallback,
    discrete MeanFlow's last stage): MeanFlow's settings and the inner ``MeanFlow`` they make
    (which validates them once)."""

    _meanflow: MeanFlow = attrs.field(init=False, repr=False, eq=False)

    @_meanflow.default
    def _make_meanflow(self) -> MeanFlow:
        names = [f.name for f in attrs.fields(MeanFlowSettings)]  # the settings, none else
        return MeanFlow(**{name: getattr(self, name) for name in names})

    def _plain_forward(self, net, x: torch.Tensor, y: Optional[torch.Tensor], t: torch.Tensor,
                       r: torch.Tensor, noise: torch.Tensor, generator: Optional[torch.Generator]):
        """The start of a stage without a JVP: ``(z_t, v, h, r != t mask, labels after class
        dropout, Forward)`` where the planner ran the CFG forwards and the prediction
        u(z_t, r, t) of every row (no tangent)."""
        check_inputs(x, t, r, noise, y)
        z, v = interpolate(x, noise, t)                   # [B, ...]
        h = t - r                                         # [B]
        y, dropped = self.drop_labels(y, t, r, generator)
        fwd = self._meanflow._planner(net, z, v, t, h, y, dropped)
        return z, v, h, h != 0, y, fwd
