"""The contract checks (mfrecipes.contracts, mfrecipes.testing): a violating component per check,
caught at build time or on the first step of the real trainer, with one error that names it;
``check_component`` and ``mfr check-plugin`` on good and bad names.
"""
from __future__ import annotations

import os

import pytest
import torch

from mfrecipes import contracts
from mfrecipes.cli import main
from mfrecipes.errors import ContractError
from mfrecipes.plugins import load_components
from mfrecipes.recipe import load_recipe
from mfrecipes.registry import (BACKBONES, DATASETS, GAP_SCHEDULES, LOSS_WEIGHTINGS, OBJECTIVES,
                                TIMESTEP_SAMPLERS, attributed_to)
from mfrecipes.testing import check_component
from mfrecipes.train.loop import Trainer
from shared_parts import TOY_RECIPE

load_components()
PLUGIN = "mfr-test-contracts"  # a made-up plugin distribution, named in every origin below


def _register(reg, name, obj):
    with attributed_to(PLUGIN):
        reg.register(name)(obj)


@pytest.fixture
def registered():
    """Register components for one test (under the made-up plugin), unregistered afterwards."""
    made = []

    def add(reg, name, obj):
        _register(reg, name, obj)
        made.append((reg, name))
        return obj
    yield add
    for reg, name in made:
        reg.unregister(name)


def _trainer(tmp_path, overrides, images=128):
    """The toy recipe for ``images`` / 64 steps (two by default)."""
    path = tmp_path / "r.yaml"
    path.write_text(TOY_RECIPE)
    recipe, data = load_recipe(str(path), [f"train.total_images={images}",
                                           "train.checkpoint_every_images=64",
                                           "train.log_every_images=64", *overrides])
    return lambda: Trainer(recipe, data, str(tmp_path / "run")).run()


# -- the components that break one check each ------------------------------------------------------
class ColumnWeighting:
    """A loss weighting returning [B, 1] (it would broadcast the loss to [B, B])."""

    def weights(self, err, t, r):
        return torch.ones_like(err)[:, None]


class LateColumnWeighting:
    """Right on the tiny build-time probe, [B, 1] on a training-size batch."""

    def weights(self, err, t, r):
        w = torch.ones_like(err)
        return w if len(err) <= 8 else w[:, None]


class NegativeWeighting:
    def weights(self, err, t, r):
        return -torch.ones_like(err)


class NanWeighting:
    def weights(self, err, t, r):
        return torch.full_like(err, float("nan"))


class ColumnSampler:
    def sample(self, batch_size, *, progress, generator, device=None):
        t = torch.rand(batch_size, 1, generator=generator)
        return t, t.clone()


class SwappedSampler:
    """r > t on every row with r != t."""

    def sample(self, batch_size, *, progress, generator, device=None):
        a = torch.rand(batch_size, generator=generator)
        b = torch.rand(batch_size, generator=generator)
        return torch.minimum(a, b), torch.maximum(a, b)


class InfSampler:
    def sample(self, batch_size, *, progress, generator, device=None):
        t = torch.rand(batch_size, generator=generator)
        t[0] = float("inf")
        return t, t.clone()


class HalfAtEqualSchedule:
    """Weight 0.5 everywhere, also on the r = t rows."""

    def weights(self, t, r, progress):
        return torch.full_like(t, 0.5)


class ScalarSchedule:
    def weights(self, t, r, progress):
        return torch.ones(())


def _flow_matching():
    from mfrecipes.objectives.flow_matching import FlowMatching
    return FlowMatching


class ColumnErrObjective(_flow_matching()):
    """flow_matching whose err is [B, 1]."""

    def __call__(self, net, x, y, t, r, noise, *, progress, ema_net=None):
        out = super().__call__(net, x, y, t, r, noise, progress=progress, ema_net=ema_net)
        out.err = out.err[:, None]
        return out


class FloatMaskObjective(_flow_matching()):
    """flow_matching whose is_average is a float mask."""

    def __call__(self, net, x, y, t, r, noise, *, progress, ema_net=None):
        out = super().__call__(net, x, y, t, r, noise, progress=progress, ema_net=ema_net)
        out.is_average = out.is_average.float()
        return out


class FirstCoordinateNet(torch.nn.Module):
    """A points backbone that returns only the first coordinate: [B, 1] for [B, 2]."""

    def __init__(self, *, input_shape, num_classes=None):
        super().__init__()
        self.lin = torch.nn.Linear(input_shape[0], 1)

    def forward(self, z, t, h, y=None):
        return self.lin(z) * (1 + t[:, None])


class WrongShapeData:
    """A dataset whose batches have one coordinate too many."""

    def __init__(self, *, seed=0, rank=0, world_size=1, cache_dir=None):
        from mfrecipes.data.base import DataInfo
        self.info = DataInfo(name="wrong", modality="points", sample_shape=(2,))

    def batches(self, batch_size, *, start=0):
        while True:
            yield torch.zeros(batch_size, 3), None

    def counters(self):
        return {}

    def reference(self, n, seed):
        return torch.zeros(n, 2)


# -- through the real trainer --------------------------------------------------------------------
def test_column_loss_weighting_stops_the_run_at_build_naming_the_plugin(tmp_path, registered):
    registered(LOSS_WEIGHTINGS, "column_weights", ColumnWeighting)
    with pytest.raises(ContractError) as caught:
        _trainer(tmp_path, ["loss_weighting.name=column_weights"])()
    msg = str(caught.value)
    print(msg)  # the report quotes it verbatim
    assert msg.startswith("loss_weighting 'column_weights' (from ")
    assert "ColumnWeighting (plugin mfr-test-contracts)" in msg
    assert "at build time" in msg and "weights shape [B]: expected shape [8], got shape [8, 1]" in msg
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # nothing trained


def test_first_step_catches_what_the_probe_missed(tmp_path, registered):
    registered(LOSS_WEIGHTINGS, "late_column", LateColumnWeighting)
    calls = []
    real_step = Trainer._train_step

    def counted(self, *a, **k):
        calls.append(self.step)
        return real_step(self, *a, **k)
    Trainer._train_step = counted
    try:
        with pytest.raises(ContractError) as caught:
            _trainer(tmp_path, ["loss_weighting.name=late_column"])()
    finally:
        Trainer._train_step = real_step
    msg = str(caught.value)
    print(msg)
    assert calls == [0], "the error must come on the first step, before any update"
    assert msg.startswith("loss_weighting 'late_column' (from ") and PLUGIN in msg
    assert ("on the first step (batch 64, 0 images): weights shape [B]: expected shape [64], "
            "got shape [64, 1]") in msg
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not os.listdir(ckpts)  # stopped before any checkpoint


@pytest.mark.parametrize("kind, name, cls, want", [
    ("loss_weighting", "neg_weights", NegativeWeighting, "weights >= 0: expected values >= 0"),
    ("loss_weighting", "nan_weights", NanWeighting, "weights finite: expected finite values"),
    ("timestep_sampler", "column_sampler", ColumnSampler, "t shape [B]: expected shape [8], "
                                                          "got shape [8, 1]"),
    ("timestep_sampler", "swapped_sampler", SwappedSampler, "0 <= r <= t <= 1: expected"),
    ("timestep_sampler", "inf_sampler", InfSampler, "t finite: expected finite values, got 1 of"),
    ("gap_schedule", "half_schedule", HalfAtEqualSchedule, "weight 1 where r = t: expected "
                                                           "weight 1 on the"),
    ("gap_schedule", "scalar_schedule", ScalarSchedule, "weight shape [B]: expected shape [8], "
                                                        "got shape []"),
])
def test_each_light_check_is_caught_at_build(tmp_path, registered, kind, name, cls, want):
    reg = {"loss_weighting": LOSS_WEIGHTINGS, "timestep_sampler": TIMESTEP_SAMPLERS,
           "gap_schedule": GAP_SCHEDULES}[kind]
    registered(reg, name, cls)
    with pytest.raises(ContractError) as caught:
        _trainer(tmp_path, [f"{kind}.name={name}"])()
    msg = str(caught.value)
    assert msg.startswith(f"{kind} {name!r} (from ") and f"{cls.__name__} (plugin {PLUGIN})" in msg
    assert "at build time" in msg and want in msg, msg
    assert msg.count("breaks its contract") == 1


@pytest.mark.parametrize("kind, name, factory, want", [
    ("objective", "column_err", ColumnErrObjective, "err shape [B]: expected shape [64], got "
                                                    "shape [64, 1]"),
    ("objective", "float_mask", FloatMaskObjective, "is_average bool: expected dtype torch.bool, "
                                                    "got torch.float32"),
    ("backbone", "first_coordinate", FirstCoordinateNet, "output shape = input shape: expected "
                                                         "shape [64, 2] (the input's), got shape "
                                                         "[64, 1]"),
])
def test_objective_and_backbone_checks_on_the_first_step(tmp_path, registered, kind, name,
                                                         factory, want):
    reg = {"objective": OBJECTIVES, "backbone": BACKBONES}[kind]
    registered(reg, name, factory)
    with pytest.raises(ContractError) as caught:
        _trainer(tmp_path, [f"{kind}.name={name}"] + (
            ["backbone.params={}"] if kind == "backbone" else []))()
    msg = str(caught.value)
    assert msg.startswith(f"{kind} {name!r} (from ") and f"(plugin {PLUGIN})" in msg
    assert "on the first step (batch 64, 0 images)" in msg and want in msg, msg


def test_good_components_are_checked_only_on_the_first_step(tmp_path, monkeypatch):
    """Four steps: the probe's two progress points at build, then one first-step check."""
    seen = []
    real = contracts.weighting_checks
    monkeypatch.setattr(contracts, "weighting_checks",
                        lambda w, b: (seen.append(b), real(w, b))[1])
    out = _trainer(tmp_path, [], images=256)()
    assert out["step"] == 4
    assert seen == [8, 8, 64]


# -- the check functions against hand-made outputs -------------------------------------------------
def test_sampler_checks_report_the_first_bad_row():
    t = torch.tensor([0.5, 0.2, 0.9])
    r = torch.tensor([0.1, 0.3, 0.9])   # row 1 has r > t
    checks = contracts.sampler_checks(t, r, 3)
    assert [p for _, p in checks][:-1] == [None] * 4
    assert checks[-1][1] == ("expected 0 <= r <= t <= 1 on every row, got 1 rows outside "
                             "(row 1: t=0.2, r=0.3)")
    assert all(p is None for _, p in contracts.sampler_checks(t, torch.minimum(r, t), 3))


def test_gap_check_tolerates_rounding_only():
    t = torch.tensor([0.5, 0.4, 0.3])
    r = torch.tensor([0.5, 0.1, 0.3])
    ok = torch.tensor([1.0 + 1e-7, 7.0, 1.0])
    bad = torch.tensor([1.0 + 1e-3, 7.0, 1.0])
    assert all(p is None for _, p in contracts.gap_checks(ok, t, r))
    assert contracts.gap_checks(bad, t, r)[-1][1].startswith(
        "expected weight 1 on the 2 rows with r = t, got 1 rows otherwise")


def test_hooks_are_read_through_the_declared_protocols():
    dtd = TIMESTEP_SAMPLERS.build({"name": "dtd", "params": {}}, device=torch.device("cpu"))
    plain = TIMESTEP_SAMPLERS.build({"name": "logit_normal", "params": {}})
    assert contracts.observer(dtd) is dtd and contracts.observer(plain) is None
    assert contracts.state_of(plain) is None and set(contracts.state_of(dtd)) == {
        "stage", "best", "counter", "ema"}
    assert contracts.description(plain) == {} and contracts.description(dtd)["stage"] == 1
    contracts.load_state(plain, {"anything": 1})  # no hook: nothing happens


# -- check_component and mfr check-plugin -------------------------------------------------------
def test_check_component_passes_every_builtin_kind():
    for kind, name in [("timestep_sampler", "uniform"), ("loss_weighting", "adaptive"),
                       ("gap_schedule", "progressive"), ("objective", "flow_matching"),
                       ("backbone", "mlp"), ("dataset", "toy2d")]:
        results = check_component(kind, name)
        assert results and all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("kind, name, cls, failing", [
    ("loss_weighting", "column_weights", ColumnWeighting, "weights shape [B]"),
    ("gap_schedule", "half_schedule", HalfAtEqualSchedule, "progress 0: weight 1 where r = t"),
    ("objective", "column_err", ColumnErrObjective, "unconditional: err shape [B]"),
    ("backbone", "first_coordinate", FirstCoordinateNet, "input 2, unconditional: output shape "
                                                         "= input shape"),
    ("dataset", "wrong_shape", WrongShapeData, "batch x shape [B, *sample_shape] float32"),
])
def test_check_component_fails_a_bad_component(registered, kind, name, cls, failing):
    reg = {"loss_weighting": LOSS_WEIGHTINGS, "gap_schedule": GAP_SCHEDULES,
           "objective": OBJECTIVES, "backbone": BACKBONES, "dataset": DATASETS}[kind]
    registered(reg, name, cls)
    params = {"input_shape": (2,)} if kind == "backbone" else {}  # a points backbone
    results = check_component(kind, name, **params)
    bad = [r for r in results if not r.ok and not r.skipped]
    assert [r.label for r in bad][:1] == [failing], "\n".join(map(str, results))
    assert PLUGIN in bad[0].component.origin


def test_cli_check_plugin_good_and_bad(registered, capsys):
    assert main(["check-plugin", "adaptive"]) == 0
    out = capsys.readouterr().out
    assert "loss_weighting 'adaptive' (from mfrecipes.loss_weightings" in out
    assert "pass  weights shape [B]" in out and out.rstrip().endswith("ok: every check passed")

    registered(LOSS_WEIGHTINGS, "column_weights", ColumnWeighting)
    assert main(["check-plugin", "column_weights", "--kind", "loss_weighting"]) == 1
    out = capsys.readouterr().out
    assert f"(plugin {PLUGIN})" in out
    assert "FAIL  weights shape [B]: expected shape [64], got shape [64, 1]" in out
    assert out.rstrip().endswith("FAILED: 1 check(s) failed")

    assert main(["check-plugin", "adaptiv"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'adaptive' (loss_weighting)?" in err


def test_cli_check_plugin_passes_params(capsys):
    assert main(["check-plugin", "mlp", "--param", "hidden=8", "--param", "depth=1"]) == 0
    assert main(["check-plugin", "mlp", "--param", "hidden=-1"]) == 2
    assert "hidden" in capsys.readouterr().err
