"""CLI habits: overrides after options, list descriptions, show with defaults, typed errors."""
from __future__ import annotations

import importlib.util
import os

import pytest
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


TOY = os.path.join(REPO, "recipes", "toy2d_meanflow.yaml")


@pytest.mark.parametrize("recipe, overrides, expected", [
    (QS, ["objective.params.omega=high"],
     "objective.params.omega: expected a number, got 'high' (str)"),
    (QS, ["objective.params.beta_cv=x"],
     "objective.params.beta_cv: expected a number, got 'x' (str)"),
    (QS, ["objective.params.jvp_impl=3"], "objective.params.jvp_impl: expected a string, got 3"),
    (QS, ["timestep_sampler.params.mu=high"],
     "timestep_sampler.params.mu: expected a number, got 'high' (str)"),
    (QS, ["timestep_sampler.params.mu_r=x"],
     "timestep_sampler.params.mu_r: expected a number or null, got 'x' (str)"),
    (QS, ["loss_weighting.params.p=[1]"],
     "loss_weighting.params.p: expected a number, got [1] (list)"),
    (TOY, ["gap_schedule.name=progressive", "gap_schedule.params.mc_draws=many"],
     "gap_schedule.params.mc_draws: expected an integer, got 'many' (str)"),
    (TOY, ["backbone.params.depth=1.5"], "backbone.params.depth: expected an integer, got 1.5 "
                                         "(float)"),
    (TOY, ["backbone.params.hidden=wide"],
     "backbone.params.hidden: expected an integer, got 'wide' (str)"),
    (TOY, ["data.params.num_points=lots"],
     "data.params.num_points: expected an integer, got 'lots' (str)"),
    (TOY, ["data.params.kind=3"], "data.params.kind: expected a string, got 3 (int)"),
    pytest.param(TOY, ["train.loggers=[jsonl, {name: wandb, params: {tags: 3}}]"],
                 "train.loggers[1].params.tags: expected a list of strings, got 3 (int)",
                 marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                          reason="wandb (an optional extra) is not installed: "
                                                 "the missing package is reported first")),
    # a value of the right type out of range: still its own key path
    (QS, ["objective.params.beta_cv=1.5"], "objective.params.beta_cv: "),
    (TOY, ["backbone.params.depth=0"], "backbone.params.depth: "),
])
def test_wrong_type_names_the_key_and_the_expected_type(capsys, recipe, overrides, expected):
    capsys.readouterr()
    assert main(["check", recipe, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}"), err
    assert err.count("error:") == 1 and "Traceback" not in err


def test_list_shows_backbone_parameter_counts_without_building(capsys, monkeypatch):
    import json

    import torch

    def refuse(*_a, **_k):
        raise AssertionError("mfr list built a module")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    assert main(["list", "backbone"]) == 0
    table = capsys.readouterr().out
    row = table[table.index("unet_cifar10"):].split("│ backbone")[0]
    assert "[55.9M params on 3x32x32]" in " ".join(line.strip("│ ") for line in row.splitlines())
    assert main(["list", "backbone", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["unet_cifar10"]["parameters"] == [55_932_419, [3, 32, 32], None]
    assert rows["dit_xl_2"]["parameters"][0] == 676_440_592


def test_known_parameter_counts_match_the_code():
    """The table ``mfr list`` prints is what the meta-device builds count today."""
    from mfrecipes.backbones import KNOWN_COUNTS, counted_on, format_count, parameter_count
    from mfrecipes.registry import BACKBONES

    built_ins = [e for e in BACKBONES.entries() if e.origin.startswith("mfrecipes.")]
    assert sorted(KNOWN_COUNTS) == sorted(e.name for e in built_ins)
    for e in built_ins:
        assert parameter_count(e.obj, *counted_on(e.name)) == KNOWN_COUNTS[e.name], e.name
    # the U-Net on the real device, once: the meta count is the real count
    assert sum(p.numel() for p in BACKBONES.get("unet_cifar10")(input_shape=(3, 32, 32))
               .parameters()) == 55_932_419
    assert [format_count(n) for n in (55_932_419, 676_440_592, 132_482, 999)] == \
        ["55.9M", "676M", "132k", "999"]


@pytest.mark.parametrize("override", ["gap_schedule.params.mc_draws=1e5",
                                      "objective.params.omega=1",
                                      "timestep_sampler.params.mu_r=null"])
def test_right_types_pass_the_type_check(override):
    """An integral float for an integer, an int for a number, null for an optional number."""
    from mfrecipes.validate import check_param_types
    from mfrecipes.plugins import load_components
    from mfrecipes.registry import GAP_SCHEDULES, OBJECTIVES, TIMESTEP_SAMPLERS

    load_components()
    section, _, rest = override.partition(".params.")
    key, _, raw = rest.partition("=")
    value = yaml.safe_load(raw) if raw != "1e5" else 1e5
    factory = {"gap_schedule": GAP_SCHEDULES.get("progressive"),
               "objective": OBJECTIVES.get("meanflow"),
               "timestep_sampler": TIMESTEP_SAMPLERS.get("logit_normal")}[section]
    check_param_types(factory, {key: value}, f"{section}.params")  # no error
