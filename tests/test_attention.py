"""Fused attention with a closed-form JVP, checked against explicit softmax attention, central
finite differences in float64 and autograd of the explicit formula."""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mfrecipes.backbones import attention as attn_mod
from mfrecipes.backbones.attention import SelfAttention, attention, attention_tangent

F64 = torch.float64


def explicit_attention(q, k, v):
    """Reference: softmax(q k^T / sqrt(d)) v, written out."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def _qkv(seed=0, shape=(2, 3, 10, 8), dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64).to(dtype=dtype, device=device)
            for _ in range(6)]


@pytest.fixture(params=[False, True], ids=["one_block", "blocked"])
def blocked(request, monkeypatch):
    """Run the tangent in one block, or force blocks of 3 query rows (B*H = 6, N = 10)."""
    if request.param:
        monkeypatch.setattr(attn_mod, "TANGENT_BLOCK_ELEMENTS", 2 * 3 * 3 * 10)
    return request.param


def test_primal_equals_explicit_attention():
    q, k, v, *_ = _qkv()
    torch.testing.assert_close(attention(q, k, v), explicit_attention(q, k, v),
                               rtol=1e-12, atol=1e-12)


def test_jvp_matches_finite_differences_and_math_jvp(blocked):
    q, k, v, dq, dk, dv = _qkv(1)
    o, do = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    eps = 1e-6
    fd = (explicit_attention(q + eps * dq, k + eps * dk, v + eps * dv)
          - explicit_attention(q - eps * dq, k - eps * dk, v - eps * dv)) / (2 * eps)
    torch.testing.assert_close(do, fd, rtol=1e-7, atol=1e-8)
    o_ref, do_ref = torch.func.jvp(explicit_attention, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(do, do_ref, rtol=1e-10, atol=1e-12)
    # the stand-alone tangent (no autograd graph) and torch.autograd.forward_ad agree too
    with torch.no_grad():
        torch.testing.assert_close(attention_tangent(q, k, v, dq, dk, dv), do_ref,
                                   rtol=1e-10, atol=1e-12)
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        dual = fwad.unpack_dual(attention(fwad.make_dual(q, dq), fwad.make_dual(k, dk),
                                          fwad.make_dual(v, dv)))
    torch.testing.assert_close(dual.tangent, do_ref, rtol=1e-10, atol=1e-12)


def test_jvp_with_partial_tangent():
    q, k, v, _, _, dv = _qkv(2)
    # only v has a tangent: dO = P dV
    _, do = torch.func.jvp(lambda v_: attention(q, k, v_), (v,), (dv,))
    torch.testing.assert_close(do, explicit_attention(q, k, dv), rtol=1e-10, atol=1e-12)


def test_primal_keeps_fused_kernel_under_jvp():
    """With only the CPU flash kernel allowed, a math fallback would raise; ours runs (plain SDPA
    has no forward AD for that kernel at all)."""
    q, k, v, dq, dk, dv = _qkv(3)
    q.requires_grad_()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o, _ = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
        o.sum().backward()
        with pytest.raises(NotImplementedError):
            torch.func.jvp(torch.nn.functional.scaled_dot_product_attention, (q, k, v),
                           (dq, dk, dv))
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_tangent_passes_of_the_backbone_keep_fused_kernel():
    """The DiT under torch.func.jvp and its hand-written forward_jvp (tangents on leading rows),
    each followed by backward, with only the CPU flash kernel allowed: no math fallback."""
    from mfrecipes.backbones.dit import DiT

    torch.manual_seed(0)
    net = DiT((2, 8, 8), 4, depth=2, hidden_size=32, num_heads=4, patch_size=2)
    with torch.no_grad():  # no zero-init gates: attention must reach the output
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    z, dz = torch.randn(2, 3, 2, 8, 8).unbind(0)
    t, h, y = torch.rand(3), torch.rand(3) * 0.5, torch.tensor([0, 1, 4])
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        u, _ = torch.func.jvp(lambda a, b, c: net(a, b, c, y), (z, t, h), (dz, torch.ones(3),
                                                                          torch.ones(3)))
        u.square().sum().backward()
        u2, du2 = net.forward_jvp(z, t, h, y, dz[:2], 1.0, 1.0)
        u2.square().sum().backward()
    assert du2.shape == (2, 2, 8, 8)
    qkv_grad = net.blocks[0].attn.qkv.weight.grad
    assert torch.isfinite(qkv_grad).all() and qkv_grad.abs().max() > 0


def test_self_attention_tangent_on_leading_rows(monkeypatch):
    torch.manual_seed(1)
    layer = SelfAttention(16, 4).double()
    x, dx = torch.randn(2, 3, 10, 16, dtype=F64).unbind(0)
    y, dy = layer.forward_jvp(x, dx[:2])
    monkeypatch.setattr(attn_mod, "attention", explicit_attention)
    y_ref, dy_ref = torch.func.jvp(layer, (x,), (dx,))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dy, dy_ref[:2], rtol=1e-10, atol=1e-12)


def _grads(fn, inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad((out * w).sum(), leaves)


def test_primal_gradients_outside_and_under_jvp(blocked):
    q, k, v, dq, dk, dv = _qkv(4)
    ref = _grads(explicit_attention, (q, k, v))
    plain = _grads(attention, (q, k, v))
    function = _grads(attn_mod._FusedAttention.apply, (q, k, v))  # what jvp uses, called directly
    under = _grads(lambda a, b, c: torch.func.jvp(attention, (a, b, c), (dq, dk, dv))[0],
                   (q, k, v))
    for r, p, f, u in zip(ref, plain, function, under):
        torch.testing.assert_close(p, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(u, r, rtol=1e-10, atol=1e-12)


def test_gradients_through_tangent(blocked):
    """Backprop through dO (rare in MeanFlow, which stops its gradient) is exact as well."""
    q, k, v, dq, dk, dv = _qkv(5)

    def tangent_of(fn):
        return lambda a, b, c, da, db, dc: torch.func.jvp(fn, (a, b, c), (da, db, dc))[1]

    ref = _grads(tangent_of(explicit_attention), (q, k, v, dq, dk, dv))
    ours = _grads(tangent_of(attention), (q, k, v, dq, dk, dv))
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-9, atol=1e-11)


def test_self_attention_forward_jvp_matches_math_jvp(blocked, monkeypatch):
    torch.manual_seed(0)
    layer = SelfAttention(16, 4).double()
    x, dx = torch.randn(2, 2, 10, 16, dtype=F64).unbind(0)
    y, dy = layer.forward_jvp(x, dx)
    # reference: the same layer with the explicit formula in place of the fused attention
    monkeypatch.setattr(attn_mod, "attention", explicit_attention)
    y_ref, dy_ref = torch.func.jvp(layer, (x,), (dx,))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dy, dy_ref, rtol=1e-10, atol=1e-12)
    assert y.requires_grad and not dy.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cuda_matches_math_path():
    """bf16 on CUDA (flash kernel) against the float32 math path. Tolerance: bf16 has an 8-bit
    mantissa; outputs of unit scale agree to ~2e-2 absolute, tangents (blocks upcast to float32
    from bf16 inputs) to 3e-2 relative to their scale."""
    q, k, v, dq, dk, dv = _qkv(6, shape=(4, 8, 256, 64), dtype=torch.bfloat16, device="cuda")
    q.requires_grad_()
    o, do = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    o.float().square().sum().backward()
    f32 = [x.detach().float() for x in (q, k, v, dq, dk, dv)]
    q32 = f32[0].clone().requires_grad_()
    with sdpa_kernel([SDPBackend.MATH]):
        o_ref, do_ref = torch.func.jvp(torch.nn.functional.scaled_dot_product_attention,
                                       (q32, *f32[1:3]), tuple(f32[3:]))
    o_ref.square().sum().backward()
    assert o.dtype == do.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), o_ref, rtol=0, atol=2e-2)
    scale = do_ref.abs().max()
    assert (do.float() - do_ref).abs().max() <= 3e-2 * scale
    gscale = q32.grad.abs().max()
    assert (q.grad.float() - q32.grad).abs().max() <= 3e-2 * gscale
