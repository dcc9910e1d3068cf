"""Contract tests, parametrised over every registered name (plugins included).

Nobody writes a test for a new component: registering it is enough to be checked here.
"""
from __future__ import annotations

import pytest
import torch

from mfrecipes.plugins import load_components
from mfrecipes.registry import (BACKBONES, DATASETS, GAP_SCHEDULES, LOSS_WEIGHTINGS, OBJECTIVES,
                                TIMESTEP_SAMPLERS)

DEV = torch.device("cpu")
load_components()  # the parametrisations below list every registered name


def _sampler():
    return TIMESTEP_SAMPLERS.build({"name": "logit_normal", "params": {}}, device=DEV)


def _tr(n=64, seed=0):
    return _sampler().sample(n, progress=0.3, generator=torch.Generator().manual_seed(seed),
                             device=DEV)


@pytest.mark.parametrize("name", TIMESTEP_SAMPLERS.names())
def test_timestep_sampler_contract(name):
    s = TIMESTEP_SAMPLERS.build({"name": name, "params": {}}, device=DEV)
    for progress in (0.0, 0.5, 1.0):
        t, r = s.sample(257, progress=progress, generator=torch.Generator().manual_seed(1),
                        device=DEV)
        assert t.shape == (257,) and r.shape == (257,)
        assert t.dtype == torch.float32 and r.dtype == torch.float32
        assert bool(((0 <= r) & (r <= t) & (t <= 1)).all()), name
        t2, r2 = s.sample(257, progress=progress, generator=torch.Generator().manual_seed(1),
                          device=DEV)
        assert torch.equal(t, t2) and torch.equal(r, r2), "not reproducible from the generator"


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS.names())
def test_loss_weighting_contract(name):
    w_ = LOSS_WEIGHTINGS.build({"name": name, "params": {}}, timestep_sampler=_sampler())
    t, r = _tr()
    err = torch.rand(64) * 3
    w = w_.weights(err, t, r)
    assert w.shape == (64,) and bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    assert not w.requires_grad


@pytest.mark.parametrize("name", GAP_SCHEDULES.names())
def test_gap_schedule_contract(name):
    g = GAP_SCHEDULES.build({"name": name, "params": {}}, timestep_sampler=_sampler())
    t, r = _tr()
    for progress in (0.0, 0.5, 1.0):
        w = g.weights(t, r, progress)
        assert w.shape == (64,) and bool(torch.isfinite(w).all()) and bool((w >= 0).all())
        assert torch.allclose(w[t == r], torch.ones_like(w[t == r]))


def _small_backbone(num_classes):
    return BACKBONES.build({"name": "mlp", "params": {"hidden": 16, "depth": 1}},
                           input_shape=(2,), num_classes=num_classes)


@pytest.mark.parametrize("num_classes", [None, 3])
@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_contract(name, num_classes):
    torch.manual_seed(0)
    obj = OBJECTIVES.build({"name": name, "params": {}}, num_classes=num_classes)
    net = _small_backbone(num_classes)
    x, noise = torch.randn(64, 2), torch.randn(64, 2)
    y = torch.randint(0, 3, (64,)) if num_classes else None
    t, r = _tr()
    out = obj(net, x, y, t, r, noise, progress=0.5, ema_net=None)
    assert out.err.shape == (64,) and out.is_average.shape == (64,)
    assert out.is_average.dtype == torch.bool
    assert bool(torch.isfinite(out.err).all()) and bool((out.err >= 0).all())
    assert all(isinstance(v, float) for v in out.diagnostics.values())
    out.err.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def _input_shape(name, obj):
    return (2,) if getattr(obj, "modality", None) == "points" or name == "mlp" else (1, 16, 16)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_contract(name):
    obj = BACKBONES.get(name)
    shape = _input_shape(name, obj)
    with torch.device("meta"):
        big = BACKBONES.build({"name": name, "params": {}}, input_shape=shape, num_classes=10)
    if sum(p.numel() for p in big.parameters()) > 5_000_000:
        pytest.skip("built on the meta device only (too large to run in the default suite)")
    for num_classes in (None, 10):
        torch.manual_seed(0)
        net = BACKBONES.build({"name": name, "params": {}}, input_shape=shape,
                              num_classes=num_classes)
        z = torch.randn(3, *shape)
        t, h = torch.rand(3), torch.rand(3) * 0.5
        y = torch.randint(0, 10, (3,)) if num_classes else None
        u = net(z, t, h, y)
        assert u.shape == z.shape
        _, du = torch.func.jvp(lambda z_, t_, h_: net(z_, t_, h_, y), (z, t, h),
                               (torch.randn_like(z), torch.ones(3), torch.ones(3)))
        assert du.shape == z.shape and bool(torch.isfinite(du).all())


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_contract(name, tmp_path):
    entry = DATASETS.entry(name)
    if any(v is ... for v in entry.parameters().values()):
        pytest.skip(f"{name} needs parameters (covered by its own tests)")
    ds = DATASETS.build({"name": name, "params": {}}, seed=0, rank=0, world_size=1,
                        cache_dir=str(tmp_path))
    info = ds.info
    x, y = next(iter(ds.batches(8)))
    assert x.shape == (8, *info.sample_shape) and x.dtype == torch.float32
    assert (y is None) == (info.num_classes is None)
    if y is not None:
        assert y.dtype == torch.int64 and y.shape == (8,)
        assert bool(((0 <= y) & (y < info.num_classes)).all())
    ref = ds.reference(16, seed=0)
    assert ref.shape == (16, *info.sample_shape)
    assert isinstance(ds.counters(), dict)
