"""Closed-form tangents (directional derivatives) of the layers the backbones use.

Each function takes the primal input ``x`` and its tangent ``dx`` and returns the tangent of the
layer's output. They are plain tensor math: the backbones' ``forward_jvp`` calls them under
``torch.no_grad()`` beside the primal, so the tangent stream builds no autograd graph.

A backbone whose class sets ``jvp_leading_rows = True`` accepts, in ``forward_jvp``, tangents
for only the first ``K <= B`` rows of the batch: the primal runs on all ``B`` rows (one set of
matmuls and one autograd graph for the whole batch) and the tangent stream on the first ``K``.
MeanFlow puts its ``r != t`` samples first and its ``r = t`` samples, which need no derivative,
after them.

The tangent of an elementwise activation ``f`` is ``f'(x) dx``, which is exactly what the
activation's backward kernel computes for the gradient ``dx``: ``silu`` and ``gelu_tanh`` call
those fused kernels (one pass over memory instead of half a dozen elementwise ops).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["as_time_tangent", "linear", "silu", "gelu_tanh", "layer_norm", "layer_norm_primal",
           "modulate", "gated_residual", "check_leading_rows"]


def linear(layer: nn.Linear, dx: torch.Tensor) -> torch.Tensor:
    """d(W x + b) = W dx (the bias has no tangent)."""
    return F.linear(dx, layer.weight)


def silu(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """d silu(x) = sigma(x) (1 + x (1 - sigma(x))) dx."""
    return torch.ops.aten.silu_backward(dx, x)


def gelu_tanh(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Tangent of GELU with the tanh approximation, ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))``."""
    return torch.ops.aten.gelu_backward(dx, x, approximate="tanh")


def layer_norm_primal(x: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(xhat, mean, rstd)``: LayerNorm over the last dim without affine parameters (with its
    autograd graph, as ``F.layer_norm``) and the statistics ``layer_norm`` takes for its fast path
    (None under autocast, where ``F.layer_norm`` picks the output dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return F.layer_norm(x, (x.shape[-1],), eps=eps), None, None
    return torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)


def layer_norm(x: torch.Tensor, dx: torch.Tensor, eps: float,
               xhat: Optional[torch.Tensor] = None,
               rstd: Optional[torch.Tensor] = None,
               mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tangent of LayerNorm over the last dim without affine parameters:
    ``d xhat = (dx - mean(dx) - xhat mean(xhat dx)) / sqrt(var + eps)``; pass the primal output
    ``xhat`` (and ``rstd = 1 / sqrt(var + eps)``) when they are at hand.

    The Jacobian of ``x -> xhat`` is symmetric, so its product with ``dx`` is what LayerNorm's
    backward kernel computes for the gradient ``dx``: given the primal's ``mean`` and ``rstd``
    (``layer_norm_primal``), one fused kernel call replaces the elementwise formula."""
    if mean is not None and rstd is not None and mean.dtype == rstd.dtype == x.dtype:
        return torch.ops.aten.native_layer_norm_backward(
            dx, x, [x.shape[-1]], mean, rstd, None, None, [True, False, False])[0]
    if rstd is None:
        centred = x - x.mean(-1, keepdim=True)
        # not x.var(): its CPU kernel is several times slower than these three ops
        rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    if xhat is None:
        xhat = (x - x.mean(-1, keepdim=True)) * rstd
    centred = dx - dx.mean(-1, keepdim=True)
    return rstd * torch.addcmul(centred, xhat, (xhat * dx).mean(-1, keepdim=True), value=-1)


def modulate(x: torch.Tensor, dx: torch.Tensor, scale: torch.Tensor, dscale: torch.Tensor,
             dshift: torch.Tensor) -> torch.Tensor:
    """Tangent of adaLN modulation ``x (1 + scale) + shift`` (product rule); x, dx [B, N, C],
    scale, dscale, dshift [B, C]."""
    out = torch.addcmul(dshift.unsqueeze(1), dx, 1 + scale.unsqueeze(1))
    return out.addcmul_(x, dscale.unsqueeze(1))


def gated_residual(dx: torch.Tensor, gate: torch.Tensor, dgate: torch.Tensor, a: torch.Tensor,
                   da: torch.Tensor) -> torch.Tensor:
    """Tangent of the adaLN-Zero residual ``x + gate a`` (product rule); dx, a, da [B, N, C],
    gate, dgate [B, C]."""
    return torch.addcmul(dx, dgate.unsqueeze(1), a).addcmul_(gate.unsqueeze(1), da)


def as_time_tangent(d, like: torch.Tensor) -> torch.Tensor:
    """A tangent for t or h given as a number or a [B] tensor -> [B] tensor like ``like``."""
    return torch.as_tensor(d, dtype=like.dtype, device=like.device).expand(like.shape)


def check_leading_rows(z: torch.Tensor, dz: torch.Tensor) -> int:
    """``K = len(dz)``: the number of leading rows of ``z [B, ...]`` that carry a tangent."""
    if dz.shape[1:] != z.shape[1:] or dz.shape[0] > z.shape[0]:
        raise ValueError(f"the tangent dz {tuple(dz.shape)} must cover the first K <= B rows "
                         f"of z {tuple(z.shape)} (same sample shape)")
    return dz.shape[0]
