"""Conditioning embedders: c = emb_t(t) + emb_h(h) + emb_y(y) (mfrecipes/METHOD.md, section 2).

t and h = t - r are raw values in [0, 1] (no x1000 scaling), each through its own sinusoidal
embedder (256 frequencies' worth of [cos, sin], max period 10000) and a two-layer MLP. Labels have
``num_classes + 1`` rows; the last row is the null class for classifier-free guidance. There is no
label dropout here: the objective drops labels by passing the null class.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mfrecipes.backbones import tangents

__all__ = ["sinusoidal_embedding", "TimestepEmbedder", "LabelEmbedder", "ConditionEmbedder"]


def _angles(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """t [B] -> t f_k [B, dim/2] (float64 stays float64; half precision is computed in float32)."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=dtype, device=t.device) / half)  # [dim/2]
    return t.to(dtype)[:, None] * freqs[None]


def sinusoidal_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0
                         ) -> torch.Tensor:
    """t [B] -> [B, dim], ``[cos(t f_k), sin(t f_k)]`` with ``f_k = max_period^(-k / (dim/2))``."""
    args = _angles(t, dim, max_period)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar time [B] -> [B, hidden]: sinusoidal features, then Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        if frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even, got {frequency_dim}")
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = sinusoidal_embedding(t, self.frequency_dim, self.max_period)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))

    def forward_jvp(self, t: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb [B, hidden] with graph, d emb [K, hidden] without graph) along the tangent
        dt [K] of the first K <= B rows."""
        lin1, _, lin2 = self.mlp
        args = _angles(t, self.frequency_dim, self.max_period)  # [B, dim/2]
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(lin1.weight.dtype)
        pre = lin1(feats)
        out = lin2(F.silu(pre))
        with torch.no_grad():
            k = dt.shape[0]
            # d/dt [cos(t f), sin(t f)] = [-sin(t f) f, cos(t f) f]
            dargs = _angles(dt, self.frequency_dim, self.max_period)
            dfeats = torch.cat([-torch.sin(args[:k]) * dargs, torch.cos(args[:k]) * dargs],
                               dim=-1)
            dpre = tangents.linear(lin1, dfeats.to(pre.dtype))
            dout = tangents.linear(lin2, tangents.silu(pre[:k], dpre))
        return out, dout


class LabelEmbedder(nn.Module):
    """Class labels [B] -> [B, hidden]; ``num_classes + 1`` rows, index ``num_classes`` = null."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class ConditionEmbedder(nn.Module):
    """c = emb_t(t) + emb_h(h) + emb_y(y) [B, hidden]; emb_y only when num_classes is set."""

    def __init__(self, hidden_size: int, num_classes: Optional[int] = None):
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool)
                                        or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.num_classes = num_classes
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.h_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes else None

    def _labels(self, y: Optional[torch.Tensor], t: torch.Tensor) -> Optional[torch.Tensor]:
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this backbone is unconditional (num_classes=None) but got "
                                 "labels y; pass y=None or build it with num_classes")
            return None
        if y is None:  # a conditional model asked for an unconditional sample: the null class
            y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
        return self.y_embedder(y)

    def forward(self, t: torch.Tensor, h: torch.Tensor, y: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        c = self.t_embedder(t) + self.h_embedder(h)
        ye = self._labels(y, t)
        return c if ye is None else c + ye

    def forward_jvp(self, t: torch.Tensor, h: torch.Tensor, y: Optional[torch.Tensor],
                    dt: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c [B, hidden] with graph, dc [K, hidden] without graph) for tangents dt, dh [K] of
        the first K <= B rows; dt enters through emb_t, dh through emb_h."""
        ct, dct = self.t_embedder.forward_jvp(t, dt)
        ch, dch = self.h_embedder.forward_jvp(h, dh)
        c = ct + ch
        ye = self._labels(y, t)
        return (c if ye is None else c + ye), dct + dch
