"""Exact metrics of the mixture test bed: the guidance target, the reference solver's error
(against an independent adaptive solver), an oracle network scoring ~0 and a perturbed one
scoring the perturbation, the cache key, fd_exact, and the metrics through the real trainer and
``mfr eval``."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mfrecipes.data.mixture import Mixture, exact_moments, velocity
from mfrecipes.evaluate import exact
from mfrecipes.evaluate.exact import GuidanceTarget, guided_velocity, solve_flow

from shared_parts import tiny_mixture_recipe

SMALL = dict(resolution=8, components_per_class=2, sigma=0.15)
FEW = dict(probes=36, traj_probes=36, steps=16)     # every (t, r) pair of the grid once


@pytest.fixture(scope="module")
def ds():
    return Mixture(**SMALL)


def test_guidance_target_is_the_fixed_point_of_the_objective(ds):
    from mfrecipes import registry
    from mfrecipes.plugins import load_components

    load_components()

    def build(name, **params):
        return registry.OBJECTIVES.build({"name": name, "params": params}, where="objective",
                                         num_classes=10)
    assert exact.guidance_of(build("meanflow", omega=1.0, kappa=0.5)).w == 2.0
    assert exact.guidance_of(build("meanflow", omega=1.5)).w == 1.5
    g = exact.guidance_of(build("meanflow", omega=0.2, kappa=0.92, t_end=0.75))
    assert g.w == pytest.approx(2.5) and (g.t_start, g.t_end) == (0.0, 0.75)
    assert g.weight(0.8) == 1.0 and g.weight(0.75) == pytest.approx(2.5)
    assert exact.guidance_of(build("meanflow")).w == 1.0
    assert exact.guidance_of(build("flow_matching")).w == 1.0
    assert exact.guidance_of(build("meanflow", omega=1.0, kappa=0.5), conditional=False).w == 1

    # The fixed point, by iterating the kappa form's own update u <- E[v_g] with exact fields.
    spec = ds.spec
    z = torch.randn(16, spec.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10
    vc, vu = velocity(spec, z, 0.4, y), velocity(spec, z, 0.4, None)
    omega, kappa = 0.2, 0.92
    u = torch.zeros_like(z)
    for _ in range(600):
        u = omega * vc + kappa * u + (1 - omega - kappa) * vu
    assert torch.allclose(u, guided_velocity(spec, z, 0.4, y, omega / (1 - kappa)), atol=1e-9)


def _few(n):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(n) % 10


def _step_halving(spec, z1, y, target):
    sols = {n: solve_flow(spec, z1, y, target, steps=n)[0].flatten(1) for n in (8, 16, 32, 64)}
    return sols, {n: float((sols[n] - sols[2 * n]).pow(2).mean()) for n in (8, 16, 32)}


def test_solver_converges_at_fourth_order(ds):
    _, d = _step_halving(ds.spec, *_few(8), GuidanceTarget(2.0, 0.0, 0.75))
    # Fourth order: halving the step shrinks the squared difference by ~2^8.
    assert d[16] < d[8] / 30 and d[32] < d[16] / 30
    assert d[32] < 1e-9


@pytest.mark.slow
def test_solver_error_is_tiny_against_an_independent_adaptive_solver(ds):
    from scipy.integrate import solve_ivp

    spec, target = ds.spec, GuidanceTarget(2.0, 0.0, 0.75)
    z1, y = _few(4)
    sols, d = _step_halving(spec, z1, y, target)
    richardson32 = math.sqrt(d[32]) * 16 / 15           # rms error estimate of the 32-step solve

    def rhs(t, zf, row):
        w = target.weight(t)
        return guided_velocity(spec, torch.from_numpy(zf)[None], t, y[row:row + 1], w)[0].numpy()
    ref = []
    for i in range(len(z1)):
        z = z1[i].flatten().double().numpy()
        # the w jump at t_end = 0.75: integrate the two pieces separately
        a = solve_ivp(rhs, (1.0, 0.75), z, args=(i,), method="DOP853", rtol=1e-11, atol=1e-12)
        b = solve_ivp(rhs, (0.75, 0.0), a.y[:, -1], args=(i,), method="DOP853", rtol=1e-11,
                      atol=1e-12)
        ref.append(b.y[:, -1])
    ref = torch.from_numpy(np.stack(ref))
    err32 = float((sols[32] - ref).pow(2).mean())
    assert err32 < 1e-8
    assert math.sqrt(err32) < 10 * richardson32 + 1e-7


class Oracle(nn.Module):
    """net(z, t, h, y) = the exact v_w at h = 0 and the exact average velocity of the v_w flow
    over [t - h, t] (an RK4 solve of 32 steps per unit time for each (t, h)), optionally plus a
    constant offset."""

    def __init__(self, spec, target, offset: float = 0.0, steps: int = 32, memo=None):
        super().__init__()
        self.spec, self.target, self.offset, self.steps = spec, target, offset, steps
        self.memo = {} if memo is None else memo      # shared by oracles of the same target
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z, t, h, y):
        key = (z.numpy().tobytes(), t.numpy().tobytes(), h.numpy().tobytes())
        if key not in self.memo:
            self.memo[key] = self._exact(z, t, h, y)
        return (self.memo[key] + self.offset).float()

    def _exact(self, z, t, h, y):
        out = torch.empty(z.shape, dtype=torch.float64)
        keys = torch.stack([t.double(), h.double()], 1)
        for key in torch.unique(keys, dim=0):
            rows = torch.nonzero((keys == key).all(1)).flatten()
            tt, hh = float(key[0]), float(key[1])
            zz, yy = z[rows].double(), None if y is None else y[rows]
            if hh == 0:
                out[rows] = guided_velocity(self.spec, zz.flatten(1), tt, yy,
                                            self.target.weight(tt)).reshape(zz.shape)
            else:
                n = max(8, math.ceil(self.steps * hh))
                out[rows] = (zz - _flow(self.spec, zz, yy, self.target, tt, tt - hh, n)) / hh
        return out


def _flow(spec, z, y, target, t0, t1, steps):
    """RK4 from t0 down to t1 (window ends included as grid points)."""
    ends = {s for s in (target.t_start, target.t_end) if t1 < s < t0}
    ts = sorted({t0 - (t0 - t1) * k / steps for k in range(steps + 1)} | ends, reverse=True)
    zf = z.flatten(1)
    for a, b in zip(ts, ts[1:]):
        dt, w = b - a, target.weight(0.5 * (a + b))
        k1 = guided_velocity(spec, zf, a, y, w)
        k2 = guided_velocity(spec, zf + 0.5 * dt * k1, a + 0.5 * dt, y, w)
        k3 = guided_velocity(spec, zf + 0.5 * dt * k2, a + 0.5 * dt, y, w)
        k4 = guided_velocity(spec, zf + dt * k3, b, y, w)
        zf = zf + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return zf.reshape(z.shape)


def test_oracle_scores_zero_and_an_offset_scores_its_square(ds, tmp_path):
    target = GuidanceTarget(2.0)
    oracle = Oracle(ds.spec, target)
    clean = exact.exact_metrics(oracle, ds, target=target, cache_dir=tmp_path,
                                batch_size=1000, **FEW)
    names = {"map1", "map2", "v_err", *(exact.bin_name(lo, hi) for lo, hi in exact.GAP_BINS)}
    assert set(clean) == names
    assert all(v < 1e-7 for v in clean.values()), clean   # float32 storage and solver error
    delta = 0.05
    off = exact.exact_metrics(Oracle(ds.spec, target, offset=delta, memo=oracle.memo), ds,
                              target=target,
                              cache_dir=tmp_path, batch_size=1000, **FEW)
    for k in names - {"map2"}:
        assert off[k] == pytest.approx(delta ** 2, rel=0.02), k
    # two offset steps of 0.5 delta, the first carried through the flow: not a closed value
    assert 0.2 * delta ** 2 < off["map2"] < 4 * delta ** 2


@pytest.mark.slow
def test_the_oracle_of_another_guidance_weight_scores_far_from_zero(ds, tmp_path):
    target = GuidanceTarget(2.0)
    wrong = exact.exact_metrics(Oracle(ds.spec, GuidanceTarget(1.0)), ds, target=target,
                                cache_dir=tmp_path, batch_size=1000, **FEW)
    assert wrong["map1"] > 1e-3 and wrong["v_err"] > 1e-3


def test_probe_cache_is_keyed_on_everything_that_changes_it(ds, tmp_path):
    a = exact.probe_set(ds, GuidanceTarget(2.0), cache_dir=tmp_path, **FEW)
    folders = {exact.cache_folder(tmp_path, exact._cache_key(ds, t, 72, 72, 16, exact.PROBE_SEED))
               for t in (GuidanceTarget(2.0), GuidanceTarget(1.5), GuidanceTarget(2.0, 0, 0.75))}
    assert len(folders) == 3
    b = exact.probe_set(ds, GuidanceTarget(1.5), cache_dir=tmp_path, **FEW)
    assert torch.equal(a.z1, b.z1) and not torch.allclose(a.phi, b.phi)
    other = Mixture(**{**SMALL, "sigma": 0.2})
    assert exact._cache_key(other, GuidanceTarget(2.0), 72, 72, 16, 1) != \
        exact._cache_key(ds, GuidanceTarget(2.0), 72, 72, 16, 1)
    # the same key in a fresh process state reads the files back (no pickle) unchanged
    exact._LOADED.clear()
    again = exact.probe_set(ds, GuidanceTarget(2.0), cache_dir=tmp_path, **FEW)
    assert torch.equal(again.phi, a.phi) and torch.equal(again.traj, a.traj)
    assert a.meta["key"]["w"] == 2.0
    with pytest.raises(ValueError):
        exact.probe_set(ds, cache_dir=tmp_path, probes=8, traj_probes=16)


def test_fd_exact_against_scipy_and_known_shifts(ds):
    from scipy import linalg

    mu, cov = exact_moments(ds.spec)
    x = ds.reference(20000, seed=1)
    flat = x.flatten(1).double().numpy()
    assert np.abs(flat.mean(0) - mu).max() < 0.03                      # Monte Carlo moments
    assert np.abs(np.cov(flat, rowvar=False) - cov).max() < 0.03
    s = np.cov(flat, rowvar=False)
    root = linalg.sqrtm(s @ cov).real
    slow = ((flat.mean(0) - mu) ** 2).sum() + np.trace(s + cov - 2 * root)
    fast = exact.fd_exact(ds, x)
    assert fast == pytest.approx(slow, rel=1e-6, abs=1e-8)
    assert fast < 0.1
    shifted = exact.fd_exact(ds, x + 0.1)                             # + 0.01 per element
    assert shifted - fast == pytest.approx(0.01 * 64, rel=0.1)
    from mfrecipes import evaluate
    assert set(evaluate.quality(ds, x[:500], seed=0)) == {"fd_exact"}


TRAIN_RECIPE = tiny_mixture_recipe(
    "exact", 2, "{total_images: 128, global_batch_size: 32, lr: 1.0e-3, ema_decays: [0.9],\n"
    "        log_every_images: 64, checkpoint_every_images: 128, progress_bar: false}",
    "{every_images: 64, nfe: [1], num_samples: 64, grid_size: 10}")


def test_trainer_logs_exact_metrics_and_mfr_eval_reports_them(tmp_path, monkeypatch):
    from mfrecipes.evaluate.commands import SamplerSpec, eval_run
    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.loop import Trainer

    monkeypatch.setattr(exact, "DEFAULTS", FEW)            # a small probe set, the real path
    path = tmp_path / "exact.yaml"
    path.write_text(TRAIN_RECIPE)
    recipe, data = load_recipe(str(path), [f"run.cache_dir={tmp_path / 'cache'}"])
    Trainer(recipe, data, str(tmp_path / "run")).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [r for r in rows if "eval/exact/map1" in r]
    assert [r["images"] for r in evals] == [64, 128]
    for r in evals:
        assert 0 < r["eval/exact/map1"] < 10 and math.isfinite(r["eval/exact/v_err"])
        assert "eval/exact/u_err/g0.25-0.50" in r and "eval/nfe1/fd_exact" in r
    # the guided target w = 2 was used
    (folder,) = (tmp_path / "cache" / "mixture-exact").iterdir()
    assert json.loads((folder / "meta.json").read_text())["key"]["w"] == 2.0
    rec = eval_run(str(tmp_path / "run"), specs=[SamplerSpec(1)], num=64, device="cpu")
    assert rec["eval/exact/map1"] == pytest.approx(evals[-1]["eval/exact/map1"], rel=1e-6)
    assert rec["eval/nfe1/fd_exact"] == pytest.approx(evals[-1]["eval/nfe1/fd_exact"], rel=1e-6)
