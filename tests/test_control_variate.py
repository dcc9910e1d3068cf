"""The beta_cv schedule (Lu & Wang 2026): each shape against numbers written out by hand, the
objective's tangent driven by the scheduled value, the former keys refused with the new ones
named, and the logged beta_cv of a real toy2d run following the schedule."""
from __future__ import annotations

import json
import math

import pytest
import torch

from shared_parts import TimeNet
from mfrecipes.errors import RecipeError
from mfrecipes.objectives.control_variate import ControlVariate
from mfrecipes.objectives.meanflow import MeanFlow
from mfrecipes.recipe import load_recipe
from mfrecipes.registry import OBJECTIVES
from mfrecipes.train.loop import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

DT = torch.float64
C45 = math.cos(math.pi / 4)  # cosine at a quarter and three quarters of the window


# ---------------------------------------------------------------------------------------------
# the shapes: start 0.9 -> end 0.1 between s0 = 0.2 and s1 = 0.6
@pytest.mark.parametrize("schedule, progress, expected", [
    ("linear", 0.0, 0.9), ("linear", 0.2, 0.9), ("linear", 0.3, 0.7), ("linear", 0.4, 0.5),
    ("linear", 0.5, 0.3), ("linear", 0.6, 0.1), ("linear", 1.0, 0.1),
    ("cosine", 0.0, 0.9), ("cosine", 0.2, 0.9), ("cosine", 0.3, 0.9 - 0.8 * (1 - C45) / 2),
    ("cosine", 0.4, 0.5), ("cosine", 0.5, 0.9 - 0.8 * (1 + C45) / 2), ("cosine", 0.6, 0.1),
    ("cosine", 0.9, 0.1),
    ("step", 0.0, 0.9), ("step", 0.2, 0.9), ("step", 0.599, 0.9), ("step", 0.6, 0.1),
    ("step", 1.0, 0.1),
])
def test_schedule_shapes(schedule, progress, expected):
    cv = ControlVariate(schedule=schedule, start=0.9, end=0.1, s0=0.2, s1=0.6)
    assert cv.at(progress) == pytest.approx(expected, abs=1e-12)
    assert cv.enabled


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_constant_is_the_default_and_holds_beta_cv(progress):
    assert ControlVariate(beta=0.4).at(progress) == 0.4
    assert ControlVariate().at(progress) == 0.0 and not ControlVariate().enabled


@pytest.mark.parametrize("schedule, progress, expected", [
    ("linear", 0.0, 1.0), ("linear", 0.25, 0.75), ("linear", 1.0, 0.0),
    ("cosine", 0.5, 0.5), ("cosine", 0.25, (1 + C45) / 2), ("step", 0.99, 1.0), ("step", 1.0, 0.0),
])
def test_default_endpoints_are_the_authors_anneal_one_to_zero(schedule, progress, expected):
    cv = ControlVariate(schedule=schedule)  # s0 = 0, s1 = 1
    assert cv.at(progress) == pytest.approx(expected, abs=1e-12)


def test_warm_up_and_a_schedule_that_never_moves_beta():
    up = ControlVariate(schedule="linear", start=0.0, end=0.8, s0=0.5, s1=1.0)
    assert [up.at(p) for p in (0.0, 0.5, 0.75, 1.0)] == pytest.approx([0.0, 0.0, 0.4, 0.8])
    assert not ControlVariate(schedule="cosine", start=0.0, end=0.0).enabled
    assert ControlVariate(schedule="step", s0=0.7, s1=0.7).at(0.69) == 1.0  # s0 = s1 is fine


# ---------------------------------------------------------------------------------------------
# the objective uses the scheduled value


def batch(b=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(b, 3, generator=g, dtype=DT), torch.randn(b, 3, generator=g, dtype=DT)
    t = torch.rand(b, generator=g, dtype=DT) * 0.9 + 0.05
    r = t * torch.rand(b, generator=g, dtype=DT)
    r[:3] = t[:3]
    return x, t, r, noise


@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
@pytest.mark.parametrize("progress", [0.1, 0.45, 0.8])
def test_scheduled_objective_equals_constant_at_the_scheduled_value(schedule, progress):
    torch.manual_seed(0)
    net, ema = TimeNet().to(DT), TimeNet().to(DT)
    x, t, r, noise = batch()
    sched = MeanFlow(beta_cv_schedule=schedule, beta_cv_start=1.0, beta_cv_end=0.0,
                     beta_cv_s0=0.2, beta_cv_s1=0.6)
    beta = {"linear": {0.1: 1.0, 0.45: 0.375, 0.8: 0.0},
            "cosine": {0.1: 1.0, 0.45: 0.5 + 0.5 * math.cos(math.pi * 0.625), 0.8: 0.0},
            "step": {0.1: 1.0, 0.45: 1.0, 0.8: 0.0}}[schedule][progress]
    out = sched(net, x, None, t, r, noise, progress=progress, ema_net=ema)
    assert out.diagnostics["beta_cv"] == pytest.approx(beta, abs=1e-12)  # logged even at 0
    const = MeanFlow(beta_cv=beta)(net, x, None, t, r, noise, progress=progress, ema_net=ema)
    torch.testing.assert_close(out.err, const.err, rtol=1e-12, atol=1e-14)
    if beta == 0.0:  # annealed away: plain MeanFlow
        plain = MeanFlow()(net, x, None, t, r, noise, progress=progress)
        torch.testing.assert_close(out.err, plain.err, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# former keys and bad settings
@pytest.mark.parametrize("schedule, new", [
    ("linear", "beta_cv_start: 0, beta_cv_end: 0.8 (same beta_cv_s0 / beta_cv_s1)"),
    ("cosine", "beta_cv_start: 0, beta_cv_end: 0.8 (same beta_cv_s0 / beta_cv_s1)"),
    ("step", "beta_cv_start: 0, beta_cv_end: 0.8, beta_cv_s1: 0.2"),
])
def test_former_rise_to_beta_cv_fails_naming_the_new_keys(schedule, new):
    params = {"beta_cv": 0.8, "beta_cv_schedule": schedule, "beta_cv_s0": 0.2,
              "beta_cv_s1": 0.4}
    with pytest.raises(RecipeError) as info:
        OBJECTIVES.build({"name": "meanflow", "params": params}, where="objective")
    assert info.value.path == "objective.params"
    assert new in str(info.value) and "beta_cv_start (default 1.0)" in str(info.value)
    # the translation it gives builds and rises from 0 to 0.8 as the former setting did
    kw = {"beta_cv_start": 0.0, "beta_cv_end": 0.8, "beta_cv_s0": 0.2,
          "beta_cv_s1": 0.2 if schedule == "step" else 0.4}
    cv = MeanFlow(beta_cv_schedule=schedule, **kw)._cv
    assert cv.at(0.1) == 0.0 and cv.at(0.4) == pytest.approx(0.8)


def test_former_constant_keys_keep_working():
    mf = MeanFlow(beta_cv=0.5, beta_cv_source="current", beta_cv_schedule="constant",
                  beta_cv_s0=0.1, beta_cv_s1=0.9)
    assert mf._cv.at(0.0) == mf._cv.at(1.0) == 0.5


@pytest.mark.parametrize("params, match", [
    ({"beta_cv_start": 1.0}, "need a schedule"),
    ({"beta_cv_end": 0.0}, "need a schedule"),
    ({"beta_cv_schedule": "linear", "beta_cv_start": 1.5}, "beta_cv_start must be in"),
    ({"beta_cv_schedule": "linear", "beta_cv_end": -0.1}, "beta_cv_end must be in"),
    ({"beta_cv_schedule": "exp"}, "beta_cv_schedule must be one of"),
    ({"beta_cv_schedule": "cosine", "beta_cv_s0": 0.5, "beta_cv_s1": 0.5}, "s0 < s1"),
    ({"beta_cv_schedule": "step", "beta_cv_s0": 0.6, "beta_cv_s1": 0.5}, "beta_cv_s0 <="),
])
def test_bad_schedule_settings(params, match):
    with pytest.raises(ValueError, match=match):
        MeanFlow(**params)


# ---------------------------------------------------------------------------------------------
# through the trainer: the logged beta_cv follows the schedule
TOY = """
run: {name: cv, seed: 2, device: cpu}
data: {name: toy2d, params: {kind: two_moons, num_points: 512}}
backbone: {name: mlp, params: {hidden: 16, depth: 2}}
objective: {name: meanflow, params: {beta_cv_schedule: linear, beta_cv_start: 1.0,
                                     beta_cv_end: 0.0, beta_cv_s0: 0.25, beta_cv_s1: 0.75}}
timestep_sampler: {name: logit_normal, params: {fm_ratio: 0.5}}
loss_weighting: {name: adaptive, params: {}}
gap_schedule: {name: constant, params: {}}
train: {total_images: 640, global_batch_size: 32, lr: 1.0e-3, ema_decays: [0.9],
        log_every_images: 32, checkpoint_every_images: 640, progress_bar: false}
eval: {at_end: false}
"""


def reference_beta(schedule: str, p: float) -> float:
    """1 -> 0 between 0.25 and 0.75, written out per shape."""
    if schedule == "step":
        return 1.0 if p < 0.75 else 0.0
    if p <= 0.25:
        return 1.0
    if p >= 0.75:
        return 0.0
    f = (p - 0.25) / 0.5
    return 1 - f if schedule == "linear" else (1 + math.cos(math.pi * f)) / 2


@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
def test_trainer_logs_beta_cv_along_the_schedule(tmp_path, schedule):
    path = tmp_path / "r.yaml"
    path.write_text(TOY)
    recipe, data = load_recipe(str(path), [f"objective.params.beta_cv_schedule={schedule}"])
    out = Trainer(recipe, data, str(tmp_path / "run")).run()
    assert out["images"] == 640
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    logged = [(r["images"], r["obj/beta_cv"]) for r in recs if "obj/beta_cv" in r]
    assert len(logged) == 20  # one per step
    for images, beta in logged:
        p = (images - 32) / 640  # the step's progress: images seen before it
        assert beta == pytest.approx(reference_beta(schedule, p), abs=1e-6), (images, beta)
    values = [b for _, b in logged]
    assert values[0] == 1.0 and values[-1] == 0.0 and 0 < min(values[:15]) <= max(values) == 1.0
