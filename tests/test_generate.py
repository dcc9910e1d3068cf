"""Samplers against hand-written formulas on a net whose u is known in closed form; PNG writers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mfrecipes.data.base import DataInfo
from mfrecipes.errors import RecipeError
from mfrecipes.generate import generate, sample_instantaneous, sample_meanflow
from mfrecipes.plots import save_curves, save_image_grid, save_scatter

A, B, D, E = 0.3, 0.7, -1.1, 0.05


class LinearU(nn.Module):
    """u(z, t, h, y) = A z + B t + D h + E y, recording every call."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))       # gives the net a device
        self.frozen = nn.Linear(1, 1)               # a sub-module left in eval mode by its owner
        self.calls = []

    def forward(self, z, t, h, y=None):
        self.calls.append((z.shape[0], t.clone(), h.clone(), self.training, torch.is_grad_enabled()))
        shape = (-1,) + (1,) * (z.ndim - 1)
        u = A * z + B * t.view(shape) + D * h.view(shape) + self.w
        if y is not None:
            u = u + E * y.to(z.dtype).view(shape)
        return u


@pytest.fixture
def net():
    n = LinearU()
    n.train()
    n.frozen.eval()
    return n


def u_ref(z, t, h, y=None):
    return A * z + B * t + D * h + (0.0 if y is None else E * y)


def test_one_nfe_matches_formula(net):
    z = torch.randn(5, 2, dtype=torch.float64)
    x = sample_meanflow(net, z, nfe=1)
    # x = z_1 - u(z_1, t = 1, h = 1)
    torch.testing.assert_close(x, z - (A * z + B * 1.0 + D * 1.0))
    (bs, t, h, training, grad), = net.calls
    assert t.tolist() == [1.0] * 5 and h.tolist() == [1.0] * 5
    assert not training and not grad


def test_two_nfe_matches_formula(net):
    z = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2])
    yf = y.double().view(-1, 1, 1, 1)
    x = sample_meanflow(net, z, y, nfe=2)
    z_half = z - 0.5 * (A * z + B * 1.0 + D * 0.5 + E * yf)
    expect = z_half - 0.5 * (A * z_half + B * 0.5 + D * 0.5 + E * yf)
    torch.testing.assert_close(x, expect)
    assert [c[1][0].item() for c in net.calls] == [1.0, 0.5]
    assert [c[2][0].item() for c in net.calls] == [0.5, 0.5]


def test_custom_times(net):
    z = torch.randn(3, 2, dtype=torch.float64)
    x = sample_meanflow(net, z, times=[1.0, 0.8, 0.0])
    z1 = z - 0.2 * u_ref(z, 1.0, 0.2)
    expect = z1 - 0.8 * u_ref(z1, 0.8, 0.8)
    torch.testing.assert_close(x, expect)
    with pytest.raises(RecipeError, match="strictly decreasing"):
        sample_meanflow(net, z, times=[1.0, 1.0, 0.0])


def test_euler_instantaneous_matches_formula(net):
    z = torch.randn(6, 2, dtype=torch.float64)
    x = sample_instantaneous(net, z, steps=3)
    zz = z
    for t in (1.0, 2 / 3, 1 / 3):                   # h = 0 at every step
        zz = zz - (1 / 3) * (A * zz + B * t)
    torch.testing.assert_close(x, zz)
    assert all((c[2] == 0).all() for c in net.calls)


def test_modes_restored_and_chunking(net):
    z = torch.randn(10, 2)
    full = sample_meanflow(net, z, nfe=2, batch_size=None)
    net.calls.clear()
    chunked = sample_meanflow(net, z, nfe=2, batch_size=3)
    torch.testing.assert_close(full, chunked)
    assert sorted({c[0] for c in net.calls}) == [1, 3]
    assert net.training and not net.frozen.training
    net.eval()
    sample_meanflow(net, z)
    assert not net.training


def test_mode_restored_on_error():
    class Boom(LinearU):
        def forward(self, *a):
            raise RuntimeError("boom")
    n = Boom().train()
    with pytest.raises(RuntimeError):
        sample_meanflow(n, torch.randn(2, 2))
    assert n.training


def test_generate_labels_and_seed(net):
    info = DataInfo("toy", "image", (1, 4, 4), num_classes=3)
    x, y = generate(net, info, 7, nfe=1, seed=5, labels="balanced")
    assert x.shape == (7, 1, 4, 4) and y.tolist() == [0, 1, 2, 0, 1, 2, 0]
    # Noise is z_1 ~ N(0, I) from a CPU generator seeded with `seed`, drawn first.
    z = torch.randn(7, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x, z - u_ref(z, 1.0, 1.0, y.float().view(-1, 1, 1, 1)))

    xu, yu = generate(net, info, 50, seed=1, labels="uniform")
    xu2, yu2 = generate(net, info, 50, seed=1)                 # None = uniform
    assert yu.shape == (50,) and yu.dtype == torch.long and yu.min() >= 0 and yu.max() <= 2
    assert len(set(yu.tolist())) == 3
    assert torch.equal(xu, xu2) and torch.equal(yu, yu2)
    xo, yo = generate(net, info, 50, seed=2)
    assert not torch.equal(xu, xo)

    yt = torch.tensor([2, 2, 3])                               # 3 = the null class
    _, yy = generate(net, info, 3, labels=yt)
    assert torch.equal(yy, yt)
    with pytest.raises(RecipeError, match="0..3"):
        generate(net, info, 3, labels=torch.tensor([0, 4, 1]))
    with pytest.raises(RecipeError, match="balanced"):
        generate(net, info, 3, labels="stratified")


def test_generate_unconditional_and_instantaneous(net):
    info = DataInfo("toy", "points", (2,))
    x, y = generate(net, info, 4, nfe=2, seed=0, instantaneous=True)
    assert y is None and x.shape == (4, 2)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    z1 = z - 0.5 * (A * z + B)
    torch.testing.assert_close(x, z1 - 0.5 * (A * z1 + B * 0.5))
    with pytest.raises(RecipeError, match="unconditional"):
        generate(net, info, 4, labels=torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------- plots

def test_image_grid_grey(tmp_path):
    from PIL import Image

    x = torch.full((3, 1, 8, 8), -1.0)
    x[1] = 1.0
    x[2, 0, 0, 0] = 0.0
    p = save_image_grid(x, tmp_path / "sub" / "g.png", nrow=2, pad=2)
    img = np.asarray(Image.open(p))
    assert Image.open(p).mode == "L"
    cell = 32                                   # 8 px upscaled to >= 32 px per cell
    assert img.shape == (2 + 2 * (cell + 2), 2 + 2 * (cell + 2))
    assert (img[2:2 + cell, 2:2 + cell] == 0).all()                        # -1 -> 0
    assert (img[2:2 + cell, 4 + cell:4 + 2 * cell] == 255).all()           # +1 -> clip(255.5) = 255
    r0 = 4 + cell
    assert (img[r0:r0 + 4, 2:6] == 128).all() and img[r0 + 4, 6] == 0      # 0 -> 128, 4x4 block
    assert not list(tmp_path.joinpath("sub").glob(".*tmp"))


def test_image_grid_rgb_and_bad_shape(tmp_path):
    from PIL import Image

    p = save_image_grid(torch.rand(5, 3, 16, 16) * 2 - 1, tmp_path / "rgb.png", upscale=1)
    assert Image.open(p).mode == "RGB" and Image.open(p).size == (2 + 3 * 18, 2 + 2 * 18)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        save_image_grid(torch.zeros(2, 4, 8, 8), tmp_path / "lat.png")


def test_scatter_and_curves(tmp_path):
    from PIL import Image

    pts = torch.randn(200, 2)
    p1 = save_scatter(pts, tmp_path / "s.png", reference=pts + 3, title="step 0")
    p2 = save_curves([("a", [0, 1, 2], [3.0, 2.0, 1.5]), ("b", [0, 2], [3.0, 1.0])],
                     tmp_path / "c.png", ylabel="FID", logy=True)
    for p in (p1, p2):
        assert Image.open(p).format == "PNG" and min(Image.open(p).size) > 100
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.png", "s.png"]


def test_many_curves_put_the_legend_beside_the_axes(tmp_path):
    from PIL import Image

    from mfrecipes.plots import save_sweep

    few = save_curves([(f"c{i}", [0, 1], [1.0, 0.5 + i]) for i in range(2)], tmp_path / "few.png")
    many = save_curves([(f"c{i}", [0, 1], [1.0, 0.5 + i]) for i in range(12)],
                       tmp_path / "many.png")
    # beside the axes (not over the data): the figure grows to the right by the legend's width
    assert Image.open(many).size[0] > Image.open(few).size[0] + 40
    sweep = save_sweep([("a", [0, 0.5, 1], [0.2, 0.15, 0.1], [0.01, 0.0, 0.02]),
                        ("b", [1], [0.3], [0.0])], tmp_path / "sweep.png", xlabel="beta_cv")
    assert Image.open(sweep).format == "PNG"
