"""The example objective plugin: its target against a float64 finite-difference reference, and the
package installed for real (entry point, contract checks, a short run through the trainer)."""
from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch

from conftest import REPO
from mfrecipes.errors import RecipeError
from mfrecipes.registry import OBJECTIVES
from shared_parts import TOY_RECIPE, TimeNet, install_plugin, run_mfr

PLUGIN = os.path.join(REPO, "plugins", "mfr_example_objective")
NAME = "meanflow_clipped"


@pytest.fixture(scope="module")
def clipped():
    """The plugin's objective class, imported from its source folder; unregistered afterwards so
    the other tests see the built-in registry only."""
    sys.path.insert(0, PLUGIN)
    try:
        mod = importlib.import_module("mfr_example_objective.objective")
        yield mod.ClippedMeanFlow
    finally:
        OBJECTIVES.unregister(NAME)
        for key in [k for k in sys.modules if k.startswith("mfr_example_objective")]:
            del sys.modules[key]
        sys.path.remove(PLUGIN)


def _batch(b=12, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, dim, generator=g, dtype=torch.float64)
    noise = torch.randn(b, dim, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.8 + 0.2
    r = t * torch.rand(b, generator=g, dtype=torch.float64)
    r[:3] = t[:3]                                            # flow-matching rows
    return x, noise, t, r


def _reference(net, x, noise, t, r, max_ratio, eps=1e-6):
    """The clipped target written out: du/dt by a central difference along (v, 1, 1)."""
    tb = t[:, None]
    z, v = (1 - tb) * x + tb * noise, noise - x
    h = t - r
    with torch.no_grad():
        dudt = (net(z + eps * v, t + eps, h + eps) - net(z - eps * v, t - eps, h - eps)) / (2 * eps)
        corr = h[:, None] * dudt
        ratio = corr.norm(dim=1) / v.norm(dim=1)
        scale = torch.clamp(max_ratio / ratio, max=1.0)
        scale = torch.where(h == 0, torch.ones_like(scale), scale)
        return v - scale[:, None] * corr, ratio, net(z, t, h)


def test_target_matches_finite_difference_reference(clipped):
    torch.manual_seed(0)
    net = TimeNet(dim=3).double()
    x, noise, t, r = _batch()
    avg = t != r
    _, ratio, _ = _reference(net, x, noise, t, r, float("inf"))
    lo, hi = ratio[avg].sort().values[[3, 4]]
    for max_ratio in (float("inf"), float((lo + hi) / 2)):  # no clipping; clipping some rows
        out = clipped(max_ratio=max_ratio)(net, x, None, t, r, noise, progress=0.5)
        target, _, u = _reference(net, x, noise, t, r, max_ratio)
        torch.testing.assert_close(out.target, target, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(out.u, u)
        torch.testing.assert_close(out.err, ((u - target) ** 2).sum(1))
        assert torch.equal(out.is_average, avg)
        clipped_rows = int((ratio[avg] > max_ratio).sum())
        assert clipped_rows == (0 if max_ratio == float("inf") else 5)
        assert out.diagnostics["clip_share"] == pytest.approx(clipped_rows / int(avg.sum()))
    # where clipped, the correction has exactly the allowed size
    v = noise - x
    corr = v - out.target
    big = avg & (ratio > max_ratio)
    torch.testing.assert_close(corr[big].norm(dim=1), max_ratio * v[big].norm(dim=1))


def test_bad_parameters_are_one_clear_error(clipped):
    with pytest.raises(RecipeError, match=r"max_ratio must be a number > 0") as info:
        OBJECTIVES.build({"name": NAME, "params": {"max_ratio": 0}}, where="objective")
    assert "objective.params" in str(info.value)
    with pytest.raises(RecipeError, match=r"omega"):
        OBJECTIVES.build({"name": NAME, "params": {"omega": 2.0}}, where="objective",
                         num_classes=None)          # guidance without labels


# -- installed for real --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """``pip install`` the example plugin into a private folder put on PYTHONPATH."""
    return install_plugin(PLUGIN, tmp_path_factory.mktemp("objective-site"))


def mfr(args, site, **env):
    return run_mfr(args, site, REPO, **env)


def test_listed_with_origin_and_passes_its_checks(plugin_site):
    proc = mfr(["list", "objective", "--json"], plugin_site)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert "mfr-example-objective" in rows[NAME]["origin"]
    assert rows[NAME]["params"]["max_ratio"] == 1.0
    proc = mfr(["check-plugin", NAME], plugin_site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok: every check passed" in proc.stdout and "FAIL" not in proc.stdout


@pytest.mark.slow
def test_trains_through_the_trainer(plugin_site, tmp_path):
    recipe = tmp_path / "r.yaml"
    text = TOY_RECIPE.replace("objective: {name: meanflow, params: {}}",
                              f"objective: {{name: {NAME}, params: {{max_ratio: 0.001}}}}")
    text = text.replace("total_images: 1280", "total_images: 320").replace(
        "log_every_images: 320", "log_every_images: 64").replace(
        "checkpoint_every_images: 640", "checkpoint_every_images: 320")
    assert NAME in text and "total_images: 320" in text
    recipe.write_text(text)
    proc = mfr(["run", str(recipe), "--out", str(tmp_path / "run")], plugin_site,
               MFR_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 5
    recs = [json.loads(line) for line in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "loss" in r]
    assert len(logged) == 5 and all(r["loss"] == r["loss"] for r in logged)
    shares = [v for r in logged for k, v in r.items() if k.endswith("clip_share")]
    assert len(shares) == 5 and all(0 <= s <= 1 for s in shares) and max(shares) > 0
    plugins = json.loads((tmp_path / "run" / "plugins.json").read_text())
    assert [p["distribution"] for p in plugins["entry_points"]] == ["mfr-example-objective"]
