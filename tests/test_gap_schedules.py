"""Gap schedules: beta(dt, s) against the explicit formula and lambda against closed forms."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mfrecipes.errors import RecipeError
from mfrecipes.gap_schedules import ConstantGapWeighting, ProgressiveGapWeighting
from mfrecipes.registry import GAP_SCHEDULES
from mfrecipes.timestep_samplers import DTD, LogitNormal, Uniform

T = [0.9, 0.5, 0.7, 0.3, 1.0, 0.2]
R = [0.1, 0.5, 0.65, 0.0, 0.0, 0.2]  # r = t at indices 1 and 5


def tr():
    return torch.tensor(T, dtype=torch.float64), torch.tensor(R, dtype=torch.float64)


def beta_ref(t, r, progress, lam, k):
    if t == r:
        return 1.0
    s = 1.0 - progress ** k
    return 1.0 - s + lam * s * (1.0 - (t - r))


def test_constant():
    t, r = tr()
    assert ConstantGapWeighting().weights(t, r, 0.3).tolist() == [1.0] * 6


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 1.0])
def test_progressive_formula(k, progress):
    t, r = tr()
    w = ProgressiveGapWeighting(k=k, lambda_=1.7).weights(t, r, progress)
    expect = [beta_ref(a, b, progress, 1.7, k) for a, b in zip(T, R)]
    assert w.tolist() == pytest.approx(expect, rel=1e-12)


def test_progressive_ends():
    t, r = tr()
    g = ProgressiveGapWeighting(lambda_=1.5)
    start = g.weights(t, r, 0.0).tolist()  # s = 1: lambda (1 - dt)
    assert start == pytest.approx([1.0 if a == b else 1.5 * (1 - (a - b)) for a, b in zip(T, R)])
    assert g.weights(t, r, 1.0).tolist() == pytest.approx([1.0] * 6)  # s = 0
    assert g.weights(t, r, 1.2).tolist() == pytest.approx([1.0] * 6)  # past the end: clamped


@pytest.mark.parametrize("fm_ratio", [0.0, 0.75])
def test_lambda_uniform_closed_form(fm_ratio):
    # dt = |U1 - U2|: E[dt] = 1/3, lambda = 1 / (1 - 1/3) = 1.5 whatever fm_ratio.
    g = ProgressiveGapWeighting(timestep_sampler=Uniform(fm_ratio=fm_ratio))
    assert g.lambda_estimate == pytest.approx(1.5, abs=5e-3)
    d = g.describe()
    assert d["lambda"] == g.lambda_estimate and d["lambda_source"] == "monte_carlo"


def test_lambda_with_gap_range_no_clipping():
    # gap' = a + (b - a) dt with a = 0, b = 0.5 never exceeds t: E[dt'] = a + (b - a) / 3 = 1/6.
    g = ProgressiveGapWeighting(timestep_sampler=Uniform(gap_range=[0.0, 0.5]))
    assert g.lambda_estimate == pytest.approx(1 / (1 - 1 / 6), abs=5e-3)


def test_lambda_with_gap_range_kept_in_bin():
    a, b = 0.3, 0.5
    # The gap a + (b - a) |U1 - U2| is never clipped (t is redrawn instead), so
    # E[dt'] = a + (b - a) / 3 and lambda = 1 / (1 - E[dt']) = 1.5.
    g = ProgressiveGapWeighting(timestep_sampler=Uniform(gap_range=[a, b]))
    assert g.lambda_estimate == pytest.approx(1 / (1 - (a + (b - a) / 3)), abs=3e-3)
    # Clipping r at 0 instead (gap min(t, ...)) would give another lambda: far enough apart.
    m = 2000
    u = (np.arange(m) + 0.5) / m
    u1, u2 = np.meshgrid(u, u)
    clipped = np.minimum(np.maximum(u1, u2), a + (b - a) * np.abs(u1 - u2))
    assert abs(1.0 / (1.0 - clipped.mean()) - 1.5) > 0.02


def test_lambda_logit_normal_and_dtd_u_branch():
    rng = np.random.default_rng(11)
    x1 = 1 / (1 + np.exp(-rng.normal(-0.4, 1.0, 1_000_000)))
    x2 = 1 / (1 + np.exp(-rng.normal(-0.4, 1.0, 1_000_000)))
    ref = 1.0 / (1.0 - np.abs(x1 - x2).mean())
    for sampler in (LogitNormal(), DTD()):  # DTD keeps the logit-normal pair for r != t
        lam = ProgressiveGapWeighting(timestep_sampler=sampler).lambda_estimate
        assert lam == pytest.approx(ref, abs=5e-3)


def test_lambda_given_explicitly_and_pure_v():
    g = ProgressiveGapWeighting(lambda_=2.0, timestep_sampler=Uniform())
    assert g.lambda_estimate == 2.0 and g.describe()["lambda_source"] == "given"
    assert ProgressiveGapWeighting(timestep_sampler=Uniform(fm_ratio=1.0)).lambda_estimate == 1.0


def test_estimate_is_reproducible_and_fast():
    # CPU time of this thread with one torch thread: a budget that other processes cannot eat.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.thread_time()
        a = ProgressiveGapWeighting(timestep_sampler=LogitNormal())
        elapsed = time.thread_time() - t0
    finally:
        torch.set_num_threads(threads)
    b = ProgressiveGapWeighting(timestep_sampler=LogitNormal())
    assert a.lambda_estimate == b.lambda_estimate and a.mc_draws == 1_000_000
    assert elapsed < 1.0, f"lambda estimate took {elapsed:.2f} s of CPU"


def test_registry_passes_sampler():
    g = GAP_SCHEDULES.build({"name": "progressive", "params": {"k": 2}},
                            timestep_sampler=Uniform())
    assert g.lambda_estimate == pytest.approx(1.5, abs=5e-3)


@pytest.mark.parametrize("params", [
    {"k": 0.0}, {"k": -1.0}, {"lambda_": 0.0}, {"lambda_": "big"}, {"mc_draws": 5},
    {"seed": -1}, {},  # {}: no lambda_ and no sampler
])
def test_bad_params_raise(params):
    with pytest.raises(ValueError):
        ProgressiveGapWeighting(**params)


def test_bad_params_through_registry():
    with pytest.raises(RecipeError, match=r"gap_schedule\.params.*k"):
        GAP_SCHEDULES.build({"name": "progressive", "params": {"k": 0}}, where="gap_schedule",
                            timestep_sampler=Uniform())
