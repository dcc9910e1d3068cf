"""The ``mixture`` data set: resumable fresh draws, its closed-form velocity (checked by Monte
Carlo and an explicit slow formula), and common random numbers across recipes through the real
trainer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mfrecipes.data.mixture import (BLOCK, Mixture, MixtureSpec, exact_moments, mixture_means,
                                    velocity)
from mfrecipes.errors import DataError

from shared_parts import tiny_mixture_recipe

SMALL = dict(resolution=8, components_per_class=2, sigma=0.15)


def _take(ds, batch, n, start=0):
    it = ds.batches(batch, start=start)
    xs, ys = zip(*(next(it) for _ in range(n)))
    return torch.cat(xs), torch.cat(ys)


def test_batches_resume_exactly_and_ranks_salts_seeds_differ():
    ds = Mixture(**SMALL, seed=5)
    x, y = _take(ds, 96, 30)                         # 2,880 samples, across block ends
    for k in (1, 10, 11, 21):                        # 21 * 96 = 2,016: inside block 1
        xr, yr = _take(ds, 96, 30 - k, start=k * 96)
        assert torch.equal(xr, x[k * 96:]) and torch.equal(yr, y[k * 96:])
    xo, _ = _take(ds, 7, 3, start=BLOCK - 10)        # a batch straddling a block boundary
    assert torch.equal(xo, x[BLOCK - 10:BLOCK + 11])
    for other in (Mixture(**SMALL, seed=5, rank=1, world_size=2),
                  Mixture(**SMALL, seed=5, draw_salt=1), Mixture(**SMALL, seed=6)):
        xb, _ = _take(other, 96, 2)
        assert not torch.allclose(xb, x[:192])
    again, _ = _take(Mixture(**SMALL, seed=5), 96, 2)
    assert torch.equal(again, x[:192])


def test_draws_follow_the_mixture():
    ds = Mixture(**SMALL)
    x, y = _take(ds, 1000, 20)                       # 20,000 samples
    counts = torch.bincount(y, minlength=10).double()
    # Uniform labels: each count is Binomial(20000, 0.1), sd ~ 42.
    assert (counts - 2000).abs().max() < 5 * math.sqrt(20000 * 0.09)
    m, cls = mixture_means(8, 1, 2)
    # Every sample lies near one of its class's means: the residual is sigma * N(0, I).
    flat = x.flatten(1).double()
    d2 = torch.cdist(flat, m.flatten(1)) ** 2 / flat.shape[1]   # [N, 20] per-element msq
    d2 = d2.masked_fill(cls[None, :] != y[:, None], math.inf)
    nearest = d2.min(1).values
    assert abs(nearest.mean().item() / 0.15 ** 2 - 1) < 0.05
    mu, cov = exact_moments(MixtureSpec.build(8, 1, 0.15, 2))
    se = np.sqrt(np.diag(cov) / len(flat))
    assert np.abs(flat.mean(0).numpy() - mu).max() < 5 * se.max()
    ref = ds.reference(20000, seed=0)
    assert not torch.allclose(ref[:100], x[:100])    # reference draws are not the training draws
    assert abs(ref.flatten(1).double().var(0).mean().item() - np.diag(cov).mean()) < 0.02


def test_parameters_shape_colour_and_errors():
    ds = Mixture(resolution=16, channels=3, components_per_class=3, conditional=False)
    assert ds.info.sample_shape == (3, 16, 16) and ds.info.num_classes is None
    x, y = next(ds.batches(8))
    assert x.shape == (8, 3, 16, 16) and y is None
    m, cls = mixture_means(16, 3, 3)
    assert m.shape == (30, 3, 16, 16)
    assert not torch.allclose(m[:, 0], m[:, 2])      # the class colours make channels differ
    assert m.min() >= -1 and m.max() <= 1
    assert len(mixture_means(16)[0]) == 1797
    for bad, key in [({"resolution": 12}, "resolution"), ({"channels": 2}, "channels"),
                     ({"sigma": 0.0}, "sigma"), ({"sigma": "big"}, "sigma"),
                     ({"components_per_class": 0}, "components_per_class"),
                     ({"draw_salt": -1}, "draw_salt"), ({"conditional": "yes"}, "conditional")]:
        with pytest.raises(DataError) as err:
            Mixture(**bad)
        assert err.value.path == f"data.params.{key}" and "valid" in str(err.value)
        with pytest.raises(DataError):
            Mixture.static_info(**bad)


def _slow_velocity(spec: MixtureSpec, z: np.ndarray, t: float, y) -> np.ndarray:
    """One point at a time, component by component (an independent, explicit formula)."""
    means = spec.means.numpy()
    prior = np.exp(spec.log_prior.numpy())
    out = np.zeros_like(z)
    for n in range(len(z)):
        keep = [i for i in range(len(means)) if y is None or spec.classes[i] == y[n]]
        a, s2 = 1 - t, (1 - t) ** 2 * spec.sigma ** 2 + t ** 2
        logw = np.array([math.log(prior[i]) - ((z[n] - a * means[i]) ** 2).sum() / (2 * s2)
                         for i in keep])
        w = np.exp(logw - logw.max())
        w /= w.sum()
        for wi, i in zip(w, keep):
            out[n] += wi * ((t - a * spec.sigma ** 2) / s2 * (z[n] - a * means[i]) - means[i])
    return out


def test_velocity_matches_an_explicit_loop():
    spec = MixtureSpec.build(8, 1, 0.15, 2)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 64, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 10
    for t in (0.05, 0.4, 0.9):
        for lab in (y, None):
            fast = velocity(spec, z, t, lab).numpy()
            slow = _slow_velocity(spec, z.numpy(), t, None if lab is None else lab.numpy())
            assert np.abs(fast - slow).max() < 1e-10


def _residual_scores(spec, t, y_of, v_fn, n=40_000, seed=0):
    """z-scores of E[((e - x) - v(z_t)) . phi * g(z_t)] = 0 for several test functions g:
    Monte Carlo over (x, e) with the standard error from the same draws."""
    rng = np.random.default_rng(seed)
    means, classes = spec.means.numpy(), spec.classes.numpy()
    y = rng.integers(0, 10, n)
    comp = np.empty(n, dtype=np.int64)
    for c in range(10):
        idx = np.flatnonzero(classes == c)
        sel = y == c
        comp[sel] = idx[rng.integers(0, len(idx), sel.sum())]
    x = means[comp] + spec.sigma * rng.standard_normal((n, spec.dim))
    e = rng.standard_normal((n, spec.dim))
    z = (1 - t) * x + t * e
    v = v_fn(torch.from_numpy(z), t, y_of(torch.from_numpy(y))).numpy()
    r = (e - x) - v                                                  # [n, D]
    phi = rng.standard_normal(spec.dim) / math.sqrt(spec.dim)
    u = rng.standard_normal(spec.dim) / math.sqrt(spec.dim)
    tests = {"1": np.ones(n), "z.u": z @ u, "tanh": np.tanh(3 * z @ phi),
             "z0": z[:, 0], "cos": np.cos(2 * z @ u)}
    scores = {}
    for name, g in tests.items():
        f = (r @ phi) * g
        scores[name] = f.mean() / (f.std() / math.sqrt(n))
    if y_of(torch.zeros(1, dtype=torch.long)) is not None:
        # a class-dependent test function: given y, the residual is orthogonal to it too
        f = (r @ phi) * (y % 3 == 0)
        scores["y%3"] = f.mean() / (f.std() / math.sqrt(n))
    return scores


@pytest.mark.parametrize("t", [pytest.param(0.15, marks=pytest.mark.slow), 0.5,
                               pytest.param(0.85, marks=pytest.mark.slow)])
def test_velocity_is_the_conditional_expectation_by_monte_carlo(t):
    spec = MixtureSpec.build(8, 1, 0.15, 2)
    cond = _residual_scores(spec, t, lambda y: y, lambda z, tt, y: velocity(spec, z, tt, y))
    uncond = _residual_scores(spec, t, lambda y: None,
                              lambda z, tt, y: velocity(spec, z, tt, None))
    # 11 z-scores: |z| < 4.5 for all holds with probability > 0.9999 when the field is exact.
    assert max(abs(s) for s in (*cond.values(), *uncond.values())) < 4.5, (cond, uncond)

    # The same check rejects a slightly wrong field (c_t off by 10 %, or uniform weights).
    def wrong_c(z, tt, y):
        a = 1 - tt
        s2 = a * a * spec.sigma ** 2 + tt * tt
        return velocity(spec, z, tt, y) + 0.1 * (tt - a * spec.sigma ** 2) / s2 * z
    bad = _residual_scores(spec, t, lambda y: y, wrong_c)
    assert max(abs(s) for s in bad.values()) > 8
    # ... and the field of the wrong class
    cheat = _residual_scores(spec, t, lambda y: (y + 1) % 10,
                             lambda z, tt, y: velocity(spec, z, tt, y))
    assert max(abs(s) for s in cheat.values()) > 8


def test_velocity_limits_at_t0_and_t1():
    spec = MixtureSpec.build(8, 1, 0.15, 2)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20, 64, generator=g, dtype=torch.float64)
    y = torch.arange(20) % 10
    for lab in (y, None):
        assert torch.allclose(velocity(spec, z, 0.0, lab), -z, atol=1e-12)
        assert torch.allclose(velocity(spec, z, 1e-7, lab), -z, atol=1e-4)
    class_mean = torch.stack([spec.means[spec.classes == c].mean(0) for c in range(10)])
    assert torch.allclose(velocity(spec, z, 1.0, y), z - class_mean[y], atol=1e-12)
    assert torch.allclose(velocity(spec, z, 1 - 1e-7, y), z - class_mean[y], atol=1e-4)
    mu, _ = exact_moments(spec)
    assert torch.allclose(velocity(spec, z, 1.0, None), z - torch.from_numpy(mu), atol=1e-12)
    null = torch.full((20,), 10)                    # the null label is unconditional
    assert torch.allclose(velocity(spec, z, 0.6, null), velocity(spec, z, 0.6, None))


# -- common random numbers through the real trainer -----------------------------------------

CRN_RECIPE = tiny_mixture_recipe(
    "crn", 11, "{total_images: 160, global_batch_size: 32, lr: 1.0e-3, ema_decays: [0.9],\n"
    "        log_every_images: 160, checkpoint_every_images: 160, progress_bar: false}",
    "{at_end: false}")


def _record_draws(tmp_path, name, overrides):
    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.loop import Trainer

    path = tmp_path / f"{name}.yaml"
    path.write_text(CRN_RECIPE)
    recipe, data = load_recipe(str(path), [f"run.cache_dir={tmp_path / 'cache'}", *overrides])
    trainer = Trainer(recipe, data, str(tmp_path / name))
    seen = []
    inner = trainer.objective

    class Recording:
        def __call__(self, net, x, y, t, r, noise, **kw):
            seen.append({"x": x.clone(), "y": y.clone(), "t": t.clone(), "r": r.clone(),
                         "noise": noise.clone(), "same": (t == r).clone()})
            return inner(net, x, y, t, r, noise, **kw)

        def __getattr__(self, item):
            return getattr(inner, item)
    trainer.objective = Recording()
    trainer.run()
    assert len(seen) == 5
    return {k: torch.stack([s[k] for s in seen]) for k in seen[0]}


def test_common_random_numbers_across_recipes_and_the_aa_salt(tmp_path):
    base = _record_draws(tmp_path, "adaptive", [])
    const = _record_draws(tmp_path, "constant", ["loss_weighting.name=constant",
                                                 "loss_weighting.params={}"])
    gap = _record_draws(tmp_path, "gap", ["gap_schedule.name=progressive"])
    for other in (const, gap):
        for k in base:
            assert torch.equal(base[k], other[k]), k
    salted = _record_draws(tmp_path, "salted", ["data.params.draw_salt=1"])
    for k in ("t", "r", "noise", "same"):
        assert torch.equal(base[k], salted[k]), k
    assert not torch.allclose(base["x"], salted["x"])
    assert not torch.equal(base["y"], salted["y"])


@pytest.mark.parametrize("rel", ["_base/testbed.yaml",
                                 "testbed/gpu/meanflow.yaml"])
def test_testbed_recipes_check(rel):
    from pathlib import Path

    from mfrecipes.recipe import load_recipe
    from mfrecipes.data.mixture import Mixture as M
    from mfrecipes.build import check_recipe

    recipe, data = load_recipe(str(Path(__file__).resolve().parents[1] / "recipes" / rel))
    check_recipe(recipe)
    gpu = "gpu" in rel
    assert data["data"]["name"] == "mixture"
    assert data["objective"]["params"]["omega"] == 1.0 and data["objective"]["params"]["kappa"] == 0.5
    assert data["train"]["total_images"] // data["eval"]["every_images"] >= 8   # a curve
    info = M.static_info(**data["data"]["params"])
    assert info.sample_shape == ((3, 32, 32) if gpu else (1, 16, 16)) and info.num_classes == 10
