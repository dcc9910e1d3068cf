"""Recipes: base inheritance, overrides, validation errors with dotted paths."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest

from mfrecipes.errors import RecipeError
from mfrecipes.recipe import load_recipe
from mfrecipes.build import check_recipe
from mfrecipes.recipe.load import apply_overrides, parse_override

from conftest import REPO

BASE = textwrap.dedent("""
    run: {name: base, seed: 1}
    data: {name: toy2d, params: {kind: checkerboard}}
    backbone: {name: mlp, params: {hidden: 32}}
    objective: {name: meanflow, params: {}}
    timestep_sampler: {name: logit_normal, params: {mu: -0.4, sigma: 1.0, fm_ratio: 0.5}}
    train: {total_images: 1000, global_batch_size: 50, lr: 1.0e-3}
""")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def base(tmp_path):
    return write(tmp_path, "_base/base.yaml", BASE)


def test_base_merge_and_component_replacement(tmp_path, base):
    child = write(tmp_path, "child.yaml", """
        base: _base/base.yaml
        run: {name: child}
        timestep_sampler: {params: {fm_ratio: 0.25}}     # same name: merged
        backbone: {name: mlp, params: {depth: 2}}         # same name: merged
        gap_schedule: {name: constant}
    """)
    recipe, data = load_recipe(child)
    assert recipe.run.name == "child" and recipe.run.seed == 1
    assert data["timestep_sampler"] == {"name": "logit_normal",
                                        "params": {"mu": -0.4, "sigma": 1.0, "fm_ratio": 0.25}}
    assert data["backbone"]["params"] == {"hidden": 32, "depth": 2}
    other = write(tmp_path, "other.yaml", """
        base: _base/base.yaml
        timestep_sampler: {name: uniform, params: {fm_ratio: 0.5}}   # new name: replaced
    """)
    _, data = load_recipe(other)
    assert data["timestep_sampler"] == {"name": "uniform", "params": {"fm_ratio": 0.5}}


def test_overrides(base):
    recipe, data = load_recipe(base, ["train.lr=2e-4", "timestep_sampler.name=uniform",
                                      "run.name=x", "train.ema_decays=[0.99, 0.999]"])
    assert recipe.train.lr == 2e-4 and recipe.run.name == "x"
    assert recipe.train.ema_decays == (0.99, 0.999)
    # A component's name changed: its params are reset to the new component's defaults.
    assert data["timestep_sampler"] == {"name": "uniform", "params": {}}
    # Name then params, in order, both apply.
    _, data = load_recipe(base, ["timestep_sampler.name=uniform",
                                 "timestep_sampler.params.fm_ratio=0.1"])
    assert data["timestep_sampler"]["params"] == {"fm_ratio": 0.1}
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])


@pytest.mark.parametrize("overrides, path, words", [
    (["train.lrr=1"], "train.lrr", ["unknown key", "did you mean 'lr'"]),
    (["train.lr=fast"], "train.lr", ["expected a number"]),
    (["train.total_images=-5"], "train.total_images", ["> 0"]),
    (["engine=fsdp"], "engine", ["'single'", "'deepspeed'"]),
    (["deepspeed.zero_stage=3"], "deepspeed.zero_stage", ["torch.func", "1 or 2"]),
    (["bogus=1"], "bogus", ["unknown key"]),
    (["train.ema_decays=[1.5]"], "train.ema_decays", ["(0, 1)"]),
])
def test_schema_errors_carry_dotted_path(base, overrides, path, words):
    with pytest.raises(RecipeError) as info:
        load_recipe(base, overrides)
    assert info.value.path == path, str(info.value)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("overrides, path, words", [
    (["timestep_sampler.name=logit_norm"], "timestep_sampler.name",
     ["did you mean 'logit_normal'", "available:"]),
    (["timestep_sampler.params.muu=0"], "timestep_sampler.params.muu", ["did you mean 'mu'"]),
    (["backbone.name=dit_tiny_3"], "backbone.name", ["dit_tiny_2"]),
    (["timestep_sampler.params.fm_ratio=2.0"], "timestep_sampler.params.fm_ratio",
     ["fm_ratio"]),
])
def test_component_errors_carry_dotted_path(base, overrides, path, words):
    recipe, _ = load_recipe(base, overrides)
    with pytest.raises(RecipeError) as info:
        check_recipe(recipe)
    assert info.value.path == path, str(info.value)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_bad_base_and_bad_override(tmp_path):
    bad = write(tmp_path, "bad.yaml", "base: nowhere.yaml\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    assert info.value.path == "base" and "nowhere.yaml" in str(info.value)
    with pytest.raises(RecipeError):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(RecipeError):
        apply_overrides({"train": 3}, ["train.lr=1"])
    cyc = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(cyc)
    notyaml = write(tmp_path, "x.yaml", "run: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(notyaml)


def test_cli_errors_are_one_message_no_traceback(base):
    for args in (["check", base, "train.lrr=1"], ["check", base, "timestep_sampler.name=nope"],
                 ["show", "missing.yaml"], ["list", "widgets"]):
        proc = subprocess.run([sys.executable, "-m", "mfrecipes.cli", *args],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_show_prints_resolved_recipe(base):
    proc = subprocess.run([sys.executable, "-m", "mfrecipes.cli", "show", base, "train.lr=3e-4"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    import yaml

    data = yaml.safe_load(proc.stdout)
    assert data["train"]["lr"] == 3e-4 and data["train"]["total_images"] == 1000
    assert data["loss_weighting"]["name"] == "adaptive"  # defaults are filled in


RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"),
                                      recursive=True) if "/_base/" not in p)


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, REPO) for p in RECIPES])
def test_every_recipe_checks(path):
    recipe, _ = load_recipe(path)
    check_recipe(recipe)
