"""MLP backbone for 2-D (or any flat D-dim) points: u(z, t, h, y), z [B, D].

``depth`` hidden layers of width ``hidden``; the condition c = emb_t(t) + emb_h(h) [+ emb_y(y)]
is added to every hidden pre-activation, so time reaches each layer, not only the first.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mfrecipes.backbones import tangents
from mfrecipes.backbones.dit import check_size
from mfrecipes.backbones.embedders import ConditionEmbedder
from mfrecipes.registry import BACKBONES

__all__ = ["MLP"]


@BACKBONES.register("mlp")
class MLP(nn.Module):
    """MLP for flat points: `depth` SiLU layers of width `hidden`, conditioned on (t, h, y)."""

    jvp_leading_rows = True  # forward_jvp accepts tangents for only the first K rows

    def __init__(self, hidden: int = 128, depth: int = 3, *, input_shape: Sequence[int],
                 num_classes: Optional[int] = None):
        super().__init__()
        input_shape = tuple(input_shape)
        if len(input_shape) != 1:
            raise ValueError(f"the mlp backbone takes flat points (D,), got input_shape "
                             f"{input_shape}; for images use a dit_* backbone")
        check_size("depth", depth, 1, 1024)
        check_size("hidden", hidden, 1, 65536)
        (dim,) = input_shape
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.cond = ConditionEmbedder(hidden, num_classes)
        self.layers = nn.ModuleList([nn.Linear(dim, hidden)]
                                    + [nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.out = nn.Linear(hidden, dim)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z [B, D], t and h [B] in [0, 1], y [B] long or None -> u [B, D]."""
        c = self.cond(t, h, y)  # [B, hidden]
        x = z
        for layer in self.layers:
            x = F.silu(layer(x) + c)
        return self.out(x)

    def forward_jvp(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                    y: Optional[torch.Tensor], dz: torch.Tensor, dt, dh
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(u [B, D] with graph, du [K, D] without graph): u = forward(z, t, h, y), du its
        derivative along (dz, dt, dh) for the first K = len(dz) <= B rows (``jvp_leading_rows``);
        dt and dh are numbers or [K] tensors."""
        k = tangents.check_leading_rows(z, dz)
        dt, dh = tangents.as_time_tangent(dt, t[:k]), tangents.as_time_tangent(dh, h[:k])
        c, dc = self.cond.forward_jvp(t, h, y, dt, dh)
        x, dx = z, dz
        for layer in self.layers:
            pre = layer(x) + c
            x = F.silu(pre)
            with torch.no_grad():
                dx = tangents.silu(pre[:k], tangents.linear(layer, dx) + dc)
        with torch.no_grad():
            du = tangents.linear(self.out, dx)
        return self.out(x), du
