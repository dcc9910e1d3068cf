"""Objectives against independent references: finite differences of the total derivative in
float64, explicit formulas, and hand-computed numbers. Tiny networks defined here, CPU only."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mfrecipes.errors import RecipeError
from mfrecipes.objectives import ObjectiveOutput
from mfrecipes.objectives.alphaflow import AlphaFlow
from mfrecipes.objectives.flow_matching import FlowMatching
from mfrecipes.objectives.meanflow import MeanFlow
from mfrecipes.registry import OBJECTIVES

# forward-mode AD loads torch's JIT decompositions on first use, which warns inside torch
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

DT = torch.float64
NUM_CLASSES = 4


# ---------------------------------------------------------------------------------------------
# tiny networks with the backbone signature net(z, t, h, y)
class TinyMLP(nn.Module):
    """Nonlinear in z, t, h and y, with t-h interactions (so every JVP term matters)."""

    def __init__(self, dim: int = 3, hidden: int = 16, num_classes: int | None = NUM_CLASSES):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Linear(4, hidden)
        self.emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, z, t, h, y=None):
        feats = torch.stack([t, h, torch.sin(3 * t) * h, torch.cos(2 * h + t)], dim=1)
        a = self.inp(z.flatten(1)) + self.time(feats)
        if y is not None:
            a = a + self.emb(y)
        a = torch.tanh(a)
        a = torch.tanh(self.mid(a)) * (1 + h[:, None] * t[:, None])
        return self.out(a).reshape(z.shape)


class TinyConv(nn.Module):
    """Image net [B, C, H, W]: conditioning enters as a per-channel bias."""

    def __init__(self, channels: int = 2, width: int = 6, num_classes: int | None = NUM_CLASSES):
        super().__init__()
        self.c1 = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(3, width)
        self.emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.c2 = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z, t, h, y=None):
        c = self.time(torch.stack([t, h, t * h], dim=1))
        if y is not None:
            c = c + self.emb(y)
        a = torch.tanh(self.c1(z) + c[:, :, None, None])
        return self.c2(a * (1 + h)[:, None, None, None])


class ManualJVPMLP(TinyMLP):
    """Offers forward_jvp, computed with forward-mode dual numbers (not torch.func)."""

    jvp_calls = 0

    def forward_jvp(self, z, t, h, y, dz, dt, dh):
        import torch.autograd.forward_ad as fwAD

        ManualJVPMLP.jvp_calls += 1
        with fwAD.dual_level():
            out = self(fwAD.make_dual(z, dz), fwAD.make_dual(t, dt), fwAD.make_dual(h, dh), y)
            u, du = fwAD.unpack_dual(out)
        return u, du


class LookupNet(nn.Module):
    """u = a[y] * z + b * h: derivatives by hand (du/dt along (dz, 1, 1) = a[y] dz + b)."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=DT))
        self.b = nn.Parameter(torch.tensor(b, dtype=DT))

    def forward(self, z, t, h, y=None):
        return self.a[y][:, None] * z + self.b * h[:, None]


class Counting(nn.Module):
    """Records (kind, batch size, grad enabled) of every call into the wrapped net."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, z, t, h, y=None):
        self.calls.append(("fwd", z.shape[0], torch.is_grad_enabled()))
        return self.inner(z, t, h, y)

    def forward_jvp(self, z, t, h, y, dz, dt, dh):
        self.calls.append(("jvp", z.shape[0], torch.is_grad_enabled()))
        return torch.func.jvp(lambda a, b, c: self.inner(a, b, c, y), (z, t, h), (dz, dt, dh))


# ---------------------------------------------------------------------------------------------
# references (independent of the code under test)
def make_batch(seed=0, shape=(3,), b=10, conditional=True, n_equal=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g, dtype=DT)
    noise = torch.randn(b, *shape, generator=g, dtype=DT)
    t = torch.rand(b, generator=g, dtype=DT) * 0.9 + 0.05
    r = t * torch.rand(b, generator=g, dtype=DT)
    r[:n_equal] = t[:n_equal]  # some r = t samples, interleaved below
    perm = torch.randperm(b, generator=g)
    t, r = t[perm], r[perm]
    y = torch.randint(0, NUM_CLASSES, (b,), generator=g) if conditional else None
    return x, y, t, r, noise


def bcast(a, x):
    return a.reshape(-1, *([1] * (x.dim() - 1)))


def fd_total_derivative(net, z, t, h, y, dz, eps=1e-6):
    """Central difference of s -> u(z + s dz, t + s, h + s): the total derivative du/dt."""
    with torch.no_grad():
        plus = net(z + eps * dz, t + eps, h + eps, y)
        minus = net(z - eps * dz, t - eps, h - eps, y)
    return (plus - minus) / (2 * eps)


def reference_guided_v(net, z, t, v, y, omega, kappa, t_start=0.0, t_end=1.0, dropped=None):
    """The CFG-mixed velocity, written out in full on every sample."""
    with torch.no_grad():
        zero = torch.zeros_like(t)
        u_c = net(z, t, zero, y)
        u_u = net(z, t, zero, torch.full_like(y, NUM_CLASSES))
    if kappa == 0:
        mixed = u_u + omega * (v - u_u)
    else:
        mixed = omega * v + kappa * u_c + (1 - omega - kappa) * u_u
    inside = (t >= t_start) & (t <= t_end)
    if dropped is not None:
        inside = inside & ~dropped
    return torch.where(bcast(inside, v), mixed, v)


def reference_meanflow(net, x, y, t, r, noise, *, v_g=None, tangent=None):
    """Full-batch MeanFlow err with du/dt by finite differences: err [B], target, u."""
    tb = bcast(t, x)
    z, v = (1 - tb) * x + tb * noise, noise - x
    h = t - r
    v_g = v if v_g is None else v_g
    tangent = v_g if tangent is None else tangent
    u = net(z, t, h, y)
    target = (v_g - bcast(h, x) * fd_total_derivative(net, z, t, h, y, tangent)).detach()
    return ((u - target) ** 2).flatten(1).sum(1), target, u


def grads(net, err, weights):
    net.zero_grad()
    (weights * err).sum().backward()
    return [p.grad.clone() for p in net.parameters()]


def seeded(seed=123):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# MeanFlow target against finite differences
@pytest.mark.parametrize("impl", ["auto", "torch_func"])
def test_tangent_h_zero_drops_the_gap_derivative(impl):
    """The broken control: du/dt along (v, 1, 0) instead of (v, 1, 1), by central differences."""
    torch.manual_seed(0)
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch()
    out = MeanFlow(num_classes=NUM_CLASSES, tangent_h=0.0, jvp_impl=impl)(
        net, x, y, t, r, noise, progress=0.0)
    tb = bcast(t, x)
    z, v, h = (1 - tb) * x + tb * noise, noise - x, t - r
    eps = 1e-6
    with torch.no_grad():
        d = (net(z + eps * v, t + eps, h, y) - net(z - eps * v, t - eps, h, y)) / (2 * eps)
    torch.testing.assert_close(out.target, (v - bcast(h, x) * d).detach(), rtol=1e-7, atol=1e-8)
    full = MeanFlow(num_classes=NUM_CLASSES)(net, x, y, t, r, noise, progress=0.0)
    avg = r != t
    assert (out.target[avg] - full.target[avg]).abs().max() > 1e-3   # the term it drops is real
    torch.testing.assert_close(out.target[~avg], full.target[~avg])
    with pytest.raises(ValueError, match="tangent_h must be 1"):
        MeanFlow(tangent_h=0.5)


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_meanflow_matches_finite_difference_reference(selective, kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net, shape = TinyMLP().to(DT), (3,)
    else:
        net, shape = TinyConv().to(DT), (2, 4, 4)
    x, y, t, r, noise = make_batch(shape=shape)
    w = torch.rand(x.shape[0], dtype=DT) + 0.5
    out = MeanFlow(selective=selective, num_classes=NUM_CLASSES)(net, x, y, t, r, noise,
                                                                  progress=0.0)
    assert isinstance(out, ObjectiveOutput)
    assert out.err.shape == (x.shape[0],)
    assert torch.equal(out.is_average, r != t)
    g_out = grads(net, out.err, w)

    err_ref, target_ref, u_ref = reference_meanflow(net, x, y, t, r, noise)
    g_ref = grads(net, err_ref, w)
    torch.testing.assert_close(out.target, target_ref, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(out.u, u_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.err, err_ref.detach(), rtol=1e-7, atol=1e-8)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_meanflow_unconditional_model():
    net = TinyMLP(num_classes=None).to(DT)
    x, _, t, r, noise = make_batch(conditional=False)
    out = MeanFlow()(net, x, None, t, r, noise, progress=0.5)
    err_ref, _, _ = reference_meanflow(net, x, None, t, r, noise)
    torch.testing.assert_close(out.err, err_ref.detach(), rtol=1e-7, atol=1e-8)


CFG_SETTINGS = [
    {},                                                          # no guidance
    {"omega": 2.0},                                              # Eq. 19
    {"omega": 1.0, "kappa": 0.5},                                # Eq. 20, B settings
    {"omega": 0.2, "kappa": 0.92, "t_end": 0.6},                 # L/XL-like, interval
    {"omega": 1.0, "kappa": 0.5, "class_dropout": 0.4},          # with dropped samples
    {"omega": 2.0, "class_dropout": 0.4, "t_start": 0.3},
    {"omega": 2.0, "class_dropout": 0.4, "class_dropout_rows": "any"},
    {"omega": 1.0, "kappa": 0.5, "beta_cv": 0.7, "beta_cv_source": "current"},
    {"omega": 2.0, "v_noise": 0.3, "fm_anchor_weight": 0.1, "fm_anchor_delta": 0.05},
]


@pytest.mark.parametrize("params", CFG_SETTINGS)
def test_selective_equals_full(params):
    torch.manual_seed(1)
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch(seed=3, b=12, n_equal=7)
    w = torch.rand(x.shape[0], dtype=DT) + 0.5
    outs, gs = [], []
    for selective in (True, False):
        obj = MeanFlow(selective=selective, num_classes=NUM_CLASSES, **params)
        out = obj(net, x, y, t, r, noise, progress=0.3, generator=seeded())
        outs.append(out)
        gs.append(grads(net, out.err, w))
    sel, full = outs
    torch.testing.assert_close(sel.err, full.err, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sel.target, full.target, rtol=1e-10, atol=1e-12)
    for a, b in zip(*gs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert sel.diagnostics.keys() == full.diagnostics.keys()
    for k in sel.diagnostics:
        assert sel.diagnostics[k] == pytest.approx(full.diagnostics[k], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("params", [
    {"omega": 2.0},
    {"omega": 1.0, "kappa": 0.5},
    {"omega": 0.2, "kappa": 0.92, "t_start": 0.2, "t_end": 0.6},
])
def test_cfg_target_matches_finite_difference_reference(selective, params):
    torch.manual_seed(2)
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch(seed=5, b=12, n_equal=5)
    out = MeanFlow(selective=selective, num_classes=NUM_CLASSES, **params)(
        net, x, y, t, r, noise, progress=0.0)
    tb = bcast(t, x)
    z, v = (1 - tb) * x + tb * noise, noise - x
    v_g = reference_guided_v(net, z, t, v, y, params["omega"], params.get("kappa", 0.0),
                             params.get("t_start", 0.0), params.get("t_end", 1.0))
    assert not torch.allclose(v_g, v)  # guidance changes something in this batch
    err_ref, target_ref, _ = reference_meanflow(net, x, y, t, r, noise, v_g=v_g)
    torch.testing.assert_close(out.target, target_ref, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(out.err, err_ref.detach(), rtol=1e-7, atol=1e-8)
    inside = ((t >= params.get("t_start", 0.0)) & (t <= params.get("t_end", 1.0))).double()
    assert out.diagnostics["cfg_share"] == pytest.approx(inside.mean().item())


# ---------------------------------------------------------------------------------------------
# CFG by hand: u = a[y] z + b h, so u_cond = a[y] z, u_uncond = a[null] z, du/dt = a[y] v_g + b
def _hand_batch():
    # num_classes 2 (null = 2, a[null] = 0.5), b = 0.25. Per sample (z, v, t, h, y):
    # s0: z = 0.5 * 0.5 + 0.5 * 1.5 = 1, v = 1, t = 0.5, h = 0 (r = t), y = 0 (a = 2): u = 2
    # s1: z = 1, v = 1, t = 0.5, h = 0.25, y = 1 (a = 3): u = 3 + 0.25 * 0.25 = 3.0625
    # s2: z = 0.1 * 1 + 0.9 * (-1) = -0.8, v = -2, t = 0.9, h = 0.4, y = 0: u = -1.6 + 0.1 = -1.5
    x = torch.tensor([[0.5], [0.5], [1.0]], dtype=DT)
    noise = torch.tensor([[1.5], [1.5], [-1.0]], dtype=DT)
    t = torch.tensor([0.5, 0.5, 0.9], dtype=DT)
    r = torch.tensor([0.5, 0.25, 0.5], dtype=DT)
    y = torch.tensor([0, 1, 0])
    return LookupNet([2.0, 3.0, 0.5], 0.25), x, y, t, r, noise


HAND_CASES = [
    # kappa = 0, omega = 1.5, interval [0, 0.8] (s2 outside): v_g = u_unc + 1.5 (v - u_unc)
    # s0: u_unc = 0.5, v_g = 0.5 + 1.5 * 0.5 = 1.25 = target (r = t)
    # s1: v_g = 1.25, du/dt = 3 * 1.25 + 0.25 = 4, target = 1.25 - 0.25 * 4 = 0.25
    # s2: v_g = v = -2, du/dt = 2 * (-2) + 0.25 = -3.75, target = -2 + 0.4 * 3.75 = -0.5
    ({"omega": 1.5, "t_end": 0.8}, [1.25, 0.25, -0.5],
     [(2 - 1.25) ** 2, (3.0625 - 0.25) ** 2, (-1.5 + 0.5) ** 2]),
    # same, interval [0, 1]: s2 u_unc = 0.5 * (-0.8) = -0.4, v_g = -0.4 + 1.5 * (-1.6) = -2.8,
    # du/dt = 2 * (-2.8) + 0.25 = -5.35, target = -2.8 + 0.4 * 5.35 = -0.66
    ({"omega": 1.5}, [1.25, 0.25, -0.66],
     [(2 - 1.25) ** 2, (3.0625 - 0.25) ** 2, (-1.5 + 0.66) ** 2]),
    # kappa = 0.5, omega = 1, interval [0, 0.8]: v_g = v + 0.5 u_cond - 0.5 u_unc
    # s0: u_cond = 2, v_g = 1 + 1 - 0.25 = 1.75;  s1: u_cond = 3, v_g = 2.25,
    # du/dt = 3 * 2.25 + 0.25 = 7, target = 2.25 - 0.25 * 7 = 0.5;  s2 outside: -0.5
    ({"omega": 1.0, "kappa": 0.5, "t_end": 0.8}, [1.75, 0.5, -0.5],
     [(2 - 1.75) ** 2, (3.0625 - 0.5) ** 2, (-1.5 + 0.5) ** 2]),
    # kappa = 0.5, interval [0, 1]: s2 u_cond = -1.6, u_unc = -0.4, v_g = -2 - 0.8 + 0.2 = -2.6,
    # du/dt = 2 * (-2.6) + 0.25 = -4.95, target = -2.6 + 0.4 * 4.95 = -0.62
    ({"omega": 1.0, "kappa": 0.5}, [1.75, 0.5, -0.62],
     [(2 - 1.75) ** 2, (3.0625 - 0.5) ** 2, (-1.5 + 0.62) ** 2]),
    # every label dropped (rows: any): null class (a = 0.5) and the plain v
    # s0: u = 0.5, target 1;  s1: u = 0.5625, du/dt = 0.5 + 0.25, target = 1 - 0.25 * 0.75
    # s2: u = -0.4 + 0.1 = -0.3, du/dt = -1 + 0.25, target = -2 + 0.4 * 0.75 = -1.7
    ({"omega": 1.0, "kappa": 0.5, "class_dropout": 1.0, "class_dropout_rows": "any"},
     [1.0, 0.8125, -1.7],
     [(0.5 - 1) ** 2, (0.5625 - 0.8125) ** 2, (-0.3 + 1.7) ** 2]),
]


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("params, expected_target, expected_err", HAND_CASES)
def test_cfg_hand_computed(selective, params, expected_target, expected_err):
    net, x, y, t, r, noise = _hand_batch()
    obj = MeanFlow(selective=selective, num_classes=2, **params)
    out = obj(net, x, y, t, r, noise, progress=0.0, generator=seeded())
    torch.testing.assert_close(out.target[:, 0], torch.tensor(expected_target, dtype=DT))
    torch.testing.assert_close(out.err, torch.tensor(expected_err, dtype=DT))


# ---------------------------------------------------------------------------------------------
# flow matching and the r = t reduction
def test_flow_matching_explicit_formula():
    net = TinyConv().to(DT)
    x, y, t, r, noise = make_batch(shape=(2, 4, 4))
    out = FlowMatching(num_classes=NUM_CLASSES)(net, x, y, t, r, noise, progress=0.0)
    tb = t[:, None, None, None]
    u = net((1 - tb) * x + tb * noise, t, torch.zeros_like(t), y)
    expected = ((u - (noise - x)) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.err, expected.detach())
    assert not out.is_average.any()
    w = torch.rand(x.shape[0], dtype=DT)
    for a, b in zip(grads(net, out.err, w), grads(net, expected, w)):
        torch.testing.assert_close(a, b)


def test_flow_matching_class_dropout_uses_null_label():
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch()
    out = FlowMatching(class_dropout=1.0, num_classes=NUM_CLASSES)(
        net, x, y, t, r, noise, progress=0.0, generator=seeded())
    null = torch.full_like(y, NUM_CLASSES)
    u = net((1 - t[:, None]) * x + t[:, None] * noise, t, torch.zeros_like(t), null)
    torch.testing.assert_close(out.err, ((u - (noise - x)) ** 2).sum(1).detach())
    assert out.diagnostics["drop_share"] == 1.0


@pytest.mark.parametrize("selective", [True, False])
def test_r_equal_t_samples_reduce_to_flow_matching(selective):
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch(b=12, n_equal=6)
    mf = MeanFlow(selective=selective, num_classes=NUM_CLASSES)(net, x, y, t, r, noise,
                                                                progress=0.0)
    fm = FlowMatching(num_classes=NUM_CLASSES)(net, x, y, t, r, noise, progress=0.0)
    eq = r == t
    assert eq.sum() == 6
    torch.testing.assert_close(mf.err[eq], fm.err[eq], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(mf.err[~eq], fm.err[~eq])
    assert mf.diagnostics["avg_share"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# control variate
def test_beta_cv_zero_in_schedule_equals_plain():
    net, ema = TinyMLP().to(DT), TinyMLP().to(DT)
    x, y, t, r, noise = make_batch()
    plain = MeanFlow(num_classes=NUM_CLASSES)(net, x, y, t, r, noise, progress=0.1)
    # linear schedule from 0 up to 1, still at 0 before s0: the tangent must be v
    cv = MeanFlow(num_classes=NUM_CLASSES, beta_cv_schedule="linear", beta_cv_start=0.0,
                  beta_cv_end=1.0, beta_cv_s0=0.5, beta_cv_s1=0.9)
    out = cv(net, x, y, t, r, noise, progress=0.1, ema_net=ema)
    torch.testing.assert_close(out.err, plain.err, rtol=0, atol=0)
    assert out.diagnostics["beta_cv"] == 0.0
    moved = cv(net, x, y, t, r, noise, progress=0.7, ema_net=ema)
    assert moved.diagnostics["beta_cv"] == pytest.approx(0.5)
    assert not torch.allclose(moved.err, plain.err)


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("beta, source", [(1.0, "ema"), (1.0, "current"), (0.3, "ema")])
@pytest.mark.parametrize("cfg", [{}, {"omega": 1.0, "kappa": 0.5}])
def test_beta_cv_tangent_matches_formula(selective, beta, source, cfg):
    torch.manual_seed(4)
    net, ema = TinyMLP().to(DT), TinyMLP().to(DT)
    x, y, t, r, noise = make_batch(seed=7)
    obj = MeanFlow(selective=selective, num_classes=NUM_CLASSES, beta_cv=beta,
                   beta_cv_source=source, **cfg)
    out = obj(net, x, y, t, r, noise, progress=0.0, ema_net=ema)
    tb = bcast(t, x)
    z, v = (1 - tb) * x + tb * noise, noise - x
    v_g = v if not cfg else reference_guided_v(net, z, t, v, y, cfg["omega"], cfg["kappa"])
    with torch.no_grad():
        proxy = (ema if source == "ema" else net)(z, t, torch.zeros_like(t), y)
    tangent = (1 - beta) * v_g + beta * proxy
    err_ref, target_ref, _ = reference_meanflow(net, x, y, t, r, noise, v_g=v_g, tangent=tangent)
    torch.testing.assert_close(out.target, target_ref, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(out.err, err_ref.detach(), rtol=1e-7, atol=1e-8)
    assert out.diagnostics["cv_ema_fallback"] == 0.0
    # the tangent changed the r != t targets, and only those
    plain = MeanFlow(selective=selective, num_classes=NUM_CLASSES, **cfg)(
        net, x, y, t, r, noise, progress=0.0)
    eq = r == t
    torch.testing.assert_close(out.target[eq], plain.target[eq])
    assert not torch.allclose(out.target[~eq], plain.target[~eq])


def test_beta_cv_ema_without_ema_net_falls_back_to_current():
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch()
    fallback = MeanFlow(num_classes=NUM_CLASSES, beta_cv=1.0)(net, x, y, t, r, noise,
                                                              progress=0.0)
    current = MeanFlow(num_classes=NUM_CLASSES, beta_cv=1.0, beta_cv_source="current")(
        net, x, y, t, r, noise, progress=0.0)
    torch.testing.assert_close(fallback.err, current.err, rtol=0, atol=0)
    assert fallback.diagnostics["cv_ema_fallback"] == 1.0


# the beta_cv schedule shapes: tests/test_control_variate.py


# ---------------------------------------------------------------------------------------------
# v-target corruption and the flow-matching anchor
@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("scale", [None, "per_element", "per_sample_norm"])
def test_v_noise_only_touches_r_equal_t_targets(selective, scale):
    """Kim et al. 2025, Fig. 3: noise "scaled by k ||v||", k ||v|| n with n ~ N(0, I) per element
    (the default); per_sample_norm divides by sqrt(dim)."""
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch(b=12, n_equal=6)
    k = 0.3
    plain = MeanFlow(selective=selective, num_classes=NUM_CLASSES)(net, x, y, t, r, noise,
                                                                   progress=0.0)
    opts = {} if scale is None else {"v_noise_scale": scale}
    noisy = MeanFlow(selective=selective, num_classes=NUM_CLASSES, v_noise=k, **opts)(
        net, x, y, t, r, noise, progress=0.0, generator=seeded(9))
    eq = r == t
    torch.testing.assert_close(noisy.target[~eq], plain.target[~eq], rtol=0, atol=0)
    n = torch.randn(x.shape, generator=seeded(9), dtype=DT)  # the objective's only random draw
    v = noise - x
    expected = k * v.norm(dim=1, keepdim=True) * n
    if scale == "per_sample_norm":
        expected = expected / math.sqrt(x.shape[1])
    torch.testing.assert_close(noisy.target[eq] - plain.target[eq], expected[eq])


def test_fm_anchor_adds_weighted_term_to_err():
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch()
    w, d = 0.1, 0.05
    plain = MeanFlow(num_classes=NUM_CLASSES)(net, x, y, t, r, noise, progress=0.0)
    anchored = MeanFlow(num_classes=NUM_CLASSES, fm_anchor_weight=w, fm_anchor_delta=d)(
        net, x, y, t, r, noise, progress=0.0, generator=seeded(5))
    delta = torch.minimum(torch.rand(t.shape, generator=seeded(5), dtype=DT) * d, t)
    z, v = (1 - t[:, None]) * x + t[:, None] * noise, noise - x
    anchor = ((net(z, t, delta, y) - v) ** 2).sum(1)   # h = delta, i.e. r = t - delta
    torch.testing.assert_close(anchored.err - plain.err, w * anchor.detach())
    assert anchored.diagnostics["anchor_err"] == pytest.approx(anchor.mean().item())


# ---------------------------------------------------------------------------------------------
# JVP implementations and precision
@pytest.mark.parametrize("cfg", [{}, {"omega": 1.0, "kappa": 0.5}])
def test_manual_jvp_equals_torch_func(cfg):
    torch.manual_seed(6)
    net = ManualJVPMLP().to(DT)
    x, y, t, r, noise = make_batch(seed=8)
    w = torch.rand(x.shape[0], dtype=DT)
    outs, gs = {}, {}
    for impl in ("manual", "auto", "torch_func"):
        before = ManualJVPMLP.jvp_calls
        outs[impl] = MeanFlow(jvp_impl=impl, num_classes=NUM_CLASSES, **cfg)(
            net, x, y, t, r, noise, progress=0.0)
        assert (ManualJVPMLP.jvp_calls - before) == (0 if impl == "torch_func" else 1)
        gs[impl] = grads(net, outs[impl].err, w)
    for impl in ("manual", "auto"):
        torch.testing.assert_close(outs[impl].err, outs["torch_func"].err, rtol=1e-12, atol=1e-14)
        for a, b in zip(gs[impl], gs["torch_func"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_jvp_dtype_float32_under_bf16_autocast():
    torch.manual_seed(7)
    net = TinyMLP(hidden=32)
    x, y, t, r, noise = (a.float() if a is not None and a.is_floating_point() else a
                         for a in make_batch(seed=2, b=16, n_equal=8))
    ref = MeanFlow(selective=False, num_classes=NUM_CLASSES)(net, x, y, t, r, noise, progress=0.0)
    obj = MeanFlow(jvp_dtype="float32", num_classes=NUM_CLASSES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(net, x, y, t, r, noise, progress=0.0)
    assert out.err.dtype == torch.float32
    avg = r != t
    # the r != t rows are computed entirely in float32: equal to the no-autocast result
    torch.testing.assert_close(out.err[avg], ref.err[avg], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.target[avg], ref.target[avg], rtol=1e-5, atol=1e-6)
    # the r = t rows' forward ran in bf16 (looser)
    torch.testing.assert_close(out.err[~avg], ref.err[~avg], rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# network calls: one JVP on the r != t rows, one forward on the r = t rows, one batched CFG call
def _calls(params, y_present=True, impl="auto", b=10, n_equal=6):
    net = Counting(TinyMLP().to(DT))
    x, y, t, r, noise = make_batch(seed=11, b=b, n_equal=n_equal)
    MeanFlow(num_classes=NUM_CLASSES, jvp_impl=impl, **params)(
        net, x, y if y_present else None, t, r, noise, progress=0.0, generator=seeded())
    return net.calls


def test_network_calls_without_guidance():
    calls = _calls({})
    assert calls == [("jvp", 4, True), ("fwd", 6, True)]
    calls = _calls({}, impl="torch_func")
    assert calls == [("fwd", 4, True), ("fwd", 6, True)]
    calls = _calls({"omega": 3.0}, y_present=False)  # unconditional batch: no CFG forwards
    assert calls == [("jvp", 4, True), ("fwd", 6, True)]


def test_network_calls_with_guidance():
    calls = _calls({"omega": 2.0})                        # u_uncond for all 10 samples
    assert calls == [("fwd", 10, False), ("jvp", 4, True), ("fwd", 6, True)]
    calls = _calls({"omega": 1.0, "kappa": 0.5})          # + u_cond for the 4 r != t rows only
    assert calls == [("fwd", 14, False), ("jvp", 4, True), ("fwd", 6, True)]
    calls = _calls({"omega": 1.0, "kappa": 0.5, "t_end": 0.5})
    _, _, t, r, _ = make_batch(seed=11, b=10, n_equal=6)
    inside = t <= 0.5
    expected = int((inside & (r != t)).sum() + inside.sum())  # u_cond rows + u_uncond rows
    assert 0 < expected < 14
    assert calls == [("fwd", expected, False), ("jvp", 4, True), ("fwd", 6, True)]
    calls = _calls({"omega": 1.0, "kappa": 0.5, "beta_cv": 0.5, "beta_cv_source": "current"})
    assert calls == [("fwd", 14, False), ("jvp", 4, True), ("fwd", 6, True)]


def test_network_calls_all_dropped_or_all_equal():
    calls = _calls({"omega": 2.0, "class_dropout": 1.0, "class_dropout_rows": "any"})  # no mix
    assert calls == [("jvp", 4, True), ("fwd", 6, True)]
    calls = _calls({}, n_equal=10)
    assert calls == [("fwd", 10, True)]


# ---------------------------------------------------------------------------------------------
# parameters
@pytest.mark.parametrize("params, match", [
    ({"jvp_impl": "jax"}, "jvp_impl"),
    ({"jvp_dtype": "bfloat16"}, "jvp_dtype"),
    ({"omega": -1.0}, "omega"),
    ({"kappa": 1.0}, "kappa"),
    ({"t_start": 0.8, "t_end": 0.2}, "t_start"),
    ({"class_dropout": 1.5}, "class_dropout"),
    ({"v_noise": -0.1}, "v_noise"),
    ({"beta_cv": 1.5}, "beta_cv"),
    ({"beta_cv_source": "teacher"}, "beta_cv_source"),
    ({"beta_cv_schedule": "exp"}, "beta_cv_schedule"),
    ({"beta_cv_schedule": "linear", "beta_cv_s0": 0.5, "beta_cv_s1": 0.5}, "s0 < s1"),
    ({"fm_anchor_weight": -1.0}, "fm_anchor_weight"),
    ({"selective": "yes"}, "selective"),
])
def test_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        MeanFlow(num_classes=NUM_CLASSES, **params)


@pytest.mark.parametrize("params", [{"omega": 2.0}, {"omega": 0.0}, {"kappa": 0.5},
                                    {"class_dropout": 0.1}])
def test_guidance_needs_a_conditional_model(params):
    (key, value), = params.items()
    with pytest.raises(ValueError, match="class-conditional") as err:
        MeanFlow(**params)
    assert str(err.value).startswith(f"{key}={value!r} need")   # the value, not True
    with pytest.raises(RecipeError, match="class-conditional") as info:
        OBJECTIVES.build({"name": "meanflow", "params": params}, where="objective",
                         num_classes=None)
    assert info.value.path == "objective.params"


def test_registry_builds_objectives():
    mf = OBJECTIVES.build({"name": "meanflow", "params": {"omega": 1.0, "kappa": 0.5,
                                                          "class_dropout": 0.1}},
                          num_classes=10)
    assert isinstance(mf, MeanFlow) and mf.num_classes == 10
    assert "kappa=0.5" in repr(mf)
    fm = OBJECTIVES.build({"name": "flow_matching"}, num_classes=None)
    assert isinstance(fm, FlowMatching)
    with pytest.raises(RecipeError, match="num_classes"):
        OBJECTIVES.build({"name": "meanflow", "params": {"num_classes": 3}}, where="objective")


# ---------------------------------------------------------------------------------------------
# AlphaFlow


def test_alphaflow_alpha_one_is_flow_matching():
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch(b=12, n_equal=5)
    out = AlphaFlow(alpha=1.0, target_clamp=None, num_classes=NUM_CLASSES)(
        net, x, y, t, r, noise, progress=0.0)
    z, v = (1 - t[:, None]) * x + t[:, None] * noise, noise - x
    # trajectory flow matching: u(z_t, r, t) regressed on v for every sample
    expected = ((net(z, t, t - r, y) - v) ** 2).sum(1)
    torch.testing.assert_close(out.err, expected.detach())
    fm = FlowMatching(num_classes=NUM_CLASSES)(net, x, y, t, r, noise, progress=0.0)
    eq = r == t
    torch.testing.assert_close(out.err[eq], fm.err[eq])
    # with every r = t, the whole batch is flow matching
    out_eq = AlphaFlow(alpha=1.0, num_classes=NUM_CLASSES)(net, x, y, t, t, noise, progress=0.0)
    torch.testing.assert_close(out_eq.err, fm.err)


@pytest.mark.parametrize("cfg", [{}, {"omega": 1.0, "kappa": 0.5, "class_dropout": 0.3}])
def test_alphaflow_alpha_zero_is_meanflow(cfg):
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch(b=12, n_equal=5)
    af = AlphaFlow(alpha_start=0.2, alpha_end=0.6, num_classes=NUM_CLASSES, **cfg)
    assert af.alpha_at(0.61) == 0.0
    out = af(net, x, y, t, r, noise, progress=0.61, generator=seeded())
    ref = MeanFlow(num_classes=NUM_CLASSES, **cfg)(net, x, y, t, r, noise, progress=0.61,
                                                     generator=seeded())
    torch.testing.assert_close(out.err, ref.err, rtol=0, atol=0)
    assert out.diagnostics["alpha"] == 0.0


@pytest.mark.parametrize("clamp", [None, 0.5])
def test_alphaflow_intermediate_alpha_formula(clamp):
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch(b=12, n_equal=5)
    a = 0.3
    out = AlphaFlow(alpha=a, target_clamp=clamp, num_classes=NUM_CLASSES)(
        net, x, y, t, r, noise, progress=0.0)
    z, v = (1 - t[:, None]) * x + t[:, None] * noise, noise - x
    s = a * r + (1 - a) * t
    with torch.no_grad():
        u_s = net(z - (t - s)[:, None] * v, s, s - r, y)     # u(z_s, r, s): time s, h = s - r
    tgt = a * v + (1 - a) * u_s
    if clamp is not None:
        tgt = tgt.clamp(-clamp, clamp)
    tgt = torch.where((r == t)[:, None], v, tgt)
    torch.testing.assert_close(out.target, tgt)
    torch.testing.assert_close(out.err, ((net(z, t, t - r, y) - tgt) ** 2).sum(1).detach())
    if clamp is not None:
        assert (out.target[r != t].abs() <= clamp).all()
    # alpha weights the discrete rows through loss_scale, never inside err (tests/test_alphaflow.py)
    torch.testing.assert_close(out.loss_scale, torch.where(r != t, a, 1.0).to(DT))


def test_alphaflow_cfg_uses_guided_velocity():
    net = TinyMLP().to(DT)
    x, y, t, r, noise = make_batch(b=12, n_equal=5)
    a, omega, kappa = 0.4, 1.0, 0.5
    out = AlphaFlow(alpha=a, target_clamp=None, omega=omega, kappa=kappa,
                    num_classes=NUM_CLASSES)(net, x, y, t, r, noise, progress=0.0)
    z, v = (1 - t[:, None]) * x + t[:, None] * noise, noise - x
    v_g = reference_guided_v(net, z, t, v, y, omega, kappa)
    s = a * r + (1 - a) * t
    with torch.no_grad():
        u_s = net(z - (t - s)[:, None] * v_g, s, s - r, y)
    tgt = torch.where((r == t)[:, None], v_g, a * v_g + (1 - a) * u_s)
    torch.testing.assert_close(out.target, tgt)


@pytest.mark.parametrize("progress, expected", [
    (0.0, 1.0), (0.1, 1.0), (0.4, 0.5), (0.7, 0.0), (1.0, 0.0),
    (0.35, 1 - 1 / (1 + math.exp(-25 * (0.35 - 0.4) / 0.6))),
])
def test_alphaflow_sigmoid_schedule(progress, expected):
    af = AlphaFlow(alpha_start=0.1, alpha_end=0.7)
    assert af.alpha_at(progress) == pytest.approx(expected)
    assert 0.0 < af.alpha_at(0.45) < 1.0
    assert af.alpha_at(0.7 - 0.6 * 0.2) == 0.0  # 1 - sigmoid(25 * 0.3) < 5e-3: snapped


def test_alphaflow_network_calls():
    net = Counting(TinyMLP().to(DT))
    x, y, t, r, noise = make_batch(seed=11, b=10, n_equal=6)
    AlphaFlow(alpha=0.5, num_classes=NUM_CLASSES)(net, x, y, t, r, noise, progress=0.0)
    assert net.calls == [("fwd", 10, True), ("fwd", 4, False)]
    net.calls.clear()
    AlphaFlow(alpha=0.5, omega=1.0, kappa=0.5, num_classes=NUM_CLASSES)(
        net, x, y, t, r, noise, progress=0.0)
    assert net.calls == [("fwd", 14, False), ("fwd", 10, True), ("fwd", 4, False)]


@pytest.mark.parametrize("params, match", [
    ({"alpha": 1.5}, "alpha"), ({"alpha_start": 0.8, "alpha_end": 0.2}, "alpha_start"),
    ({"gamma": 0.0}, "gamma"), ({"target_clamp": -1.0}, "target_clamp"),
    ({"jvp_impl": "x"}, "jvp_impl"), ({"kappa": 2.0}, "kappa"),
])
def test_alphaflow_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        AlphaFlow(num_classes=NUM_CLASSES, **params)


# ---------------------------------------------------------------------------------------------
# class dropout coupled to the r = t rows (the official code's coupling)
@pytest.mark.parametrize("rows", [None, "r_eq_t", "any"])
def test_class_dropout_rows(rows):
    """Default: labels drop only on r = t rows, at class_dropout of the whole batch; "any": on
    every row. Counted from the labels the network sees (the null class is NUM_CLASSES)."""
    torch.manual_seed(0)
    b, p = 4000, 0.1
    seen = []

    class Spy(TinyMLP):
        def forward(self, z, t, h, y=None):
            seen.append(y.clone())
            return super().forward(z, t, h, y)
    net = Spy().to(DT)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, 3, dtype=DT, generator=g)
    noise = torch.randn(b, 3, dtype=DT, generator=g)
    y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
    t = torch.rand(b, dtype=DT, generator=g)
    r = torch.where(torch.rand(b, generator=g) < 0.75, t, t * 0.5)
    opts = {} if rows is None else {"class_dropout_rows": rows}
    obj = MeanFlow(num_classes=NUM_CLASSES, class_dropout=p, jvp_impl="torch_func",
                   selective=False, **opts)
    out = obj(net, x, y, t, r, noise, progress=0.0, generator=seeded(1))
    labels = seen[-1]  # the one call over the whole batch, in batch order
    dropped = labels == NUM_CLASSES
    avg = r != t
    share_u = dropped[avg].double().mean().item()
    assert dropped.double().mean().item() == pytest.approx(p, abs=0.015)
    if rows == "any":
        assert share_u == pytest.approx(p, abs=0.03)
    else:
        assert share_u == 0.0
        assert out.diagnostics["drop_share_u_rows"] == 0.0
