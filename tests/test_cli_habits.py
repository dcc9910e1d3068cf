"""CLI habits: overrides after options, list descriptions, show with defaults, typed errors."""
from __future__ import annotations

import os

import yaml

from mfrecipes.cli import _parse, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = os.path.join(REPO, "recipes", "quickstart.yaml")


def test_overrides_in_any_order():
    a = _parse(["run", QS, "--out", "D", "train.lr=2e-4", "run.seed=3"])
    assert a.out == "D" and a.overrides == ["train.lr=2e-4", "run.seed=3"]
    b = _parse(["run", QS, "run.seed=3", "--out", "D", "train.lr=2e-4"])
    assert sorted(b.overrides) == sorted(a.overrides)


def test_stray_option_still_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        _parse(["check", QS, "--bogus", "x=1"])
    assert "--bogus" in capsys.readouterr().err


def test_list_shows_descriptions(capsys):
    assert main(["list", "loss_weighting"]) == 0
    out = capsys.readouterr().out
    assert "description" in out and "Adaptive weighting" in out


def test_show_fills_component_defaults(capsys):
    from mfrecipes.plugins import load_components
    from mfrecipes.registry import OBJECTIVES

    assert main(["show", QS, "objective.params.omega=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    load_components()
    defaults = OBJECTIVES.entry("meanflow").parameters()
    params = shown["objective"]["params"]
    assert set(params) == {k for k in defaults if k not in OBJECTIVES.runtime_args}
    assert params["omega"] == 0.5 and params["jvp_impl"] == defaults["jvp_impl"]


def test_wrong_type_says_expected_type(capsys):
    assert main(["check", QS, "objective.params.omega=high"]) == 2
    err = capsys.readouterr().err
    assert "omega must be a number, got str 'high'" in err and "not supported" not in err
    assert main(["check", QS, "timestep_sampler.params.mu=high"]) == 2
    assert "mu must be a number" in capsys.readouterr().err
