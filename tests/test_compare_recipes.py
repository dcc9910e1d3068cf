"""tools/compare_recipes.py and mfrecipes.evaluate.compare on hand-written run directories."""
from __future__ import annotations

import csv
import io
import json
import os
import statistics

import pytest
import yaml

from mfrecipes.errors import RecipeError
from mfrecipes.evaluate.compare import compare, images_to_threshold, lower_is_better

from conftest import REPO, load_tool

M = "eval/nfe1/fd_digits"


def _run(root, name, *, seed=0, sampler="logit_normal", p=1.0, values=(), eval_lines=()):
    d = root / name
    d.mkdir()
    recipe = {"run": {"name": name, "seed": seed, "out_dir": None},
              "data": {"name": "digits", "params": {}},
              "timestep_sampler": {"name": sampler, "params": {"mu": -0.4}},
              "loss_weighting": {"name": "adaptive", "params": {"p": p, "c": 0.01}},
              "train": {"total_images": 300, "ema_decays": [0.999]}}
    (d / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    lines = [{"images": 50, "step": 1, "loss": 1.0}]
    lines += [{"images": i, "step": i // 50, M: v} for i, v in values]
    lines.append({"images": 999, M: "nan"})            # non-finite values are skipped
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "{cut")
    if eval_lines:
        (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_lines))
    return str(d)


@pytest.fixture
def runs(tmp_path):
    return [
        _run(tmp_path, "mf_s0", seed=0, values=[(100, 30.0), (200, 20.0), (300, 22.0)]),
        _run(tmp_path, "mf_s1", seed=1, values=[(100, 28.0), (200, 24.0), (300, 18.0)]),
        _run(tmp_path, "dtd_s0", seed=0, sampler="dtd", values=[(100, 25.0), (200, 15.0),
                                                                (300, 12.0)]),
        _run(tmp_path, "dtd_s1", seed=1, sampler="dtd", values=[(100, 26.0), (200, 19.0),
                                                                (300, 14.0)]),
    ]


def test_direction_and_threshold():
    assert lower_is_better("eval/nfe1/fid") and lower_is_better("eval/nfe2/swd")
    assert not lower_is_better("eval/nfe1/fid", "higher")
    assert not lower_is_better("accuracy")
    # the exact metrics of the test bed: map error, velocity errors, per-gap-bin errors
    assert all(lower_is_better(m) for m in ("eval/exact/map1", "eval/exact/v_err",
                                            "eval/exact/u_err/g0.25-0.50"))
    assert not lower_is_better("eval/tas/g0.10-0.30")   # an affinity (a cosine)
    pts = [(100, 30.0), (200, 20.0), (300, 10.0)]
    assert images_to_threshold(pts, 20.0) == 200
    assert images_to_threshold(pts, 5.0) is None
    assert images_to_threshold(pts, 25.0, lower=False) == 100
    with pytest.raises(RecipeError, match="direction"):
        lower_is_better("x", "down")


def test_one_row_per_run(runs):
    cmp = compare(runs, M, threshold=20.0)
    assert cmp.keys == ("run.seed", "timestep_sampler.name")   # name/out_dir are ignored
    rows = {r["run"]: r for r in cmp.rows}
    assert rows["mf_s0"]["final"] == 22.0 and rows["mf_s0"]["best"] == 20.0
    assert rows["mf_s0"]["images_to_20"] == 200 and rows["mf_s1"]["images_to_20"] == 300
    assert rows["dtd_s0"]["images_to_20"] == 200 and rows["dtd_s1"]["images_to_20"] == 200
    assert rows["dtd_s1"]["timestep_sampler.name"] == "dtd"
    assert rows["mf_s0"]["images_final"] == 300


def test_group_seeds_mean_std(runs):
    cmp = compare(runs, M, threshold=20.0, group_seeds=True)
    assert cmp.keys == ("timestep_sampler.name",)
    assert len(cmp.rows) == 2
    mf = next(r for r in cmp.rows if r["timestep_sampler.name"] == "logit_normal")
    assert mf["final"] == pytest.approx((20.0, statistics.stdev([22.0, 18.0])))
    assert mf["best"] == pytest.approx((19.0, statistics.stdev([20.0, 18.0])))
    assert mf["images_to_20"] == pytest.approx((250.0, statistics.stdev([200, 300])))
    assert mf["seeds"] == "0,1"
    label, xs, ys = next(c for c in cmp.curves if "logit_normal" in c[0])
    assert xs == (100, 200, 300) and ys == pytest.approx((29.0, 22.0, 20.0))
    cmp = compare(runs, M, threshold=13.0, group_seeds=True)
    dtd = next(r for r in cmp.rows if r["timestep_sampler.name"] == "dtd")
    assert dtd["images_to_13"] == "1/2 reached"


def test_writers_and_tool(runs, tmp_path, capsys):
    tool = load_tool("compare_recipes")
    md, cs, png = (str(tmp_path / n) for n in ("o.md", "o.csv", "o.png"))
    assert tool.main([*runs, "--metric", M, "--threshold", "20", "--group-seeds", "--md", md,
                      "--csv", cs, "--plot", png]) == 0
    text = open(md).read()
    assert "| run | timestep_sampler.name | seeds | final | best |" in text
    assert "20 ± 2.8" in text
    rows = list(csv.DictReader(io.StringIO(open(cs).read())))
    assert {r["timestep_sampler.name"] for r in rows} == {"logit_normal", "dtd"}
    mf = next(r for r in rows if r["timestep_sampler.name"] == "logit_normal")
    assert float(mf["final"]) == pytest.approx(20.0) and float(mf["final_std"]) > 0
    assert open(png, "rb").read(4) == b"\x89PNG"
    assert "logit_normal" in capsys.readouterr().out
    assert tool.main([*runs, "--metric", "eval/nfe9/none"]) == 2
    assert tool.main([str(tmp_path / "missing")]) == 2


def test_eval_jsonl_fills_in(tmp_path):
    a = _run(tmp_path, "a", values=[(100, 5.0)],
             eval_lines=[{"images": 100, "eval/euler32/fid": 9.0},
                         {"images": 200, "eval/euler32/fid": 7.0}])
    b = _run(tmp_path, "b", p=0.75, values=[(100, 6.0)])
    cmp = compare([a, b], "eval/euler32/fid")
    assert cmp.keys == ("loss_weighting.params.p",)
    ra, rb = cmp.rows
    assert ra["final"] == 7.0 and ra["best"] == 7.0 and rb["final"] is None


def test_empty_params_are_not_a_difference():
    from mfrecipes.evaluate.compare import differing_keys, flatten

    a = flatten({"gap_schedule": {"name": "constant", "params": {}}})
    b = flatten({"gap_schedule": {"name": "progressive", "params": {"k": 1.0}}})
    assert a == {"gap_schedule.name": "constant"}
    assert differing_keys([a, b]) == ["gap_schedule.name", "gap_schedule.params.k"]


def test_a_key_added_later_at_its_default_is_not_a_difference(tmp_path):
    """Runs recorded before train.compile existed group with runs that have it at its default."""
    from mfrecipes.recipe import load_recipe
    from mfrecipes.recipe.load import dump_yaml

    _, resolved = load_recipe(os.path.join(REPO, "recipes", "quickstart.yaml"))
    old = json.loads(json.dumps(resolved))
    del old["train"]["compile"], old["train"]["compile_mode"]
    dirs = []
    for i, rec in enumerate((old, resolved, old)):
        rec = json.loads(json.dumps(rec))
        rec["run"]["seed"] = i
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "recipe.resolved.yaml").write_text(dump_yaml(rec))
        (d / "metrics.jsonl").write_text(json.dumps({"images": 10, "loss": float(i)}) + "\n")
        dirs.append(str(d))
    cmp = compare(dirs, "loss", group_seeds=True)
    assert len(cmp.rows) == 1 and cmp.rows[0]["seeds"] == "0,1,2"
    assert not any("compile" in c for c in cmp.columns)


def test_curve_labels_are_short_and_unambiguous():
    from mfrecipes.evaluate.compare import _curve_label, _short_keys

    keys = ["gap_schedule.name", "gap_schedule.params.k", "loss_weighting.name"]
    assert _short_keys(keys) == {"gap_schedule.name": "gap_schedule.name",
                                 "gap_schedule.params.k": "k",
                                 "loss_weighting.name": "loss_weighting.name"}
    row = {"run": "beta-s0 (+2)", "gap_schedule.name": "progressive",
           "gap_schedule.params.k": "1.0", "loss_weighting.name": "adaptive"}
    assert _curve_label(row, keys) == "beta"   # too long: the arm's name, no seed or count
    assert _curve_label(row, ["gap_schedule.params.k"]) == "k=1.0"
    assert _curve_label({"run": "r", "x.k": "<unset>"}, ["x.k"]) == "r"
    assert _curve_label({"run": "dtd_beta_s3"}, []) == "dtd_beta"
    assert _curve_label({"run": "s1"}, []) == "s1"


def test_tool_without_metric_picks_one_the_runs_have(runs, tmp_path, capsys):
    tool = load_tool("compare_recipes")
    assert tool.main(runs) == 0
    captured = capsys.readouterr()
    assert f"metric: {M}" in captured.err and "mf_s0" in captured.out
    bare = _run(tmp_path, "bare")                       # logs only a loss
    assert tool.main([bare]) == 2
    err = capsys.readouterr().err
    assert "pass --metric, one of: loss" in err


def test_grouped_curves_carry_the_seed_spread_and_plain_ticks(runs, tmp_path, monkeypatch):
    """The band around a grouped curve is the seeds' standard deviation at each point, and the
    axes use plain tick labels (40k, 0.2), not an exponent offset."""
    from mfrecipes import plots
    from mfrecipes.plots import _minor_label, plain_number

    cmp = compare(runs, M, group_seeds=True)
    i = next(k for k, c in enumerate(cmp.curves) if "logit_normal" in c[0])
    assert cmp.spreads[i] == pytest.approx((statistics.stdev([30.0, 28.0]),
                                            statistics.stdev([20.0, 24.0]),
                                            statistics.stdev([22.0, 18.0])))
    assert compare(runs[:1], M, group_seeds=True).spreads == (None,)
    bands = []
    real_finish = plots._finish_axes

    def spy(fig, ax, path, **kw):
        bands.extend(c for c in ax.collections)   # fill_between adds one collection per band
        return real_finish(fig, ax, path, **kw)

    monkeypatch.setattr(plots, "_finish_axes", spy)
    cmp.plot(str(tmp_path / "c.png"), logy=True)
    assert len(bands) == 2 and (tmp_path / "c.png").stat().st_size > 0
    assert [plain_number(v) for v in (40_000, 1_200_000, 0.25, 3.0, 500)] == \
        ["40k", "1.2M", "0.25", "3", "500"]
    assert [_minor_label(v) for v in (0.2, 0.3, 0.5, 0.9, 20.0)] == ["0.2", "", "0.5", "", "20"]
