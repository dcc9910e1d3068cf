"""Small-scale reproduction of the paper's figures and tables: train every run, then compare.

    python tools/reproduce.py [--only GROUP[,GROUP]] [--seeds 0,1,2] [--out runs/repro]
        [--recipes recipes] [--set key=value ...] [--scale F] [--select GLOB[,GLOB]]
        [--jobs N] [--full] [--dry-run | --report-only]

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
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Optional

import attrs

GROUPS = ("table3", "table4", "fig2", "fig3", "fig4", "table5", "cv_sweep", "dmf")
DIGITS_METRICS = ("eval/nfe1/fd_digits", "eval/nfe2/fd_digits")
TOY_METRICS = ("eval/nfe1/swd", "eval/nfe2/swd")
EULER_STEPS = (32, 64, 128)
TABLE5_ROWS = ("meanflow", "minsnr_beta", "dtd_beta")   # MeanFlow, Ours w MinSNR, Ours w DTD
FIG4_EULER_STEPS = (32,)
BETA_CV = (0.0, 0.25, 0.5, 0.75, 1.0)
SWEEP_KEY = "objective.params.beta_cv"


@attrs.frozen
class Job:
    """One training run (``kind="train"``) or one evaluation of a trained run (``"eval"``)."""

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


def plan(group: str, *, recipes: str, out: str, seeds: list[int], extra: tuple[str, ...] = (),
         full: bool = False, scale: float = 1.0) -> list[Job]:
    """The jobs of one group, in the order they must run."""
    jobs: list[Job] = []

    def add(path, seed, overrides=(), variant="", after=()):
        name = _stem(path) + (f"-{variant}" if variant else "")
        ov = (f"run.seed={seed}", *overrides, *extra)
        ov += scaled_overrides(path, ov, scale)
        jobs.append(Job(group, name, path, os.path.join(out, group, f"{name}-s{seed}"), seed,
                        ov, after=tuple(after)))

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
        fm = _globs(recipes, "digits/flow_matching.yaml")
        for s in seeds:
            for path in fm:
                add(path, s)
            fm_dir = jobs[-1].run_dir if fm else None
            for path in _globs(recipes, "observation/digits_dmf*.yaml"):
                add(path, s, (f"init_from.path={fm_dir}",) if fm_dir else (),
                    after=(fm_dir,) if fm_dir else ())
    elif group == "table5":
        # "Ours w X" in the paper is X + progressive beta (Table 1's rows), not + X alone.
        for path in _globs(recipes, *(f"digits/table3/{row}.yaml" for row in TABLE5_ROWS)):
            for s in seeds:
                euler(path, s, os.path.join(out, "table3", f"{_stem(path)}-s{s}"), EULER_STEPS)
    else:
        raise SystemExit(f"error: unknown group {group!r}; valid: {', '.join(GROUPS)}")
    return jobs


def euler_metrics(steps) -> tuple[str, ...]:
    return tuple(f"eval/euler{k}/fd_digits" for k in steps)


def metrics_for(group: str) -> tuple[str, ...]:
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
    from mfrecipes.train.checkpoint import latest_checkpoint, load_meta

    folder = latest_checkpoint(os.path.join(job.run_dir, "checkpoints"))
    if folder is None:
        return False
    images = int(load_meta(folder).get("images", 0))
    if job.kind == "train":
        return images >= total_images(job)
    path = os.path.join(job.run_dir, "eval.jsonl")
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


def command(job: Job) -> list[str]:
    if job.kind == "eval":
        return [sys.executable, "-m", "mfrecipes", "eval", job.run_dir, *job.eval_args]
    return [sys.executable, "-m", "mfrecipes", "run", job.recipe, *job.overrides,
            "--out", job.run_dir]


def report(group: str, jobs: list[Job], out: str) -> Optional[str]:
    """Compare the group's runs into OUT/<group>.md / .csv / .png; None if nothing to compare."""
    from mfrecipes.errors import MfrError
    from mfrecipes.evaluate.compare import compare

    # A run whose training has not finished is left out (its figures are from fewer images and
    # would be averaged with finished seeds); groups that only evaluate need their evaluation.
    trains = {j.run_dir for j in jobs if j.kind == "train"}
    dirs, unfinished = [], []
    for j in jobs:
        seen = j.run_dir in dirs or j.run_dir in unfinished
        if seen or (j.kind == "eval" and j.run_dir in trains):
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

    def __init__(self, jobs: list[Job], *, width: int, out: str, on_group_done):
        self.pending = list(jobs)
        self.width = max(1, width)
        self.out = out
        self.on_group_done = on_group_done
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
        elif self.width > 1:
            print(f"  [done] {job.run_dir}", flush=True)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated groups (default all: {','.join(GROUPS)})")
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
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; write each group's report from the runs already there")
    args = p.parse_args(argv)
    groups = args.only.split(",") if args.only else list(GROUPS)
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
    by_group: dict[str, list[Job]] = {}
    to_run: list[Job] = []
    for group in groups:
        jobs = [j for j in plan(group, recipes=args.recipes, out=args.out, seeds=seeds,
                                extra=tuple(args.set), full=args.full, scale=args.scale)
                if _selected(j, patterns)]
        by_group[group] = jobs
        print(f"== {group}: {len(jobs)} job(s)")
        for job in jobs:
            done = is_complete(job)
            state = "done, skip" if done else "to run"
            print(f"  [{state}] {job.kind} {job.run_dir}\n      {shlex.join(command(job)[1:])}")
            if not done:
                to_run.append(job)
    if args.dry_run:
        return 0

    def group_done(group: str) -> None:
        md = report(group, by_group[group], args.out)
        if md:
            print(f"  report: {md}", flush=True)

    if args.report_only:
        for group in groups:
            group_done(group)
        return 0

    failed = Scheduler(to_run, width=args.jobs, out=args.out, on_group_done=group_done).run()
    for group in groups:   # groups with nothing left to run still get their report
        if not any(j.group == group for j in to_run):
            group_done(group)
    if failed:
        print(f"{len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
