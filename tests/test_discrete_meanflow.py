"""Discrete MeanFlow curriculum against independent references: an explicit per-sample formula,
hand-computed DMF-dagger steps, and the MeanFlow target from float64 finite differences."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mfrecipes.objectives.discrete_meanflow import DiscreteMeanFlow, back_time
from mfrecipes.registry import OBJECTIVES

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

DT = torch.float64
NC = 3  # classes; label NC is the null class


class Net(nn.Module):
    """Smooth and nonlinear in z, t, h and y, so the finite-difference terms all matter."""

    def __init__(self, dim: int = 3, hidden: int = 16):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Linear(4, hidden)
        self.emb = nn.Embedding(NC + 1, hidden)
        self.out = nn.Linear(hidden, dim)
        self.calls = 0

    def forward(self, z, t, h, y=None):
        self.calls += 1
        feats = torch.stack([t, h, torch.sin(3 * t) * h, torch.cos(2 * h + t)], dim=1)
        a = self.inp(z) + self.time(feats) + (self.emb(y) if y is not None else 0)
        return self.out(torch.tanh(a) * (1 + t[:, None] * h[:, None]))


def batch(n=12, seed=0, all_average=False):
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)
    a, b = torch.rand(n, generator=g, dtype=DT), torch.rand(n, generator=g, dtype=DT)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    if not all_average:
        r[::4] = t[::4]  # some flow-matching (r = t) rows
    y = torch.randint(0, NC, (n,), generator=g)
    return x, y, t, r, e


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().to(DT)


def dagger_back(t, r, i, q, eps=1e-3):
    """Slow scalar DMF-dagger: t' from Phi(t) = t / (1 - t), clamped as documented."""
    phi = lambda s: min(s, 1 - eps) / (1 - min(s, 1 - eps))  # noqa: E731
    s = phi(t) - (phi(t) - phi(r)) / q ** i
    return min(max(s / (1 + s), r), t)


def slow_target(net, x, y, t, r, e, i, q, dagger=False, omega=1.0, kappa=0.0):
    """Per-sample loop: v_g, D_i, the back-stepped call and Eq. 5 written out."""
    rows = []
    with torch.no_grad():
        for b in range(len(t)):
            tb, rb, yb = float(t[b]), float(r[b]), y[b:b + 1]
            z = (1 - tb) * x[b:b + 1] + tb * e[b:b + 1]
            v = e[b:b + 1] - x[b:b + 1]
            T = torch.tensor([tb], dtype=DT)
            if omega != 1.0 or kappa != 0.0:
                unc = net(z, T, T * 0, torch.tensor([NC]))
                cond = net(z, T, T * 0, yb)
                v = omega * v + kappa * cond + (1 - omega - kappa) * unc
            if rb == tb:
                rows.append(v)
                continue
            if i == 0:
                tp = rb
            elif dagger:
                tp = dagger_back(tb, rb, i, q)
            else:
                tp = tb - (tb - rb) / q ** i
            d = tb - tp
            if tp - rb <= 0:
                u_back = v  # boundary: u(z_r, r, r) is the instantaneous velocity
            else:
                u_back = net(z - d * v, torch.tensor([tp], dtype=DT),
                             torch.tensor([tp - rb], dtype=DT), yb)
            rows.append((v * d + (tb - rb) * u_back) / (d + tb - rb))
    return torch.cat(rows)


def test_stage_zero_is_exactly_flow_matching(net):
    x, y, t, r, e = batch()
    for dagger in (False, True):
        obj = DiscreteMeanFlow(stage=0, dagger=dagger, num_classes=NC)
        net.calls = 0
        out = obj(net, x, y, t, r, e, progress=0.9)
        assert net.calls == 1  # the prediction only: no back-stepped call at the boundary
        assert torch.equal(out.target, e - x)
        d, h_back = back_time(t, r, 0, 2.0, dagger=dagger)
        assert torch.equal(d, t - r) and torch.equal(h_back, torch.zeros_like(t))
        u = net((1 - t[:, None]) * x + t[:, None] * e, t, t - r, y)
        assert torch.allclose(out.err, ((u - (e - x)) ** 2).sum(1))


@pytest.mark.parametrize("stage, q, dagger", [(1, 2.0, False), (2, 2.0, False), (4, 3.0, False),
                                              (1, 2.0, True), (3, 1.5, True)])
def test_discrete_target_matches_slow_formula(net, stage, q, dagger):
    x, y, t, r, e = batch(seed=stage)
    obj = DiscreteMeanFlow(K=6, q=q, dagger=dagger, stage=stage, num_classes=NC)
    out = obj(net, x, y, t, r, e, progress=0.0)
    ref = slow_target(net, x, y, t, r, e, stage, q, dagger)
    assert torch.allclose(out.target, ref, atol=1e-12, rtol=0)
    z = (1 - t[:, None]) * x + t[:, None] * e
    assert torch.allclose(out.err, ((net(z, t, t - r, y) - ref) ** 2).sum(1), atol=1e-12)
    assert torch.equal(out.is_average, t != r)
    assert out.diagnostics["stage"] == stage
    d_ref = torch.tensor([0.0 if a == b else a - dagger_back(a, b, stage, q) if dagger
                          else (a - b) / q ** stage for a, b in zip(t.tolist(), r.tolist())],
                         dtype=DT)
    assert math.isclose(out.diagnostics["dmf_D"], float(d_ref[t != r].mean()), rel_tol=1e-6)


@pytest.mark.parametrize("omega, kappa", [(2.0, 0.0), (0.6, 0.3)])
def test_discrete_target_with_cfg_mixing(net, omega, kappa):
    x, y, t, r, e = batch(seed=5)
    obj = DiscreteMeanFlow(stage=2, omega=omega, kappa=kappa, num_classes=NC)
    out = obj(net, x, y, t, r, e, progress=0.0)
    ref = slow_target(net, x, y, t, r, e, 2, 2.0, omega=omega, kappa=kappa)
    assert torch.allclose(out.target, ref, atol=1e-12, rtol=0)


def meanflow_target_fd(net, x, y, t, r, e, eps=1e-5):
    """u_tgt = v - (t - r) du/dt with du/dt by central differences along (v, 1, 1) in (z, t, h)."""
    z, v, h = (1 - t[:, None]) * x + t[:, None] * e, e - x, t - r
    with torch.no_grad():
        up = net(z + eps * v, t + eps, h + eps, y)
        dn = net(z - eps * v, t - eps, h - eps, y)
    return v - h[:, None] * (up - dn) / (2 * eps)


def test_small_steps_approach_the_meanflow_target_at_first_order(net):
    """u - u_tgt = D / (D + t - r) (u - u_tgt_MF) + O(D^2): the target implied by the finite
    difference, u + (u_tgt - u)(D + t - r) / D, tends to the MeanFlow target with error ~ D."""
    x, y, t, r, e = batch(seed=3, all_average=True)
    t, r = 0.1 + 0.8 * t, 0.1 + 0.8 * r  # keep t - D away from 0 and h comfortably > 0
    mf = meanflow_target_fd(net, x, y, t, r, e)
    z, h = (1 - t[:, None]) * x + t[:, None] * e, (t - r)[:, None]
    with torch.no_grad():
        u = net(z, t, t - r, y)
    errors, gaps = [], []
    for i in range(4, 11):
        out = DiscreteMeanFlow(K=12, q=2.0, stage=i, num_classes=NC)(net, x, y, t, r, e,
                                                                      progress=0.0)
        d = h / 2 ** i
        implied = u + (out.target - u) * (d + h) / d
        errors.append(float((implied - mf).abs().max()))
        gaps.append(float((out.target - u).abs().max()))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.8 < q < 2.2 for q in ratios), ratios   # first order: halving D halves the error
    assert errors[-1] < 2e-3
    assert all(1.8 < q < 2.2 for q in (a / b for a, b in zip(gaps, gaps[1:])))  # u_tgt -> u


def test_dagger_steps_by_hand():
    q = 2.0
    t = torch.tensor([0.5, 0.8, 0.8, 1.0, 1.0, 0.3], dtype=DT)
    r = torch.tensor([0.25, 0.0, 0.0, 0.5, 0.9995, 0.3], dtype=DT)
    i = torch.tensor([1, 2, 1, 1, 1, 3])
    # Phi(0.5) = 1, Phi(0.25) = 1/3: s' = 1 - (2/3)/2 = 2/3, t' = 0.4, D = 0.1
    # Phi(0.8) = 4, Phi(0) = 0: i = 2: s' = 3, t' = 0.75, D = 0.05; i = 1: s' = 2, t' = 2/3
    # t = 1 clamped to 0.999: Phi = 999, Phi(0.5) = 1: s' = 500, t' = 500/501, D = 1/501
    # r within eps of 1 as well: t' would fall below r, so t' = r and D = t - r (boundary)
    expect_d = [0.1, 0.05, 0.8 - 2 / 3, 1 / 501, 1 - 0.9995, 0.0]
    expect_hb = [0.15, 0.75, 2 / 3, 500 / 501 - 0.5, 0.0, 0.0]
    for k in range(len(t)):
        d, hb = back_time(t[k:k + 1], r[k:k + 1], int(i[k]), q, dagger=True, eps=1e-3)
        assert math.isclose(float(d), expect_d[k], abs_tol=1e-12), k
        assert math.isclose(float(hb), expect_hb[k], abs_tol=1e-12), k
    # the plain schedule for comparison: D_i = (t - r) / q^i
    d, hb = back_time(t, r, 2, q)
    assert torch.allclose(d, (t - r) / 4) and torch.allclose(hb, 0.75 * (t - r))


def test_dagger_is_finite_at_t_equal_one(net):
    x, y, _, _, e = batch(n=4)
    t = torch.ones(4, dtype=DT)
    r = torch.tensor([0.0, 0.5, 0.9999, 1.0], dtype=DT)
    for stage in range(1, 5):
        out = DiscreteMeanFlow(stage=stage, dagger=True, num_classes=NC)(net, x, y, t, r, e,
                                                                         progress=0.0)
        assert bool(torch.isfinite(out.err).all()) and bool(torch.isfinite(out.target).all())


def test_stage_follows_progress():
    obj = DiscreteMeanFlow(K=6)
    cases = {0.0: 0, 0.16: 0, 1 / 6 + 1e-9: 1, 0.34: 2, 0.5: 3, 0.8: 4, 0.84: 5, 0.99: 5,
             1.0: 5}
    assert {p: obj.stage_at(p) for p in cases} == cases
    assert [DiscreteMeanFlow(K=3).stage_at(p) for p in (0.2, 0.4, 0.7, 1.0)] == [0, 1, 2, 2]
    pinned = DiscreteMeanFlow(K=6, stage=2)
    assert {pinned.stage_at(p) for p in (0.0, 0.5, 1.0)} == {2}
    assert DiscreteMeanFlow(K=4).describe()["stage_starts"] == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("params, words", [
    ({"K": 1}, "K must be"), ({"q": 1.0}, "q must be"), ({"stage": 6}, "stage must be"),
    ({"stage": -1}, "stage must be"), ({"eps": 0.0}, "eps must be"),
    ({"dagger": "yes"}, "dagger must be"), ({"omega": -1.0}, "omega"),
])
def test_bad_params(params, words):
    with pytest.raises(ValueError, match=words):
        DiscreteMeanFlow(num_classes=NC, **params)


def test_no_jvp_before_the_last_stage(net, monkeypatch):
    import mfrecipes.objectives.jvp as jvp_module

    calls = {"n": 0}
    real = torch.func.jvp

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.func, "jvp", counting)
    if hasattr(jvp_module, "jvp"):  # in case the helper binds torch.func.jvp at import
        monkeypatch.setattr(jvp_module, "jvp", counting)
    x, y, t, r, e = batch()
    obj = OBJECTIVES.build({"name": "discrete_meanflow", "params": {"K": 5}}, num_classes=NC)
    seen = []
    for progress in (0.0, 0.25, 0.45, 0.65, 0.9):
        calls["n"] = 0
        out = obj(net, x, y, t, r, e, progress=progress)
        seen.append((out.diagnostics["stage"], calls["n"]))
        out.err.mean().backward()
    assert seen[:4] == [(0.0, 0), (1.0, 0), (2.0, 0), (3.0, 0)]
    assert seen[4][0] == 4.0 and seen[4][1] >= 1  # the MeanFlow stage does take the JVP


def test_last_stage_is_meanflow(net):
    from mfrecipes.objectives.meanflow import MeanFlow

    x, y, t, r, e = batch()
    out = DiscreteMeanFlow(K=4, omega=2.0, num_classes=NC)(net, x, y, t, r, e, progress=0.8)
    ref = MeanFlow(omega=2.0, num_classes=NC)(net, x, y, t, r, e, progress=0.8)
    assert torch.allclose(out.target, ref.target, atol=1e-12)
    # and the JVP target agrees with the finite-difference one without guidance
    out = DiscreteMeanFlow(K=4, num_classes=NC)(net, x, y, t, r, e, progress=0.8)
    assert torch.allclose(out.target, meanflow_target_fd(net, x, y, t, r, e), atol=1e-7)
