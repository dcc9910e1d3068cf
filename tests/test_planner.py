"""The forward planner (objectives/planner.py) against independent references: float64 central
differences of the network for du/dt, the explicit CFG formulas from direct network calls for
v_g, and a record of every network call (which rows, grad on or off)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mfrecipes.objectives.base import as_batch, interpolate
from mfrecipes.objectives.guidance import Guidance
from mfrecipes.objectives.planner import ForwardPlanner, Tangent
from mfrecipes.plugins import load_components
from mfrecipes.registry import BACKBONES

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

DT = torch.float64
C = 3  # classes; label C is the null class


class Net(nn.Module):
    """Conditional, nonlinear in z, t and h, with a t-h term; no forward_jvp (torch.func path)."""

    def __init__(self, dim: int = 4, hidden: int = 10):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Linear(3, hidden)
        self.emb = nn.Embedding(C + 1, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, z, t, h, y=None):
        a = self.inp(z) + self.time(torch.stack([t, h, t * h], dim=1))
        if y is not None:
            a = a + self.emb(y)
        return self.out(torch.tanh(a)) * (1 + h[:, None])


class Recorder(nn.Module):
    """Records ("fwd" | "jvp", rows, grad enabled) of every call; forward_jvp only if asked."""

    def __init__(self, inner, leading_rows: bool):
        super().__init__()
        self.inner, self.calls = inner, []
        if leading_rows:
            self.jvp_leading_rows = True
            self.forward_jvp = self._forward_jvp

    def forward(self, z, t, h, y=None):
        self.calls.append(("fwd", z.shape[0], torch.is_grad_enabled()))
        return self.inner(z, t, h, y)

    def _forward_jvp(self, z, t, h, y, dz, dt, dh):
        self.calls.append(("jvp", z.shape[0], dz.shape[0], torch.is_grad_enabled()))
        return self.inner.forward_jvp(z, t, h, y, dz, dt, dh)


def _batch(b=8, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn(b, dim, generator=g, dtype=DT), torch.randn(b, dim, generator=g, dtype=DT)
    t = torch.rand(b, generator=g, dtype=DT) * 0.8 + 0.1
    h = t * torch.rand(b, generator=g, dtype=DT)
    h[[1, 4, 5]] = 0.0                                     # r = t rows, interleaved
    y = torch.randint(0, C, (b,), generator=g)
    dropped = torch.zeros(b, dtype=torch.bool)
    dropped[2] = True
    y = torch.where(dropped, torch.full_like(y, C), y)
    z, v = interpolate(x, e, t)
    return z, v, t, h, y, dropped


def _dudt_fd(net, z, t, h, y, dz, dh, eps=1e-6):
    """Central difference of net along (dz, dt = 1, dh), row by row (float64)."""
    def at(s):
        return net(z + s * dz, t + s, h + s * dh, y)
    return (at(eps) - at(-eps)) / (2 * eps)


def _v_g_ref(net, z, v, t, y, dropped, omega, kappa, t_end):
    """Geng et al. Eq. 19 / 20 from two direct no-grad calls, v where unguided."""
    with torch.no_grad():
        uc = net(z, t, torch.zeros_like(t), y)
        uu = net(z, t, torch.zeros_like(t), torch.full_like(y, C))
    mixed = omega * v + kappa * uc + (1 - omega - kappa) * uu
    guided = (t <= t_end) & ~dropped
    return torch.where(guided[:, None], mixed, v)


def _mlp():
    load_components()
    torch.manual_seed(0)
    return BACKBONES.build({"name": "mlp", "params": {"hidden": 12, "depth": 2}},
                           input_shape=(4,), num_classes=C).to(DT)


@pytest.mark.parametrize("backbone", ["torch_func", "leading_rows"])
@pytest.mark.parametrize("dz_kind", ["v_g", "tensor", "callable"])
@pytest.mark.parametrize("dh", [1.0, 0.0, "tensor"])
def test_u_dudt_and_v_g_match_references(backbone, dz_kind, dh):
    torch.manual_seed(1)
    inner = Net().to(DT) if backbone == "torch_func" else _mlp()
    z, v, t, h, y, dropped = _batch()
    omega, kappa, t_end = 1.7, 0.3, 0.75
    planner = ForwardPlanner(Guidance(omega, kappa, 0.0, t_end, 0.1), C)
    rows = h != 0
    v_g_ref = _v_g_ref(inner, z, v, t, y, dropped, omega, kappa, t_end)
    seen = {}
    gen = torch.Generator().manual_seed(5)
    other = torch.randn(z.shape, generator=gen, dtype=DT)
    if dz_kind == "v_g":
        dz, dz_ref = None, v_g_ref
    elif dz_kind == "tensor":
        dz, dz_ref = other, other
    else:
        def dz(r):
            seen["idx"], seen["u_cond"], seen["v_g"] = r.idx, r.u_cond, r.v_g
            return 0.5 * r.v_g + 0.5 * r.u_cond
        with torch.no_grad():
            dz_ref = 0.5 * v_g_ref + 0.5 * inner(z, t, torch.zeros_like(t), y)
    dh_arg = torch.linspace(0.0, 1.0, len(t), dtype=DT) if dh == "tensor" else dh
    dh_ref = dh_arg if torch.is_tensor(dh_arg) else torch.full_like(t, dh_arg)

    fwd = planner(inner, z, v, t, h, y, dropped,
                  Tangent(rows, dz=dz, dh=dh_arg, reads_cond=dz_kind == "callable"))

    torch.testing.assert_close(fwd.u, inner(z, t, h, y), rtol=1e-12, atol=1e-12)
    assert fwd.u.requires_grad and not fwd.dudt.requires_grad and not fwd.v_g.requires_grad
    torch.testing.assert_close(fwd.v_g, v_g_ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        fd = _dudt_fd(inner, z, t, h, y, dz_ref, dh_ref)
    torch.testing.assert_close(fwd.dudt[rows], fd[rows], rtol=1e-6, atol=1e-7)
    assert torch.equal(fwd.dudt[~rows], torch.zeros_like(fd[~rows]))
    assert torch.equal(fwd.tangent_rows, rows) and torch.equal(fwd.dropped, dropped)
    if dz_kind == "callable":
        assert torch.equal(seen["idx"], rows.nonzero().squeeze(1))
        with torch.no_grad():
            uc = inner(z, t, torch.zeros_like(t), y)
        torch.testing.assert_close(seen["u_cond"], uc[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(seen["v_g"], v_g_ref[rows], rtol=1e-12, atol=1e-12)
    # assemble: the given tensor on the tangent rows, v_g on the others
    marker = torch.full_like(z, 7.0)
    out = fwd.assemble(marker)
    assert torch.equal(out[rows], marker[rows])
    torch.testing.assert_close(out[~rows], v_g_ref[~rows], rtol=1e-12, atol=1e-12)


def test_gradient_flows_through_u_in_batch_order():
    """u's graph is the net's: the gradient of sum(w * u) equals that of the direct call."""
    inner = _mlp()
    z, v, t, h, y, dropped = _batch()
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    planner = ForwardPlanner(Guidance(), C)
    fwd = planner(inner, z, v, t, h, y, None, Tangent(h != 0))
    g_plan = torch.autograd.grad((w * fwd.u).sum(), list(inner.parameters()))
    g_ref = torch.autograd.grad((w * inner(z, t, h, y)).sum(), list(inner.parameters()))
    for a, b in zip(g_plan, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("leading_rows", [False, True])
def test_network_calls(leading_rows):
    """One batched no-grad guidance call; the JVP on the 5 tangent rows; the 3 plain rows in the
    JVP call (leading-rows backbone) or in one forward of their own."""
    z, v, t, h, y, dropped = _batch()
    net = Recorder(_mlp(), leading_rows)
    planner = ForwardPlanner(Guidance(omega=2.0, class_dropout=0.1), C)
    planner(net, z, v, t, h, y, dropped, Tangent(h != 0))
    jvp = [("jvp", 8, 5, True)] if leading_rows else [("fwd", 5, True), ("fwd", 3, True)]
    assert net.calls == [("fwd", 7, False)] + jvp   # u_uncond on the 7 undropped rows
    net.calls.clear()
    # kappa > 0 adds u_cond on the guided tangent rows; the plain h = 0 rows lend their own
    planner = ForwardPlanner(Guidance(omega=1.0, kappa=0.5, class_dropout=0.1), C)
    planner(net, z, v, t, h, y, dropped, Tangent(h != 0))
    assert net.calls[0] == ("fwd", 7 + 4, False)   # rows 0, 3, 6, 7 (row 2 dropped)
    net.calls.clear()
    # no tangent: the whole batch in one forward, u_cond on the guided h != 0 rows only
    planner(net, z, v, t, h, y, dropped)
    assert net.calls == [("fwd", 11, False), ("fwd", 8, True)]


def test_float32_jvp_under_bf16_autocast():
    """jvp_dtype float32: u and du/dt come back in float32 on every row under bf16 autocast, and
    du/dt matches the float64 reference to float32 accuracy."""
    inner = _mlp()
    z, v, t, h, y, _ = _batch()
    with torch.no_grad():
        fd = _dudt_fd(inner, z, t, h, y, v, torch.ones_like(t))
    net32 = _mlp().float()
    planner = ForwardPlanner(Guidance(), C, jvp_dtype="float32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fwd = planner(net32, z.float(), v.float(), t.float(), h.float(), y, None,
                      Tangent(h != 0))
    assert fwd.u.dtype == torch.float32 and fwd.dudt.dtype == torch.float32
    rows = h != 0
    torch.testing.assert_close(fwd.dudt[rows].double(), fd[rows], rtol=1e-4, atol=1e-4)


def test_assemble_keeps_the_prediction_precision_on_plain_rows():
    """Under bf16 autocast (ambient precision) the plain rows' target is v_g rounded to bf16,
    as the prediction it is compared with."""
    net = _mlp().float()
    z, v, t, h, y, _ = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fwd = ForwardPlanner(Guidance(), C)(net, z.float(), v.float(), t.float(), h.float(),
                                            y, None, Tangent(h != 0))
    assert fwd.u.dtype == torch.bfloat16
    tgt = fwd.assemble(fwd.v_g - as_batch(h.float(), fwd.dudt) * fwd.dudt)
    plain = h == 0
    assert torch.equal(tgt[plain], v.float()[plain].to(torch.bfloat16).float())
