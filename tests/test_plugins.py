"""Plugins: the example package is installed for real and discovered through its entry point."""
from __future__ import annotations

import json
import os

import pytest

from conftest import REPO
from shared_parts import install_plugin, run_mfr

PLUGIN = os.path.join(REPO, "plugins", "mfr_example_sampler")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """``pip install`` the example plugin into a private folder put on PYTHONPATH."""
    return install_plugin(PLUGIN, tmp_path_factory.mktemp("plugin-site"))


def mfr(args, site, **env):
    return run_mfr(args, site, REPO, **env)


def test_plugin_discovered_with_provenance(plugin_site):
    proc = mfr(["list", "timestep_sampler", "--json"], plugin_site)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert "beta" in rows
    assert "mfr-example-sampler" in rows["beta"]["origin"]
    assert rows["beta"]["params"] == {"a": 2.0, "b": 2.0, "fm_ratio": 0.75}


def test_plugin_can_be_disabled(plugin_site):
    proc = mfr(["list", "timestep_sampler", "--json"], plugin_site,
               MFR_DISABLE_PLUGINS="example_sampler")
    assert proc.returncode == 0, proc.stderr
    assert "beta" not in {r["name"] for r in json.loads(proc.stdout)}


def test_train_one_step_with_plugin_sampler(plugin_site, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "run: {name: plug}\n"
        "data: {name: toy2d, params: {kind: two_moons, num_points: 1000}}\n"
        "backbone: {name: mlp, params: {hidden: 16, depth: 1}}\n"
        "timestep_sampler: {name: beta, params: {a: 3.0}}\n"
        "train: {total_images: 32, global_batch_size: 32, progress_bar: false}\n"
        "eval: {at_end: false}\n")
    proc = mfr(["run", str(recipe), "--out", str(tmp_path / "run")], plugin_site,
               MFR_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 1
    plugins = json.loads((tmp_path / "run" / "plugins.json").read_text())
    assert [p["distribution"] for p in plugins["entry_points"]] == ["mfr-example-sampler"]


def test_broken_plugin_is_one_clear_error(tmp_path):
    site = tmp_path / "site"
    dist = site / "broken_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mfrecipes.plugins]\nbroken = broken_mod\n")
    (site / "broken_mod.py").write_text("raise ImportError('no such thing')\n")
    proc = mfr(["list"], str(site))
    assert proc.returncode == 2
    assert "plugin 'broken'" in proc.stderr and "broken-plugin" in proc.stderr
    assert "MFR_DISABLE_PLUGINS=broken" in proc.stderr and "Traceback" not in proc.stderr
