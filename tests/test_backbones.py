"""Backbones: every registered name builds and runs; DiT and MLP tangents (torch.func.jvp and the
closed-form ``forward_jvp``) against finite differences in float64 and against torch.func.jvp of
the same network with explicit softmax attention."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mfrecipes.backbones  # noqa: F401  (registration)
from mfrecipes.backbones import attention as attn_mod
from mfrecipes.backbones import tangents
from mfrecipes.backbones.dit import DiT, sincos_pos_embed_2d
from mfrecipes.backbones.embedders import ConditionEmbedder, sinusoidal_embedding
from mfrecipes.errors import RecipeError
from mfrecipes.registry import BACKBONES

F64 = torch.float64
IMAGE, FLAT = (4, 32, 32), (2,)
PAPER_PARAMS_M = {"dit_b_4": 131, "dit_m_2": 308, "dit_l_2": 459, "dit_xl_2": 676}


def explicit_attention(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def _build(name, input_shape=None, num_classes=10):
    """Build a registered backbone on image input, or on flat points if it rejects images."""
    shapes = [input_shape] if input_shape else [IMAGE, FLAT]
    for i, shape in enumerate(shapes):
        try:
            net = BACKBONES.build({"name": name}, input_shape=shape, num_classes=num_classes)
            return net, shape
        except RecipeError:
            if i == len(shapes) - 1:
                raise


def _is_small(name):
    return name == "mlp" or "tiny" in name


def _inputs(shape, batch=3, dtype=torch.float32, device="cpu", seed=0, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, *shape, generator=g, dtype=F64)
    t = torch.rand(batch, generator=g, dtype=F64)
    h = t * torch.rand(batch, generator=g, dtype=F64)
    y = torch.randint(0, num_classes + 1, (batch,), generator=g)  # includes the null class
    cast = dict(dtype=dtype, device=device)
    return z.to(**cast), t.to(**cast), h.to(**cast), y.to(device)


def _randomize(net, seed=0):
    """Non-zero weights everywhere (DiT zero-inits its gates and output, which would make every
    tangent check trivially 0 == 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            std = 1.0 / math.sqrt(fan_in) if p.dim() > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * std)
    return net


# -- registry contract ------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_builds_and_keeps_shape(name):
    with torch.device("meta"):  # no memory: the XL sizes cost nothing here
        net, shape = _build(name)
        z, t, h, y = (torch.empty(2, *shape), torch.empty(2), torch.empty(2),
                      torch.zeros(2, dtype=torch.long))
        assert net(z, t, h, y).shape == z.shape
        assert net(z, t, h).shape == z.shape
    if _is_small(name):
        net, shape = _build(name)
        z, t, h, y = _inputs(shape)
        u = net(z, t, h, y)
        assert u.shape == z.shape and u.dtype == z.dtype and torch.isfinite(u).all()


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_dit_parameter_counts_match_paper(name):
    with torch.device("meta"):
        net = BACKBONES.build({"name": name}, input_shape=IMAGE, num_classes=1000)
    count = sum(p.numel() for p in net.parameters()) / 1e6
    assert abs(count - PAPER_PARAMS_M[name]) <= 0.01 * PAPER_PARAMS_M[name], count


def test_named_sizes_are_the_generic_factory():
    with torch.device("meta"):
        named = BACKBONES.build({"name": "dit_l_4"}, input_shape=IMAGE, num_classes=None)
        generic = BACKBONES.build({"name": "dit", "params": dict(
            depth=24, hidden_size=1024, num_heads=16, patch_size=4)}, input_shape=IMAGE)
    assert [(n, p.shape) for n, p in named.named_parameters()] == \
        [(n, p.shape) for n, p in generic.named_parameters()]
    assert len(named.blocks) == 24 and named.patch_size == 4


def test_bad_input_shapes_are_recipe_errors():
    with pytest.raises(RecipeError, match="patch_size"):
        BACKBONES.build({"name": "dit_tiny_4"}, input_shape=(1, 10, 10), num_classes=None)
    with pytest.raises(RecipeError, match="mlp"):
        BACKBONES.build({"name": "dit_tiny_2"}, input_shape=(2,), num_classes=None)
    with pytest.raises(RecipeError, match="dit"):
        BACKBONES.build({"name": "mlp"}, input_shape=(1, 8, 8), num_classes=None)


# -- embedders and initialisation -------------------------------------------------------------

def test_sinusoidal_embedding_is_raw_t_cos_then_sin():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    emb = sinusoidal_embedding(t, dim=256, max_period=10000)
    k = torch.arange(128, dtype=F64)
    args = t[:, None] * torch.exp(-math.log(10000) * k / 128)[None]
    torch.testing.assert_close(emb, torch.cat([torch.cos(args), torch.sin(args)], 1))


def test_labels_have_a_null_row_and_no_dropout():
    cond = ConditionEmbedder(16, num_classes=10)
    assert cond.y_embedder.embedding_table.weight.shape == (11, 16)
    t, h = torch.rand(4), torch.rand(4)
    null = torch.full((4,), 10)
    cond.train()  # training mode must not drop labels (the objective does that)
    torch.testing.assert_close(cond(t, h, None), cond(t, h, null))
    y = torch.tensor([0, 1, 2, 3])
    assert not torch.allclose(cond(t, h, y), cond(t, h, null))
    with pytest.raises(ValueError, match="unconditional"):
        ConditionEmbedder(16, None)(t, h, y)


def test_dit_zero_init_outputs_zero_and_can_learn():
    net = BACKBONES.build({"name": "dit_tiny_2"}, input_shape=(1, 8, 8), num_classes=10)
    z, t, h, y = _inputs((1, 8, 8))
    u = net(z, t, h, y)
    assert torch.count_nonzero(u) == 0
    ((u - z) ** 2).sum().backward()
    assert net.final_layer.linear.weight.grad.abs().sum() > 0
    _, du = net.forward_jvp(z, t, h, y, torch.randn_like(z), 1.0, 1.0)
    assert torch.count_nonzero(du) == 0


def test_dit_positions_are_fixed_2d_sincos():
    emb = sincos_pos_embed_2d(8, 3, 4)  # [12 tokens, 8]: cols in channels 0..3, rows in 4..7
    row, col = 2, 3
    tok = emb[row * 4 + col].double()
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=F64) / 2)
    ref = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                     torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(tok, ref, rtol=1e-6, atol=1e-7)
    net = DiT((1, 8, 8), None, depth=1, hidden_size=32, num_heads=2, patch_size=2)
    assert "pos_embed" not in dict(net.named_parameters())


# -- closed-form tangents of single layers ------------------------------------------------------

def _primal_stats(x):
    xhat, mean, rstd = tangents.layer_norm_primal(x, 1e-6)
    torch.testing.assert_close(xhat, F.layer_norm(x, (8,), eps=1e-6), rtol=0, atol=0)
    assert mean is not None and rstd is not None  # no autocast: the fast path is taken
    return xhat, rstd, mean


@pytest.mark.parametrize("which", ["silu", "gelu_tanh", "layer_norm", "layer_norm_given_xhat",
                                   "layer_norm_given_rstd", "layer_norm_backward_kernel",
                                   "modulate", "gated_residual", "linear"])
def test_layer_tangents_match_torch_jvp(which):
    g = torch.Generator().manual_seed(1)
    x, dx = torch.randn(2, 3, 5, 8, generator=g, dtype=F64).unbind(0)
    scale, shift, dscale, dshift = torch.randn(4, 3, 8, generator=g, dtype=F64).unbind(0)
    lin = nn.Linear(8, 6).double()
    cases = {  # (torch's own function of x, our tangent)
        "silu": (F.silu, lambda: tangents.silu(x, dx)),
        "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), lambda: tangents.gelu_tanh(x, dx)),
        "layer_norm": (lambda a: F.layer_norm(a, (8,), eps=1e-6),
                       lambda: tangents.layer_norm(x, dx, 1e-6)),
        "layer_norm_given_xhat": (lambda a: F.layer_norm(a, (8,), eps=1e-6),
                                  lambda: tangents.layer_norm(x, dx, 1e-6,
                                                              F.layer_norm(x, (8,), eps=1e-6))),
        "layer_norm_given_rstd": (
            lambda a: F.layer_norm(a, (8,), eps=1e-6),
            lambda: tangents.layer_norm(x, dx, 1e-6, F.layer_norm(x, (8,), eps=1e-6),
                                        1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True)
                                                       + 1e-6))),
        "layer_norm_backward_kernel": (  # the primal's statistics -> LayerNorm's backward kernel
            lambda a: F.layer_norm(a, (8,), eps=1e-6),
            lambda: tangents.layer_norm(x, dx, 1e-6, *_primal_stats(x))),
        "linear": (lin, lambda: tangents.linear(lin, dx)),
    }
    if which == "modulate":
        fn = lambda a, s, b: a * (1 + s[:, None]) + b[:, None]  # noqa: E731
        _, ref = torch.func.jvp(fn, (x, scale, shift), (dx, dscale, dshift))
        ours = tangents.modulate(x, dx, scale, dscale, dshift)
    elif which == "gated_residual":  # x + gate * a, with a = scale-shaped branch output
        a, da = torch.randn(2, 3, 5, 8, generator=g, dtype=F64).unbind(0)
        fn = lambda x_, g_, a_: x_ + g_[:, None] * a_  # noqa: E731
        _, ref = torch.func.jvp(fn, (x, scale, a), (dx, dscale, da))
        ours = tangents.gated_residual(dx, scale, dscale, a, da)
    else:
        fn, tangent = cases[which]
        _, ref = torch.func.jvp(fn, (x,), (dx,))
        ours = tangent()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


# -- whole-network tangents ---------------------------------------------------------------------

def _tiny(kind, num_classes):
    if kind == "dit":
        net = BACKBONES.build({"name": "dit_tiny_2"}, input_shape=(2, 8, 8),
                              num_classes=num_classes)
        shape = (2, 8, 8)
    else:
        net = BACKBONES.build({"name": "mlp"}, input_shape=FLAT, num_classes=num_classes)
        shape = FLAT
    return _randomize(net.double()), shape


def _tangents(z, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    dz = torch.randn(z.shape, generator=g, dtype=F64)
    dt = torch.rand(t.shape, generator=g, dtype=F64) + 0.5
    dh = torch.rand(t.shape, generator=g, dtype=F64) - 0.5
    return dz, dt, dh


def test_func_jvp_through_dit_matches_finite_differences():
    net, shape = _tiny("dit", 10)
    z, t, h, y = _inputs(shape, dtype=F64)
    dz, dt, dh = _tangents(z, t)
    u, du = torch.func.jvp(lambda a, b, c: net(a, b, c, y), (z, t, h), (dz, dt, dh))
    eps = 1e-6
    with torch.no_grad():
        fd = (net(z + eps * dz, t + eps * dt, h + eps * dh, y)
              - net(z - eps * dz, t - eps * dt, h - eps * dh, y)) / (2 * eps)
    assert du.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(du, fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(u, net(z, t, h, y), rtol=0, atol=0)


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "unconditional"])
@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_forward_jvp_matches_func_jvp_and_gradients(kind, labels, monkeypatch):
    net, shape = _tiny(kind, 10 if labels else None)
    z, t, h, y = _inputs(shape, dtype=F64)
    y = y if labels else None
    dz, dt, dh = _tangents(z, t)

    u, du = net.forward_jvp(z, t, h, y, dz, dt, dh)
    assert u.requires_grad and not du.requires_grad
    assert du.abs().max() > 1e-2
    torch.testing.assert_close(u, net(z, t, h, y), rtol=1e-12, atol=1e-12)
    loss_w = torch.linspace(-1, 1, u.numel(), dtype=F64).reshape(u.shape)
    grads = torch.autograd.grad((u * loss_w).sum(), list(net.parameters()), allow_unused=True)

    # Reference: torch.func.jvp of the same network with explicit softmax attention.
    monkeypatch.setattr(attn_mod, "attention", explicit_attention)
    u_ref, du_ref = torch.func.jvp(lambda a, b, c: net(a, b, c, y), (z, t, h), (dz, dt, dh))
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du, du_ref, rtol=1e-9, atol=1e-11)
    ref_grads = torch.autograd.grad((net(z, t, h, y) * loss_w).sum(), list(net.parameters()),
                                    allow_unused=True)
    for (name, _), g, r in zip(net.named_parameters(), grads, ref_grads):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0, name
        else:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


def test_forward_jvp_takes_scalar_time_tangents():
    """MeanFlow's (dt, dh) = (1, 1): scalars broadcast like [B] tensors."""
    net, shape = _tiny("mlp", None)
    z, t, h, _ = _inputs(shape, dtype=F64)
    dz = torch.randn_like(z)
    _, du_scalar = net.forward_jvp(z, t, h, None, dz, 1.0, 1.0)
    _, du_tensor = net.forward_jvp(z, t, h, None, dz, torch.ones_like(t), torch.ones_like(h))
    torch.testing.assert_close(du_scalar, du_tensor, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "unconditional"])
@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_forward_jvp_on_leading_rows(kind, labels, rows, monkeypatch):
    """Tangents for the first K rows only: u covers every row (with its graph), du the first K,
    each equal to the full-batch reference."""
    net, shape = _tiny(kind, 10 if labels else None)
    assert type(net).jvp_leading_rows is True
    z, t, h, y = _inputs(shape, batch=3, dtype=F64)
    y = y if labels else None
    dz, dt, dh = _tangents(z, t)
    u, du = net.forward_jvp(z, t, h, y, dz[:rows], dt[:rows], dh[:rows])
    assert u.shape == z.shape and du.shape == (rows, *shape)
    assert u.requires_grad and not du.requires_grad
    loss_w = torch.linspace(-1, 1, u.numel(), dtype=F64).reshape(u.shape)
    grads = torch.autograd.grad((u * loss_w).sum(), list(net.parameters()), allow_unused=True)

    monkeypatch.setattr(attn_mod, "attention", explicit_attention)
    u_ref, du_ref = torch.func.jvp(lambda a, b, c: net(a, b, c, y), (z, t, h), (dz, dt, dh))
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)
    assert du_ref[:rows].abs().max() > 1e-2
    torch.testing.assert_close(du, du_ref[:rows], rtol=1e-9, atol=1e-11)
    ref_grads = torch.autograd.grad((u_ref * loss_w).sum(), list(net.parameters()),
                                    allow_unused=True)
    for (name, _), g, r in zip(net.named_parameters(), grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


def test_forward_jvp_rejects_tangents_that_do_not_cover_leading_rows():
    net, shape = _tiny("mlp", None)
    z, t, h, _ = _inputs(shape, batch=3, dtype=F64)
    with pytest.raises(ValueError, match="first K <= B rows"):
        net.forward_jvp(z, t, h, None, torch.zeros(4, *shape, dtype=F64), 1.0, 1.0)
    with pytest.raises(ValueError, match="first K <= B rows"):
        net.forward_jvp(z, t, h, None, torch.zeros(3, 5, dtype=F64), 1.0, 1.0)


# -- the MeanFlow objective on the real backbones (one call for all rows) -----------------------

def _meanflow_batch(shape, b=9, seed=3, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g, dtype=F64)
    noise = torch.randn(b, *shape, generator=g, dtype=F64)
    t = torch.rand(b, generator=g, dtype=F64) * 0.9 + 0.05
    r = t * torch.rand(b, generator=g, dtype=F64)
    r[torch.tensor([0, 3, 4, 7])] = t[torch.tensor([0, 3, 4, 7])]  # r = t rows, interleaved
    y = torch.randint(0, num_classes, (b,), generator=g)
    return x, y, t, r, noise


def _reference_meanflow(net, x, y, t, r, noise, omega, kappa, num_classes):
    """Every sample written out: CFG mix (MeanFlow Eqs. 19-20) and du/dt by central finite
    differences along (v_g, 1, 1) in float64; returns (err [B] with graph, target)."""
    tb = t.reshape(-1, *([1] * (x.dim() - 1)))
    z, v = (1 - tb) * x + tb * noise, noise - x
    h = t - r
    with torch.no_grad():
        zero = torch.zeros_like(t)
        u_c = net(z, t, zero, y)
        u_u = net(z, t, zero, torch.full_like(y, num_classes))
        v_g = omega * v + kappa * u_c + (1 - omega - kappa) * u_u
        eps = 1e-6
        dudt = (net(z + eps * v_g, t + eps, h + eps, y)
                - net(z - eps * v_g, t - eps, h - eps, y)) / (2 * eps)
        target = v_g - h.reshape(tb.shape) * dudt
    u = net(z, t, h, y)
    return ((u - target) ** 2).flatten(1).sum(1), target


@pytest.mark.parametrize("cfg", [{}, {"omega": 2.0}, {"omega": 1.0, "kappa": 0.5}],
                         ids=["no_cfg", "cfg", "cfg_kappa"])
@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_meanflow_one_call_for_all_rows_matches_reference(kind, cfg):
    from mfrecipes.objectives.meanflow import MeanFlow

    net, shape = _tiny(kind, 10)
    x, y, t, r, noise = _meanflow_batch(shape)
    jvp_rows = []
    inner = net.forward_jvp

    def spy(z, *rest):
        jvp_rows.append((z.shape[0], rest[3].shape[0]))  # (primal rows, tangent rows)
        return inner(z, *rest)

    net.forward_jvp = spy
    plain_calls = []
    net.register_forward_pre_hook(lambda mod, args: plain_calls.append(
        (args[0].shape[0], torch.is_grad_enabled())))
    out = MeanFlow(num_classes=10, **cfg)(net, x, y, t, r, noise, progress=0.0)
    # one call for the 9 rows, tangent on the 5 r != t rows; no separate forward with grad
    assert jvp_rows == [(9, 5)]
    assert all(not grad for _, grad in plain_calls)
    w = torch.linspace(0.5, 1.5, 9, dtype=F64)
    g_ours = torch.autograd.grad((w * out.err).sum(), list(net.parameters()), allow_unused=True)
    full = MeanFlow(num_classes=10, selective=False, **cfg)(net, x, y, t, r, noise, progress=0.0)

    omega, kappa = cfg.get("omega", 1.0), cfg.get("kappa", 0.0)
    err_ref, target_ref = _reference_meanflow(net, x, y, t, r, noise, omega, kappa, 10)
    torch.testing.assert_close(out.target, target_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.err, err_ref, rtol=1e-6, atol=1e-7)
    # selective = full JVP on every sample, to float64 round-off
    torch.testing.assert_close(out.err, full.err, rtol=1e-10, atol=1e-10)
    g_ref = torch.autograd.grad((w * err_ref).sum(), list(net.parameters()), allow_unused=True)
    for (name, _), a, b in zip(net.named_parameters(), g_ours, g_ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
