"""Monte Carlo expectations under a timestep sampler, for constants fixed once at construction.

The progressive gap schedule's ``lambda = 1 / E[1 - dt]`` (over the ``r != t`` samples) and the
MinSNR normaliser ``E[alpha(t)]`` (over the ``r = t`` samples) are constants of the sampler
(our reading, mfrecipes/METHOD.md, section 6): estimated once with a fixed seed, in chunks to
bound memory.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["branch_mean"]


def branch_mean(sampler, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, branch: str,
                draws: int = 1_000_000, seed: int = 0, progress: float = 0.0,
                chunk: int = 1 << 17) -> tuple[float, int]:
    """Mean of ``fn(t, r)  # [n]`` over the samples of one branch of ``sampler``.

    ``branch`` is ``"v"`` (``r = t``) or ``"u"`` (``r != t``). Draws ``draws`` pairs from
    ``sampler.sample`` at ``progress`` with a CPU generator seeded ``seed`` (the sampler's own
    state is not touched). Returns ``(mean, count)``; ``mean`` is NaN when ``count`` is 0.
    """
    if branch not in ("v", "u"):
        raise ValueError(f"branch must be 'v' or 'u', got {branch!r}")
    g = torch.Generator().manual_seed(seed)
    total, count, left = 0.0, 0, draws
    with torch.no_grad():
        while left > 0:
            n = min(chunk, left)
            t, r = sampler.sample(n, progress=progress, generator=g, device="cpu")
            keep = (r == t) if branch == "v" else (r != t)
            total += fn(t[keep].double(), r[keep].double()).sum().item()
            count += int(keep.sum())
            left -= n
    return (total / count if count else float("nan")), count
