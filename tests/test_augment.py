"""EDM non-leaking augmentation (data/augment.py): each transform against an explicit reference,
the labels, the seeded draws, and the wrapper that hands the labels to the U-Net."""
from __future__ import annotations

import pytest
import torch

from mfrecipes.data.augment import LABELS, EdmAugment, LabelChannels, geometric
from mfrecipes.errors import RecipeError
from mfrecipes.registry import TRANSFORMS
from mfrecipes.train.streams import RandomStreams


def _labels(b, **values):
    lab = torch.zeros(b, len(LABELS))
    for k, v in values.items():
        lab[:, LABELS.index(k)] = v
    return lab


def _reflect(i, n):  # a slow reference: bounce off the edges until inside [0, n)
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def test_flip_is_index_reversal_and_zero_labels_are_identity():
    x = torch.randn(3, 3, 8, 6)
    assert torch.equal(geometric(x, _labels(3, xflip=1.0)), x[..., torch.arange(5, -1, -1)])
    assert torch.equal(geometric(x, _labels(3)), x)


@pytest.mark.parametrize("tx,ty", [(2, 0), (0, -3), (-5, 4), (7, 7)])
def test_integer_translation_reflects_at_the_border(tx, ty):
    h, w = 8, 6
    x = torch.randn(1, 2, h, w)
    out = geometric(x, _labels(1, translate_x=tx / w, translate_y=ty / h))
    ref = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            ref[0, :, i, j] = x[0, :, _reflect(i - ty, h), _reflect(j - tx, w)]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("deg,k", [(90, 1), (-90, -1), (180, 2)])
def test_right_angle_rotation_is_rot90(deg, k):
    x = torch.randn(2, 3, 8, 8)
    out = geometric(x, _labels(2, rotate=deg / 180))
    assert torch.allclose(out, torch.rot90(x, k, dims=(-2, -1)), atol=1e-6)


def test_scaling_of_a_linear_ramp():
    # Bilinear resampling is exact on a linear function: zooming by s about the centre divides
    # the slope by s wherever the sampled points stay inside the image.
    h, w = 8, 16
    ramp = (torch.arange(w, dtype=torch.float32) - (w - 1) / 2).expand(1, 1, h, w).clone()
    out = geometric(ramp, _labels(1, scale=1.0))                     # s = 2
    assert torch.allclose(out, ramp / 2, atol=1e-5)
    # anisotropic a = 1: x stretched by 2 (slope / 2), y squeezed (the ramp is constant in y)
    out = geometric(ramp, _labels(1, aniso=1.0))
    assert torch.allclose(out, ramp / 2, atol=1e-5)
    out = geometric(ramp, _labels(1, scale=-1.0, aniso=1.0))         # 2^-1 * 2^1 = 1 in x
    assert torch.allclose(out, ramp, atol=1e-5)


def test_draws_labels_and_rows():
    aug = EdmAugment(p=0.3)
    x = torch.randn(64, 3, 8, 8)
    out, lab = aug(x, generator=torch.Generator().manual_seed(0))
    assert lab.shape == (64, 6) and lab.dtype == x.dtype
    untouched = (lab == 0).all(dim=1)
    assert 0 < int(untouched.sum()) < 64
    assert torch.equal(out[untouched], x[untouched])
    assert torch.equal(out, geometric(x, lab))   # the labels describe exactly what was done
    # the translations are whole pixels, the angles within rotate_max, the flip 0 or 1
    assert torch.equal(lab[:, 1] * 8, torch.round(lab[:, 1] * 8))
    assert set(lab[:, 0].tolist()) <= {0.0, 1.0}
    assert float(lab[:, 4].abs().max()) <= 1.0
    # p = 0: identity and all-zero labels; p = 1: every continuous transform on every row
    out0, lab0 = EdmAugment(p=0.0)(x, generator=torch.Generator().manual_seed(0))
    assert out0 is x and not lab0.any()
    _, lab1 = EdmAugment(p=1.0)(x, generator=torch.Generator().manual_seed(0))
    assert (lab1[:, 3:] != 0).all()


def test_determinism_under_the_seed():
    aug, x = EdmAugment(p=0.5), torch.randn(16, 3, 8, 8)
    a = aug(x, generator=torch.Generator().manual_seed(5))
    b = aug(x, generator=torch.Generator().manual_seed(5))
    c = aug(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # the draws per batch do not depend on p: the stream's position is the batch count
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    EdmAugment(p=0.0).draw(16, 8, 8, g1)
    EdmAugment(p=0.9).draw(16, 8, 8, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_augment_stream_is_checkpointed():
    s = RandomStreams(3)
    state = s.rank_state()
    assert set(state) == {"objective", "augment"}
    first = torch.rand(4, generator=s.augment)
    s.load_rank_state(state)
    assert torch.equal(torch.rand(4, generator=s.augment), first)
    assert not torch.equal(first, torch.rand(4, generator=RandomStreams(3).objective))
    RandomStreams(3).load_rank_state({"objective": state["objective"]})  # older checkpoints


def test_bad_params_are_recipe_errors():
    with pytest.raises(RecipeError, match=r"p must be in \[0.0, 1.0\]") as err:
        TRANSFORMS.build({"name": "edm_augment", "params": {"p": 1.5}}, where="train.augment")
    assert err.value.path == "train.augment.params"
    # mfr check builds it, so a bad value fails there, with its key path
    import os

    from mfrecipes.recipe import load_recipe
    from mfrecipes.recipe.build import check_recipe

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe, _ = load_recipe(os.path.join(repo, "recipes", "cifar10", "meanflow.yaml"),
                            ["train.augment.params.p=2"])
    with pytest.raises(RecipeError, match="p must be in") as err:
        check_recipe(recipe)
    assert err.value.path == "train.augment.params"
    with pytest.raises(RecipeError, match="unknown parameter 'prob'"):
        TRANSFORMS.check_params({"name": "edm_augment", "params": {"prob": 0.1}},
                                where="train.augment")


def test_label_channels_reach_the_unet_and_have_zero_tangent():
    from mfrecipes.backbones.unet import SongUNet

    torch.manual_seed(0)
    net = SongUNet((3, 8, 8), None, model_channels=8, channel_mult=(1, 2), channel_mult_emb=2,
                   channel_mult_noise=1, num_blocks=1, attn_resolutions=(), dropout=0.0,
                   augment_dim=6).double()
    with torch.no_grad():  # the zero-initialised output layer would hide every difference
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    wrapped = LabelChannels(net, 3)
    x, t, h = torch.randn(4, 3, 8, 8).double(), torch.rand(4).double(), torch.rand(4).double()
    lab = torch.randn(4, 6).double()
    u = wrapped(LabelChannels.planes(x, lab), t, h)
    assert u.shape == (4, 9, 8, 8) and not u[:, 3:].any()
    assert torch.equal(u[:, :3], net(x, t, h, None, augment_labels=lab))
    assert not torch.allclose(u[:, :3], net(x, t, h))   # the labels change the prediction
    # zeros are no augmentation (what sampling passes)
    assert torch.allclose(wrapped(LabelChannels.planes(x, 0 * lab), t, h)[:, :3], net(x, t, h))
    # the JVP along (v, 1, 1) with v = 0 on the label planes: the labels' tangent is zero
    dz = LabelChannels.planes(torch.randn_like(x), torch.zeros(4, 6).double())
    ones = torch.ones_like(t)
    _, du = torch.func.jvp(lambda z_, t_, h_: wrapped(z_, t_, h_),
                           (LabelChannels.planes(x, lab), t, h), (dz, ones, ones))
    _, ref = torch.func.jvp(lambda z_, t_, h_: net(z_, t_, h_, None, augment_labels=lab),
                            (x, t, h), (dz[:, :3], ones, ones))
    assert torch.allclose(du[:, :3], ref) and not du[:, 3:].any()
    # and that derivative is the float64 central difference of the net at fixed labels
    eps = 1e-6
    f = lambda s: net(x + s * dz[:, :3], t + s, h + s, None, augment_labels=lab)  # noqa: E731
    assert torch.allclose(ref, (f(eps) - f(-eps)) / (2 * eps), atol=1e-6)
