"""The part every (t, r) sampler shares: the flow-matching ratio and the gap-range control.

A sampler draws a raw pair ``t, r  # [B], r <= t`` (its own distribution), then this base applies
the observation-study controls of mfrecipes/METHOD.md, section 5 (Kim et al., Sec. 4 and App. A):

- ``gap_range = [a, b]``: the raw gap ``dt = t - r`` in [0, 1] is rescaled linearly to
  ``gap = a + (b - a) * dt`` and ``r = t - gap`` (Kim et al. 2025, App. A). The gap must stay
  inside [a, b]: where ``t < gap``, t is redrawn from the sampler's own t law conditioned on
  ``t >= gap`` (our reading; rejection sampling from the same law), never by clipping r to 0,
  which would put 43 % of the [0.5, 0.7] gaps and 80 % of the [0.7, 0.9] gaps below their bin.
  The paper's gap studies also set ``fm_ratio: 0`` (App. A).
- ``fm_ratio``: each sample independently gets ``r = t`` with this probability (a random mask,
  our reading; the official JAX code takes the first indices of the batch). ``1.0`` is pure
  v-learning. The gap range only matters for the ``r != t`` samples.

Randomness comes only from the ``generator`` passed to :meth:`PairSampler.sample` (drawn on the
generator's device, CPU in the training loop, then moved to ``device``), so a run is reproducible.
"""
from __future__ import annotations

import attrs
import torch

from mfrecipes.validate import as_tuple, number

__all__ = ["PairSampler"]


def _check_gap_range(_inst, attribute, value):
    if value is None:
        return
    ok = isinstance(value, tuple) and len(value) == 2
    if ok:
        try:
            number(0.0, 1.0)(None, attribute, value[0])
            number(0.0, 1.0)(None, attribute, value[1])
        except ValueError:
            ok = False
    if not ok or value[0] > value[1]:
        raise ValueError(f"{attribute.name} must be null or [a, b] with 0 <= a <= b <= 1, "
                         f"got {value!r}")


@attrs.frozen(kw_only=True)
class PairSampler:
    """Base of the timestep samplers: ``sample(B, ...) -> (t, r)``, each ``[B]`` float32."""

    fm_ratio: float = attrs.field(default=0.75, validator=number(0.0, 1.0))
    gap_range: tuple[float, float] | None = attrs.field(default=None, converter=as_tuple,
                                                        validator=_check_gap_range)

    # -- what a sampler implements ----------------------------------------------------------------
    def _pair(self, n: int, *, progress: float, generator: torch.Generator | None,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw pair ``t, r  # [n] float32 on device, 0 <= r <= t <= 1``."""
        raise NotImplementedError

    def _v_time(self, t: torch.Tensor, *, progress: float, generator: torch.Generator | None
                ) -> torch.Tensor:
        """t for the samples that get ``r = t`` (``[n]``); by default the pair's own t."""
        return t

    def redraw_t_below(self, t: torch.Tensor, gap: torch.Tensor, *, progress, generator, device,
                      per_round: int = 16, max_rounds: int = 256) -> torch.Tensor:
        """t where ``t >= gap``; elsewhere a fresh t from the pair's law, conditioned on
        ``t >= gap`` by rejection (``per_round`` candidates a row a round)."""
        t = t.clone()
        todo = (t < gap).nonzero().squeeze(1)
        rounds = 0
        while len(todo):
            if rounds == max_rounds:
                worst = float(gap[todo].max())
                raise ValueError(
                    f"gap_range {list(self.gap_range)}: no t >= {worst:.3g} in "
                    f"{per_round * max_rounds} draws of this sampler's t law; its law puts "
                    f"almost no mass there (lower the range or widen the t law)")
            m = len(todo)
            cand, _ = self._pair(m * per_round, progress=progress, generator=generator,
                                 device=device)
            cand = cand.view(m, per_round)
            ok = cand >= gap[todo, None]                     # [m, per_round]
            hit = ok.any(dim=1)
            first = ok.float().argmax(dim=1)                  # first accepted candidate
            t[todo[hit]] = cand[hit, first[hit]]
            todo = todo[~hit]
            rounds += 1
        return t

    # -- the contract -----------------------------------------------------------------------------
    def sample(self, batch_size: int, *, progress: float, generator: torch.Generator | None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``t, r  # [B] float32 on device, 0 <= r <= t <= 1``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
        draw_on = generator.device if generator is not None else torch.device("cpu")
        t, r = self._pair(batch_size, progress=progress, generator=generator, device=draw_on)
        if self.gap_range is not None:
            a, b = self.gap_range
            gap = a + (b - a) * (t - r)
            t = self.redraw_t_below(t, gap, progress=progress, generator=generator, device=draw_on)
            r = (t - gap).clamp_min(0.0)  # only float rounding: t >= gap on every row
        is_v = torch.rand(batch_size, generator=generator, device=draw_on) < self.fm_ratio
        t = torch.where(is_v, self._v_time(t, progress=progress, generator=generator), t)
        r = torch.where(is_v, t, r)
        device = draw_on if device is None else device
        return t.to(device, torch.float32), r.to(device, torch.float32)
