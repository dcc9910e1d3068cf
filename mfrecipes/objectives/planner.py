"""The forward planner: every network call of one objective evaluation, in batch order.

An objective states its method (which rows need the total derivative du/dt, along which tangent,
and what the target is); the planner runs the calls that this needs and returns, in batch order,

    u     = net(z_t, t, h, y)                       the prediction, with its autograd graph
    du/dt = d/dt net(z_t, t, h, y) along (dz, 1, dh) detached, on the tangent rows (0 elsewhere)
    v_g   the CFG-mixed velocity (mfrecipes/METHOD.md, section 4; v without guidance), detached

Use (a third-party objective does the same)::

    planner = ForwardPlanner(guidance, num_classes, jvp_impl="auto", jvp_dtype=None)
    fwd = planner(net, z, v, t, h, y, dropped, tangent=Tangent(rows=h != 0))
    target = fwd.assemble(fwd.v_g - as_batch(h, fwd.dudt) * fwd.dudt)   # MeanFlow, Eq. 4/5

``Tangent(rows, dz=None, dh=1.0, reads_cond=False)``: ``rows [B]`` bool selects the rows that get
du/dt; ``dz`` is the z tangent on those rows: None (v_g, the method), a ``[B, ...]`` tensor read
on the rows, or a callable ``dz(rows: TangentRows) -> [K, ...]`` that sees the tangent rows' z, t,
h, y, v_g and (with ``reads_cond``) ``u_cond = net(z_t, t, 0, y)`` (the control variate's proxy);
``dh`` (a number, or a ``[B]`` tensor read on the rows) is the tangent of h = t - r, 1 in the
method. Without a ``tangent`` every row is a plain forward.

What it runs, in this order:

1. one batched no-grad call for the guidance velocities: ``u_uncond`` on the guided rows and
   ``u_cond`` on the guided rows whose prediction is not already ``u(z_t, t, 0, y)`` (tangent
   rows, rows with h != 0), plus every tangent row when ``reads_cond``; no call when neither is
   needed. The plain rows with h = 0 take u_cond from their own prediction.
2. the JVP on the tangent rows (``jvp_forward``): on a ``jvp_leading_rows`` backbone the plain
   rows ride in the same call (tangent rows first), otherwise they get one plain forward.
   ``jvp_dtype="float32"`` runs the JVP with autocast off on float32 inputs, so bf16 rounding
   stays out of du/dt; with a ``tangent`` the plain rows' prediction is cast to float32 too (one
   precision for u whatever the number of tangent rows).

``Forward.assemble(x)`` puts ``x`` on the tangent rows and v_g on the others (in the
prediction's precision), the regression target of a MeanFlow-style objective.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import attrs
import torch

from mfrecipes.objectives.base import as_batch, masked_mean, sum_sq
from mfrecipes.objectives.guidance import Guidance
from mfrecipes.objectives.jvp import jvp_forward, jvp_precision, takes_leading_rows

__all__ = ["Forward", "ForwardPlanner", "Tangent", "TangentRows"]


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().squeeze(1)


def _take(x: Optional[torch.Tensor], idx: torch.Tensor) -> Optional[torch.Tensor]:
    return None if x is None else x[idx]


@attrs.frozen
class TangentRows:
    """What a tangent callable sees: the tangent rows (indices ``idx [K]`` into the batch) and
    their inputs; ``u_cond`` only when the ``Tangent`` says ``reads_cond``."""

    idx: torch.Tensor
    z: torch.Tensor
    t: torch.Tensor
    h: torch.Tensor
    y: Optional[torch.Tensor]
    v_g: torch.Tensor
    u_cond: Optional[torch.Tensor] = None


@attrs.frozen
class Tangent:
    """The rows that need du/dt and the tangent along which it is taken (module docstring)."""

    rows: torch.Tensor
    dz: Union[None, torch.Tensor, Callable[[TangentRows], torch.Tensor]] = None
    dh: Union[float, torch.Tensor] = 1.0
    reads_cond: bool = False


@attrs.frozen
class Forward:
    """The planner's result, every tensor in batch order ([B, ...] or [B])."""

    u: torch.Tensor                   # prediction, with graph
    dudt: torch.Tensor                # total derivative on the tangent rows, 0 elsewhere; detached
    v_g: torch.Tensor                 # guided velocity (v where unguided), detached
    tangent_rows: torch.Tensor        # [B] bool
    guided: Optional[torch.Tensor]    # [B] bool, or None when no row is mixed
    dropped: Optional[torch.Tensor]   # [B] bool, or None when no label was dropped
    _jvp_idx: torch.Tensor = attrs.field(repr=False)
    _plain_idx: torch.Tensor = attrs.field(repr=False)
    _inverse: Optional[torch.Tensor] = attrs.field(repr=False)

    def assemble(self, on_tangent_rows: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` detached: ``on_tangent_rows`` on the tangent rows, v_g (cast to the
        prediction's dtype) on the others."""
        parts = []
        if len(self._jvp_idx):
            parts.append(on_tangent_rows[self._jvp_idx])
        if len(self._plain_idx):
            parts.append(self.v_g[self._plain_idx].to(self.u.dtype))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return (out if self._inverse is None else out[self._inverse]).detach()

    def diagnostics(self, err: torch.Tensor, v: torch.Tensor, is_avg: torch.Tensor) -> dict:
        """The logged figures every objective on the planner shares (tensors; ``to_floats``)."""
        u_d, err_d = self.u.detach(), err.detach()
        stats = {
            "v_loss": sum_sq(u_d - v).mean(),             # in the wider of the two dtypes
            "u_err": masked_mean(err_d, is_avg),
            "v_err": masked_mean(err_d, ~is_avg),
            "avg_share": is_avg.float().mean(),
        }
        if self.guided is not None:
            stats["cfg_share"] = self.guided.float().mean()
        if self.dropped is not None:
            stats["drop_share"] = self.dropped.float().mean()
        return stats


@attrs.frozen
class ForwardPlanner:
    """Runs the guidance forwards, the JVP and the plain rows of one objective evaluation.

    guidance: the CFG settings (``Guidance``); num_classes: the null label for ``u_uncond``.
    jvp_impl: "auto", "torch_func" or "manual" (``jvp_forward``); jvp_dtype: None or "float32".
    """

    guidance: Guidance
    num_classes: Optional[int] = None
    jvp_impl: str = "auto"
    jvp_dtype: Optional[str] = None

    def __call__(self, net, z: torch.Tensor, v: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                 y: Optional[torch.Tensor], dropped: Optional[torch.Tensor] = None,
                 tangent: Optional[Tangent] = None) -> Forward:
        """z, v [B, ...]; t, h [B]; y [B] (labels after dropout) or None; dropped [B] bool or
        None (those rows keep plain v)."""
        g = self.guidance
        guided = g.mask(t, y, dropped)                       # [B] bool or None
        on = torch.zeros_like(t, dtype=torch.bool) if tangent is None else tangent.rows
        jvp_idx, plain_idx = _rows(on), _rows(~on)
        n_jvp, n_plain = len(jvp_idx), len(plain_idx)

        # -- 1. one batched no-grad call: u_uncond on guided rows, u_cond where none is at hand
        need_cond = torch.zeros_like(on)
        if guided is not None and g.needs_cond:
            need_cond |= guided & (on | (h != 0))
        if tangent is not None and tangent.reads_cond:
            need_cond |= on
        cond_idx = _rows(need_cond)
        uncond_idx = _rows(guided) if guided is not None else cond_idx[:0]
        u_cond, u_uncond = g.forwards(net, z, t, y, cond_idx, uncond_idx, self.num_classes)

        # -- 2. tangent rows: prediction and du/dt from one call (with the plain rows if fused)
        fuse = (n_jvp > 0 and n_plain > 0 and self.jvp_dtype is None
                and takes_leading_rows(net, self.jvp_impl))
        order = torch.cat([jvp_idx, plain_idx])
        parts_u = []
        dudt = None
        if n_jvp:
            v_g_j = v[jvp_idx] if guided is None else g.mix(
                v[jvp_idx], u_cond[jvp_idx], u_uncond[jvp_idx], guided[jvp_idx])
            dz = self._tangent_z(tangent, jvp_idx, z, t, h, y, v_g_j, u_cond)
            with jvp_precision(self.jvp_dtype, z.device.type) as cast:
                rows = order if fuse else jvp_idx
                zj, tj, hj = z[rows], t[rows], h[rows]
                if cast is not None:
                    zj, tj, hj, dz = (a.to(cast) for a in (zj, tj, hj, dz))
                ones = torch.ones_like(tj[:n_jvp])
                if torch.is_tensor(tangent.dh):
                    dh = tangent.dh[jvp_idx].to(ones.dtype)
                else:
                    dh = ones if tangent.dh == 1 else ones * tangent.dh
                u_rows, du_j = jvp_forward(net, zj, tj, hj, _take(y, rows), dz, ones, dh,
                                           impl=self.jvp_impl)  # u [len(rows)], du [K]
            parts_u.append(u_rows[:n_jvp])
            dudt = du_j.new_zeros((len(t),) + tuple(du_j.shape[1:]))
            dudt[jvp_idx] = du_j

        # -- 3. plain rows: their own forward unless they rode in the JVP call
        if n_plain:
            if fuse:
                u_p = u_rows[n_jvp:]
            elif n_jvp == 0:
                u_p = net(z, t, h, y)                        # every row plain: no row selection
            else:
                u_p = net(z[plain_idx], t[plain_idx], h[plain_idx], _take(y, plain_idx))
            if guided is not None and g.needs_cond:
                # u(z_t, t, t) is u_cond itself: the plain rows with h = 0 lend their prediction
                at_zero = as_batch(h[plain_idx] == 0, u_p)
                u_cond[plain_idx] = torch.where(at_zero, u_p.detach().to(z.dtype),
                                                u_cond[plain_idx])
            if self.jvp_dtype is not None and tangent is not None:
                u_p = u_p.to(getattr(torch, self.jvp_dtype))  # one precision for every row
            parts_u.append(u_p)

        v_g = v if guided is None else g.mix(v, u_cond, u_uncond, guided)   # [B, ...]
        inverse = None if n_jvp == 0 or n_plain == 0 else torch.argsort(order)
        u = torch.cat(parts_u) if len(parts_u) > 1 else parts_u[0]
        if inverse is not None:
            u = u[inverse]                                   # back in batch order
        if dudt is None:
            dudt = torch.zeros_like(u.detach())
        return Forward(u=u, dudt=dudt, v_g=v_g.detach(), tangent_rows=on, guided=guided,
                       dropped=dropped, jvp_idx=jvp_idx, plain_idx=plain_idx, inverse=inverse)

    @staticmethod
    def _tangent_z(tangent: Tangent, idx: torch.Tensor, z, t, h, y, v_g_j, u_cond
                   ) -> torch.Tensor:
        """The z tangent on the tangent rows ``idx`` ([K, ...])."""
        if tangent.dz is None:
            return v_g_j
        if torch.is_tensor(tangent.dz):
            return tangent.dz[idx]
        return tangent.dz(TangentRows(idx=idx, z=z[idx], t=t[idx], h=h[idx], y=_take(y, idx),
                                      v_g=v_g_j, u_cond=u_cond[idx] if tangent.reads_cond
                                      else None))
