"""Task-affinity score between the v-loss and the u-loss per gap range (Kim et al. 2025, App. A).

Kim et al. 2025 define the score as the cosine similarity between the gradients of the two losses
within each gap interval, averaged over samples and training epochs; the per-batch computation
below is our reading. For each gap range [a, b] and each of ``num_batches`` batches:

1. a data batch ``x [B, ...]`` (labels ``y``), noise ``e ~ N(0, I)``, and ``(t, r_raw)`` from the
   run's timestep sampler with ``fm_ratio = 0`` (every pair is an r != t pair);
2. the gap is rescaled into the range as in training (mfrecipes/METHOD.md, section 5):
   ``dt = a + (b - a) * (t - r_raw)``, ``r = max(t - dt, 0)``; t is kept. Unlike the training
   sampler, which redraws t where ``t < dt``, r is clipped at 0 here, so in the wide-gap ranges
   some pairs have a gap below their range;
3. ``L_v = mean_i err_i(t_i, r = t_i)`` (flow matching, Kim et al. 2025, Eq. 5) and
   ``L_u = mean_i err_i(t_i, r_i)`` (MeanFlow, Kim et al. 2025, Eq. 4) with the run's objective on
   the same x, y, e and t; ``err`` is the objective's unweighted per-sample error (``weighted=True``
   multiplies by the run's loss weighting, detached, as training does);
4. ``g_v = dL_v/dtheta``, ``g_u = dL_u/dtheta`` over all trainable parameters, flattened;
   ``cos = <g_v, g_u> / (|g_v| |g_u|)``.

The score of a range is the mean of ``cos`` over the batches, reported with its standard deviation
(``ddof = 1``) and the batch count. Each range sees the same data, noise, t and raw gaps (one
generator seeded with ``seed``), so ranges differ only by the gap. Class dropout inside the
objective draws from torch's global RNG, re-seeded identically before L_v and L_u.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import attrs
import torch
from torch import nn

from mfrecipes.errors import RecipeError

__all__ = ["AffinityResult", "gradient_cosine", "flat_grad", "parse_gap_ranges",
           "task_affinity", "task_affinity_run", "DEFAULT_GAP_RANGES"]

DEFAULT_GAP_RANGES = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.0))


@attrs.frozen
class AffinityResult:
    """Cosine of the v- and u-loss gradients for one gap range: mean, std over batches, count."""

    gap_range: tuple[float, float]
    mean: float
    std: float
    num_batches: int
    cosines: tuple[float, ...] = attrs.field(repr=False)

    def as_dict(self) -> dict:
        return {"gap_range": list(self.gap_range), "mean": self.mean, "std": self.std,
                "num_batches": self.num_batches, "cosines": list(self.cosines)}


def parse_gap_ranges(text: Optional[str]) -> list[tuple[float, float]]:
    """``"0:0.1,0.1:0.3"`` -> ``[(0.0, 0.1), (0.1, 0.3)]`` (default: :data:`DEFAULT_GAP_RANGES`)."""
    if not text:
        return list(DEFAULT_GAP_RANGES)
    out = []
    for part in text.split(","):
        try:
            a, b = (float(v) for v in part.split(":"))
        except ValueError as err:
            raise RecipeError(f"gap range {part!r}: expected a:b such as 0.1:0.3",
                              path="--gap-ranges") from err
        if not 0.0 <= a <= b <= 1.0:
            raise RecipeError(f"gap range {part!r}: need 0 <= a <= b <= 1", path="--gap-ranges")
        out.append((a, b))
    return out


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``dloss/dparams`` flattened into one float64 vector (zeros for unused parameters)."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def gradient_cosine(g1: torch.Tensor, g2: torch.Tensor) -> float:
    n1, n2 = g1.norm(), g2.norm()
    if n1 == 0 or n2 == 0:
        return math.nan
    return float(g1 @ g2 / (n1 * n2))


def _loss(objective, net, x, y, t, r, noise, *, weighting, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)   # the same class dropout for L_v and L_u
    out = objective(net, x, y, t, r, noise, progress=1.0, ema_net=net)
    err = out.err.float()                                                # [B]
    if weighting is not None:
        err = weighting.weights(err, t, r).detach() * err
    return err.mean()


def task_affinity(net: nn.Module, objective, batches, sampler, *,
                  gap_ranges: Sequence[tuple[float, float]] = DEFAULT_GAP_RANGES,
                  num_batches: int = 8, seed: int = 0, weighting=None,
                  device: torch.device | str = "cpu") -> list[AffinityResult]:
    """Scores per gap range (see the module docstring). ``batches`` yields ``(x, y)``;
    ``sampler.sample(B, progress, generator, device) -> (t, r)`` with no r = t pairs."""
    if num_batches < 1:
        raise RecipeError(f"--num-batches must be >= 1, got {num_batches}", path="--num-batches")
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(num_batches):
        x, y = next(batches)
        t, r_raw = sampler.sample(x.shape[0], progress=1.0, generator=g, device="cpu")
        noise = torch.randn(x.shape, generator=g).to(x.dtype)
        draws.append((x, y, t, r_raw, noise, int(torch.randint(0, 2**31 - 1, (), generator=g))))
    results = []
    for a, b in gap_ranges:
        cos = []
        for x, y, t, r_raw, noise, s in draws:
            x, noise, t = x.to(device), noise.to(device), t.to(device)
            y = None if y is None else y.to(device)
            # Rescaled into [a, b] (mfrecipes/METHOD.md, section 5); r clipped at 0, see above.
            gap = a + (b - a) * (t - r_raw.to(device))
            r = (t - gap).clamp_min(0.0)
            g_v = flat_grad(_loss(objective, net, x, y, t, t.clone(), noise,
                                  weighting=weighting, seed=s), params)
            g_u = flat_grad(_loss(objective, net, x, y, t, r, noise,
                                  weighting=weighting, seed=s), params)
            cos.append(gradient_cosine(g_v, g_u))
        vals = torch.tensor(cos, dtype=torch.float64)
        results.append(AffinityResult(
            gap_range=(float(a), float(b)), mean=float(vals.mean()),
            std=float(vals.std()) if len(cos) > 1 else 0.0, num_batches=len(cos),
            cosines=tuple(cos)))
    return results


def task_affinity_run(run_dir: str, *, gap_ranges=DEFAULT_GAP_RANGES, num_batches: int = 8,
                      batch_size: Optional[int] = None, weights: str = "ema",
                      checkpoint: Optional[str] = None, seed: int = 0, weighted: bool = False,
                      device: str = "auto") -> dict:
    """:func:`task_affinity` on a checkpoint of a run, with the run's data, objective and sampler
    (``fm_ratio`` forced to 0, its own ``gap_range`` dropped: the ranges here replace it)."""
    from mfrecipes import registry
    from mfrecipes.devices import pick_device
    from mfrecipes.evaluate.load import load_run

    dev = pick_device(device, where="--device")
    run = load_run(run_dir, checkpoint=checkpoint, weights=weights, device=dev)
    recipe = run.recipe
    net = run.net.train().requires_grad_(True)
    objective = registry.OBJECTIVES.build(recipe.objective.as_dict(), where="objective",
                                          num_classes=run.info.num_classes)
    block = recipe.timestep_sampler.as_dict()
    block["params"] = {**block["params"], "fm_ratio": 0.0, "gap_range": None}
    try:
        sampler = registry.TIMESTEP_SAMPLERS.build(block, where="timestep_sampler", device=dev)
    except RecipeError as err:
        raise RecipeError(f"the run's timestep sampler {block['name']!r} does not take fm_ratio "
                          f"and gap_range, which the affinity score needs ({err.message})",
                          path="timestep_sampler") from err
    weighting = None
    if weighted:
        weighting = registry.LOSS_WEIGHTINGS.build(recipe.loss_weighting.as_dict(),
                                                   where="loss_weighting",
                                                   timestep_sampler=sampler)
    bs = batch_size or min(recipe.train.global_batch_size, 256)
    batches = run.get_dataset().batches(bs)
    results = task_affinity(net, objective, batches, sampler, gap_ranges=gap_ranges,
                            num_batches=num_batches, seed=seed, weighting=weighting, device=dev)
    return {"run_dir": run_dir, "checkpoint": run.checkpoint_name, "images": run.images,
            "weights": run.weights, "batch_size": bs, "weighted": weighted, "seed": seed,
            "results": [r.as_dict() for r in results]}
