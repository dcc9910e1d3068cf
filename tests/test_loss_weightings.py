"""Loss weightings against explicit float64 formulas written here."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from mfrecipes.errors import RecipeError
from mfrecipes.loss_weightings import AdaptiveWeighting, ConstantWeighting, MinSNRWeighting
from mfrecipes.registry import LOSS_WEIGHTINGS
from mfrecipes.timestep_samplers import LogitNormal, Uniform

ERR = [0.0, 1e-4, 0.05, 0.7, 3.0, 120.0]


def test_adaptive_matches_formula():
    err = torch.tensor(ERR, dtype=torch.float64, requires_grad=True)
    t = torch.full((6,), 0.5, dtype=torch.float64)
    for p, c in [(1.0, 0.01), (0.75, 1e-3), (0.5, 0.2)]:
        w = AdaptiveWeighting(p=p, c=c).weights(err, t, t * 0.5)
        assert not w.requires_grad  # stopgrad
        expect = [1.0 / (e + c) ** p for e in ERR]
        assert w.tolist() == pytest.approx(expect, rel=1e-12)


def test_adaptive_p0_is_constant():
    err = torch.tensor(ERR)
    assert AdaptiveWeighting(p=0.0).weights(err, err, err).tolist() == [1.0] * 6


def test_constant():
    err = torch.tensor(ERR, requires_grad=True)
    w = ConstantWeighting(scale=2.5).weights(err, err, err)
    assert w.tolist() == [2.5] * 6 and not w.requires_grad
    assert ConstantWeighting().weights(err, err, err).tolist() == [1.0] * 6


def alpha_ref(t: float, gamma: float) -> float:
    """t^2 * min(SNR(t), gamma), SNR = ((1 - t) / t)^2; the t -> 0 limit is 0."""
    if t == 0.0:
        return 0.0
    snr = ((1.0 - t) / t) ** 2
    return t * t * min(snr, gamma)


TS = [0.0, 0.05, 0.2, 1 / (1 + math.sqrt(5)), 0.5, 0.8, 0.99, 1.0]


@pytest.mark.parametrize("gamma", [5.0, 1.0, 0.3])
def test_min_snr_alpha_on_v_samples(gamma):
    t = torch.tensor(TS, dtype=torch.float64)
    err = torch.linspace(0.1, 2.0, len(TS), dtype=torch.float64)
    w = MinSNRWeighting(gamma=gamma, p=1.0, c=0.01, normalize=False).weights(err, t, t.clone())
    expect = [alpha_ref(ti, gamma) / (e + 0.01) for ti, e in zip(TS, err.tolist())]
    assert w.tolist() == pytest.approx(expect, rel=1e-12, abs=1e-15)


def test_min_snr_only_adaptive_on_u_samples():
    t = torch.tensor(TS, dtype=torch.float64)
    r = t * 0.5
    r[0] = 0.0  # t = 0 gives r = t: alpha(0) = 0 applies there
    err = torch.linspace(0.1, 2.0, len(TS), dtype=torch.float64)
    w = MinSNRWeighting(p=0.75, c=1e-3, normalize=False).weights(err, t, r)
    expect = [(0.0 if i == 0 else 1.0) / (e + 1e-3) ** 0.75 for i, e in enumerate(err.tolist())]
    assert w.tolist() == pytest.approx(expect, rel=1e-12)
    assert MinSNRWeighting(normalize=False).alpha_mean == 1.0


def test_min_snr_is_normalised_by_default():
    """Default normalize: true; E[alpha] = 1 under the sampler's r = t law (raw it is ~0.22)."""
    import numpy as np

    raw = MinSNRWeighting(normalize=False)
    wt = MinSNRWeighting(timestep_sampler=LogitNormal())
    assert wt.normalize and not raw.normalize
    rng = np.random.default_rng(11)
    z = np.maximum(rng.normal(-0.4, 1, 400_000), rng.normal(-0.4, 1, 400_000))
    t = torch.tensor(1 / (1 + np.exp(-z)))
    ones = torch.zeros_like(t)  # err 0: the adaptive weight is the constant 1 / c
    assert float((raw.weights(ones, t, t) * 0.01).mean()) == pytest.approx(0.2165, abs=3e-3)
    assert float((wt.weights(ones, t, t) * 0.01).mean()) == pytest.approx(1.0, abs=1e-2)


def test_min_snr_normalize_uniform_sampler():
    gamma = 5.0
    # v-branch t of the uniform sampler = max of two uniforms: density 2t.
    mean, _ = quad(lambda x: 2 * x * alpha_ref(x, gamma), 0, 1, points=[1 / (1 + math.sqrt(5))])
    wt = MinSNRWeighting(gamma=gamma, normalize=True, timestep_sampler=Uniform(fm_ratio=0.5))
    assert wt.alpha_mean == pytest.approx(mean, rel=5e-3)  # ~4 Monte Carlo standard errors
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    w = wt.weights(torch.zeros(2, dtype=torch.float64), t, t)
    expect = [alpha_ref(x, gamma) / wt.alpha_mean / 0.01 for x in (0.3, 0.6)]
    assert w.tolist() == pytest.approx(expect, rel=1e-12)
    assert wt.describe()["alpha_mean"] == wt.alpha_mean


def test_min_snr_normalize_logit_normal_against_numpy():
    import numpy as np

    rng = np.random.default_rng(5)
    z = np.maximum(rng.normal(-0.4, 1, 1_000_000), rng.normal(-0.4, 1, 1_000_000))
    x = 1 / (1 + np.exp(-z))
    ref = np.minimum((1 - x) ** 2, 5.0 * x ** 2).mean()
    wt = MinSNRWeighting(normalize=True, timestep_sampler=LogitNormal())
    assert wt.alpha_mean == pytest.approx(ref, rel=3e-3)


def test_min_snr_normalize_uses_the_v_branch():
    from mfrecipes.timestep_samplers import DTD

    # After DTD's curriculum (the law normalised against), r = t samples have t ~ U[0, 1]; its
    # r != t samples are logit-normal, so averaging the wrong branch would be far off.
    mean, _ = quad(lambda x: alpha_ref(x, 5.0), 0, 1, points=[1 / (1 + math.sqrt(5))])
    wt = MinSNRWeighting(normalize=True, timestep_sampler=DTD(num_clusters=5, fm_ratio=0.5))
    assert wt.alpha_mean == pytest.approx(mean, rel=5e-3)
    # With after: base, the v branch returns to the pair's t law (max of two logit-normals)
    base = MinSNRWeighting(normalize=True, timestep_sampler=DTD(fm_ratio=0.5, after="base"))
    ref = MinSNRWeighting(normalize=True, timestep_sampler=LogitNormal(fm_ratio=0.5))
    assert base.alpha_mean == pytest.approx(ref.alpha_mean, rel=5e-3)


def test_min_snr_normalize_needs_sampler_and_v_samples():
    with pytest.raises(ValueError, match="timestep sampler"):
        MinSNRWeighting(normalize=True)
    with pytest.raises(ValueError, match="fm_ratio"):
        MinSNRWeighting(normalize=True, timestep_sampler=Uniform(fm_ratio=0.0))


def test_registry_passes_sampler():
    wt = LOSS_WEIGHTINGS.build({"name": "min_snr", "params": {"normalize": True}},
                               timestep_sampler=Uniform())
    assert 0 < wt.alpha_mean < 1


@pytest.mark.parametrize("cls,params", [
    (AdaptiveWeighting, {"p": -1.0}),
    (AdaptiveWeighting, {"c": 0.0}),
    (AdaptiveWeighting, {"c": "small"}),
    (ConstantWeighting, {"scale": 0.0}),
    (MinSNRWeighting, {"gamma": 0.0}),
    (MinSNRWeighting, {"p": -0.5}),
    (MinSNRWeighting, {"c": -1.0}),
    (MinSNRWeighting, {"normalize": "yes"}),
    (MinSNRWeighting, {"mc_draws": 10}),
])
def test_bad_params_raise(cls, params):
    with pytest.raises(ValueError):
        cls(**params)


def test_bad_params_through_registry():
    with pytest.raises(RecipeError, match=r"loss_weighting\.params.*gamma"):
        LOSS_WEIGHTINGS.build({"name": "min_snr", "params": {"gamma": -5}},
                              where="loss_weighting")
