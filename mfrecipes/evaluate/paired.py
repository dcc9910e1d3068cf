"""Paired analysis of arms against a baseline, and the controls gate of a test-bed study.

Runs of the same seed that differ in one component share their random streams (data order,
noise, (t, r), masks), so the difference between two arms *per seed* is far less noisy than the
difference between two unpaired means. This module reads each run's curve of one metric and
reports, for every arm against a named baseline:

- the **primary figure** of a run: the mean of ``log(metric)`` over the evaluations in the second
  half of its training (``images > train.total_images / 2``), a curve average rather than one
  snapshot; a metric with a value <= 0 is averaged as it is (``scale = "linear"``);
- per seed, the difference arm - baseline of that figure; its mean, a 95 % confidence interval
  ``mean +- t_{0.975, n-1} sd / sqrt(n)`` (sd the sample standard deviation of the n paired
  differences) and the minimum detectable effect at 80 % power, two-sided alpha 0.05,
  ``(t_{0.975, n-1} + t_{0.80, n-1}) sd / sqrt(n)``; differences of logs are also given as
  percentages ``exp(d) - 1``;
- beside it the final value, and **images to baseline quality**: the images at which the arm's
  curve (log-linear between evaluations) first reaches the baseline's final value of the same
  seed, and the speed-up ``baseline images / those images`` per seed and as a geometric mean
  ("not reached" when the arm never gets there).

``controls`` runs the gate a study must pass before any of its claims is read: an A/A pair (an
irrelevant change) must show no difference, a baseline with more images must be detected as
better and a deliberately broken arm as worse, each with at least two paired seeds.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import statistics
from typing import Optional, Sequence

import attrs

from mfrecipes.errors import RecipeError

__all__ = ["PRIMARY_METRIC", "primary_figure", "images_to_reach", "paired_stats", "PairedStats",
           "ArmResult", "PairedAnalysis", "paired_analysis", "arm_name", "group_by_arm",
           "Control", "ControlsVerdict", "controls", "CONTROL_EXPECT"]

PRIMARY_METRIC = "eval/exact/map1"
ALPHA = 0.05
POWER = 0.80
#: what each control must show against the baseline
CONTROL_EXPECT = {"aa": "none", "more_images": "better", "broken": "worse"}
_SEED_SUFFIX = re.compile(r"[-_]s(\d+)$")


# ----------------------------------------------------------------------------- per-run figures
def _second_half(points: Sequence[tuple[int, float]], total_images: Optional[int]):
    if not points:
        return []
    total = total_images if total_images else points[-1][0]
    return [(i, v) for i, v in points if i > total / 2]


def primary_figure(points: Sequence[tuple[int, float]], total_images: Optional[int], *,
                   scale: str = "log") -> Optional[float]:
    """Mean of ``log(v)`` (``scale="log"``) or ``v`` over the evaluations after half of
    ``total_images`` (the last logged images when None); None when there is none."""
    half = _second_half(points, total_images)
    if not half:
        return None
    vals = [math.log(v) if scale == "log" else v for _, v in half]
    return statistics.fmean(vals)


def images_to_reach(points: Sequence[tuple[int, float]], target: float, *, lower: bool = True,
                    log: bool = True) -> Optional[float]:
    """The images at which the curve first reaches ``target``, interpolated linearly in
    ``log(value)`` (``log=False``: in the value) between consecutive evaluations; the first
    evaluation's images if it already does; None if the curve never does."""
    def reached(v):
        return v <= target if lower else v >= target

    f = math.log if log else (lambda x: x)
    prev = None
    for images, v in points:
        if reached(v):
            if prev is None:
                return float(images)
            i0, v0 = prev
            a, b, c = f(v0), f(v), f(target)
            frac = (c - a) / (b - a) if b != a else 1.0
            return i0 + min(max(frac, 0.0), 1.0) * (images - i0)
        prev = (images, v)
    return None


# ----------------------------------------------------------------------------- statistics
@attrs.frozen
class PairedStats:
    """Summary of paired differences ``d`` (n values)."""

    n: int
    mean: Optional[float]
    sd: Optional[float]
    ci: Optional[tuple[float, float]]
    mde: Optional[float]


def _t(q: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, dof))


def paired_stats(diffs: Sequence[float], *, alpha: float = ALPHA,
                 power: float = POWER) -> PairedStats:
    """Mean, sample sd, the (1 - alpha) t interval and the minimum detectable effect at
    ``power`` (two-sided alpha) of paired differences; no interval below two pairs."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        return PairedStats(0, None, None, None, None)
    mean = statistics.fmean(d)
    if n < 2:
        return PairedStats(n, mean, None, None, None)
    sd = statistics.stdev(d)
    se = sd / math.sqrt(n)
    t_a = _t(1 - alpha / 2, n - 1)
    return PairedStats(n, mean, sd, (mean - t_a * se, mean + t_a * se),
                       (t_a + _t(power, n - 1)) * se)


def _pct(d: Optional[float]) -> Optional[float]:
    return None if d is None else 100.0 * math.expm1(d)


# ----------------------------------------------------------------------------- runs and arms
def arm_name(run_dir: str) -> str:
    """The folder name without its seed suffix: ``.../dtd_beta-s3`` -> ``dtd_beta``."""
    return _SEED_SUFFIX.sub("", os.path.basename(os.path.normpath(run_dir)))


@attrs.frozen
class _Run:
    run_dir: str
    seed: int
    total_images: Optional[int]
    points: tuple


def _load(run_dir: str, metric: str) -> _Run:
    from mfrecipes.evaluate.compare import load_run_curve

    curve = load_run_curve(run_dir, metric)
    seed = curve.recipe.get("run.seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        m = _SEED_SUFFIX.search(os.path.basename(os.path.normpath(run_dir)))
        if m is None:
            raise RecipeError(f"{run_dir!r}: no integer run.seed in its resolved recipe and no "
                              "-s<seed> suffix in its name; runs are paired by seed")
        seed = int(m.group(1))
    total = curve.recipe.get("train.total_images")
    total = int(total) if isinstance(total, (int, float)) and not isinstance(total, bool) \
        else None
    return _Run(run_dir, seed, total, curve.points)


def group_by_arm(run_dirs: Sequence[str]) -> dict[str, list[str]]:
    """``{arm name: [run dirs]}`` in first-seen order (see :func:`arm_name`)."""
    out: dict[str, list[str]] = {}
    for d in run_dirs:
        out.setdefault(arm_name(d), []).append(d)
    return out


@attrs.frozen
class ArmResult:
    """One arm against the baseline: per-seed rows and the summaries."""

    arm: str
    seeds: tuple[int, ...]                 # seeds both arms have (paired)
    diffs: tuple[float, ...]               # primary(arm) - primary(baseline), per paired seed
    stats: PairedStats
    final_mean: Optional[float]            # the arm's final value, mean over its paired seeds
    final_diffs: tuple[float, ...]         # log final(arm) - log final(baseline) (or linear)
    reach: tuple[Optional[float], ...]     # images to the baseline's final value, per seed
    speedup: tuple[Optional[float], ...]   # baseline images / reach, per seed
    unpaired: tuple[str, ...] = ()         # run dirs of seeds the other side lacks
    # reached at its first evaluation: the images are an upper bound, the speed-up a lower one
    at_first: tuple[bool, ...] = ()

    @property
    def speedup_geomean(self) -> Optional[float]:
        ok = [s for s in self.speedup if s is not None and s > 0]
        if not ok or len(ok) != len(self.speedup):
            return None
        return math.exp(statistics.fmean(math.log(s) for s in ok))

    def speedup_text(self) -> tuple[str, str]:
        """(geometric mean, per seed) as text; ``>=`` where a seed reached the baseline's final
        value at its first evaluation (a lower bound)."""
        bound = any(self.at_first)
        g = self.speedup_geomean
        geo = "not reached" if g is None else f"{'>=' if bound else ''}{g:.3g}x"
        first = self.at_first or (False,) * len(self.speedup)
        per = ", ".join("not reached" if s is None else f"{'>=' if f else ''}{s:.3g}x"
                        for s, f in zip(self.speedup, first))
        return geo, per or "n/a"

    @property
    def reached(self) -> str:
        return f"{sum(r is not None for r in self.reach)}/{len(self.reach)}"


def verdict(stats: PairedStats, lower: bool) -> str:
    """``better`` / ``worse``: the interval lies wholly on one side of 0; ``no difference
    detected``: it contains 0; ``cannot judge``: fewer than two pairs."""
    if stats.ci is None:
        return "cannot judge"
    lo, hi = stats.ci
    if hi < 0:
        return "better" if lower else "worse"
    if lo > 0:
        return "worse" if lower else "better"
    return "no difference detected"


@attrs.frozen
class PairedAnalysis:
    metric: str
    lower: bool
    scale: str                            # "log" or "linear"
    baseline: str
    arms: tuple[ArmResult, ...]
    baseline_final: Optional[float]

    def arm(self, name: str) -> ArmResult:
        for a in self.arms:
            if a.arm == name:
                return a
        raise KeyError(name)

    def _fmt_d(self, d: Optional[float]) -> str:
        if d is None:
            return "n/a"
        if self.scale == "log":
            return f"{d:+.4f} ({_pct(d):+.1f} %)"
        return f"{d:+.4g}"

    def _fmt_ci(self, ci) -> str:
        if ci is None:
            return "n/a (needs 2 seeds)"
        lo, hi = ci
        if self.scale == "log":
            return f"[{lo:+.4f}, {hi:+.4f}] ([{_pct(lo):+.1f}, {_pct(hi):+.1f}] %)"
        return f"[{lo:+.4g}, {hi:+.4g}]"

    def _fmt_mde(self, mde) -> str:
        if mde is None:
            return "n/a"
        return f"{mde:.4f} ({100 * math.expm1(mde):.1f} %)" if self.scale == "log" \
            else f"{mde:.4g}"

    def rows(self) -> list[dict]:
        out = []
        for a in self.arms:
            final_d = paired_stats(a.final_diffs).mean if a.final_diffs else None
            g = a.speedup_geomean
            out.append({
                "arm": a.arm, "n": a.stats.n, "seeds": ",".join(map(str, a.seeds)),
                "diff": a.stats.mean, "ci_low": a.stats.ci[0] if a.stats.ci else None,
                "ci_high": a.stats.ci[1] if a.stats.ci else None, "sd": a.stats.sd,
                "mde": a.stats.mde, "verdict": verdict(a.stats, self.lower),
                "diff_pct": _pct(a.stats.mean) if self.scale == "log" else None,
                "final": a.final_mean, "final_diff": final_d,
                "reached": a.reached, "speedup_geomean": g,
                "speedup_lower_bound": any(a.at_first),
                "speedup_per_seed": ";".join("not reached" if s is None else f"{s:.6g}"
                                             for s in a.speedup)})
        return out

    def markdown(self, *, claims: bool = True) -> str:
        what = f"mean of log({self.metric})" if self.scale == "log" else f"mean of {self.metric}"
        lines = [f"Paired against `{self.baseline}` on {what} over the second half of each "
                 f"run ({'lower' if self.lower else 'higher'} is better); 95 % t interval, "
                 "MDE at 80 % power.", ""]
        if not claims:
            lines.append("_No claims: the controls did not pass (see above)._")
            return "\n".join(lines) + "\n"
        lines += ["| arm | seeds | difference | 95 % CI | MDE | verdict | final | "
                  "final diff | reached base final | speed-up (geo. mean) | per seed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for a, r in zip(self.arms, self.rows()):
            g, per = a.speedup_text()
            lines.append(
                f"| {a.arm} | {r['seeds']} | {self._fmt_d(a.stats.mean)} | "
                f"{self._fmt_ci(a.stats.ci)} | {self._fmt_mde(a.stats.mde)} | {r['verdict']} | "
                f"{'' if a.final_mean is None else f'{a.final_mean:.4g}'} | "
                f"{self._fmt_d(r['final_diff'])} | {a.reached} | {g} | {per} |")
        unpaired = [d for a in self.arms for d in a.unpaired]
        if unpaired:
            lines += ["", "Left out (no run of the same seed on the other side): "
                      + ", ".join(os.path.basename(d) for d in unpaired)]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        rows = self.rows()
        buf = io.StringIO()
        cols = ["arm", "n", "seeds", "diff", "diff_pct", "ci_low", "ci_high", "sd", "mde",
                "verdict", "final", "final_diff", "reached", "speedup_geomean",
                "speedup_lower_bound", "speedup_per_seed"]
        w = csv.DictWriter(buf, fieldnames=["metric", "baseline", *cols])
        w.writeheader()
        for r in rows:
            w.writerow({"metric": self.metric, "baseline": self.baseline,
                        **{c: ("" if r[c] is None else r[c]) for c in cols}})
        return buf.getvalue()

    def plot(self, path: str, *, title: Optional[str] = None) -> str:
        """Each arm's mean difference with its 95 % interval as the error bar, one row per arm
        (arm names on the axis), a zero line; percentages on a log figure."""
        from mfrecipes.plots import _new_figure, _save_figure

        arms = [a for a in self.arms if a.stats.mean is not None]
        fig = _new_figure((7.0, 0.55 * max(len(arms), 1) + 1.6))
        ax = fig.add_subplot(1, 1, 1)
        conv = (lambda d: _pct(d)) if self.scale == "log" else (lambda d: d)
        for y, a in enumerate(arms):
            m = conv(a.stats.mean)
            if a.stats.ci is not None:
                lo, hi = (conv(c) for c in a.stats.ci)
                ax.errorbar([m], [y], xerr=[[m - lo], [hi - m]], fmt="o", color="C0",
                            ecolor="C0", capsize=4)
            else:
                ax.plot([m], [y], "o", color="C7")
        ax.axvline(0.0, color="0.4", lw=0.8, ls="--")
        ax.set_yticks(range(len(arms)))
        ax.set_yticklabels([a.arm for a in arms])
        ax.set_ylim(-0.6, len(arms) - 0.4)
        ax.invert_yaxis()
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        unit = " (%)" if self.scale == "log" else ""
        ax.set_xlabel(f"{self.metric}: arm - {self.baseline}{unit}, mean over paired seeds "
                      "and 95 % CI")
        ax.set_title(title or f"paired against {self.baseline}")
        ax.grid(axis="x", alpha=0.3)
        return str(_save_figure(fig, path))


def _scale(runs: Sequence[_Run], scale: str) -> str:
    if scale not in ("auto", "log", "linear"):
        raise RecipeError(f"scale must be auto, log or linear, got {scale!r}", path="--scale")
    positive = all(v > 0 for r in runs for _, v in r.points)
    if scale == "log" and not positive:
        raise RecipeError("log scale needs every value of the metric > 0", path="--scale")
    return scale if scale != "auto" else ("log" if positive else "linear")


def paired_analysis(arms: dict[str, Sequence[str]], baseline: str, metric: str, *,
                    direction: str = "auto", scale: str = "auto") -> PairedAnalysis:
    """Every arm of ``arms`` (``{name: run dirs}``) paired by seed with ``arms[baseline]``."""
    from mfrecipes.evaluate.compare import lower_is_better

    if baseline not in arms:
        raise RecipeError(f"baseline {baseline!r} is not one of the arms: "
                          + ", ".join(sorted(arms)), path="--baseline")
    lower = lower_is_better(metric, direction)
    loaded = {name: [_load(d, metric) for d in dirs] for name, dirs in arms.items()}
    for name, runs in loaded.items():
        seeds = [r.seed for r in runs]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            raise RecipeError(f"arm {name!r} has more than one run of seed(s) {dup}: "
                              + ", ".join(r.run_dir for r in runs if r.seed in dup))
    every = [r for runs in loaded.values() for r in runs]
    if not any(r.points for r in every):
        raise RecipeError(f"no run has metric {metric!r} in metrics.jsonl or eval.jsonl",
                          path="--metric")
    sc = _scale([r for r in every if r.points], scale)
    f = math.log if sc == "log" else (lambda x: x)
    base = {r.seed: r for r in loaded[baseline] if r.points}
    base_fig = {s: primary_figure(r.points, r.total_images, scale=sc) for s, r in base.items()}
    results = []
    for name, runs in loaded.items():
        if name == baseline:
            continue
        seeds, diffs, finals, fdiffs, reach, speed, unpaired, first = [], [], [], [], [], [], \
            [], []
        for r in sorted(runs, key=lambda r: r.seed):
            b = base.get(r.seed)
            fig = primary_figure(r.points, r.total_images, scale=sc) if r.points else None
            if b is None or fig is None or base_fig.get(r.seed) is None:
                unpaired.append(r.run_dir)
                continue
            seeds.append(r.seed)
            diffs.append(fig - base_fig[r.seed])
            b_images, b_final = b.points[-1]
            finals.append(r.points[-1][1])
            fdiffs.append(f(r.points[-1][1]) - f(b_final))
            at = images_to_reach(r.points, b_final, lower=lower, log=sc == "log")
            reach.append(at)
            first.append(at is not None and at == r.points[0][0])
            speed.append(None if at is None or at <= 0 else b_images / at)
        results.append(ArmResult(name, tuple(seeds), tuple(diffs), paired_stats(diffs),
                                 statistics.fmean(finals) if finals else None, tuple(fdiffs),
                                 tuple(reach), tuple(speed), tuple(unpaired), tuple(first)))
    b_finals = [r.points[-1][1] for r in base.values()]
    return PairedAnalysis(metric, lower, sc, baseline, tuple(results),
                          statistics.fmean(b_finals) if b_finals else None)


# ----------------------------------------------------------------------------- controls gate
@attrs.frozen
class Control:
    name: str
    expect: str                      # "none", "better" or "worse"
    result: Optional[ArmResult]      # None: the control's runs are missing
    verdict: str
    passed: bool
    why: str


@attrs.frozen
class ControlsVerdict:
    metric: str
    controls: tuple[Control, ...]
    analysis: Optional[PairedAnalysis]

    @property
    def passed(self) -> bool:
        return bool(self.controls) and all(c.passed for c in self.controls)

    @property
    def mde(self) -> Optional[float]:
        """The A/A pair's minimum detectable effect (the test bed's for this n)."""
        aa = next((c for c in self.controls if c.name == "aa"), None)
        return aa.result.stats.mde if aa is not None and aa.result is not None else None

    def markdown(self) -> str:
        lines = ["## Controls", ""]
        if self.passed:
            lines.append("**The controls pass**: the test bed can judge claims at this n.")
        else:
            lines.append("**The test bed cannot judge**: a control failed or has fewer than 2 "
                         "paired seeds, so no claim of this study is printed.")
        lines += ["", "| control | expected | seeds | difference | 95 % CI | MDE | verdict | "
                  "pass | per seed | final value: difference, 95 % CI (not judged) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        a = self.analysis
        for c in self.controls:
            exp = {"none": "no difference", "better": "better", "worse": "worse"}[c.expect]
            if c.result is None or a is None:
                lines.append(f"| {c.name} | {exp} | - | - | - | - | {c.verdict} | no: {c.why} "
                             "| - | - |")
                continue
            st, fin = c.result.stats, paired_stats(c.result.final_diffs)
            lines.append(f"| {c.name} | {exp} | {','.join(map(str, c.result.seeds)) or '-'} | "
                         f"{a._fmt_d(st.mean)} | {a._fmt_ci(st.ci)} | {a._fmt_mde(st.mde)} | "
                         f"{c.verdict} | {'yes' if c.passed else 'no: ' + c.why} | "
                         f"{', '.join(f'{d:+.3f}' for d in c.result.diffs)} | "
                         f"{a._fmt_d(fin.mean)} {a._fmt_ci(fin.ci)} |")
        lines += ["", "The gate judges the primary figure (the second-half mean); the per-seed "
                  "differences are of that figure, and the final value's paired difference is "
                  "shown beside it for reading, not judged."]
        if self.mde is not None and a is not None:
            lines += ["", f"Minimum detectable effect of the A/A pair (80 % power, alpha 0.05): "
                      f"{a._fmt_mde(self.mde)}."]
        return "\n".join(lines) + "\n"


def controls(baseline: Sequence[str], aa: Sequence[str], more_images: Sequence[str],
             broken: Sequence[str], metric: str = PRIMARY_METRIC, *,
             direction: str = "auto") -> ControlsVerdict:
    """The gate: ``aa`` must show no difference (CI contains 0), ``more_images`` must be
    better (CI wholly on the better side), ``broken`` worse; each with >= 2 paired seeds."""
    arms = {"baseline": list(baseline), "aa": list(aa), "more_images": list(more_images),
            "broken": list(broken)}
    present = {k: v for k, v in arms.items() if v}
    analysis = None
    if present.get("baseline") and len(present) > 1:
        try:
            analysis = paired_analysis(present, "baseline", metric, direction=direction)
        except RecipeError as err:
            why = str(err)
            return ControlsVerdict(metric, tuple(
                Control(n, e, None, "cannot judge", False, why)
                for n, e in CONTROL_EXPECT.items()), None)
    out = []
    for name, expect in CONTROL_EXPECT.items():
        res = None
        if analysis is not None and name in present:
            res = analysis.arm(name)
        if res is None:
            why = "no baseline runs" if not arms["baseline"] else f"no {name} runs"
            out.append(Control(name, expect, None, "cannot judge", False, why))
            continue
        v = verdict(res.stats, analysis.lower)
        if res.stats.n < 2:
            out.append(Control(name, expect, res, v, False,
                               f"{res.stats.n} paired seed(s), needs 2"))
            continue
        want = {"none": "no difference detected", "better": "better", "worse": "worse"}[expect]
        out.append(Control(name, expect, res, v, v == want,
                           "" if v == want else f"expected {want}, got {v}"))
    return ControlsVerdict(metric, tuple(out), analysis)
