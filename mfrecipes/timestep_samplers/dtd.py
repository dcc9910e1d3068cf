"""DTD: the denoising-task-difficulty curriculum over t (Kim, Go, Kwon, Kim, ICLR 2025).

Confirmed from the DTD paper: t is split into N clusters ``C_1 .. C_N``, ``C_N`` the easiest
(most noise, t near 1) and ``C_1`` the hardest (t near 0). Training starts on ``C_N`` and
accumulates harder clusters: stage n samples the union of the n easiest clusters,
``[edges[N - n], 1]``. Pacing is adaptive: the next cluster opens when the training loss has not
improved for ``patience`` observations; once all clusters are open, t covers the whole range.
Kim et al. 2025 (Sec. 5, Eq. 9) use it as the t law of the improved objective, written
``t ~ p_acc(t)`` for the whole expectation.

What the curriculum watches (Kim et al. 2025 do not say; our reading): a loss that falls as the
model learns, the UNWEIGHTED error of the ``r = t`` rows (mean of ``err`` over those rows, before
any loss weighting), averaged across ranks; the training loop feeds it through :meth:`observe`.
The weighted loss would not do: with adaptive weighting ``w * err = err / (err + c) ~ 1`` for every
sample, so it stays flat and a cluster would open every ``patience`` steps whatever the model
learns (a timer, not a curriculum).

Our reading, where neither the DTD paper nor Kim et al. 2025 say:

- Clusters are equal intervals of t (``clustering: uniform_t``), or equal steps of log-SNR with
  ``SNR = ((1 - t) / t)^2`` over ``t in [t_min, 1 - t_min]`` (``log_snr``; the outer edges are
  then moved to 0 and 1). t is uniform over the open clusters.
- ``num_clusters = 5``, ``patience = 500`` observations (the loop observes once per step),
  ``loss_ema = 0.99``, ``min_improvement = 1e-3`` (relative), ``curriculum_end = 0.5``.
- The loss is tracked as an EMA, ``ema <- loss_ema * ema + (1 - loss_ema) * loss``; an
  observation improves when ``ema < best * (1 - min_improvement)``. Opening a cluster resets the
  patience counter and the best (the EMA is kept).
- ``pacing: fixed`` is the deterministic alternative: stage n + 1 opens at progress
  ``stage_fractions[n - 1]`` (default evenly spaced, the last at ``curriculum_end``). With either
  pacing every cluster is open from ``curriculum_end`` on.
- ``after``: the v branch's t law once every cluster is open. ``uniform`` (default) is DTD's own
  rule, t uniform over the union of all clusters, [0, 1]; ``base`` returns to the pair's
  logit-normal t law, the recipe's law without a curriculum.
- Which samples: Kim et al. 2025, Eq. 9, draws t from ``p_acc`` for the whole expectation; we apply
  the curriculum to the v branch (the ``r = t`` samples) by default, so the ``r != t`` samples keep
  the logit-normal pair (two draws of ``LN(mu, sigma)``, t = max, r = min) and their law does not
  change over training. ``apply_to: all`` also draws the t of the ``r != t`` samples from the
  curriculum and keeps the pair's gap: ``r = max(t - (t_pair - r_pair), 0)``.

The curriculum state (stage, best, patience counter, EMA) is the only mutable part; it lives in a
small object and round-trips through :meth:`DTD.state_dict` / :meth:`DTD.load_state_dict`.
"""
from __future__ import annotations

import math

import attrs
import torch

from mfrecipes.errors import CheckpointError
from mfrecipes.registry import TIMESTEP_SAMPLERS
from mfrecipes.timestep_samplers.base import PairSampler
from mfrecipes.validate import as_tuple, integer, number, one_of
from mfrecipes.timestep_samplers.logit_normal import logit_normal

__all__ = ["DTD", "cluster_edges"]


def cluster_edges(num_clusters: int, clustering: str, t_min: float = 1e-3) -> tuple[float, ...]:
    """Cluster boundaries in t, ``[N + 1]``, 0 to 1; ``C_k = [edges[k - 1], edges[k]]``."""
    n = num_clusters
    if clustering == "uniform_t":
        return tuple(k / n for k in range(n + 1))
    # Equal steps of log SNR(t) = 2 log((1 - t) / t) over [t_min, 1 - t_min];
    # t = sigmoid(-logsnr / 2).
    top = 2.0 * math.log((1.0 - t_min) / t_min)
    inner = tuple(1.0 / (1.0 + math.exp((top - 2.0 * top * k / n) / 2.0)) for k in range(1, n))
    return (0.0, *inner, 1.0)


@attrs.define
class _CurriculumState:
    stage: int = 1
    best: float | None = None
    counter: int = 0
    ema: float | None = None


def _check_fractions(_inst, attribute, value):
    if value is None:
        return
    if not isinstance(value, tuple):
        raise ValueError(f"{attribute.name} must be null or a list of progress fractions, "
                         f"got {value!r}")
    for v in value:
        number(0.0, 1.0)(None, attribute, v)


@TIMESTEP_SAMPLERS.register("dtd")
@attrs.frozen(kw_only=True)
class DTD(PairSampler):
    """DTD curriculum for the v branch's t (easy, noisy clusters first), logit-normal pairs else."""

    num_clusters: int = attrs.field(default=5, validator=integer(1, 1000))
    clustering: str = attrs.field(default="uniform_t", validator=one_of("uniform_t", "log_snr"))
    t_min: float = attrs.field(default=1e-3, validator=number(0.0, 0.5, lo_open=True,
                                                              hi_open=True))
    pacing: str = attrs.field(default="adaptive", validator=one_of("adaptive", "fixed"))
    patience: int = attrs.field(default=500, validator=integer(1, 10**9))
    loss_ema: float = attrs.field(default=0.99, validator=number(0.0, 1.0, hi_open=True))
    min_improvement: float = attrs.field(default=1e-3, validator=number(0.0, 1.0, hi_open=True))
    stage_fractions: tuple[float, ...] | None = attrs.field(default=None, converter=as_tuple,
                                                            validator=_check_fractions)
    curriculum_end: float = attrs.field(default=0.5, validator=number(0.0, 1.0, lo_open=True))
    apply_to: str = attrs.field(default="v", validator=one_of("v", "all"))
    after: str = attrs.field(default="uniform", validator=one_of("uniform", "base"))
    mu: float = attrs.field(default=-0.4, validator=number())
    sigma: float = attrs.field(default=1.0, validator=number(0.0, lo_open=True))

    edges: tuple[float, ...] = attrs.field(init=False, repr=False)  # [N + 1], 0 .. 1
    opens_at: tuple[float, ...] = attrs.field(init=False, repr=False)  # [N - 1], stages 2..N
    _state: _CurriculumState = attrs.field(init=False, factory=_CurriculumState, repr=False,
                                           eq=False)

    def __attrs_post_init__(self):
        n = self.num_clusters
        if self.stage_fractions is None:
            opens = tuple(self.curriculum_end * k / (n - 1) for k in range(1, n))
        else:
            opens = self.stage_fractions
            if len(opens) != n - 1:
                raise ValueError(f"stage_fractions must list the progress at which stages 2..N "
                                 f"open: {n - 1} values for num_clusters={n}, got {len(opens)}")
            if any(b < a for a, b in zip(opens, opens[1:])) or (opens and opens[-1] >
                                                                 self.curriculum_end):
                raise ValueError(f"stage_fractions must be non-decreasing and <= curriculum_end="
                                 f"{self.curriculum_end}, got {list(opens)}")
        object.__setattr__(self, "opens_at", tuple(float(f) for f in opens))
        object.__setattr__(self, "edges", cluster_edges(n, self.clustering, self.t_min))

    # -- curriculum -------------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        """Number of open clusters after the last observation (1 .. num_clusters)."""
        return self._state.stage

    def stage_at(self, progress: float) -> int:
        """The stage sampled at ``progress``: the state's, or later if the schedule says so."""
        n = self.num_clusters
        if progress >= self.curriculum_end:
            scheduled = n
        elif self.pacing == "fixed":
            scheduled = 1 + sum(progress >= f for f in self.opens_at)
        else:
            scheduled = 1
        return max(self._state.stage, scheduled)

    def lowest_open_t(self, stage: int) -> float:
        """Lower end of the union of the ``stage`` easiest clusters (whose upper end is 1)."""
        return self.edges[self.num_clusters - stage]

    def observe(self, loss: float, progress: float) -> None:
        """Loss feedback, called every step with the unweighted error of the ``r = t`` rows: update
        the EMA and, if adaptive, open a cluster when the EMA has not improved by
        ``min_improvement`` for ``patience`` observations."""
        loss = float(loss)
        if not math.isfinite(loss):
            return  # a non-finite step is the loop's business, not evidence of a plateau
        st = self._state
        st.ema = loss if st.ema is None else self.loss_ema * st.ema + (1.0 - self.loss_ema) * loss
        st.stage = self.stage_at(progress)
        if self.pacing != "adaptive" or st.stage >= self.num_clusters:
            return
        if st.best is None or st.ema < st.best - self.min_improvement * abs(st.best):
            st.best, st.counter = st.ema, 0
            return
        st.counter += 1
        if st.counter >= self.patience:
            st.stage, st.counter, st.best = st.stage + 1, 0, None

    def state_dict(self) -> dict:
        st = self._state
        return {"stage": st.stage, "best": st.best, "counter": st.counter, "ema": st.ema}

    def load_state_dict(self, state: dict) -> None:
        keys = {"stage", "best", "counter", "ema"}
        if not isinstance(state, dict) or set(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"DTD sampler state must have keys {sorted(keys)}, got {got}")
        stage = state["stage"]
        if not isinstance(stage, int) or not 1 <= stage <= self.num_clusters:
            raise CheckpointError(f"DTD sampler state has stage {stage!r}, but this recipe has "
                                  f"num_clusters={self.num_clusters} "
                                  f"(valid: 1..{self.num_clusters})")
        opt = (lambda v: None if v is None else float(v))
        self._state.stage, self._state.counter = stage, int(state["counter"])
        self._state.best, self._state.ema = opt(state["best"]), opt(state["ema"])

    def describe(self) -> dict:
        """The curriculum state, for logging (keys with no value yet are left out)."""
        st = self._state
        out = {"stage": st.stage, "num_clusters": self.num_clusters,
               "lowest_open_t": self.lowest_open_t(st.stage), "patience_counter": st.counter}
        if st.ema is not None:
            out["watched_loss_ema"] = st.ema
        if st.best is not None:
            out["best_ema_loss"] = st.best
        return out

    # -- sampling ---------------------------------------------------------------------------------
    def _curriculum_t(self, n, *, progress, generator, device):
        lo = self.lowest_open_t(self.stage_at(progress))
        # p_acc(t): uniform over the open clusters, i.e. over [lo, 1] (DTD, our reading).
        return lo + (1.0 - lo) * torch.rand(n, generator=generator, device=device)

    def _pair(self, n, *, progress, generator, device):
        a = logit_normal(n, self.mu, self.sigma, generator=generator, device=device)
        b = logit_normal(n, self.mu, self.sigma, generator=generator, device=device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        if self.apply_to == "all" and not self._finished(progress):
            t_acc = self._curriculum_t(n, progress=progress, generator=generator, device=device)
            t, r = t_acc, (t_acc - (t - r)).clamp_min(0.0)
        return t, r

    def _finished(self, progress) -> bool:
        return self.after == "base" and self.stage_at(progress) >= self.num_clusters

    def _v_time(self, t, *, progress, generator):
        if self.apply_to == "all" or self._finished(progress):
            return t
        return self._curriculum_t(t.shape[0], progress=progress, generator=generator,
                                  device=t.device)
