"""Task-affinity score: against an explicit gradient-cosine computation with a hand-written MeanFlow
loss (torch.func.jvp) in float64; identical losses give 1; the tool on a tiny run."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from mfrecipes.errors import RecipeError
from mfrecipes.evaluate.task_affinity import parse_gap_ranges, task_affinity

from conftest import REPO, load_tool

F64 = torch.float64


class TinyNet(nn.Module):
    """u(z, t, h) for 3-d points: a small MLP on [z, t, h] (smooth, so the JVP is non-trivial)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, z, t, h, y=None):
        return self.body(torch.cat([z, t[:, None], h[:, None]], dim=1))


class FixedPairs:
    """A sampler stub: fixed (t, r_raw) per call, consuming nothing from the generator."""

    def __init__(self, pairs):
        self.pairs = list(pairs)

    def sample(self, batch_size, *, progress, generator, device):
        t, r = self.pairs.pop(0)
        assert t.shape == (batch_size,)
        return t, r


def _meanflow_loss_by_hand(net, x, t, r, e):
    """L = mean_i |u(z, r, t) - stopgrad(v - (t - r) du/dt)|^2, summed over dims (Eq. 4)."""
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    u, dudt = torch.func.jvp(lambda z_, t_, r_: net(z_, t_, t_ - r_), (z, t, r),
                             (v, torch.ones_like(t), torch.zeros_like(r)))
    target = (v - (t - r)[:, None] * dudt).detach()
    return ((u - target) ** 2).sum(1).mean()


def _flat_grad(loss, net):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])


def _setup(num_batches=3, b=16):
    from mfrecipes.plugins import load_components
    from mfrecipes.registry import OBJECTIVES

    load_components()
    torch.manual_seed(0)
    net = TinyNet().to(F64)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, 3, generator=g, dtype=F64), None) for _ in range(num_batches)]
    pairs = []
    for _ in range(num_batches):
        a, c = torch.rand(b, generator=g, dtype=F64), torch.rand(b, generator=g, dtype=F64)
        pairs.append((torch.maximum(a, c), torch.minimum(a, c)))
    objective = OBJECTIVES.build({"name": "meanflow", "params": {}}, num_classes=None)
    return net, objective, data, pairs


def test_cosine_matches_explicit_computation():
    net, objective, data, pairs = _setup()
    ranges = [(0.1, 0.3), (0.6, 0.9)]
    got = task_affinity(net, objective, iter(data), FixedPairs(pairs * 1), gap_ranges=ranges,
                        num_batches=3, seed=5)
    # the documented draws: per batch, noise from one generator seeded with `seed`
    gen = torch.Generator().manual_seed(5)
    noises = []
    for x, _ in data:
        noises.append(torch.randn(x.shape, generator=gen))
        torch.randint(0, 2**31 - 1, (), generator=gen)
    for res, (a, b) in zip(got, ranges):
        cos = []
        for (x, _), (t, r_raw), e in zip(data, pairs, noises):
            e = e.to(F64)
            r = (t - (a + (b - a) * (t - r_raw))).clamp_min(0)
            g_v = _flat_grad(_meanflow_loss_by_hand(net, x, t, t.clone(), e), net)
            g_u = _flat_grad(_meanflow_loss_by_hand(net, x, t, r, e), net)
            cos.append(float(g_v @ g_u / (g_v.norm() * g_u.norm())))
        c = torch.tensor(cos, dtype=F64)
        assert res.gap_range == (a, b) and res.num_batches == 3
        assert res.mean == pytest.approx(float(c.mean()), abs=1e-6)
        assert res.std == pytest.approx(float(c.std()), abs=1e-6)
        assert -1 <= res.mean < 0.9999   # genuinely different tasks
    assert got[0].mean != pytest.approx(got[1].mean, abs=1e-6)


def test_identical_losses_give_one():
    net, objective, data, pairs = _setup(num_batches=2)
    (res,) = task_affinity(net, objective, iter(data), FixedPairs(pairs), gap_ranges=[(0.0, 0.0)],
                           num_batches=2)
    assert res.cosines == pytest.approx((1.0, 1.0), abs=1e-9)
    assert res.mean == pytest.approx(1.0, abs=1e-9) and res.std == pytest.approx(0.0, abs=1e-9)


def test_parse_gap_ranges():
    assert parse_gap_ranges("0:0.1,0.1:0.3") == [(0.0, 0.1), (0.1, 0.3)]
    assert len(parse_gap_ranges(None)) == 6
    for bad in ("0.3:0.1", "0.1-0.3", "0:1.5"):
        with pytest.raises(RecipeError, match="gap range"):
            parse_gap_ranges(bad)


def test_tool_on_a_tiny_run(tmp_path, capsys):
    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.loop import train

    recipe, data = load_recipe(os.path.join(REPO, "recipes", "toy2d_meanflow.yaml"), [
        "train.total_images=512", "train.global_batch_size=128", "eval.every_images=null",
        "eval.at_end=false", "train.progress_bar=false", "run.device=cpu"])
    run = str(tmp_path / "toy")
    train(recipe, data, run)
    tool = load_tool("task_affinity")
    code = tool.main([run, "--gap-ranges", "0:0,0.5:0.7", "--num-batches", "2",
                      "--batch-size", "32", "--weights", "raw", "--device", "cpu", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["weights"] == "net" and out["images"] == 512
    same, far = out["results"]
    assert same["mean"] == pytest.approx(1.0, abs=1e-6) and same["num_batches"] == 2
    assert -1.0 <= far["mean"] <= 1.0
    assert tool.main([run, "--gap-ranges", "0.9:0.1", "--device", "cpu"]) == 2
