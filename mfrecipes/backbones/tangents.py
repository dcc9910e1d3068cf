"""Closed-form tangents (directional derivatives) of the layers the backbones use.

Each function takes the primal input ``x`` and its tangent ``dx`` and returns the tangent of the
layer's output. They are plain tensor math: the backbones' ``forward_jvp`` calls them under
``torch.no_grad()`` beside the primal, so the tangent stream builds no autograd graph.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["as_time_tangent", "linear", "silu", "gelu_tanh", "layer_norm", "modulate"]

_GELU_C = math.sqrt(2.0 / math.pi)


def linear(layer: nn.Linear, dx: torch.Tensor) -> torch.Tensor:
    """d(W x + b) = W dx (the bias has no tangent)."""
    return F.linear(dx, layer.weight)


def silu(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """d silu(x) = sigma(x) (1 + x (1 - sigma(x))) dx."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s)) * dx


def gelu_tanh(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Tangent of GELU with the tanh approximation, ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))``."""
    th = torch.tanh(_GELU_C * (x + 0.044715 * x ** 3))
    slope = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x * x)
    return slope * dx


def layer_norm(x: torch.Tensor, dx: torch.Tensor, eps: float,
               xhat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tangent of LayerNorm over the last dim without affine parameters:
    ``d xhat = (dx - mean(dx) - xhat mean(xhat dx)) / sqrt(var + eps)``; pass the primal output
    ``xhat`` when it is at hand."""
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    if xhat is None:
        xhat = (x - x.mean(-1, keepdim=True)) * rstd
    return rstd * (dx - dx.mean(-1, keepdim=True) - xhat * (xhat * dx).mean(-1, keepdim=True))


def modulate(x: torch.Tensor, dx: torch.Tensor, scale: torch.Tensor, dscale: torch.Tensor,
             dshift: torch.Tensor) -> torch.Tensor:
    """Tangent of adaLN modulation ``x (1 + scale) + shift`` (product rule); x, dx [B, N, C],
    scale, dscale, dshift [B, C]."""
    return dx * (1 + scale.unsqueeze(1)) + x * dscale.unsqueeze(1) + dshift.unsqueeze(1)


def as_time_tangent(d, like: torch.Tensor) -> torch.Tensor:
    """A tangent for t or h given as a number or a [B] tensor -> [B] tensor like ``like``."""
    return torch.as_tensor(d, dtype=like.dtype, device=like.device).expand(like.shape)
