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
    from mfrecipes.registry import OBJECTIVES, ensure_builtins

    assert main(["show", QS, "objective.params.omega=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    ensure_builtins()
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
