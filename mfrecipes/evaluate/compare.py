"""Compare runs: the recipe keys that differ, final and best figures, images to a threshold, curves.

A run is a directory with ``recipe.resolved.yaml`` and ``metrics.jsonl`` (records from
``eval.jsonl`` of the same checkpoint images are added where metrics.jsonl lacks the metric).
With ``group_seeds``, runs whose resolved recipes differ only in ``run.seed``, ``run.name`` or
``run.out_dir`` form one row, with mean +- std (sample std, ddof = 1) over the seeds.

Direction: lower is better for metrics with a path segment named like ``fd``, ``swd``, ``fid``,
``loss``, ``err`` or ``map`` (the one-step map error of the exact metrics)
(``direction="auto"``); ``"higher"`` flips best and threshold.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
from typing import Any, Optional, Sequence

import attrs

from mfrecipes.errors import RecipeError
from mfrecipes.run.layout import EVAL, METRICS, RESOLVED, read_jsonl

__all__ = ["RunCurve", "load_run_curve", "flatten", "differing_keys", "compare",
           "Comparison", "lower_is_better", "images_to_threshold", "SEED_KEYS"]

SEED_KEYS = ("run.seed", "run.name", "run.out_dir")
_LOWER = ("fd", "swd", "fid", "loss", "err", "map")


def lower_is_better(metric: str, direction: str = "auto") -> bool:
    if direction == "lower":
        return True
    if direction == "higher":
        return False
    if direction != "auto":
        raise RecipeError(f"direction must be auto, lower or higher, got {direction!r}",
                          path="--direction")
    # every segment counts: eval/exact/u_err/g0.00-0.25 is an error per gap bin
    return any(seg.startswith(p) or seg.endswith(p)
               for seg in metric.lower().split("/") for p in _LOWER)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (shown as JSON); an empty
    mapping sets nothing, so it leaves no key (``params: {}`` next to ``params.k: 1`` would
    otherwise show up as a difference of its own)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


@attrs.frozen
class RunCurve:
    """One run: its flattened recipe and the metric's ``(images, value)`` points, in order."""

    run_dir: str
    recipe: dict = attrs.field(repr=False)
    points: tuple[tuple[int, float], ...]


def _with_defaults(resolved: dict) -> dict:
    """The resolved recipe with every key the schema knows filled in, so a run recorded before
    a key existed compares equal to one that has the key at its default (not a difference, and
    seeds still group). Component params are the components' own and stay as recorded. A recipe
    this version cannot read is compared as written."""
    from mfrecipes.recipe.schema import Recipe

    try:
        return Recipe.from_dict(resolved).to_dict()
    except Exception:  # noqa: BLE001  (an older or newer schema: compare the raw mapping)
        return resolved


def load_run_curve(run_dir: str, metric: str) -> RunCurve:
    from mfrecipes.recipe.load import read_yaml

    path = os.path.join(run_dir, RESOLVED)
    if not os.path.isfile(path):
        raise RecipeError(f"{run_dir!r} is not a run directory (no {RESOLVED})")
    recipe = flatten(_with_defaults(read_yaml(path)))
    pts: dict[int, float] = {}
    for source in (EVAL, METRICS):   # metrics.jsonl wins on equal images
        for rec in read_jsonl(os.path.join(run_dir, source)):
            v = rec.get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                    and "images" in rec:
                pts[int(rec["images"])] = float(v)
    return RunCurve(run_dir, recipe, tuple(sorted(pts.items())))


def images_to_threshold(points: Sequence[tuple[int, float]], threshold: Optional[float], *,
                        lower: bool = True) -> Optional[int]:
    """The first image count whose value reaches ``threshold`` (None: never or no threshold)."""
    if threshold is None:
        return None
    for images, v in points:
        if (v <= threshold) if lower else (v >= threshold):
            return images
    return None


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return "null" if v is None else str(v)


def differing_keys(recipes: Sequence[dict], *, ignore: Sequence[str] = ()) -> list[str]:
    keys = sorted(set().union(*recipes)) if recipes else []
    return [k for k in keys if k not in ignore
            and len({_show(r.get(k, "<unset>")) for r in recipes}) > 1]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


@attrs.frozen
class Comparison:
    """Rows (one per run or seed group) with the differing keys and the figures; writers."""

    metric: str
    lower: bool
    threshold: Optional[float]
    keys: tuple[str, ...]
    rows: tuple[dict, ...] = attrs.field(repr=False)
    curves: tuple[tuple[str, tuple, tuple], ...] = attrs.field(repr=False)
    # per curve: the standard deviation over seeds at each point (None: a single run)
    spreads: tuple = attrs.field(default=(), repr=False)

    @property
    def columns(self) -> list[str]:
        cols = ["run", *self.keys, "seeds", "final", "best", "images_final"]
        if self.threshold is not None:
            cols.append(f"images_to_{self.threshold:g}")
        return cols

    def cell(self, row: dict, col: str) -> str:
        v = row.get(col)
        if isinstance(v, tuple):           # (mean, std) over seeds
            return f"{v[0]:.4g} ± {v[1]:.2g}" if v[1] else f"{v[0]:.4g}"
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    def markdown(self) -> str:
        cols = self.columns
        lines = [f"Metric `{self.metric}` ({'lower' if self.lower else 'higher'} is better)", "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in self.rows:
            lines.append("| " + " | ".join(self.cell(row, c).replace("|", "\\|")
                                           for c in cols) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        cols = self.columns
        header = []
        for c in cols:
            header += [c, f"{c}_std"] if any(isinstance(r.get(c), tuple) for r in self.rows) \
                else [c]
        w.writerow(header)
        for row in self.rows:
            out = []
            for c in cols:
                v = row.get(c)
                if any(isinstance(r.get(c), tuple) for r in self.rows):
                    out += list(v) if isinstance(v, tuple) else [v, ""]
                else:
                    out.append("" if v is None else v)
            w.writerow(out)
        return buf.getvalue()

    def rich_table(self):
        from rich.table import Table

        table = Table(title=f"{self.metric} ({'lower' if self.lower else 'higher'} is better)")
        for c in self.columns:
            table.add_column(c, overflow="fold")
        for row in self.rows:
            table.add_row(*(self.cell(row, c) for c in self.columns))
        return table

    def plot(self, path: str, *, logy: bool = False) -> str:
        from mfrecipes.plots import save_curves

        return str(save_curves(list(self.curves), path, xlabel="images seen", ylabel=self.metric,
                               title=self.metric, logy=logy, spreads=list(self.spreads) or None))


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key ends with (``name`` is ambiguous
    between ``gap_schedule.name`` and ``loss_weighting.name``; ``k`` is not)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != k and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[k] = suffix
    return out


def _arm(run: str) -> str:
    """A row's run label as an arm name: ``beta-s0 (+2)`` -> ``beta`` (the seed suffix and the
    count of further seeds dropped)."""
    return re.sub(r"[-_]s\d+$", "", re.sub(r" \(\+\d+\)$", "", run)) or run


def _curve_label(row: dict, keys: Sequence[str], limit: int = 48) -> str:
    """``k=0.5`` from the differing keys when that stays short, else the arm's name (the run's
    folder name without its seed suffix)."""
    if not keys:
        return _arm(row["run"])
    short = _short_keys(keys)
    label = ", ".join(f"{short[k]}={row[k]}" for k in keys if row[k] != "<unset>")
    return label if label and len(label) <= limit else _arm(row["run"])


def _label(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir))


def run_metrics(run_dir: str) -> set[str]:
    """The numeric keys a run logged (metrics.jsonl and eval.jsonl), ``images``/``step``/``time``
    aside."""
    keys: set[str] = set()
    for source in (EVAL, METRICS):
        for rec in read_jsonl(os.path.join(run_dir, source)):
            keys.update(k for k, v in rec.items() if k not in ("images", "step", "time", "seed",
                                                               "num")
                        and isinstance(v, (int, float)) and not isinstance(v, bool))
    return keys


def pick_metric(run_dirs: Sequence[str]) -> str:
    """The quality metric every run has (``eval/...``; the 1-NFE one first), else an error that
    lists what the runs have."""
    have = [run_metrics(d) for d in run_dirs]
    common = set.intersection(*have) if have else set()
    evals = sorted((k for k in common if k.startswith("eval/")),
                   key=lambda k: (not k.startswith("eval/nfe1/"), k))
    if evals:
        return evals[0]
    union = sorted(set().union(*have)) if have else []
    raise RecipeError("no eval/ metric is logged by every run; pass --metric, one of: "
                      + (", ".join(union) if union else "(none: the runs logged nothing)"))


def compare(run_dirs: Sequence[str], metric: str, *, threshold: Optional[float] = None,
            direction: str = "auto", group_seeds: bool = False) -> Comparison:
    """One row per run (or per seed group) for ``metric`` (see the module docstring)."""
    if not run_dirs:
        raise RecipeError("compare needs at least one run directory")
    lower = lower_is_better(metric, direction)
    runs = [load_run_curve(d, metric) for d in run_dirs]
    empty = [r.run_dir for r in runs if not r.points]
    if len(empty) == len(runs):
        raise RecipeError(f"no run has metric {metric!r} in metrics.jsonl or eval.jsonl")
    ignore = ("run.name", "run.out_dir") + (("run.seed",) if group_seeds else ())
    keys = differing_keys([r.recipe for r in runs], ignore=ignore)
    groups: dict[tuple, list[RunCurve]] = {}
    for r in runs:
        ident = tuple(_show(r.recipe.get(k, "<unset>")) for k in keys) if group_seeds \
            else (r.run_dir,)
        groups.setdefault(ident, []).append(r)
    best_fn = min if lower else max
    rows, curves, spreads = [], [], []
    for members in groups.values():
        first = members[0]
        row: dict[str, Any] = {k: _show(first.recipe.get(k, "<unset>")) for k in keys}
        with_pts = [m for m in members if m.points]
        finals = [m.points[-1][1] for m in with_pts]
        bests = [best_fn(v for _, v in m.points) for m in with_pts]
        reach = [images_to_threshold(m.points, threshold, lower=lower) for m in with_pts]
        row["run"] = _label(first.run_dir) if len(members) == 1 else \
            f"{_label(first.run_dir)} (+{len(members) - 1})"
        row["seeds"] = ",".join(_show(m.recipe.get("run.seed")) for m in members)
        row["images_final"] = max((m.points[-1][0] for m in with_pts), default=None)
        if group_seeds and len(members) > 1:
            row["final"] = _mean_std(finals) if finals else None
            row["best"] = _mean_std(bests) if bests else None
            reached = [v for v in reach if v is not None]
            if threshold is not None:
                row[f"images_to_{threshold:g}"] = (
                    _mean_std(reached) if len(reached) == len(members)
                    else f"{len(reached)}/{len(members)} reached")
        else:
            row["final"] = finals[0] if finals else None
            row["best"] = bests[0] if bests else None
            if threshold is not None:
                row[f"images_to_{threshold:g}"] = reach[0] if reach else None
        rows.append(row)
        # the curve: mean over seeds at the image counts every member logged
        common = sorted(set.intersection(*(set(i for i, _ in m.points) for m in with_pts))) \
            if with_pts else []
        ys = [statistics.fmean(dict(m.points)[i] for m in with_pts) for i in common]
        curves.append((_curve_label(row, keys), tuple(common), tuple(ys)))
        spreads.append(tuple(statistics.stdev(dict(m.points)[i] for m in with_pts)
                             for i in common) if len(with_pts) > 1 else None)
    return Comparison(metric=metric, lower=lower, threshold=threshold, keys=tuple(keys),
                      rows=tuple(rows), curves=tuple(curves), spreads=tuple(spreads))
