"""Sliced Wasserstein-1 distance between two point sets (mfrecipes/METHOD.md, section 7: the
2-D benchmarks use 4,096 samples and 500 projections).

``SWD(a, b) = mean over unit directions w of W1(<a, w>, <b, w>)``; each 1-D W1 is exact:
``integral_0^1 |F_a^-1(q) - F_b^-1(q)| dq`` for the empirical quantile functions.
"""
from __future__ import annotations

import torch

__all__ = ["random_directions", "sliced_wasserstein"]


def random_directions(num: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``num`` unit vectors ``[num, dim]`` (float64), uniform on the sphere, from a seeded CPU
    generator."""
    g = torch.Generator().manual_seed(int(seed))
    w = torch.randn(num, dim, generator=g, dtype=torch.float64)
    return w / w.norm(dim=1, keepdim=True)


def _w1_sorted(pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """Exact 1-D W1 per column between sorted samples ``pa [N, P]`` and ``pb [M, P]`` -> ``[P]``."""
    n, m = pa.shape[0], pb.shape[0]
    if n == m:
        return (pa - pb).abs().mean(0)
    # Quantile functions are step functions with breaks at i/N and j/M. Work in units of 1/(N M)
    # so the merged breakpoints are exact integers; each interval holds one value of each side.
    dev = pa.device
    brk = torch.unique(torch.cat([torch.arange(1, n + 1, device=dev) * m,
                                  torch.arange(1, m + 1, device=dev) * n]))     # [K], last = N M
    lo = torch.cat([brk.new_zeros(1), brk[:-1]])
    mid2 = lo + brk                                          # twice the interval midpoint
    ia = torch.div(mid2, 2 * m, rounding_mode="floor")       # floor(q N): index of F_a^-1(q)
    ib = torch.div(mid2, 2 * n, rounding_mode="floor")
    length = (brk - lo).to(pa.dtype) / (n * m)               # [K]
    return ((pa[ia] - pb[ib]).abs() * length[:, None]).sum(0)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, num_projections: int = 500,
                       seed: int = 0, directions: torch.Tensor | None = None) -> float:
    """Sliced W1 between ``a [N, D]`` and ``b [M, D]`` (any trailing shape is flattened).

    Directions are ``random_directions(num_projections, D, seed)`` unless given ``[P, D]``.
    Computed in float64; sizes may differ (exact quantile matching).
    """
    a = a.detach().reshape(a.shape[0], -1).double()
    b = b.detach().reshape(b.shape[0], -1).to(a.device, torch.float64)
    if a.shape[1] != b.shape[1] or a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"sliced_wasserstein needs two non-empty sets of the same dimension, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if directions is None:
        directions = random_directions(num_projections, a.shape[1], seed)
    w = directions.to(a.device, torch.float64)                          # [P, D]
    pa = torch.sort(a @ w.T, dim=0).values                              # [N, P]
    pb = torch.sort(b @ w.T, dim=0).values                              # [M, P]
    return float(_w1_sorted(pa, pb).mean())
