"""2-D toy distributions (the benchmarks of the control-variate paper): exact samplers.

Each sampler draws ``n`` points ``[n, 2]`` (float32, roughly unit scale) from a torch Generator, so
that fresh reference data for evaluation is as cheap and as reproducible as the training data.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

TOYS: dict[str, Callable[[int, torch.Generator], torch.Tensor]] = {}


def _toy(name: str):
    def deco(fn):
        TOYS[name] = fn
        return fn
    return deco


@_toy("checkerboard")
def checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # 4x4 board on [-2, 2]^2, points on the 8 "black" squares.
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
    x2 = x2 + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], 1) * 1.0


@_toy("eight_gaussians")
def eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    angles = torch.randint(0, 8, (n,), generator=g).float() * (2 * math.pi / 8)
    centres = torch.stack([torch.cos(angles), torch.sin(angles)], 1) * 2.0
    return centres + 0.15 * torch.randn(n, 2, generator=g)


@_toy("two_moons")
def two_moons(n: int, g: torch.Generator) -> torch.Tensor:
    which = torch.randint(0, 2, (n,), generator=g)
    theta = torch.rand(n, generator=g) * math.pi
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    pts = torch.where(which[:, None] == 0, upper, lower)
    pts = pts + 0.05 * torch.randn(n, 2, generator=g)
    return (pts - torch.tensor([0.5, 0.25])) * 1.5


@_toy("swiss_roll")
def swiss_roll(n: int, g: torch.Generator) -> torch.Tensor:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5.0
    return pts + 0.05 * torch.randn(n, 2, generator=g)


@_toy("two_spirals")
def two_spirals(n: int, g: torch.Generator) -> torch.Tensor:
    r = torch.sqrt(torch.rand(n, generator=g)) * 540 * (2 * math.pi) / 360
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    d1 = sign * (-torch.cos(r) * r)
    d2 = sign * (torch.sin(r) * r)
    pts = torch.stack([d1, d2], 1) / 3.0
    return pts + 0.1 * torch.randn(n, 2, generator=g)


@_toy("pinwheel")
def pinwheel(n: int, g: torch.Generator) -> torch.Tensor:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = torch.linspace(0, 2 * math.pi, num_classes + 1)[:-1]
    labels = torch.randint(0, num_classes, (n,), generator=g)
    feats = torch.randn(n, 2, generator=g) * torch.tensor([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angles = rads[labels] + rate * torch.exp(feats[:, 0])
    rot = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles),
                       torch.cos(angles)], 1).view(n, 2, 2)
    return 2.0 * torch.einsum("ni,nij->nj", feats, rot)


def sample_toy(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` fresh points ``[n, 2]`` float32 from the toy ``kind``."""
    if kind not in TOYS:
        from mfrecipes.errors import DataError
        raise DataError(f"unknown 2-D toy {kind!r}; valid: {', '.join(sorted(TOYS))}")
    return TOYS[kind](n, generator).float()
