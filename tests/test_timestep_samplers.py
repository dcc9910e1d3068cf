"""Timestep samplers: distributions against closed forms / independent numpy simulations,
the fm_ratio and gap_range controls, the DTD curriculum, reproducibility and bad parameters."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from mfrecipes.errors import CheckpointError, RecipeError
from mfrecipes.registry import TIMESTEP_SAMPLERS
from mfrecipes.timestep_samplers import DTD, LogitNormal, Uniform

N = 200_000


def draw(sampler, n=N, seed=0, progress=0.0):
    g = torch.Generator().manual_seed(seed)
    t, r = sampler.sample(n, progress=progress, generator=g, device="cpu")
    assert t.shape == r.shape == (n,) and t.dtype == r.dtype == torch.float32
    return t.double().numpy(), r.double().numpy()


def logit(x):
    return np.log(x) - np.log1p(-x)


# -- logit-normal -------------------------------------------------------------------------------
def test_logit_normal_imagenet_order_statistics():
    mu, sigma = -0.4, 1.0
    t, r = draw(LogitNormal(mu=mu, sigma=sigma, fm_ratio=0.0))
    # logit(t) = max of two N(mu, sigma): mean mu + sigma / sqrt(pi), CDF Phi(z)^2.
    lt, lr = logit(t), logit(r)
    assert abs(lt.mean() - (mu + sigma / math.sqrt(math.pi))) < 0.01
    assert abs(lr.mean() - (mu - sigma / math.sqrt(math.pi))) < 0.01
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(lt, q) - (mu + sigma * norm.ppf(math.sqrt(q)))) < 0.02
        assert abs(np.quantile(lr, q) - (mu + sigma * norm.ppf(1 - math.sqrt(1 - q)))) < 0.02
    assert (r < t).mean() > 0.999


def test_logit_normal_fm_ratio_share_and_v_marginal():
    mu, sigma = -0.4, 1.0
    t, r = draw(LogitNormal(mu=mu, sigma=sigma, fm_ratio=0.75))
    is_v = r == t
    assert abs(is_v.mean() - 0.75) < 0.005  # 5 standard errors
    # A random mask per sample, not the first indices of the batch.
    assert abs(is_v[: N // 2].mean() - 0.75) < 0.007 and abs(is_v[N // 2:].mean() - 0.75) < 0.007
    # The mask is independent of the pair: the v samples' t is still the max of two draws.
    assert abs(logit(t[is_v]).mean() - (mu + sigma / math.sqrt(math.pi))) < 0.012
    assert abs(logit(r[~is_v]).mean() - (mu - sigma / math.sqrt(math.pi))) < 0.02


def test_logit_normal_cifar_style_separate_r_law():
    t, r = draw(LogitNormal(mu=-0.6, sigma=1.6, mu_r=-4.0, sigma_r=1.6, fm_ratio=0.0))
    lt, lr = logit(t), logit(r)
    assert abs(lt.mean() + 0.6) < 0.02 and abs(lt.std() - 1.6) < 0.02
    rng = np.random.default_rng(123)  # independent simulation of logit(r) = min(x_t, x_r)
    ref = np.minimum(rng.normal(-0.6, 1.6, 2_000_000), rng.normal(-4.0, 1.6, 2_000_000))
    assert abs(lr.mean() - ref.mean()) < 0.02
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(lr, q) - np.quantile(ref, q)) < 0.03


# -- uniform ------------------------------------------------------------------------------------
def test_uniform_order_statistics():
    t, r = draw(Uniform(fm_ratio=0.0))
    assert abs(t.mean() - 2 / 3) < 0.003 and abs(r.mean() - 1 / 3) < 0.003
    for q in (0.1, 0.5, 0.9):  # CDF of max: x^2, of min: 1 - (1 - x)^2
        assert abs(np.quantile(t, q) - math.sqrt(q)) < 0.005
        assert abs(np.quantile(r, q) - (1 - math.sqrt(1 - q))) < 0.005


@pytest.mark.parametrize("fm_ratio", [0.0, 0.3, 1.0])
def test_fm_ratio_share(fm_ratio):
    t, r = draw(Uniform(fm_ratio=fm_ratio))
    assert abs((r == t).mean() - fm_ratio) < 0.005


# -- gap range ----------------------------------------------------------------------------------
def _gap_range_reference(a, b, n, rng):
    """numpy: t = max(U1, U2), gap = a + (b - a) |U1 - U2|; where t < gap, t is drawn afresh from
    the law of max(U1, U2) conditioned on t >= gap, by its inverse CDF t = sqrt(g^2 + U (1 - g^2))."""
    u1, u2 = rng.random(n), rng.random(n)
    t, gap = np.maximum(u1, u2), a + (b - a) * np.abs(u1 - u2)
    low = t < gap
    t[low] = np.sqrt(gap[low] ** 2 + rng.random(low.sum()) * (1 - gap[low] ** 2))
    return t, gap


def test_gap_range_bounds_and_distribution():
    """Kim et al. 2025, App. A: the rescaled gap stays inside [a, b] (t redrawn, r never clipped)."""
    a, b = 0.3, 0.5
    t, r = draw(Uniform(fm_ratio=0.25, gap_range=[a, b]))
    u = r != t
    gap = t[u] - r[u]
    assert gap.max() <= b + 1e-6 and gap.min() >= a - 1e-6
    assert r.min() >= 0
    ref_t, ref_gap = _gap_range_reference(a, b, 2_000_000, np.random.default_rng(7))
    assert abs(gap.mean() - ref_gap.mean()) < 0.002
    assert abs(np.quantile(gap, 0.5) - np.quantile(ref_gap, 0.5)) < 0.003
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(t[u], q) - np.quantile(ref_t, q)) < 0.004
    assert abs(t[u].mean() - ref_t.mean()) < 0.003


@pytest.mark.parametrize("gap_range", [(0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9)])
def test_gap_range_share_outside_the_bin_is_zero(gap_range):
    """The Fig. 4 bins under the logit-normal law: no gap outside its bin (clipping r at 0 put 43 %
    of the [0.5, 0.7] gaps and 80 % of the [0.7, 0.9] gaps below their bin)."""
    a, b = gap_range
    t, r = draw(LogitNormal(fm_ratio=0.0, gap_range=list(gap_range)))
    gap = t - r
    outside = (gap < a - 1e-6) | (gap > b + 1e-6)
    assert outside.mean() == 0.0
    assert r.min() >= 0 and t.max() <= 1


def test_gap_range_impossible_bin_is_a_clear_error():
    s = LogitNormal(mu=-8.0, sigma=0.1, fm_ratio=0.0, gap_range=[0.9, 1.0])
    with pytest.raises(ValueError, match=r"gap_range \[0.9, 1.0\].*t law"):
        s.sample(64, progress=0.0, generator=torch.Generator().manual_seed(0))


def test_gap_range_keeps_v_samples():
    t, r = draw(LogitNormal(fm_ratio=0.5, gap_range=[0.1, 0.2]))
    assert abs((r == t).mean() - 0.5) < 0.005


# -- DTD ----------------------------------------------------------------------------------------
def test_dtd_cluster_edges():
    assert DTD(num_clusters=5).edges == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0], abs=1e-12)
    t_min, n = 1e-3, 4
    edges = DTD(num_clusters=n, clustering="log_snr", t_min=t_min).edges
    assert edges[0] == 0.0 and edges[-1] == 1.0 and len(edges) == n + 1
    # Inner edges: equal steps of log SNR = 2 log((1 - t) / t) from t_min to 1 - t_min.
    logsnr = [2 * math.log((1 - e) / e) for e in (t_min, *edges[1:-1], 1 - t_min)]
    steps = np.diff(logsnr)
    assert np.allclose(steps, steps[0]) and steps[0] < 0
    assert edges[2] == pytest.approx(0.5)


@pytest.mark.parametrize("clustering", ["uniform_t", "log_snr"])
def test_dtd_samples_only_unlocked_clusters(clustering):
    s = DTD(num_clusters=5, clustering=clustering, fm_ratio=1.0)
    for stage in range(1, 6):
        s.load_state_dict({"stage": stage, "best": None, "counter": 0, "ema": None})
        lo = s.edges[5 - stage]
        t, r = draw(s, n=50_000, seed=stage)
        assert np.all(r == t) and t.min() >= lo and t.max() <= 1.0
        # Uniform over [lo, 1]: every open cluster gets its share of length.
        counts = np.histogram(t, bins=s.edges[5 - stage:])[0] / len(t)
        widths = np.diff(s.edges[5 - stage:]) / (1 - lo)
        assert np.allclose(counts, widths, atol=0.01)


def test_dtd_u_branch_keeps_logit_normal_pair():
    s = DTD(mu=-0.4, sigma=1.0, fm_ratio=0.5)
    assert s.stage == 1
    t, r = draw(s)
    u = r != t
    assert abs(logit(t[u]).mean() - (-0.4 + 1 / math.sqrt(math.pi))) < 0.015
    assert abs(logit(r[u]).mean() - (-0.4 - 1 / math.sqrt(math.pi))) < 0.015
    assert t[~u].min() >= 0.8  # stage 1: only the easiest cluster for the v branch


def test_dtd_apply_to_all():
    s = DTD(apply_to="all", fm_ratio=0.5)
    t, r = draw(s)
    assert t.min() >= 0.8 and np.all((0 <= r) & (r <= t))
    assert abs((r == t).mean() - 0.5) < 0.005


def test_dtd_adaptive_pacing_on_plateau():
    # No smoothing (loss_ema = 0): the EMA is the loss. 20 improving steps, then a plateau.
    s = DTD(num_clusters=5, patience=10, loss_ema=0.0, min_improvement=0.01, curriculum_end=1.0)
    stages = []
    for i in range(80):
        s.observe(0.9 ** min(i, 19), progress=i / 1000)
        stages.append(s.stage)
    # obs 19 is the last improvement; obs 20..29 fail -> stage 2 at 29. The next obs sets the best,
    # then 10 failures each: stage 3 at 40, 4 at 51, 5 at 62, and it stays at 5.
    expect = [1 + sum(i >= k for k in (29, 40, 51, 62)) for i in range(80)]
    assert stages == expect


def test_dtd_adaptive_no_advance_while_improving_and_cap():
    s = DTD(patience=3, loss_ema=0.5, min_improvement=0.01, curriculum_end=0.5)
    for i in range(100):
        s.observe(0.8 ** i, progress=i / 1000)
    assert s.stage == 1
    s.observe(1.0, progress=0.5)  # every cluster is open from curriculum_end on
    assert s.stage == 5 and s.stage_at(0.0) == 5


def test_dtd_ema_smoothing():
    s = DTD(loss_ema=0.9)
    for x in (1.0, 2.0, 3.0):
        s.observe(x, progress=0.0)
    assert s.state_dict()["ema"] == pytest.approx((0.9 * 1.0 + 0.1 * 2.0) * 0.9 + 0.1 * 3.0)


def test_dtd_fixed_pacing():
    s = DTD(num_clusters=4, pacing="fixed", curriculum_end=0.6)
    got = [s.stage_at(p) for p in (0.0, 0.19, 0.2, 0.39, 0.45, 0.59, 0.6, 1.0)]
    assert got == [1, 1, 2, 2, 3, 3, 4, 4]
    s = DTD(num_clusters=4, pacing="fixed", stage_fractions=[0.1, 0.5, 0.55], curriculum_end=0.9)
    assert [s.stage_at(p) for p in (0.05, 0.1, 0.5, 0.56, 0.95)] == [1, 2, 3, 4, 4]
    # Fixed pacing ignores the loss; sampling follows the schedule.
    for i in range(50):
        s.observe(1.0, progress=0.0)
    assert s.stage == 1
    t, r = draw(DTD(num_clusters=4, pacing="fixed", curriculum_end=0.6, fm_ratio=1.0),
                n=20_000, progress=0.45)
    assert t.min() >= 0.25 and t.min() < 0.26


def test_dtd_state_round_trip():
    losses = [1.0 / (1 + i) if i < 30 else 0.03 + 0.001 * math.sin(i) for i in range(200)]
    a = DTD(patience=7, loss_ema=0.8)
    for i, x in enumerate(losses[:120]):
        a.observe(x, progress=i / 1000)
    state = a.state_dict()
    assert state["stage"] > 1
    b = DTD(patience=7, loss_ema=0.8)
    b.load_state_dict(dict(state))
    assert b.state_dict() == state and b.stage == a.stage and b.describe() == a.describe()
    for i, x in enumerate(losses[120:], start=120):
        a.observe(x, progress=i / 1000)
        b.observe(x, progress=i / 1000)
        assert a.state_dict() == b.state_dict()
    assert draw(a)[0].tolist() == draw(b)[0].tolist()


def test_dtd_bad_state_raises():
    s = DTD(num_clusters=3)
    with pytest.raises(CheckpointError, match="stage"):
        s.load_state_dict({"stage": 4, "best": None, "counter": 0, "ema": None})
    with pytest.raises(CheckpointError, match="keys"):
        s.load_state_dict({"stage": 1})


def test_dtd_describe():
    s = DTD()
    d = s.describe()
    assert d["stage"] == 1 and d["lowest_open_t"] == pytest.approx(0.8)
    s.observe(0.5, progress=0.0)
    assert s.describe()["watched_loss_ema"] == 0.5


# -- every sampler ------------------------------------------------------------------------------
def _all_samplers():
    names = TIMESTEP_SAMPLERS.names()
    assert {"logit_normal", "uniform", "dtd"} <= set(names)
    return names


@pytest.mark.parametrize("name", _all_samplers())
@pytest.mark.parametrize("params", [{}, {"fm_ratio": 0.0},
                                    {"fm_ratio": 0.0, "gap_range": [0.6, 1.0]}])
def test_contract_every_sampler(name, params):
    s = TIMESTEP_SAMPLERS.build({"name": name, "params": params}, device=torch.device("cpu"))
    for progress in (0.0, 0.3, 0.7, 1.0):
        g = torch.Generator().manual_seed(1)
        t, r = s.sample(4096, progress=progress, generator=g, device=torch.device("cpu"))
        assert t.shape == r.shape == (4096,) and t.dtype == r.dtype == torch.float32
        assert bool(((0 <= r) & (r <= t) & (t <= 1)).all())
        # Reproducible from the generator alone; another seed gives other draws.
        t2, r2 = s.sample(4096, progress=progress, generator=torch.Generator().manual_seed(1))
        assert torch.equal(t, t2) and torch.equal(r, r2)
        t3, _ = s.sample(4096, progress=progress, generator=torch.Generator().manual_seed(2))
        assert not torch.equal(t, t3)
    assert s.sample(0, progress=0.0, generator=torch.Generator())[0].shape == (0,)


def test_global_rng_untouched():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    for s in (LogitNormal(), Uniform(), DTD()):
        s.sample(100, progress=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize("cls,params", [
    (LogitNormal, {"sigma": 0.0}),
    (LogitNormal, {"sigma": float("nan")}),
    (LogitNormal, {"mu_r": -4.0}),
    (LogitNormal, {"fm_ratio": 1.5}),
    (LogitNormal, {"fm_ratio": "half"}),
    (Uniform, {"gap_range": [0.5, 0.2]}),
    (Uniform, {"gap_range": [0.1, 1.2]}),
    (Uniform, {"gap_range": [0.1]}),
    (Uniform, {"gap_range": 0.3}),
    (DTD, {"num_clusters": 0}),
    (DTD, {"num_clusters": 2.5}),
    (DTD, {"clustering": "quantile"}),
    (DTD, {"pacing": "sometimes"}),
    (DTD, {"patience": 0}),
    (DTD, {"loss_ema": 1.0}),
    (DTD, {"t_min": 0.5}),
    (DTD, {"apply_to": "u"}),
    (DTD, {"num_clusters": 3, "stage_fractions": [0.1]}),
    (DTD, {"num_clusters": 3, "stage_fractions": [0.3, 0.1]}),
    (DTD, {"num_clusters": 3, "stage_fractions": [0.1, 0.7], "curriculum_end": 0.5}),
    (DTD, {"curriculum_end": 0.0}),
])
def test_bad_params_raise(cls, params):
    with pytest.raises(ValueError):
        cls(**params)


def test_bad_params_through_registry_name_the_path():
    with pytest.raises(RecipeError, match=r"timestep_sampler\.params.*fm_ratio"):
        TIMESTEP_SAMPLERS.build({"name": "uniform", "params": {"fm_ratio": 2}},
                                where="timestep_sampler")


def test_bad_batch_size_raises():
    with pytest.raises(ValueError, match="batch_size"):
        Uniform().sample(-1, progress=0.0, generator=torch.Generator())


@pytest.mark.parametrize("after", ["uniform", "base"])
def test_dtd_after_the_curriculum(after):
    """Once every cluster is open the v branch's t is uniform on [0, 1] (DTD's rule) or returns
    to the pair's law, the max of two LN(mu, sigma) (after: base)."""
    s = DTD(num_clusters=5, fm_ratio=1.0, after=after)
    s.load_state_dict({"stage": 5, "best": None, "counter": 0, "ema": None})
    t, r = draw(s, progress=0.7)
    assert np.all(t == r)
    if after == "uniform":
        ref = np.linspace(0, 1, 1001)
    else:
        rng = np.random.default_rng(2)
        z = np.maximum(rng.normal(-0.4, 1, 2_000_000), rng.normal(-0.4, 1, 2_000_000))
        ref = 1 / (1 + np.exp(-z))
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(t, q) - np.quantile(ref, q)) < 0.005
    # before every cluster is open, both follow the curriculum (t in the open clusters)
    s.load_state_dict({"stage": 2, "best": None, "counter": 0, "ema": None})
    t, _ = draw(s, progress=0.1)
    assert t.min() >= 0.6 - 1e-6
