"""tools/reproduce.py: the plan, the skip logic, and one tiny group end to end."""
from __future__ import annotations

import glob
import json
import os

import pytest

from conftest import REPO, load_tool

RECIPES = os.path.join(REPO, "recipes")


@pytest.fixture(scope="module")
def repro():
    return load_tool("reproduce")


def test_plan_globs_recipes_and_seeds(repro, tmp_path):
    jobs = repro.plan("table3", recipes=RECIPES, out=str(tmp_path), seeds=[0, 1])
    names = sorted({os.path.basename(j.recipe) for j in jobs})
    assert names == sorted(os.path.basename(p)
                           for p in glob.glob(os.path.join(RECIPES, "digits/table3/*.yaml")))
    assert len(jobs) == 2 * len(names)
    j = jobs[0]
    assert j.run_dir == os.path.join(str(tmp_path), "table3", f"{j.name}-s{j.seed}")
    assert f"run.seed={j.seed}" in j.overrides

    cv = repro.plan("cv_sweep", recipes=RECIPES, out="o", seeds=[0])
    swept = [j for j in cv if "beta_cv" in " ".join(j.overrides)]
    assert swept and all("train.total_images=1000000" in j.overrides for j in cv)
    assert all("train.total_images=1000000" not in j.overrides
               for j in repro.plan("cv_sweep", recipes=RECIPES, out="o", seeds=[0], full=True))

    dmf = repro.plan("dmf", recipes=RECIPES, out="o", seeds=[3])
    if len(dmf) > 1:   # flow matching first, the DMF runs read it
        assert dmf[0].name == "flow_matching"
        assert all(f"init_from.path={dmf[0].run_dir}" in j.overrides for j in dmf[1:])

    fig4 = repro.plan("fig4", recipes=RECIPES, out="o", seeds=[0])
    trains = [j for j in fig4 if j.kind == "train"]
    evals = [j for j in fig4 if j.kind == "eval"]
    assert trains and [j.run_dir for j in evals] == [j.run_dir for j in trains]
    assert all(j.after == (j.run_dir,) and j.wants == ("eval/euler32/fd_digits",)
               and j.eval_args == ("--instantaneous", "--steps", "32") for j in evals)
    assert "eval/euler32/fd_digits" in repro.metrics_for("fig4")

    t5 = repro.plan("table5", recipes=RECIPES, out="o", seeds=[0])
    assert all(j.kind == "eval" and j.run_dir.startswith(os.path.join("o", "table3"))
               for j in t5)
    # the paper's Table 5 rows: MeanFlow, Ours w MinSNR, Ours w DTD (the full method: + beta)
    assert sorted(j.name for j in t5) == ["dtd_beta", "meanflow", "minsnr_beta"]
    assert all(j.after == (j.run_dir,) for j in t5)


def test_dry_run_prints_and_writes_nothing(repro, tmp_path, capsys):
    out = tmp_path / "repro"
    assert repro.main(["--only", "table3,fig3", "--seeds", "0,1", "--out", str(out),
                       "--recipes", RECIPES, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "== table3" in text and "== fig3" in text and "[to run]" in text
    assert "mfrecipes run" in text and "run.seed=1" in text
    assert not out.exists()


def _fake_checkpoint(run_dir, images):
    folder = os.path.join(run_dir, "checkpoints", f"img-{images:012d}")
    os.makedirs(folder)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"images": images, "complete": True}, f)


def test_skip_logic(repro, tmp_path):
    (job,) = [j for j in repro.plan("table3", recipes=RECIPES, out=str(tmp_path), seeds=[0])
              if j.name == "meanflow"]
    total = repro.total_images(job)
    assert not repro.is_complete(job)                 # nothing there
    _fake_checkpoint(job.run_dir, total // 2)
    assert not repro.is_complete(job)                 # interrupted: resume
    _fake_checkpoint(job.run_dir, total)
    assert repro.is_complete(job)
    # an override of the budget changes what "complete" means
    longer = repro.plan("table3", recipes=RECIPES, out=str(tmp_path), seeds=[0],
                        extra=(f"train.total_images={2 * total}",))
    assert not repro.is_complete(next(j for j in longer if j.name == "meanflow"))
    # evaluation jobs: complete once eval.jsonl has every metric for the final checkpoint
    (ev,) = [j for j in repro.plan("table5", recipes=RECIPES, out=str(tmp_path), seeds=[0])
             if j.name == "meanflow"]
    assert ev.run_dir == job.run_dir and not repro.is_complete(ev)
    rec = {"images": total, **{m: 1.0 for m in repro.metrics_for("table5")}}
    with open(os.path.join(job.run_dir, "eval.jsonl"), "w") as f:
        f.write(json.dumps(rec) + "\n")
    assert repro.is_complete(ev)


TINY = """\
run: {name: tiny, device: cpu}
data: {name: digits, params: {resolution: 8}}
backbone: {name: dit_tiny_2, params: {}}
train: {global_batch_size: 64, total_images: 128, lr: 1.0e-3, ema_decays: [0.999],
        log_every_images: 64, progress_bar: false}
eval: {nfe: [1, 2], num_samples: 32, grid_size: 16}
"""


def test_one_tiny_group_runs_skips_and_reports(repro, tmp_path, capsys):
    root = tmp_path / "recipes"
    (root / "digits" / "table3").mkdir(parents=True)
    (root / "digits" / "table3" / "tiny.yaml").write_text(TINY)
    out = tmp_path / "out"
    argv = ["--only", "table3", "--recipes", str(root), "--out", str(out), "--seeds", "0"]
    assert repro.main(argv) == 0
    assert "[to run]" in capsys.readouterr().out
    run_dir = out / "table3" / "tiny-s0"
    assert (run_dir / "checkpoints" / "latest").is_file()
    md = (out / "table3.md").read_text()
    assert "eval/nfe1/fd_digits" in md and "eval/nfe2/fd_digits" in md and "tiny" in md
    assert "## Every run" in md and "tiny-s0 |" in md.split("## Every run")[1]
    assert (out / "table3.csv").is_file() and (out / "table3.png").is_file()
    mtime = os.path.getmtime(run_dir / "metrics.jsonl")
    assert repro.main(argv) == 0
    assert "[done, skip]" in capsys.readouterr().out
    assert os.path.getmtime(run_dir / "metrics.jsonl") == mtime

    # The run's record, written by the tool from what `mfr run` wrote, restores it in a fresh
    # output folder: nothing is trained there and the report has the same rows.
    records = json.loads((out / "table3_runs.json").read_text())
    assert list(records) == ["table3/tiny-s0"]
    rec = records["table3/tiny-s0"]
    assert rec["recipe"]["run"]["seed"] == 0 and "git_commit" in rec["provenance"]
    assert any("eval/nfe1/fd_digits" in e for e in rec["evaluations"])
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / "table3_runs.json").write_text(json.dumps(records))
    fresh = tmp_path / "fresh"
    argv2 = ["--only", "table3", "--recipes", str(root), "--out", str(fresh), "--seeds", "0",
             "--records", str(shelf)]
    assert repro.main(argv2) == 0
    text = capsys.readouterr().out
    assert "1 run(s) restored" in text and "[recorded, skip]" in text and "[started]" not in text
    restored = fresh / "table3" / "tiny-s0"
    assert (restored / "recorded.json").is_file() and not (restored / "checkpoints").exists()

    def every_run(md):
        return md.split("## Every run")[1]
    assert every_run((fresh / "table3.md").read_text()) == every_run(md)
    # a later call with another seed keeps the record of seed 0 in the same file
    (one,) = repro.plan("table3", recipes=str(root), out=str(fresh), seeds=[1])
    os.makedirs(one.run_dir)
    _fake_checkpoint(one.run_dir, 128)
    import shutil

    shutil.copy(restored / "recipe.resolved.yaml", one.run_dir)
    assert repro.write_records("table3", [one], str(fresh)) == str(fresh / "table3_runs.json")
    kept = json.loads((fresh / "table3_runs.json").read_text())
    assert sorted(kept) == ["table3/tiny-s0", "table3/tiny-s1"]
    assert kept["table3/tiny-s0"]["evaluations"] == rec["evaluations"]


def test_scale_multiplies_every_image_count(repro):
    from mfrecipes.recipe import load_recipe

    for group, name in (("fig2", "digits_fig2_vpre50k"), ("table3", "meanflow")):
        full = next(j for j in repro.plan(group, recipes=RECIPES, out="o", seeds=[0])
                    if j.name == name)
        half = next(j for j in repro.plan(group, recipes=RECIPES, out="o", seeds=[0], scale=0.5)
                    if j.name == name)
        a, _ = load_recipe(full.recipe, list(full.overrides))
        b, _ = load_recipe(half.recipe, list(half.overrides))
        assert b.train.total_images == round(a.train.total_images / 2)
        assert b.train.checkpoint_every_images == round(a.train.checkpoint_every_images / 2)
        assert b.eval.every_images == round(a.eval.every_images / 2)
        assert b.train.log_every_images == round(a.train.log_every_images / 2)
        assert [s.images for s in b.stages] == [round(s.images / 2) for s in a.stages]
        assert [s.overrides for s in b.stages] == [s.overrides for s in a.stages]
        if a.stages:
            assert sum(s.images for s in b.stages) == b.train.total_images
        assert repro.total_images(half) == b.train.total_images


def test_select_and_bad_arguments(repro, tmp_path, capsys):
    argv = ["--only", "table3,fig3", "--seeds", "0,1", "--out", str(tmp_path / "o"),
            "--recipes", RECIPES, "--dry-run", "--select", "table3/dtd*"]
    assert repro.main(argv) == 0
    text = capsys.readouterr().out
    assert "table3/dtd-s1" in text and "table3/dtd_beta-s0" in text
    assert "meanflow-s" not in text and "== fig3: 0 job(s)" in text
    for bad in (["--scale", "0"], ["--jobs", "0"], ["--seeds", "a"]):
        assert repro.main(["--dry-run", *bad]) == 2
        assert "error: --" in capsys.readouterr().err


TINY_FM = TINY.replace("name: tiny,", "name: tiny_fm,") + (
    "objective: {name: flow_matching, params: {}}\n"
    "timestep_sampler: {name: logit_normal, params: {fm_ratio: 1.0}}\n")
TINY_DMF = TINY.replace("name: tiny,", "name: tiny_dmf,") + (
    "init_from: {path: does/not/exist/yet, weights: ema}\n"
    "objective: {name: discrete_meanflow, params: {K: 2}}\n")


def test_parallel_jobs_wait_for_the_runs_they_read(repro, tmp_path, capsys):
    """--jobs 2 on the dmf group: the DMF runs start from the flow-matching run, so they wait
    for it (mfr run refuses an init_from that does not exist), then run side by side."""
    root = tmp_path / "recipes"
    (root / "digits").mkdir(parents=True)
    (root / "observation").mkdir()
    (root / "digits" / "flow_matching.yaml").write_text(TINY_FM)
    (root / "observation" / "digits_dmf.yaml").write_text(TINY_DMF)
    (root / "observation" / "digits_dmf_dagger.yaml").write_text(
        TINY_DMF.replace("K: 2}", "K: 2, dagger: true}"))
    out = tmp_path / "out"
    argv = ["--only", "dmf", "--recipes", str(root), "--out", str(out), "--seeds", "0",
            "--jobs", "2"]
    assert repro.main(argv) == 0
    text = capsys.readouterr().out
    fm_done = text.index("[done] " + str(out / "dmf" / "flow_matching-s0"))
    for name in ("digits_dmf-s0", "digits_dmf_dagger-s0"):
        run_dir = out / "dmf" / name
        assert text.index("[started] " + str(run_dir)) > fm_done
        assert (run_dir / "checkpoints" / "latest").is_file()
        assert (out / "logs" / "dmf" / f"{name}.log").is_file()
    assert "dmf" in (out / "dmf.md").read_text()


def test_report_only_runs_nothing_and_reports_what_is_there(repro, tmp_path, capsys):
    root = tmp_path / "recipes"
    (root / "digits" / "table3").mkdir(parents=True)
    (root / "digits" / "table3" / "tiny.yaml").write_text(TINY)
    out = tmp_path / "out"
    base = ["--only", "table3", "--recipes", str(root), "--out", str(out)]
    assert repro.main([*base, "--seeds", "0"]) == 0
    (out / "table3.md").unlink()
    capsys.readouterr()
    assert repro.main([*base, "--seeds", "0,1", "--report-only"]) == 0
    assert "[to run]" in capsys.readouterr().out          # seed 1 is planned ...
    assert not (out / "table3" / "tiny-s1").exists()        # ... but not run
    assert "tiny-s0" in (out / "table3.md").read_text()
    # an unfinished run (a checkpoint at half the budget) is named, not averaged in
    s1 = out / "table3" / "tiny-s1"
    s1.mkdir()
    (s1 / "recipe.resolved.yaml").write_text(
        (out / "table3" / "tiny-s0" / "recipe.resolved.yaml").read_text())
    (s1 / "metrics.jsonl").write_text(json.dumps({"images": 64, "eval/nfe1/fd_digits": 1e3}) + "\n")
    _fake_checkpoint(str(s1), 64)
    assert repro.main([*base, "--seeds", "0,1", "--report-only"]) == 0
    md = (out / "table3.md").read_text()
    assert "Not finished, left out: tiny-s1" in md and "tiny-s1 |" not in md


def test_cv_sweep_report_plots_the_final_figure_against_beta_cv(repro, tmp_path):
    import math

    import yaml

    jobs = [j for j in repro.plan("cv_sweep", recipes=RECIPES, out=str(tmp_path), seeds=[0, 1])
            if "swiss_roll" in j.name or "anchor" in j.name]
    assert {j.name for j in jobs} >= {"toy2d_swiss_roll-beta0", "toy2d_swiss_roll-beta1",
                                      "toy2d_beta1_anchor"}
    expected = {}   # (label, beta_cv) -> the finals written for seeds 0 and 1
    for j in jobs:
        recipe = repro._load(j.recipe, j.overrides)
        beta = recipe.to_dict()["objective"]["params"]["beta_cv"]
        total = recipe.train.total_images
        os.makedirs(j.run_dir)
        with open(os.path.join(j.run_dir, "recipe.resolved.yaml"), "w") as f:
            yaml.safe_dump(recipe.to_dict(), f)
        final = 0.1 + beta + 0.2 * j.seed       # seed 0: 0.1 + b, seed 1: 0.3 + b
        with open(os.path.join(j.run_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"images": total // 2, "eval/nfe1/swd": 9.0}) + "\n")
            f.write(json.dumps({"images": total, "eval/nfe1/swd": final,
                                "eval/nfe2/swd": final}) + "\n")
        _fake_checkpoint(j.run_dir, total)
        expected.setdefault((repro._stem(j.recipe), beta), []).append(final)

    series = repro.sweep_series([(repro._stem(j.recipe), j.run_dir) for j in jobs],
                                "eval/nfe1/swd", repro.SWEEP_KEY)
    by_label = {label: (xs, means, stds) for label, xs, means, stds in series}
    assert set(by_label) == {"toy2d_swiss_roll", "toy2d_beta1_anchor"}
    xs, means, stds = by_label["toy2d_swiss_roll"]
    assert list(xs) == list(repro.BETA_CV)
    for x, m, s in zip(xs, means, stds):
        a, b = expected[("toy2d_swiss_roll", x)]
        assert math.isclose(m, 0.2 + x) and math.isclose(m, (a + b) / 2)
        assert math.isclose(s, math.sqrt(((a - m) ** 2 + (b - m) ** 2) / 1))   # ddof = 1
    assert by_label["toy2d_beta1_anchor"][0] == (1.0,)

    assert repro.report("cv_sweep", jobs, str(tmp_path)) == str(tmp_path / "cv_sweep.md")
    from PIL import Image

    png = tmp_path / "cv_sweep_beta_cv.png"
    assert Image.open(png).format == "PNG"
    # a run without the metric is left out of the series, not counted as a zero
    (tmp_path / "cv_sweep" / "toy2d_swiss_roll-beta0-s1" / "metrics.jsonl").write_text("")
    series = repro.sweep_series([(repro._stem(j.recipe), j.run_dir) for j in jobs],
                                "eval/nfe1/swd", repro.SWEEP_KEY)
    xs, means, stds = {lab: (x, m, s) for lab, x, m, s in series}["toy2d_swiss_roll"]
    assert means[0] == pytest.approx(0.1) and stds[0] == 0.0


# ----------------------------------------------------------------------------- the test bed
STUB_BASE = """\
# A stand-in for the test-bed base recipe: the plans read YAML only.
base: digits.yaml
run: {name: testbed}
data: {name: mixture, params: {resolution: 16}}
train: {total_images: 1000, checkpoint_every_images: 500}
eval: {every_images: 125}
"""


@pytest.fixture
def tb_recipes(tmp_path):
    """recipes/testbed and recipes/_base copied, with a stand-in _base/testbed.yaml when the
    real one is not there."""
    import shutil

    root = tmp_path / "recipes"
    shutil.copytree(os.path.join(RECIPES, "_base"), root / "_base")
    shutil.copytree(os.path.join(RECIPES, "testbed"), root / "testbed")
    if not (root / "_base" / "testbed.yaml").exists():
        (root / "_base" / "testbed.yaml").write_text(STUB_BASE)
    return str(root)


def test_testbed_recipes_name_their_paper_row():
    paths = glob.glob(os.path.join(RECIPES, "testbed", "**", "*.yaml"), recursive=True)
    paths = [p for p in paths if os.sep + "gpu" + os.sep not in p]
    assert len(paths) >= 30
    for p in paths:
        head = open(p).read().split("\nbase:")[0]
        assert head.startswith("#") and any(w in head for w in (
            "Table", "Fig.", "Control-variate", "Discrete MeanFlow", "MeanFlow on the test bed",
            "Flow-matching")), p


def test_testbed_plans_from_yaml_only(repro, tb_recipes, tmp_path, capsys):
    out = str(tmp_path / "o")
    plans = {g: repro.plan(g, recipes=tb_recipes, out=out, seeds=[0, 1])
             for g in repro.TB_GROUPS}
    names = {g: sorted({j.name for j in jobs}) for g, jobs in plans.items()}
    assert names["tb_table3"] == ["beta", "dtd", "dtd_beta", "meanflow", "minsnr",
                                  "minsnr_beta"]
    assert names["tb_table4"] == ["k05", "k1", "k2", "k3"]
    assert names["tb_fig3"] == ["vnoise_k0", "vnoise_k001", "vnoise_k003", "vnoise_k01"]
    assert "vpre_only" in names["tb_fig4"] and len(names["tb_fig4"]) == 9
    assert {f"fixed_u_vpre{v:02d}" for v in (0, 5, 10, 15, 20)} <= set(names["tb_fig2"])
    assert len(names["tb_fig2"]) == 10
    assert names["tb_cv"] == [f"meanflow_cv-beta{b:g}" for b in repro.BETA_CV]
    # controls: the baseline is Table 3's MeanFlow run, the variants are overrides of it
    ctl = plans["tb_controls"]
    t3 = {j.run_dir: j for j in plans["tb_table3"]}
    base = [j for j in ctl if j.name == "meanflow"]
    assert [j.run_dir for j in base] == [os.path.join(out, "tb_table3", f"meanflow-s{s}")
                                         for s in (0, 1)]
    assert all(j.run_dir in t3 and t3[j.run_dir].overrides == j.overrides for j in base)
    by = {j.name: j for j in ctl if j.seed == 1}
    assert "data.params.draw_salt=1" in by["meanflow-aa"].overrides
    assert "objective.params.tangent_h=0" in by["meanflow-broken"].overrides
    total = repro.total_images(base[0])
    assert repro.total_images(by["meanflow-more_images"]) == round(1.25 * total)
    # table5 evaluates the Table 3 runs; fig5 measures the affinity of its own runs
    t5 = plans["tb_table5"]
    assert sorted(j.name for j in t5 if j.seed == 0) == ["dtd_beta", "meanflow", "minsnr_beta"]
    assert all(j.kind == "eval" and j.run_dir in t3 and j.after == (j.run_dir,) for j in t5)
    aff = [j for j in plans["tb_fig5"] if j.kind == "affinity"]
    assert len(aff) == 6 and all(j.wants == repro.TAS_METRICS for j in aff)
    dmf = plans["tb_dmf"]
    fm = next(j for j in dmf if j.name == "flow_matching" and j.seed == 0)
    d = next(j for j in dmf if j.name == "dmf" and j.seed == 0)
    assert f"init_from.path={fm.run_dir}" in d.overrides and d.after == (fm.run_dir,)
    # the tool's dry run of every new group
    assert repro.main(["--only", ",".join(repro.TB_GROUPS), "--recipes", tb_recipes,
                       "--out", out, "--seeds", "0,1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert all(f"== {g}:" in text for g in repro.TB_GROUPS) and not os.path.exists(out)
    assert repro.main(["--only", "tb_nothing", "--dry-run"]) == 2
    assert "unknown group" in capsys.readouterr().err


def _fake_run(repro, job, factor, *, points=8):
    """A finished run of ``job``: its resolved recipe, a map1 curve level * factor * 1000 / i
    at every 1/8 of the base budget up to its own total, and a checkpoint at that total."""
    import yaml

    recipe = repro._load(job.recipe, job.overrides)
    total = recipe.train.total_images
    os.makedirs(job.run_dir, exist_ok=True)
    with open(os.path.join(job.run_dir, "recipe.resolved.yaml"), "w") as f:
        yaml.safe_dump(recipe.to_dict(), f)
    import zlib

    import numpy as np

    level = {0: 1.0, 1: 1.6, 2: 0.7}[job.seed]   # a seed spread far above the effects
    # a small wobble of its own per run (arm and seed), the same at every evaluation
    rng = np.random.default_rng(zlib.crc32(os.path.basename(job.run_dir).encode()))
    wobble = float(np.exp(0.02 * rng.standard_normal()))
    step = 125
    with open(os.path.join(job.run_dir, "metrics.jsonl"), "w") as f:
        for i in range(step, total + 1, step):
            f.write(json.dumps({"images": i, "eval/exact/map1": level * factor * wobble
                                * 1000 / i, "eval/exact/v_err": level * factor}) + "\n")
    _fake_checkpoint(job.run_dir, total)


@pytest.mark.parametrize("broken_factor, passes", [(1.6, True), (1.0, False)])
def test_testbed_report_controls_gate(repro, tmp_path, broken_factor, passes):
    root = tmp_path / "recipes"
    (root / "_base").mkdir(parents=True)
    import shutil

    shutil.copy(os.path.join(RECIPES, "_base", "digits.yaml"), root / "_base")
    (root / "_base" / "testbed.yaml").write_text(STUB_BASE)
    shutil.copytree(os.path.join(RECIPES, "testbed", "table3"), root / "testbed" / "table3")
    out = str(tmp_path / "o")
    seeds = [0, 1, 2]
    ctl = repro.plan("tb_controls", recipes=str(root), out=out, seeds=seeds)
    t3 = repro.plan("tb_table3", recipes=str(root), out=out, seeds=seeds)
    factors = {"meanflow": 1.0, "meanflow-aa": 1.0, "meanflow-more_images": 1.0,
               "meanflow-broken": broken_factor, "minsnr": 0.8, "dtd": 1.0, "beta": 1.2,
               "minsnr_beta": 0.7, "dtd_beta": 0.9}
    for j in {j.run_dir: j for j in ctl + t3}.values():
        _fake_run(repro, j, factors[j.name])
    assert repro.main(["--only", "tb_controls,tb_table3", "--recipes", str(root), "--out", out,
                       "--seeds", "0,1,2", "--report-only"]) == 0
    ctl_md = open(os.path.join(out, "tb_controls.md")).read()
    t3_md = open(os.path.join(out, "tb_table3.md")).read()
    assert t3_md.index("## Controls") < t3_md.index("## Table 3")
    if passes:
        assert "The controls pass" in ctl_md and "The controls pass" in t3_md
        assert "| minsnr_beta | 0,1,2 |" in t3_md and "| dtd | 0,1,2 |" in t3_md
        rows = open(os.path.join(out, "tb_table3.csv")).read()
        assert "minsnr_beta" in rows and "better" in rows and "worse" in rows
        assert open(os.path.join(out, "tb_table3.png"), "rb").read(4) == b"\x89PNG"
        assert open(os.path.join(out, "tb_controls.png"), "rb").read(4) == b"\x89PNG"
    else:
        assert "cannot judge" in ctl_md and "cannot judge" in t3_md
        assert "| minsnr_beta |" not in t3_md and "No claims" in t3_md
        assert not os.path.exists(os.path.join(out, "tb_table3.png"))


def test_only_testbed_expands_and_the_default_stays_digits(repro, tb_recipes, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert repro.main(["--only", "testbed", "--recipes", tb_recipes, "--out", out,
                       "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert [g for g in repro.GROUPS if f"== {g}:" in text] == list(repro.TB_GROUPS)
    assert repro.main(["--recipes", tb_recipes, "--out", out, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "== tb_" not in text and "== table3:" in text


def test_affinity_job_writes_eval_jsonl(repro, tmp_path):
    """The Fig. 5 job on a real tiny run: the score per gap range lands in eval.jsonl at the
    checkpoint's images, the value mfrecipes.evaluate.task_affinity gives for the same seed,
    and the job then counts as done."""
    from mfrecipes.evaluate.task_affinity import task_affinity_run
    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.loop import Trainer

    from shared_parts import TOY_RECIPE

    path = tmp_path / "toy.yaml"
    path.write_text(TOY_RECIPE)
    run_dir = str(tmp_path / "run")
    recipe, data = load_recipe(str(path), ["train.total_images=640"])
    Trainer(recipe, data, run_dir).run()
    job = repro.Job("tb_fig5", "toy", str(path), run_dir, 3, ("train.total_images=640",),
                    kind="affinity", eval_args=("--gap-ranges", "0.1:0.3,0.5:0.7", "--seed", "3"),
                    wants=(repro.tas_metric(0.1, 0.3), repro.tas_metric(0.5, 0.7)))
    assert not repro.is_complete(job)
    assert repro.main(["--affinity", run_dir, *job.eval_args]) == 0
    (rec,) = [json.loads(line) for line in open(os.path.join(run_dir, "eval.jsonl"))]
    assert rec["images"] == 640 and set(job.wants) <= set(rec)
    ref = task_affinity_run(run_dir, gap_ranges=[(0.1, 0.3), (0.5, 0.7)], seed=3)
    assert rec["eval/tas/g0.10-0.30"] == pytest.approx(ref["results"][0]["mean"])
    assert -1.0 <= rec["eval/tas/g0.50-0.70"] <= 1.0
    assert repro.is_complete(job)
    assert repro.main(["--affinity", str(tmp_path / "nothing"), "--gap-ranges", "0:1"]) == 2


def test_testbed_report_of_nothing_writes_nothing(repro, tb_recipes, tmp_path):
    out = str(tmp_path / "o")
    jobs = repro.plan("tb_fig3", recipes=tb_recipes, out=out, seeds=[0])
    assert repro.report("tb_fig3", jobs, out, controls_jobs=[]) is None
    assert not os.path.exists(out)


def test_records_restore_only_the_same_recipe(repro, tmp_path, capsys):
    """A record restores a run only when it ran the recipe the plan would run, only into an
    empty folder and only when no other job needs the run's weights; a bad records file is one
    clear error."""
    root = tmp_path / "recipes"
    (root / "digits" / "table3").mkdir(parents=True)
    (root / "digits" / "table3" / "tiny.yaml").write_text(TINY)
    out = str(tmp_path / "o")
    (job,) = repro.plan("table3", recipes=str(root), out=out, seeds=[0])
    recipe = repro.expected_recipe(job)
    assert recipe["train"]["total_images"] == 128 and "params" in recipe["timestep_sampler"]
    rec = {"recipe": recipe, "evaluations": [{"images": 128, "eval/nfe1/fd_digits": 3.0}]}
    index = {"table3/tiny-s0": ("x_runs.json", rec)}
    assert repro.restore_recorded([job], index, out, dry=True) == (["table3/tiny-s0"], [])
    assert not os.path.exists(job.run_dir)                       # a dry run writes nothing
    # another budget: the record ran another recipe, so the run is trained, and the key is named
    (longer,) = repro.plan("table3", recipes=str(root), out=out, seeds=[0],
                           extra=("train.total_images=256",))
    keys, notes = repro.restore_recorded([longer], index, out)
    assert keys == [] and "train.total_images" in notes[0] and not os.path.exists(job.run_dir)
    # a job that reads the run (an evaluation) needs its weights: trained
    reader = repro.Job("table5", "tiny", job.recipe, job.run_dir, 0, kind="eval",
                       after=(job.run_dir,))
    keys, notes = repro.restore_recorded([job, reader], index, out)
    assert keys == [] and "reads its weights" in notes[0]
    # an interrupted run resumes rather than being replaced
    os.makedirs(job.run_dir)
    open(os.path.join(job.run_dir, "metrics.jsonl"), "w").close()
    keys, notes = repro.restore_recorded([job], index, out)
    assert keys == [] and "not empty" in notes[0]
    os.remove(os.path.join(job.run_dir, "metrics.jsonl"))
    assert repro.restore_recorded([job], index, out) == (["table3/tiny-s0"], [])
    assert repro.is_complete(job) and repro.is_recorded(job.run_dir)
    # an evaluation of a restored run (planned in a later call) cannot run: one error, no job
    assert not repro.is_complete(reader)
    from mfrecipes.evaluate.compare import load_run_curve

    assert load_run_curve(job.run_dir, "eval/nfe1/fd_digits").points == ((128, 3.0),)

    shelf = tmp_path / "shelf"
    shelf.mkdir()
    argv = ["--only", "table3", "--recipes", str(root), "--out", str(tmp_path / "p"),
            "--records", str(shelf), "--dry-run"]
    for text in ("{not json", json.dumps({"table3/tiny-s0": {"recipe": 1}}), "[1, 2]"):
        (shelf / "table3_runs.json").write_text(text)
        assert repro.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "table3_runs.json" in err and err.count("\n") == 1
    assert repro.main(argv[:-3] + ["--records", str(tmp_path / "nowhere"), "--dry-run"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_an_evaluation_of_a_restored_run_is_one_error(repro, tmp_path, capsys):
    root = tmp_path / "recipes"
    (root / "digits" / "table3").mkdir(parents=True)
    (root / "digits" / "table3" / "meanflow.yaml").write_text(TINY)
    out = str(tmp_path / "o")
    (job,) = repro.plan("table3", recipes=str(root), out=out, seeds=[0])
    rec = {"recipe": repro.expected_recipe(job),
           "evaluations": [{"images": 128, "eval/nfe1/fd_digits": 3.0}]}
    assert repro.restore_recorded([job], {"table3/meanflow-s0": ("x", rec)}, out)[0]
    assert repro.main(["--only", "table5", "--recipes", str(root), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "restored from a run record and has no weights" in err and err.count("\n") == 1
    # nothing ran: the restored folder is as it was
    assert sorted(os.listdir(job.run_dir)) == ["eval.jsonl", "recipe.resolved.yaml",
                                               "recorded.json"]
