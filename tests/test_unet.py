"""The DDPM++ U-Net: parameter count of the official CIFAR-10 network derived by hand from the
architecture's definition, its JVP (the MeanFlow path through torch.func) against float64 finite
differences, conditioning and errors, and a MeanFlow step through it."""
import math

import pytest
import torch

import mfrecipes.backbones  # noqa: F401  (registration)
from mfrecipes.backbones.unet import SongUNet, positional_embedding
from mfrecipes.errors import RecipeError
from mfrecipes.objectives.jvp import jvp_forward
from mfrecipes.registry import BACKBONES, OBJECTIVES

F64 = torch.float64
CIFAR = (3, 32, 32)


# -- parameter count ---------------------------------------------------------------------------
# Counted from the layer list of the DDPM++ definition, independently of the module code:
# conv k x k: ci co k^2 + co; linear: i o (+ o); GroupNorm: 2 c. A residual block is
# GN(ci) conv3(ci, co) affine(emb, co) GN(co) conv3(co, co) [+ conv1(ci, co) shortcut when the
# width or resolution changes] [+ GN(co) conv1(co, 3co) conv1(co, co) with attention].

def _conv(ci, co, k):
    return ci * co * k * k + co


def _block(ci, co, emb, attn=False, resample=False):
    n = 2 * ci + _conv(ci, co, 3) + emb * co + co + 2 * co + _conv(co, co, 3)
    if ci != co or resample:
        n += _conv(ci, co, 1)
    if attn:
        n += 2 * co + _conv(co, 3 * co, 1) + _conv(co, co, 1)
    return n


def count_by_hand(in_ch=3, res=32, ch=128, mult=(2, 2, 2), mult_emb=4, mult_noise=2, blocks=4,
                  attn=(16,), augment_dim=0, num_classes=None):
    emb, cond = ch * mult_emb, 2 * ch * mult_noise  # two noise embeddings, concatenated
    n = cond * emb + emb + emb * emb + emb + augment_dim * cond
    n += 0 if num_classes is None else (num_classes + 1) * cond
    n += _conv(in_ch, ch, 3)
    widths, c = [ch], ch  # encoder outputs, each a decoder skip
    for level, m in enumerate(mult):
        if level:
            n += _block(c, c, emb, resample=True)
            widths.append(c)
        for _ in range(blocks):
            n += _block(c, ch * m, emb, attn=(res >> level) in attn)
            c = ch * m
            widths.append(c)
    for level in reversed(range(len(mult))):
        if level == len(mult) - 1:
            n += _block(c, c, emb, attn=True) + _block(c, c, emb)
        else:
            n += _block(c, c, emb, resample=True)
        for i in range(blocks + 1):
            n += _block(c + widths.pop(), ch * mult[level], emb,
                        attn=i == blocks and (res >> level) in attn)
            c = ch * mult[level]
    return n + 2 * c + _conv(c, in_ch, 3)


# The official MeanFlow CIFAR-10 network (unconditional, augment_dim 6, emb 512), counted by hand:
# mapping: augment 3,072 + 2 x 262,656;
# encoder: conv 3,584; 32x32 1,050,368 (128 -> 256) + 3 x 1,312,512; 16x16 down 1,378,304
#   + 4 x 1,576,192 (attention); 8x8 down 1,378,304 + 4 x 1,312,512;
# middle: 1,576,192 + 1,312,512;
# decoder: 8x8 5 x 2,034,176 (512 -> 256); up 1,378,304; 16x16 4 x 2,034,176 + 2,297,856
#   (attention); up 1,378,304; 32x32 4 x 2,034,176 + 1,706,240 (384 -> 256);
# output: GN 512 + conv 6,915.  Sum: 55,932,419, equal to count_by_hand(augment_dim=6).
OFFICIAL_CIFAR10_PARAMS = 55_932_419


def _n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_official_cifar10_count_derived_by_hand():
    assert count_by_hand(augment_dim=6) == OFFICIAL_CIFAR10_PARAMS
    with torch.device("meta"):
        net = BACKBONES.build({"name": "unet_cifar10"}, input_shape=CIFAR, num_classes=None)
    assert _n_params(net) == OFFICIAL_CIFAR10_PARAMS
    # EDM's own DDPM++ (one 128-channel noise embedding, augment_dim 9) is the 56M network the
    # EDM paper trains on CIFAR-10: ours with one embedding's worth of width less must land there.
    edm = count_by_hand(mult_noise=1, augment_dim=9) - 128 * 512 - 9 * 128
    assert round(edm / 1e6, 1) == 55.7


@pytest.mark.parametrize("settings, num_classes", [
    (dict(), 10),
    (dict(model_channels=64, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_resolutions=(16, 8),
          channel_mult_noise=1, augment_dim=9), None),
])
def test_count_matches_hand_formula_for_other_settings(settings, num_classes):
    with torch.device("meta"):
        net = BACKBONES.build({"name": "unet", "params": settings}, input_shape=CIFAR,
                              num_classes=num_classes)
    hand = dict(ch=settings.get("model_channels", 128), mult=settings.get("channel_mult", (2,) * 3),
                blocks=settings.get("num_blocks", 4), attn=settings.get("attn_resolutions", (16,)),
                mult_noise=settings.get("channel_mult_noise", 2),
                augment_dim=settings.get("augment_dim", 0), num_classes=num_classes)
    assert _n_params(net) == count_by_hand(**hand)


# -- numerics ----------------------------------------------------------------------------------

def _tiny(num_classes=10, augment_dim=0, dtype=F64, seed=0):
    torch.manual_seed(seed)
    net = SongUNet((3, 16, 16), num_classes, model_channels=8, channel_mult=(1, 2),
                   channel_mult_emb=2, channel_mult_noise=1, num_blocks=1,
                   attn_resolutions=(8,), dropout=0.0, augment_dim=augment_dim).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # no near-zero gains: every path must matter for the checks
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype)
                    * (1 / math.sqrt(fan_in) if p.dim() > 1 else 0.2))
    return net


def _inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 3, 16, 16, generator=g, dtype=F64)
    t = torch.rand(batch, generator=g, dtype=F64)
    h = t * torch.rand(batch, generator=g, dtype=F64)
    return z, t, h, torch.tensor([0, 3, 10])[:batch]


def test_positional_embedding_is_the_explicit_formula():
    t = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    emb = positional_embedding(t, 8)
    freqs = torch.tensor([10000.0 ** (-k / 3) for k in range(4)], dtype=F64)
    args = t[:, None] * freqs[None]
    torch.testing.assert_close(emb, torch.cat([torch.cos(args), torch.sin(args)], 1))


def test_jvp_matches_float64_finite_differences():
    net = _tiny(augment_dim=0)
    z, t, h, y = _inputs()
    g = torch.Generator().manual_seed(2)
    dz = torch.randn(z.shape, generator=g, dtype=F64)
    dt, dh = torch.tensor([1.0, 0.5, -0.3], dtype=F64), torch.tensor([1.0, 0.0, 2.0], dtype=F64)
    u, du = jvp_forward(net, z, t, h, y, dz, dt, dh, impl="torch_func")
    torch.testing.assert_close(u, net(z, t, h, y))
    eps = 1e-6
    fd = (net(z + eps * dz, t + eps * dt, h + eps * dh, y)
          - net(z - eps * dz, t - eps * dt, h - eps * dh, y)) / (2 * eps)
    assert du.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(du, fd, rtol=1e-6, atol=1e-7)
    # the time tangent alone reaches the output through both embeddings
    _, du_t = jvp_forward(net, z, t, h, y, torch.zeros_like(z), torch.ones_like(t),
                          torch.zeros_like(h), impl="torch_func")
    _, du_h = jvp_forward(net, z, t, h, y, torch.zeros_like(z), torch.zeros_like(t),
                          torch.ones_like(h), impl="torch_func")
    assert du_t.abs().max() > 1e-3 and du_h.abs().max() > 1e-3
    assert not torch.allclose(du_t, du_h)


def test_labels_and_augmentation_conditioning():
    net = _tiny(augment_dim=6)
    z, t, h, y = _inputs()
    u = net(z, t, h, y)
    assert not torch.allclose(u, net(z, t, h, y.flip(0)))  # labels condition
    # no labels on a conditional net is the null class; zero augmentation labels are "none"
    torch.testing.assert_close(net(z, t, h), net(z, t, h, torch.full_like(y, 10)))
    torch.testing.assert_close(net(z, t, h, y, torch.zeros(3, 6, dtype=F64)), u)
    assert not torch.allclose(net(z, t, h, y, torch.ones(3, 6, dtype=F64)), u)
    with pytest.raises(ValueError, match="augment_dim"):
        _tiny(augment_dim=0)(z, t, h, y, torch.zeros(3, 6, dtype=F64))
    with pytest.raises(ValueError, match="unconditional"):
        _tiny(num_classes=None)(z, t, h, y)


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    net = BACKBONES.build({"name": "unet", "params": dict(
        model_channels=8, channel_mult=[1, 2], num_blocks=1, dropout=0.5)},
        input_shape=(3, 16, 16))
    with torch.no_grad():  # the zero-gain convs after dropout would hide it
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.3)
    z, t, h, _ = (a.float() for a in _inputs())
    net.train()
    assert not torch.allclose(net(z, t, h), net(z, t, h))
    net.eval()
    torch.testing.assert_close(net(z, t, h), net(z, t, h))


@pytest.mark.parametrize("params, shape, match", [
    ({}, (2,), "image-shaped"),
    ({"channel_mult": [1, 2, 2, 2]}, (3, 20, 20), "divisible"),
    ({"dropout": 1.5}, CIFAR, "dropout"),
    ({"model_channels": 30}, CIFAR, "divisible by 4"),
])
def test_bad_settings_are_recipe_errors(params, shape, match):
    with pytest.raises(RecipeError, match=match):
        BACKBONES.build({"name": "unet", "params": params}, input_shape=shape)


def test_meanflow_step_through_torch_func():
    net = BACKBONES.build({"name": "unet_tiny"}, input_shape=CIFAR, num_classes=10)
    objective = OBJECTIVES.build({"name": "meanflow", "params": {"jvp_impl": "torch_func"}},
                                 num_classes=10)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(4, *CIFAR, generator=g), torch.randn(4, *CIFAR, generator=g)
    t = torch.tensor([0.9, 0.5, 0.3, 0.7])
    r = torch.tensor([0.2, 0.5, 0.0, 0.7])  # two r != t rows, two flow-matching rows
    out = objective(net, x, torch.tensor([1, 2, 3, 10]), t, r, noise, progress=0.0)
    out.err.mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)
