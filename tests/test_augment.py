"""EDM non-leaking augmentation (data/augment.py): each transform against an explicit reference,
the labels, the seeded draws, and the wrapper that hands the labels to the U-Net."""
from __future__ import annotations

import math

import pytest
import torch

from mfrecipes.data.augment import (COLOUR_LABELS, LABELS, EdmAugment, LabelChannels,
                                    colour, geometric)
from mfrecipes.errors import RecipeError
from mfrecipes.registry import TRANSFORMS
from mfrecipes.train.streams import RandomStreams


def _labels(b, **values):
    lab = torch.zeros(b, len(LABELS))
    for k, v in values.items():
        lab[:, LABELS.index(k)] = v
    return lab


def _colour_labels(b, **values):
    lab = torch.zeros(b, len(COLOUR_LABELS), dtype=torch.float64)
    for k, v in values.items():
        lab[:, COLOUR_LABELS.index(k)] = v
    return lab


def _hue(theta):
    return {"hue_cos": math.cos(theta) - 1, "hue_sin": math.sin(theta)}


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
    from mfrecipes.build import check_recipe

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe, _ = load_recipe(os.path.join(repo, "recipes", "cifar10", "meanflow.yaml"),
                            ["train.augment.params.p=2"])
    with pytest.raises(RecipeError, match="p must be in") as err:
        check_recipe(recipe)
    assert err.value.path == "train.augment.params"
    # mfr check also compares the label count with the backbone's augment_dim
    recipe, _ = load_recipe(os.path.join(repo, "recipes", "cifar10", "meanflow.yaml"),
                            ["train.augment.params.colour=true"])
    with pytest.raises(RecipeError, match="gives 12 conditioning labels.*augment_dim: 12") as err:
        check_recipe(recipe)
    assert err.value.path == "backbone.params.augment_dim"
    recipe, _ = load_recipe(os.path.join(repo, "recipes", "cifar10", "meanflow.yaml"),
                            ["train.augment.params.colour=true", "backbone.params.augment_dim=12"])
    check_recipe(recipe)
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


# -- colour --------------------------------------------------------------------------------------
# References written per channel in float64: luma = the mean of R, G, B; chroma = x - luma.
def _luma(x):
    return x.mean(dim=1, keepdim=True)


def test_brightness_and_contrast_on_every_channel():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    b = torch.tensor([0.3, -0.7, 0.0, 1.1], dtype=torch.float64)
    lab = _colour_labels(4)
    lab[:, 0] = b
    assert torch.allclose(colour(x, lab), x + b[:, None, None, None], atol=1e-12)
    # contrast: every channel times c, about 0 (the mid grey of [-1, 1] data)
    assert torch.allclose(colour(x, _colour_labels(4, contrast=1.0)), 2 * x, atol=1e-12)
    assert torch.allclose(colour(x, _colour_labels(4, contrast=-2.0)), x / 4, atol=1e-12)
    # composed, brightness first: c (x + b)
    assert torch.allclose(colour(x, _colour_labels(4, brightness=0.5, contrast=1.0)),
                          2 * (x + 0.5), atol=1e-12)
    # a grey image takes them too
    g = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert torch.allclose(colour(g, _colour_labels(2, brightness=0.5, contrast=1.0)),
                          2 * (g + 0.5), atol=1e-12)
    with pytest.raises(ValueError, match="only brightness and contrast"):
        colour(g, _colour_labels(2, saturation=1.0))


def test_saturation_scales_chroma_about_the_luma():
    x = torch.randn(3, 3, 4, 5, dtype=torch.float64)
    grey = colour(x, _colour_labels(3, saturation=-math.inf))          # s = 0
    assert torch.allclose(grey, _luma(x).expand_as(x), atol=1e-12)      # every channel = luma
    out = colour(x, _colour_labels(3, saturation=1.0))                  # s = 2
    assert torch.allclose(out, _luma(x) + 2 * (x - _luma(x)), atol=1e-12)


def test_hue_rotation_about_the_grey_axis():
    x = torch.randn(3, 3, 4, 5, dtype=torch.float64)
    # +120 degrees about (1, 1, 1) is the cyclic channel move R -> G -> B -> R
    out = colour(x, _colour_labels(3, **_hue(2 * math.pi / 3)))
    assert torch.allclose(out, x[:, [2, 0, 1]], atol=1e-12)
    # a full turn (three steps of 120 degrees) is the identity; any angle keeps the luma and the
    # chroma's length, and the turn back by -theta undoes it
    y = x
    for _ in range(3):
        y = colour(y, _colour_labels(3, **_hue(2 * math.pi / 3)))
    assert torch.allclose(y, x, atol=1e-12)
    for theta in (0.4, -2.5, math.pi):
        out = colour(x, _colour_labels(3, **_hue(theta)))
        assert torch.allclose(_luma(out), _luma(x), atol=1e-12)
        assert torch.allclose((out - _luma(out)).norm(dim=1), (x - _luma(x)).norm(dim=1),
                              atol=1e-12)
        assert not torch.allclose(out, x, atol=1e-3)
        back = colour(out, _colour_labels(3, **_hue(-theta)))
        assert torch.allclose(back, x, atol=1e-12)


def test_luma_flip_negates_the_luma_and_is_an_involution():
    x = torch.randn(3, 3, 4, 5, dtype=torch.float64)
    out = colour(x, _colour_labels(3, luma_flip=1.0))
    assert torch.allclose(out, x - 2 * _luma(x), atol=1e-12)   # luma -> -luma, chroma kept
    assert torch.allclose(colour(out, _colour_labels(3, luma_flip=1.0)), x, atol=1e-12)


def test_colour_draws_labels_and_rows():
    x = torch.randn(64, 3, 8, 8)
    aug = EdmAugment(p=0.3, colour=True)
    assert aug.label_dim == 12 and EdmAugment().label_dim == 6
    out, lab = aug(x, generator=torch.Generator().manual_seed(0))
    assert lab.shape == (64, 12)
    untouched = (lab == 0).all(dim=1)
    assert 0 < int(untouched.sum()) < 64
    assert torch.equal(out[untouched], x[untouched])
    assert torch.equal(out, colour(geometric(x, lab[:, :6]), lab[:, 6:]))
    # the geometric labels are the colour-free ones: the colour draws come after them
    _, lab6 = EdmAugment(p=0.3)(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lab[:, :6], lab6)
    # the hue labels lie on the circle (cos - 1, sin) and are zero together
    c, s = lab[:, 9].double() + 1, lab[:, 10].double()
    hue = (lab[:, 9] != 0) | (lab[:, 10] != 0)
    assert torch.allclose(c[hue] ** 2 + s[hue] ** 2, torch.ones(int(hue.sum()), dtype=c.dtype),
                          atol=1e-6)
    assert set(lab[:, 8].tolist()) <= {0.0, 1.0}
    # p = 0: identity, all labels zero; p = 1: every continuous colour label on every row
    out0, lab0 = EdmAugment(p=0.0, colour=True)(x, generator=torch.Generator().manual_seed(0))
    assert out0 is x and lab0.shape == (64, 12) and not lab0.any()
    _, lab1 = EdmAugment(p=1.0, colour=True)(x, generator=torch.Generator().manual_seed(0))
    assert (lab1[:, [6, 7, 10, 11]] != 0).all()
    # a grey image: brightness and contrast only
    g = torch.randn(32, 1, 8, 8)
    out, lab = EdmAugment(p=1.0, colour=True)(g, generator=torch.Generator().manual_seed(0))
    assert (lab[:, 6:8] != 0).all() and not lab[:, 8:].any()
    assert torch.equal(out, colour(geometric(g, lab[:, :6]), lab[:, 6:]))
    with pytest.raises(ValueError, match="3 channels"):
        aug(torch.randn(2, 4, 8, 8))


def test_colour_draw_count_does_not_depend_on_p_or_channels():
    states = []
    for p, ch in ((0.0, 3), (0.9, 3), (0.5, 1)):
        g = torch.Generator().manual_seed(1)
        EdmAugment(p=p, colour=True).draw(16, 8, 8, g, channels=ch)
        states.append(g.get_state())
    assert all(torch.equal(states[0], st) for st in states[1:])
    g = torch.Generator().manual_seed(1)
    EdmAugment(p=0.5).draw(16, 8, 8, g)
    assert not torch.equal(g.get_state(), states[0])   # colour draws more
    with pytest.raises(RecipeError, match="colour must be true or false"):
        TRANSFORMS.build({"name": "edm_augment", "params": {"colour": "yes"}},
                         where="train.augment")


def test_grey_images_train_with_brightness_and_contrast_only(tmp_path):
    """The 1-channel digits through the real trainer with colour: true: the brightness and
    contrast labels reach the U-Net (their input weights move), the luma flip, hue and saturation
    labels stay zero (their weights do not)."""
    import os

    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.loop import Trainer

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe, data = load_recipe(os.path.join(repo, "recipes", "quickstart.yaml"), [
        "backbone={name: unet_tiny, params: {augment_dim: 12}}",
        "train.augment={name: edm_augment, params: {p: 1.0, colour: true}}",
        "train.total_images=16", "train.global_batch_size=8", "train.log_every_images=8",
        "train.checkpoint_every_images=null", "eval.every_images=null", "eval.at_end=false",
        "run.device=cpu", "train.progress_bar=false"])
    trainer = Trainer(recipe, data, str(tmp_path / "run"))
    assert trainer.info.sample_shape[0] == 1
    before = trainer.net.map_augment.weight.detach().clone()
    out = trainer.run()   # two steps: the zero-initialised output layer blocks the first
    assert out["images"] == 16 and out["nonfinite"] == 0
    moved = (trainer.net.map_augment.weight.detach() != before).any(dim=0)
    assert moved[:8].all() and not moved[8:].any()
    with pytest.raises(ValueError, match="got 4 channels"):
        EdmAugment(colour=True).check_channels(4)
    EdmAugment().check_channels(4)   # the geometric part takes any channel count
