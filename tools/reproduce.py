"""Small-scale reproduction of the paper's figures and tables: train every run, then compare.

    python tools/reproduce.py [--only GROUP[,GROUP]] [--seeds 0,1,2] [--out runs/repro]
        [--recipes recipes] [--set key=value ...] [--scale F] [--select GLOB[,GLOB]]
        [--jobs N] [--full] [--records DIR] [--dry-run | --report-only]

Groups (recipes are globbed when the plan is made, so new recipe files join automatically):

- ``table3``: ``digits/table3/*.yaml`` (MeanFlow, + MinSNR, + DTD, + beta, + MinSNR + beta,
  + DTD + beta);
- ``table4``: ``digits/table4/*.yaml`` (k of the progress schedule);
- ``fig2``: ``digits/fig2_vpre*.yaml`` and ``observation/digits_fig2_vpre*.yaml`` (v-pretraining);
- ``fig3``: ``digits/fig3/*.yaml`` (noise on the v-target);
- ``fig4``: ``digits/fig4/*.yaml`` and ``observation/digits_fig4_vpre_gap_*.yaml`` (gap ranges),
  each run then evaluated as the paper measures v in Fig. 4: Euler on u(z, t, t), 32 steps;
- ``table5``: no training: Euler sampling on u(z, t, t) with 32, 64 and 128 steps of the table3
  runs of the paper's Table 5 rows, MeanFlow, "Ours w MinSNR" and "Ours w DTD", which are the
  full method (``meanflow``, ``minsnr_beta``, ``dtd_beta``; ``mfr eval --instantaneous``),
  figures in their eval.jsonl;
- ``cv_sweep``: ``cv/toy2d_*.yaml`` with ``objective.params.beta_cv`` in 0, 0.25, 0.5, 0.75, 1
  (``toy2d_beta1_anchor`` as written); 1M images per run (the quick CPU look of
  recipes/README.md) unless ``--full``;
- ``dmf``: ``digits/flow_matching.yaml``, then ``observation/digits_dmf*.yaml`` initialised from
  that run (``init_from.path`` points at it).

Each run goes to ``OUT/<group>/<recipe>[-<variant>]-s<seed>`` and is trained with ``mfr run``
(``run.seed`` set, ``--set`` overrides appended). A run whose newest checkpoint holds the recipe's
``train.total_images`` is complete and skipped; an interrupted one resumes. When all runs of a
group are done, they are compared (``mfrecipes.evaluate.compare``) into ``OUT/<group>.md`` (every
metric of the group, seeds grouped as mean +- std, then every run on its own), ``.csv`` and
``.png`` (the first metric, seeds grouped); the ``cv_sweep`` report adds
``cv_sweep_beta_cv.png``, the final figure against beta_cv, one line per toy.
``--dry-run`` prints the plan; ``--report-only`` writes the reports from the runs already there
and runs nothing. Runs whose training has not finished are left out of a report and named in it.

Test-bed groups (``--only testbed`` for all; not run by default), each over
``recipes/testbed/<dir>/`` on the mixture data set with exact metrics, reported as paired
per-seed differences against a named baseline (``mfrecipes.evaluate.paired``), behind the
controls' verdict:

- ``tb_controls``: the baseline ``testbed/table3/meanflow.yaml`` (its runs are ``tb_table3``'s)
  and three variants of it: ``aa`` (``data.params.draw_salt=1``: must show no difference),
  ``more_images`` (``train.total_images`` x 1.25: must be better), ``broken``
  (``objective.params.tangent_h=0``: must be worse); every test-bed report starts with this
  verdict and prints no claim unless all three pass with >= 2 paired seeds;
- ``tb_table3``, ``tb_table4``, ``tb_fig3``, ``tb_fig4``: the folder's recipes (baselines
  ``meanflow``, ``k1``, ``vnoise_k0``, ``vpre_only``; Fig. 4 judged by ``eval/exact/v_err``);
- ``tb_table5``: no training: ``v_err`` of the ``tb_table3`` runs meanflow, minsnr_beta and
  dtd_beta, and Euler on u(z, t, t) with 32 steps (``mfr eval --instantaneous``);
- ``tb_fig2``: ``fig2/fixed_u/`` and ``fig2/fixed_total/``, each against its ``vpre00``;
- ``tb_fig5``: ``fig5/*.yaml``, then the task-affinity score of each run's final checkpoint
  on Fig. 5's four gap intervals, appended to its eval.jsonl as ``eval/tas/g<a>-<b>``
  (baseline ``random``);
- ``tb_cv``: ``cv/*.yaml`` with beta_cv in 0, 0.25, 0.5, 0.75, 1 (baseline beta 0);
- ``tb_dmf``: ``dmf/flow_matching.yaml``, ``dmf/dmf*.yaml`` started from it and
  ``dmf/meanflow.yaml`` for the same images in all (baseline ``meanflow``).

A run two groups share (the controls' baseline) is trained once; a group that shares one is
reported when the run finishes. The test-bed plans read the recipes as YAML only.

**Run records.** As each training run finishes, its group's ``OUT/<group>_runs.json`` is
rewritten: for every finished run (keyed by its folder under OUT, e.g. ``tb_table3/meanflow-s0``)
its resolved recipe, its evaluation records and where it came from (git commit, torch). Commit
those files beside the reports (``recipes/reproduction/testbed/``) and a later checkout picks
the study up where it stopped: ``--records DIR`` restores every planned run that is not in OUT
yet and whose record ran the very resolved recipe the plan would run, as a folder with the
resolved recipe, eval.jsonl and ``recorded.json`` but no weights; it is not trained again, and
the reports name it. A record whose recipe differs (the differing keys are printed), a run
another job reads (an evaluation, an initialisation: they need the weights) and a folder that
already holds something (it resumes) are trained as usual. Runs are not bit-identical across
machines (float32 rounding differs from the first step), so a restored seed stands for a rerun
only to within that drift; ``recipes/reproduction/README.md`` gives its measured size.
Jobs run seed-major, so a study cut short has every arm at its first seeds.

``--scale F`` multiplies every image count of a training run by F: the budget, each stage's
images and the log, checkpoint and evaluation cadences (the components see training progress,
not image counts, so curricula and schedules keep their shape). ``--select`` keeps the jobs whose
``<group>/<name>`` matches one of the globs (``cv_sweep/toy2d_swiss_roll-*``). ``--jobs N`` runs
N jobs at once, each with ``OMP_NUM_THREADS`` = cores / N unless it is set, and its output in
``OUT/logs/<group>/<name>-s<seed>.log``; a job that reads another run (a DMF run's flow-matching
start, a Table 5 evaluation's Table 3 run) waits for it.
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import glob
import io
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Optional

import attrs

DIGITS_GROUPS = ("table3", "table4", "fig2", "fig3", "fig4", "table5", "cv_sweep", "dmf")
TB_GROUPS = ("tb_controls", "tb_table3", "tb_table4", "tb_table5", "tb_fig2", "tb_fig3",
             "tb_fig4", "tb_fig5", "tb_cv", "tb_dmf")
GROUPS = DIGITS_GROUPS + TB_GROUPS
DIGITS_METRICS = ("eval/nfe1/fd_digits", "eval/nfe2/fd_digits")
TOY_METRICS = ("eval/nfe1/swd", "eval/nfe2/swd")
EULER_STEPS = (32, 64, 128)
TABLE5_ROWS = ("meanflow", "minsnr_beta", "dtd_beta")   # MeanFlow, Ours w MinSNR, Ours w DTD
FIG4_EULER_STEPS = (32,)
BETA_CV = (0.0, 0.25, 0.5, 0.75, 1.0)
SWEEP_KEY = "objective.params.beta_cv"
# the test bed (recipes/testbed/): exact metrics of the mixture data set
TB_BASELINE = "testbed/table3/meanflow.yaml"
MAP1, V_ERR = "eval/exact/map1", "eval/exact/v_err"
TB_METRICS = (MAP1, "eval/exact/map2", V_ERR, "eval/nfe1/fd_exact", "eval/nfe2/fd_exact")
U_ERR = tuple(f"eval/exact/u_err/g{a:.2f}-{a + 0.25:.2f}" for a in (0.0, 0.25, 0.5, 0.75))
TB_EULER_STEPS = (32,)
MORE_IMAGES = 1.25          # the "more images" control: the baseline's budget x 1.25
TAS_RANGES = ((0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9))   # Fig. 5's four gap intervals
CONTROL_VARIANTS = {"aa": ("data.params.draw_salt=1",),          # an irrelevant change
                    "more_images": None,                         # total x 1.25 (planned)
                    "broken": ("objective.params.tangent_h=0",)}  # du/dh dropped


def tas_metric(lo: float, hi: float) -> str:
    return f"eval/tas/g{lo:.2f}-{hi:.2f}"


TAS_METRICS = tuple(tas_metric(a, b) for a, b in TAS_RANGES)


@attrs.frozen
class Study:
    """One paired comparison of a test-bed group: the arms (job names; ``prefix`` selects them,
    ``exclude`` drops some), the baseline arm and the metrics (the first is the primary)."""

    title: str
    baseline: str
    metrics: tuple[str, ...]
    prefix: str = ""
    exclude: tuple[str, ...] = ()


STUDIES = {
    "tb_controls": (),   # the controls gate itself
    "tb_table3": (Study("Table 3: components", "meanflow", TB_METRICS + U_ERR),),
    "tb_table4": (Study("Table 4: k of the progressive schedule (DTD + beta)", "k1",
                        TB_METRICS + U_ERR),),
    "tb_table5": (Study("Table 5: the instantaneous velocity of the Table 3 runs", "meanflow",
                        (V_ERR, *(f"eval/euler{k}/fd_exact" for k in TB_EULER_STEPS))),),
    "tb_fig2": (Study("Fig. 2 (top): fixed u budget", "fixed_u_vpre00", TB_METRICS,
                      prefix="fixed_u_"),
                Study("Fig. 2 (bottom): fixed total budget", "fixed_total_vpre00", TB_METRICS,
                      prefix="fixed_total_")),
    "tb_fig3": (Study("Fig. 3: noise k on the v-target", "vnoise_k0", TB_METRICS),),
    "tb_fig4": (Study("Fig. 4: gap ranges from scratch and after v-pretraining, by v_err",
                      "vpre_only", (V_ERR, MAP1)),),
    "tb_fig5": (Study("Fig. 5: task affinity of the v-loss and the u-loss per gap range",
                      "random", TAS_METRICS),),
    "tb_cv": (Study("Control-variate beta_cv sweep", "meanflow_cv-beta0", TB_METRICS),),
    "tb_dmf": (Study("Discrete MeanFlow vs MeanFlow at equal images", "meanflow", TB_METRICS,
                     exclude=("flow_matching",)),),
}


@attrs.frozen
class Job:
    """One training run (``kind="train"``), one evaluation of a trained run (``"eval"``) or
    one task-affinity measurement of it (``"affinity"``, written to its eval.jsonl)."""

    group: str
    name: str
    recipe: str
    run_dir: str
    seed: int
    overrides: tuple[str, ...] = ()
    kind: str = "train"
    eval_args: tuple[str, ...] = ()
    wants: tuple[str, ...] = ()  # evaluation: the metrics it writes to eval.jsonl
    after: tuple[str, ...] = ()  # run directories this job reads (they must be trained first)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _globs(root: str, *patterns: str) -> list[str]:
    out: list[str] = []
    for p in patterns:
        out += sorted(glob.glob(os.path.join(root, p)))
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=None)
def _load(path: str, overrides: tuple[str, ...]):
    """The typed recipe, read once per (path, overrides): planning, the skip check and the
    reports all ask for the same recipes."""
    from mfrecipes.recipe import load_recipe

    return load_recipe(path, list(overrides))[0]


def scaled_overrides(path: str, overrides: tuple[str, ...], scale: float) -> tuple[str, ...]:
    """Overrides that multiply every image count of the recipe at ``path`` (after
    ``overrides``) by ``scale``: budget, stages, log/checkpoint/eval cadence."""
    if scale == 1:
        return ()
    recipe = _load(path, tuple(overrides))

    def times(n: int) -> int:
        return max(1, int(round(n * scale)))

    train = recipe.train
    out = [f"train.log_every_images={times(train.log_every_images)}"]
    if recipe.stages:
        stages = [{"name": st.name, "images": times(st.images), "overrides": dict(st.overrides)}
                  for st in recipe.stages]
        out.append("stages=" + json.dumps(stages))
        out.append(f"train.total_images={sum(st['images'] for st in stages)}")
    else:
        out.append(f"train.total_images={times(train.total_images)}")
    if train.checkpoint_every_images:
        out.append(f"train.checkpoint_every_images={times(train.checkpoint_every_images)}")
    if recipe.eval.every_images:
        out.append(f"eval.every_images={times(recipe.eval.every_images)}")
    return tuple(out)


def plan_curriculum(add, jobs: list[Job], seeds: list[int], fm: list[str], dmf: list[str],
                    alone: list[str] = ()) -> None:
    """Per seed: the flow-matching run, then each DMF curriculum initialised from it (it reads
    that run's weights), then the runs that start from scratch (``alone``)."""
    for s in seeds:
        for path in fm:
            add(path, s)
        fm_dir = jobs[-1].run_dir if fm else None
        for path in dmf:
            add(path, s, (f"init_from.path={fm_dir}",) if fm_dir else (),
                after=(fm_dir,) if fm_dir else ())
        for path in alone:
            add(path, s)


def plan(group: str, *, recipes: str, out: str, seeds: list[int], extra: tuple[str, ...] = (),
         full: bool = False, scale: float = 1.0) -> list[Job]:
    """The jobs of one group, in the order they must run."""
    jobs: list[Job] = []

    def add(path, seed, overrides=(), variant="", after=(), folder=None, stem=None):
        name = (stem or _stem(path)) + (f"-{variant}" if variant else "")
        ov = (f"run.seed={seed}", *overrides, *extra)
        ov += scaled_overrides(path, ov, scale)
        jobs.append(Job(group, name, path, os.path.join(out, folder or group, f"{name}-s{seed}"),
                        seed, ov, after=tuple(after)))

    if group in TB_GROUPS:
        return _plan_testbed(group, add, jobs, recipes=recipes, out=out, seeds=seeds,
                             extra=extra)

    simple = {"table3": ("digits/table3/*.yaml",), "table4": ("digits/table4/*.yaml",),
              "fig2": ("digits/fig2_vpre*.yaml", "observation/digits_fig2_vpre*.yaml"),
              "fig3": ("digits/fig3/*.yaml",),
              "fig4": ("digits/fig4/*.yaml", "observation/digits_fig4_vpre_gap_*.yaml")}
    def euler(path, seed, run_dir, steps):
        jobs.append(Job(group, _stem(path), path, run_dir, seed, kind="eval",
                        eval_args=("--instantaneous", "--steps", ",".join(map(str, steps))),
                        wants=euler_metrics(steps), after=(run_dir,)))

    if group in simple:
        for path in _globs(recipes, *simple[group]):
            for s in seeds:
                add(path, s)
                if group == "fig4":  # the paper's measure of v: Euler on u(z, t, t)
                    euler(path, s, jobs[-1].run_dir, FIG4_EULER_STEPS)
    elif group == "cv_sweep":
        budget = () if full else ("train.total_images=1000000",)
        for path in _globs(recipes, "cv/toy2d_*.yaml"):
            for s in seeds:
                if "anchor" in _stem(path):
                    add(path, s, budget)
                    continue
                for b in BETA_CV:
                    add(path, s, (f"objective.params.beta_cv={b}", *budget), f"beta{b:g}")
    elif group == "dmf":
        plan_curriculum(add, jobs, seeds, _globs(recipes, "digits/flow_matching.yaml"),
                        _globs(recipes, "observation/digits_dmf*.yaml"))
    elif group == "table5":
        # "Ours w X" in the paper is X + progressive beta (Table 1's rows), not + X alone.
        for path in _globs(recipes, *(f"digits/table3/{row}.yaml" for row in TABLE5_ROWS)):
            for s in seeds:
                euler(path, s, os.path.join(out, "table3", f"{_stem(path)}-s{s}"), EULER_STEPS)
    else:
        raise SystemExit(f"error: unknown group {group!r}; valid: {', '.join(GROUPS)}")
    return jobs


def raw_total_images(path: str, overrides: tuple[str, ...]) -> int:
    """``train.total_images`` of a recipe read as YAML only (its base chain merged, the
    overrides applied): no component is built and no data set has to exist."""
    from mfrecipes.errors import MfrError
    from mfrecipes.recipe.load import apply_overrides, load_raw

    try:
        raw = apply_overrides(load_raw(path), [o for o in overrides
                                               if o.startswith("train.total_images=")])
    except MfrError as err:
        raise SystemExit(f"error: {path}: {err}") from err
    total = (raw.get("train") or {}).get("total_images")
    if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
        raise SystemExit(f"error: {path}: train.total_images is {total!r} after its base "
                         "chain; the more_images control needs a positive integer there")
    return total


def _plan_testbed(group, add, jobs, *, recipes, out, seeds, extra):
    """The test-bed groups (recipes/testbed/<dir>/); planned from the YAML files only."""
    def each(*patterns, **kw):
        for path in _globs(recipes, *patterns):
            for s in seeds:
                add(path, s, **kw)

    def euler(name, path, seed, run_dir):
        jobs.append(Job(group, name, path, run_dir, seed, kind="eval",
                        eval_args=("--instantaneous", "--steps",
                                   ",".join(map(str, TB_EULER_STEPS))),
                        wants=tuple(f"eval/euler{k}/fd_exact" for k in TB_EULER_STEPS),
                        after=(run_dir,)))

    if group == "tb_controls":
        path = os.path.join(recipes, TB_BASELINE)
        if not os.path.isfile(path):
            return jobs
        for s in seeds:
            add(path, s, folder="tb_table3")        # the baseline: Table 3's MeanFlow runs
            for variant, ov in CONTROL_VARIANTS.items():
                if ov is None:                      # more images, cadences unchanged
                    total = raw_total_images(path, (f"run.seed={s}", *extra))
                    ov = (f"train.total_images={round(MORE_IMAGES * total)}",)
                add(path, s, ov, variant)
    elif group in ("tb_table3", "tb_table4", "tb_fig3", "tb_fig4"):
        each(f"testbed/{group[3:]}/*.yaml")
    elif group == "tb_table5":
        # no training: the Table 3 runs of the paper's Table 5 rows, and Euler on u(z, t, t)
        for path in _globs(recipes, *(f"testbed/table3/{row}.yaml" for row in TABLE5_ROWS)):
            for s in seeds:
                run_dir = os.path.join(out, "tb_table3", f"{_stem(path)}-s{s}")
                euler(_stem(path), path, s, run_dir)
    elif group == "tb_fig2":
        for setting in ("fixed_u", "fixed_total"):
            for path in _globs(recipes, f"testbed/fig2/{setting}/*.yaml"):
                for s in seeds:
                    add(path, s, stem=f"{setting}_{_stem(path)}")
    elif group == "tb_fig5":
        ranges = ",".join(f"{a:g}:{b:g}" for a, b in TAS_RANGES)
        for path in _globs(recipes, "testbed/fig5/*.yaml"):
            for s in seeds:
                add(path, s)
                run_dir = jobs[-1].run_dir
                jobs.append(Job(group, _stem(path), path, run_dir, s, kind="affinity",
                                eval_args=("--gap-ranges", ranges, "--seed", str(s)),
                                wants=TAS_METRICS, after=(run_dir,)))
    elif group == "tb_cv":
        for path in _globs(recipes, "testbed/cv/*.yaml"):
            for s in seeds:
                for b in BETA_CV:
                    add(path, s, (f"{SWEEP_KEY}={b}",), f"beta{b:g}")
    elif group == "tb_dmf":
        plan_curriculum(add, jobs, seeds, _globs(recipes, "testbed/dmf/flow_matching.yaml"),
                        _globs(recipes, "testbed/dmf/dmf*.yaml"),
                        _globs(recipes, "testbed/dmf/meanflow.yaml"))
    return jobs


def euler_metrics(steps) -> tuple[str, ...]:
    return tuple(f"eval/euler{k}/fd_digits" for k in steps)


def metrics_for(group: str) -> tuple[str, ...]:
    if group in TB_GROUPS:
        return tuple(dict.fromkeys(m for st in STUDIES[group] for m in st.metrics)) or (MAP1,)
    if group == "cv_sweep":
        return TOY_METRICS
    if group == "table5":
        return euler_metrics(EULER_STEPS)
    if group == "fig4":
        return DIGITS_METRICS + euler_metrics(FIG4_EULER_STEPS)
    return DIGITS_METRICS


def total_images(job: Job) -> int:
    return _load(job.recipe, job.overrides).train.total_images


def is_complete(job: Job) -> bool:
    """Training: the newest checkpoint holds the recipe's total images. Evaluation: eval.jsonl
    already has every metric the job writes, for the final checkpoint."""
    from mfrecipes.run import layout
    from mfrecipes.run.layout import latest_checkpoint, load_meta

    folder = latest_checkpoint(layout.checkpoints_dir(job.run_dir))
    if folder is None:
        # a run restored from a record has no weights: finished training, nothing to evaluate
        return job.kind == "train" and is_recorded(job.run_dir)
    images = int(load_meta(folder).get("images", 0))
    if job.kind == "train":
        return images >= total_images(job)
    path = os.path.join(job.run_dir, layout.EVAL)
    if not os.path.isfile(path):
        return False
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("images") == images:
                seen.update(rec)
    return set(job.wants) <= seen


# ----------------------------------------------------------------------------- run records
RECORDS = "_runs.json"        # OUT/<group>_runs.json: every finished training run of the group
RECORDED = "recorded.json"    # in a run directory restored from a record (it has no weights)


def run_key(job: Job, out: str) -> str:
    """A run's name in the records: its folder under OUT, e.g. ``tb_table3/meanflow-s0``."""
    return os.path.relpath(job.run_dir, out).replace(os.sep, "/")


def _plain(x):
    return json.loads(json.dumps(x))


def expected_recipe(job: Job) -> dict:
    """The resolved recipe ``mfr run`` would write for ``job`` (defaults filled, redacted)."""
    from mfrecipes import plugins
    from mfrecipes.data.remote import redact_recipe
    from mfrecipes.recipe import load_recipe
    from mfrecipes.build import with_component_defaults

    plugins.load_components()
    _, resolved = load_recipe(job.recipe, list(job.overrides))
    return _plain(redact_recipe(with_component_defaults(resolved)))


def _evaluations(run_dir: str) -> list[dict]:
    """The evaluation records of a run: its ``eval/...`` lines of metrics.jsonl and eval.jsonl."""
    from mfrecipes.run import layout

    out = [r for r in layout.read_jsonl(os.path.join(run_dir, layout.METRICS))
           if any(k.startswith("eval/") for k in r)]
    return out + layout.read_jsonl(os.path.join(run_dir, layout.EVAL))


def _provenance(run_dir: str) -> dict:
    from mfrecipes.run import layout

    marker = os.path.join(run_dir, RECORDED)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            return json.load(f).get("provenance", {})
    env = {}
    if os.path.isfile(os.path.join(run_dir, layout.ENV)):
        with open(os.path.join(run_dir, layout.ENV), encoding="utf-8") as f:
            env = json.load(f)
    return {k: env[k] for k in ("git_commit", "torch", "python", "device") if k in env}


def write_records(group: str, jobs: list[Job], out: str) -> Optional[str]:
    """OUT/<group>_runs.json: for every finished training run of ``jobs``, its resolved recipe,
    its evaluation records and where it came from; what the file already holds of runs this call
    did not plan (other seeds) is kept. Committed beside a report, it lets a fresh checkout
    rebuild the report, and later runs of the study skip those runs (``--records``)."""
    from mfrecipes.recipe.load import read_yaml
    from mfrecipes.run import layout

    recs = {}
    for j in jobs:
        if j.kind != "train" or not os.path.isfile(os.path.join(j.run_dir, layout.RESOLVED)) \
                or not _trained(j):
            continue
        recs[run_key(j, out)] = {"recipe": _plain(read_yaml(os.path.join(j.run_dir,
                                                                          layout.RESOLVED))),
                                 "evaluations": _evaluations(j.run_dir),
                                 "provenance": _provenance(j.run_dir)}
    if not recs:
        return None
    path = os.path.join(out, group + RECORDS)
    if os.path.isfile(path):   # runs of this group that this call did not plan (other seeds)
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            old = {}
        planned = {run_key(j, out) for j in jobs}
        if isinstance(old, dict):
            recs.update({k: v for k, v in old.items() if k not in planned and k not in recs})
    layout.atomic_write_text(path, json.dumps(dict(sorted(recs.items())), indent=1) + "\n")
    return path


class RecordsError(ValueError):
    pass


def read_records(folder: str) -> dict[str, tuple[str, dict]]:
    """``{run key: (file, record)}`` from every ``*_runs.json`` in ``folder`` (first file wins)."""
    if not os.path.isdir(folder):
        raise RecordsError(f"--records {folder!r}: not a folder (expected the folder that holds "
                           f"the <group>{RECORDS} files, such as recipes/reproduction/testbed)")
    index: dict[str, tuple[str, dict]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*" + RECORDS))):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecordsError(f"{path}: not a readable records file ({err})") from None
        bad = [k for k, v in data.items() if not isinstance(v, dict)
               or not isinstance(v.get("recipe"), dict)
               or not isinstance(v.get("evaluations"), list)] if isinstance(data, dict) else [0]
        if bad:
            raise RecordsError(f"{path}: expected {{run key: {{recipe: mapping, evaluations: "
                               f"list, ...}}}}; {'the file' if bad == [0] else repr(bad[0])} "
                               "is not")
        for k, v in data.items():
            index.setdefault(k, (path, v))
    return index


def restore_recorded(jobs: list[Job], index: dict[str, tuple[str, dict]], out: str, *,
                     dry: bool = False) -> tuple[list[str], list[str]]:
    """Turn each training job that has not run yet, whose record's resolved recipe is the one it
    would run, into a record-only run directory (resolved recipe, eval.jsonl, ``recorded.json``)
    that counts as finished. Runs another job reads (an evaluation, an initialisation) need their
    weights and are trained; so is a run whose folder already holds anything (it resumes).
    Returns the keys restored (with ``dry``: that would be; nothing is written) and one line
    per recorded run that is trained instead, with the reason."""
    from mfrecipes.evaluate.compare import differing_keys, flatten
    from mfrecipes.recipe.load import dump_yaml
    from mfrecipes.run import layout

    readers = {d for j in jobs for d in j.after} | {j.run_dir for j in jobs if j.kind != "train"}
    restored, notes = [], []
    for j in {j.run_dir: j for j in jobs if j.kind == "train"}.values():
        key = run_key(j, out)
        if key not in index or is_complete(j):
            continue
        path, rec = index[key]
        if j.run_dir in readers:
            notes.append(f"{key}: recorded in {path}, but another job reads its weights: trained")
            continue
        if os.path.isdir(j.run_dir) and os.listdir(j.run_dir):
            notes.append(f"{key}: its folder is not empty: resumed, not restored")
            continue
        diff = differing_keys([flatten(rec["recipe"]), flatten(expected_recipe(j))])
        if diff:
            notes.append(f"{key}: the record in {path} ran another recipe ({', '.join(diff[:5])}"
                         f"{' ...' if len(diff) > 5 else ''} differ): trained")
            continue
        restored.append(key)
        if dry:
            continue
        os.makedirs(j.run_dir, exist_ok=True)
        layout.atomic_write_text(os.path.join(j.run_dir, layout.RESOLVED), dump_yaml(rec["recipe"]))
        layout.atomic_write_text(os.path.join(j.run_dir, layout.EVAL), "".join(
            json.dumps(e) + "\n" for e in rec["evaluations"]))
        layout.atomic_write_text(os.path.join(j.run_dir, RECORDED), json.dumps(
            {"source": os.path.basename(path), "provenance": rec.get("provenance", {})},
            indent=1))
    return restored, notes


def is_recorded(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, RECORDED))


def command(job: Job) -> list[str]:
    if job.kind == "eval":
        return [sys.executable, "-m", "mfrecipes", "eval", job.run_dir, *job.eval_args]
    if job.kind == "affinity":
        return [sys.executable, os.path.abspath(__file__), "--affinity", job.run_dir,
                *job.eval_args]
    return [sys.executable, "-m", "mfrecipes", "run", job.recipe, *job.overrides,
            "--out", job.run_dir]


def _trained(job: Job) -> bool:
    """The run a job trains or reads has finished its training."""
    return is_complete(job if job.kind == "train" else attrs.evolve(job, kind="train"))


def _arms(jobs: list[Job], study: Optional[Study] = None) -> tuple[dict, list[str]]:
    """``{arm: [run dirs]}`` of the finished runs of ``jobs`` (a study's arms), and the run
    dirs left out because their training has not finished."""
    arms: dict[str, list[str]] = {}
    unfinished: list[str] = []
    for j in jobs:
        if study is not None and (not j.name.startswith(study.prefix)
                                  or j.name in study.exclude):
            continue
        if any(j.run_dir in d for d in arms.values()) or j.run_dir in unfinished:
            continue
        if not os.path.isfile(os.path.join(j.run_dir, "recipe.resolved.yaml")):
            continue
        if _trained(j):
            arms.setdefault(j.name, []).append(j.run_dir)
        else:
            unfinished.append(j.run_dir)
    return arms, unfinished


def controls_verdict(controls_jobs: list[Job]):
    """The controls gate (mfrecipes.evaluate.paired.controls) on the finished control runs."""
    from mfrecipes.evaluate.paired import controls

    arms, _ = _arms(controls_jobs)
    base = _stem(TB_BASELINE)
    return controls(arms.get(base, []), *(arms.get(f"{base}-{v}", [])
                                          for v in CONTROL_VARIANTS), metric=MAP1)


def _write_csv(path: str, analyses: list[tuple[str, object]]) -> None:
    import csv as csvmod

    rows = []
    for title, a in analyses:
        for r in csvmod.DictReader(io.StringIO(a.csv())):
            rows.append({"study": title, **r})
    if not rows:
        return
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csvmod.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def report_testbed(group: str, jobs: list[Job], out: str,
                   controls_jobs: Optional[list[Job]] = None) -> Optional[str]:
    """A test-bed group's report: the controls' verdict first, then each study's paired
    analysis against its baseline (no claims unless the controls passed), into
    OUT/<group>.md / .csv / .png (one png per study, the primary metric)."""
    from mfrecipes.errors import MfrError
    from mfrecipes.evaluate.compare import run_metrics
    from mfrecipes.evaluate.paired import paired_analysis

    if controls_jobs is None:
        controls_jobs = jobs if group == "tb_controls" else []
    gate = controls_verdict(controls_jobs)
    lines = [f"# {group}", "", gate.markdown()]
    if not controls_jobs:
        lines.append("The controls were not planned with this report: run "
                     "`tools/reproduce.py --only tb_controls` with the same --seeds and --out.\n")
    analyses: list[tuple[str, object]] = []
    pngs: list[tuple[str, object]] = []
    left_out: list[str] = []
    if group == "tb_controls":
        if gate.analysis is not None:
            analyses.append(("controls", gate.analysis))
            pngs.append((os.path.join(out, group + ".png"), gate.analysis))
    for k, study in enumerate(STUDIES[group]):
        arms, unfinished = _arms(jobs, study)
        left_out += unfinished
        lines += [f"## {study.title}", ""]
        if study.baseline not in arms:
            lines.append(f"No finished run of the baseline `{study.baseline}` yet.\n")
            continue
        logged = set().union(*(run_metrics(d) for dirs in arms.values() for d in dirs))
        for m, metric in enumerate(study.metrics):
            if metric not in logged:
                lines.append(f"`{metric}`: not logged by these runs.\n")
                continue
            try:
                a = paired_analysis(arms, study.baseline, metric)
            except MfrError as err:
                lines.append(f"`{metric}`: {err}\n")
                continue
            lines += [f"### `{metric}`" + (" (primary)" if m == 0 else ""), "",
                      a.markdown(claims=gate.passed)]
            if gate.passed:
                analyses.append((study.title, a))
                if m == 0:
                    suffix = "" if k == 0 else f"_{study.prefix.strip('_') or k}"
                    pngs.append((os.path.join(out, f"{group}{suffix}.png"), a))
    if gate.analysis is None and not analyses and not left_out and not any(
            _arms(jobs, st)[0] for st in STUDIES[group]):
        return None       # nothing of this group (nor of the controls) has run yet
    from_records = sorted({os.path.basename(j.run_dir) for j in jobs + controls_jobs
                           if j.kind == "train" and is_recorded(j.run_dir)})
    if from_records:
        lines.append(f"Read from the committed run records ({RECORDED} in the run folder), not "
                     f"trained here: {', '.join(from_records)}\n")
    if left_out:
        lines.append("Not finished, left out: "
                     + ", ".join(os.path.basename(d) for d in left_out) + "\n")
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, group)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    _write_csv(base + ".csv", analyses)
    for path, a in pngs:
        a.plot(path, title=f"{group}: paired against {a.baseline}")
    return base + ".md"


def report(group: str, jobs: list[Job], out: str,
           controls_jobs: Optional[list[Job]] = None) -> Optional[str]:
    """Compare the group's runs into OUT/<group>.md / .csv / .png; None if nothing to compare."""
    from mfrecipes.errors import MfrError

    if group in TB_GROUPS:
        return report_testbed(group, jobs, out, controls_jobs)
    from mfrecipes.evaluate.compare import compare

    # A run whose training has not finished is left out (its figures are from fewer images and
    # would be averaged with finished seeds); groups that only evaluate need their evaluation.
    trains = {j.run_dir for j in jobs if j.kind == "train"}
    dirs, unfinished = [], []
    for j in jobs:
        seen = j.run_dir in dirs or j.run_dir in unfinished
        if seen or (j.kind != "train" and j.run_dir in trains):
            continue
        if not os.path.isfile(os.path.join(j.run_dir, "recipe.resolved.yaml")):
            continue
        (dirs if is_complete(j) else unfinished).append(j.run_dir)
    if not dirs:
        return None
    sections, per_run, first = [], [], None
    for metric in metrics_for(group):
        try:
            cmp = compare(dirs, metric, group_seeds=True)
            runs = compare(dirs, metric, group_seeds=False)
        except MfrError:
            continue
        first = first or cmp
        sections.append(cmp.markdown())
        per_run.append(runs.markdown())
    if first is None:
        return None
    base = os.path.join(out, group)
    os.makedirs(out, exist_ok=True)
    left_out = "" if not unfinished else (
        "\nNot finished, left out: " + ", ".join(os.path.basename(d) for d in unfinished) + "\n")
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(f"# {group}\n\n" + "\n".join(sections) + left_out
                + "\n## Every run\n\n" + "\n".join(per_run))
    with open(base + ".csv", "w", encoding="utf-8") as f:
        f.write(first.csv())
    first.plot(base + ".png", logy=True)  # early figures are an order of magnitude higher
    if group == "cv_sweep":  # the sweep's question: the final figure against beta_cv
        from mfrecipes.plots import save_sweep

        runs = [(_stem(j.recipe), j.run_dir) for j in jobs
                if j.kind == "train" and j.run_dir in dirs]
        series = sweep_series(runs, first.metric, SWEEP_KEY)
        if series:
            save_sweep(series, base + "_beta_cv.png", xlabel="beta_cv", ylabel=first.metric,
                       title=f"final {first.metric}, mean ± std over seeds")
    return base + ".md"


def sweep_series(runs: list[tuple[str, str]], metric: str, key: str
                 ) -> list[tuple[str, tuple, tuple, tuple]]:
    """``[(label, xs, means, stds)]``: each label's final ``metric`` against its recipe value of
    ``key`` (``runs`` = ``[(label, run_dir)]``), mean and sample std over the runs (seeds) that
    share a label and a value. Runs without the metric or the key are left out."""
    from mfrecipes.evaluate.compare import _mean_std, load_run_curve

    finals: dict[str, dict[float, list[float]]] = {}
    for label, run_dir in runs:
        curve = load_run_curve(run_dir, metric)
        x = curve.recipe.get(key)
        if curve.points and isinstance(x, (int, float)) and not isinstance(x, bool):
            finals.setdefault(label, {}).setdefault(float(x), []).append(curve.points[-1][1])
    out = []
    for label, by_x in finals.items():
        xs = sorted(by_x)
        stats = [_mean_std(by_x[x]) for x in xs]   # the same mean +- std as the tables
        out.append((label, tuple(xs), tuple(m for m, _ in stats), tuple(s for _, s in stats)))
    return out


def _selected(job: Job, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatch(job.key, pat) for pat in patterns)


def log_path(job: Job, out: str) -> str:
    return os.path.join(out, "logs", job.group, os.path.basename(job.run_dir) + ".log")


class Scheduler:
    """Runs jobs, at most ``width`` at once, each after the jobs it reads have succeeded."""

    def __init__(self, jobs: list[Job], *, width: int, out: str, on_group_done,
                 on_job_done=None):
        self.pending = list(jobs)
        self.width = max(1, width)
        self.out = out
        self.on_group_done = on_group_done
        self.on_job_done = on_job_done
        self.running: dict[subprocess.Popen, Job] = {}
        self.failed: list[str] = []
        self.groups_left = {j.group: sum(k.group == j.group for k in jobs) for j in jobs}
        self._files: dict[subprocess.Popen, object] = {}

    def _ready(self, job: Job) -> Optional[bool]:
        """True: can start; False: a job it reads failed; None: wait."""
        blocking = {j.run_dir for j in self.pending if j is not job and j.kind == "train"}
        blocking |= {j.run_dir for j in self.running.values() if j.kind == "train"}
        if any(dep in self.failed for dep in job.after):
            return False
        return None if any(dep in blocking for dep in job.after) else True

    def _start(self, job: Job) -> None:
        env = dict(os.environ)
        if self.width > 1:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.width)))
            path = log_path(job, self.out)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            f = open(path, "a", encoding="utf-8")
            proc = subprocess.Popen(command(job), env=env, stdout=f, stderr=subprocess.STDOUT)
            self._files[proc] = f
            print(f"  [started] {job.run_dir} (log: {path})", flush=True)
        else:
            proc = subprocess.Popen(command(job), env=env)
        self.running[proc] = job

    def _finish(self, proc: subprocess.Popen, job: Job, rc: int) -> None:
        del self.running[proc]
        f = self._files.pop(proc, None)
        if f is not None:
            f.close()
        if rc != 0:
            self.failed.append(job.run_dir)
            print(f"  failed (exit {rc}): {job.run_dir}", file=sys.stderr, flush=True)
        else:
            if self.width > 1:
                print(f"  [done] {job.run_dir}", flush=True)
            if self.on_job_done is not None:
                self.on_job_done(job)
        self._group_step(job.group)

    def _group_step(self, group: str) -> None:
        self.groups_left[group] -= 1
        if self.groups_left[group] == 0:
            self.on_group_done(group)

    def run(self) -> list[str]:
        while self.pending or self.running:
            for job in list(self.pending):
                if len(self.running) >= self.width:
                    break
                ready = self._ready(job)
                if ready is None:
                    continue
                self.pending.remove(job)
                if ready is False:
                    self.failed.append(job.run_dir)
                    print(f"  skipped (a run it reads failed): {job.run_dir}", file=sys.stderr)
                    self._group_step(job.group)
                    continue
                self._start(job)
            for proc, job in list(self.running.items()):
                rc = proc.poll()
                if rc is not None:
                    self._finish(proc, job, rc)
            if self.running:
                time.sleep(0.2)
        return self.failed


def affinity_main(argv: list[str]) -> int:
    """``--affinity RUN_DIR --gap-ranges a:b,... --seed S``: the task-affinity score of the run's
    final checkpoint per gap range, appended to its eval.jsonl as ``eval/tas/g<a>-<b>``."""
    from mfrecipes.errors import MfrError
    from mfrecipes.evaluate.task_affinity import parse_gap_ranges, task_affinity_run

    p = argparse.ArgumentParser(prog="reproduce.py --affinity")
    p.add_argument("run_dir")
    p.add_argument("--gap-ranges", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        res = task_affinity_run(args.run_dir, gap_ranges=parse_gap_ranges(args.gap_ranges),
                                seed=args.seed)
    except MfrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rec = {"images": int(res["images"]),
           **{tas_metric(*r["gap_range"]): r["mean"] for r in res["results"]}}
    with open(os.path.join(args.run_dir, "eval.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--affinity"]:
        return affinity_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated groups (default: the digits groups "
                                  f"{','.join(DIGITS_GROUPS)}; the test bed's: "
                                  f"{','.join(TB_GROUPS)}, or 'testbed' for all of them)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default=os.path.join("runs", "repro"))
    p.add_argument("--recipes", default="recipes", help="the recipes folder")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides added to every training run")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every image count of each training run (default 1)")
    p.add_argument("--select", default="",
                   help="comma-separated globs over GROUP/NAME; only matching jobs")
    p.add_argument("--jobs", type=int, default=1, help="jobs at once (default 1)")
    p.add_argument("--full", action="store_true", help="cv_sweep: the recipes' full budget")
    p.add_argument("--records", metavar="DIR",
                   help="a folder of <group>_runs.json files (as this tool writes them to OUT, "
                        "e.g. recipes/reproduction/testbed): a run not yet in OUT whose record "
                        "ran the same resolved recipe is restored from it instead of trained")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; write each group's report from the runs already there")
    args = p.parse_args(argv)
    from mfrecipes.errors import MfrError

    groups = [g.strip() for g in args.only.split(",") if g.strip()] if args.only \
        else list(DIGITS_GROUPS)
    groups = list(dict.fromkeys(x for g in groups
                                for x in (TB_GROUPS if g == "testbed" else (g,))))
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds {args.seeds!r}: expected integers such as 0,1,2", file=sys.stderr)
        return 2
    if not args.scale > 0:
        print(f"error: --scale {args.scale!r}: expected a number > 0 such as 0.5",
              file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs!r}: expected an integer >= 1", file=sys.stderr)
        return 2
    patterns = [g for g in args.select.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        print(f"error: --only {','.join(unknown)}: unknown group; valid: {', '.join(GROUPS)}",
              file=sys.stderr)
        return 2
    plans = {g: [j for j in plan(g, recipes=args.recipes, out=args.out, seeds=seeds,
                                 extra=tuple(args.set), full=args.full, scale=args.scale)
                 if _selected(j, patterns)] for g in groups}
    recorded: set[str] = set()
    if args.records:
        try:
            index = read_records(args.records)
            keys, notes = restore_recorded([j for js in plans.values() for j in js], index,
                                           args.out, dry=args.dry_run or args.report_only)
        except (RecordsError, MfrError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        recorded = set(keys)
        print(f"records: {len(keys)} run(s) restored from {args.records}"
              + (" (dry run: nothing written)" if args.dry_run or args.report_only else ""))
        for line in notes:
            print(f"  {line}")
    by_group: dict[str, list[Job]] = {}
    to_run: list[Job] = []
    planned: set[tuple] = set()
    shares: set[str] = set()   # groups with a job another group runs (reported at the end)
    for group in groups:
        jobs = plans[group]
        by_group[group] = jobs
        print(f"== {group}: {len(jobs)} job(s)")
        for job in jobs:
            done = is_complete(job) or (job.kind == "train" and run_key(job, args.out)
                                        in recorded)
            state = ("recorded, skip" if is_recorded(job.run_dir)
                     or run_key(job, args.out) in recorded else "done, skip") if done \
                else "to run"
            print(f"  [{state}] {job.kind} {job.run_dir}\n      {shlex.join(command(job)[1:])}")
            ident = (job.kind, job.run_dir, job.eval_args)
            if job.kind != "train" and not done and is_recorded(job.run_dir):
                print(f"error: {job.key} evaluates {job.run_dir}, which was restored from a run "
                      f"record and has no weights; remove that folder and plan its training "
                      f"group in the same call (e.g. --only tb_table3,tb_table5) so it is "
                      f"trained", file=sys.stderr)
                return 2
            if ident in planned:
                shares.add(group)
            elif not done:
                to_run.append(job)
            planned.add(ident)
    if args.dry_run:
        return 0
    tb_controls = None

    def group_done(group: str) -> None:
        nonlocal tb_controls
        if group in TB_GROUPS and tb_controls is None:
            tb_controls = plan("tb_controls", recipes=args.recipes, out=args.out, seeds=seeds,
                               extra=tuple(args.set), full=args.full, scale=args.scale)
        md = report(group, by_group[group], args.out,
                    controls_jobs=tb_controls if group in TB_GROUPS else None)
        write_records(group, by_group[group], args.out)
        if md:
            print(f"  report: {md}", flush=True)

    if args.report_only:
        for group in groups:
            group_done(group)
        return 0

    # seed-major: a study cut short has every arm at its first seeds, not some arms at all
    to_run.sort(key=lambda j: j.seed)

    def job_done(job: Job) -> None:    # a study cut short keeps the record of every run done
        for group in groups:
            if any(j.run_dir == job.run_dir for j in by_group[group]):
                write_records(group, by_group[group], args.out)

    failed = Scheduler(to_run, width=args.jobs, out=args.out, on_group_done=group_done,
                       on_job_done=job_done).run()
    for group in groups:   # groups with nothing left to run still get their report, and
        # groups that share a run with another group (written once that one has finished)
        if group in shares or not any(j.group == group for j in to_run):
            group_done(group)
    if failed:
        print(f"{len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
