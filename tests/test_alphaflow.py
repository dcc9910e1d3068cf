"""AlphaFlow's weight on the discrete rows (Zhang et al. 2025): alpha / (err + c) reaches the loss.

References are explicit formulas on float64 tensors, written out here from the target
``alpha v + (1 - alpha) u(z_t - (t - s) v, r, s)``; the trainer is checked by recording what its
objective saw and recomputing the loss and gradient from a float64 copy of the net.
"""
from __future__ import annotations

import copy

import pytest
import torch

from shared_parts import TimeNet
from mfrecipes.loss_weightings.adaptive import AdaptiveWeighting
from mfrecipes.loss_weightings.constant import ConstantWeighting
from mfrecipes.loss_weightings.min_snr import MinSNRWeighting
from mfrecipes.objectives.alphaflow import AlphaFlow
from mfrecipes.objectives.meanflow import MeanFlow
from mfrecipes.recipe import load_recipe
from mfrecipes.train.loop import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

DT = torch.float64
ALPHA = 0.3




def batch(b=12, n_equal=4, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, dim, generator=g, dtype=DT)
    noise = torch.randn(b, dim, generator=g, dtype=DT)
    t = torch.rand(b, generator=g, dtype=DT) * 0.9 + 0.05
    r = t * torch.rand(b, generator=g, dtype=DT)
    r[:n_equal] = t[:n_equal]
    return x, t, r, noise


def reference_err(net, x, t, r, noise, alpha):
    """Per-row squared error against the AlphaFlow target, written out (no clamp)."""
    z, v = (1 - t[:, None]) * x + t[:, None] * noise, noise - x
    s = alpha * r + (1 - alpha) * t
    with torch.no_grad():
        u_s = net(z - (t - s)[:, None] * v, s, s - r)          # u(z_s, r, s)
    target = torch.where((r == t)[:, None], v, alpha * v + (1 - alpha) * u_s)
    return ((net(z, t, t - r) - target) ** 2).sum(1)


def loop_loss(out, weighting, t, r):
    """What the trainer minimises: mean(weighting(err) * loss_scale * err), weights detached."""
    w = weighting.weights(out.err, t, r) * out.loss_scale
    return (w.detach() * out.err).mean()


def grads(loss, net):
    parts = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    return torch.cat([g.flatten() for g in parts])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_alpha_weight_matches_explicit_formula_and_old_fold_does_not():
    torch.manual_seed(0)
    net = TimeNet().to(DT)
    x, t, r, noise = batch()
    c = 0.01
    out = AlphaFlow(alpha=ALPHA, target_clamp=None)(net, x, None, t, r, noise, progress=0.0)
    avg = r != t
    assert out.loss_scale.tolist() == [ALPHA if a else 1.0 for a in avg.tolist()]

    loss = loop_loss(out, AdaptiveWeighting(p=1.0, c=c), t, r)
    g = grads(loss, net)

    # explicit: mean over the batch of alpha err / (err + c) on the discrete rows and
    # err / (err + c) on the r = t rows, the denominators held fixed (stop-gradient)
    err = reference_err(net, x, t, r, noise, ALPHA)
    den = err.detach() + c
    ref = torch.where(avg, ALPHA * err / den, err / den).mean()
    g_ref = grads(ref, net)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)

    # the old reading folded alpha into err: 1 / (alpha err + c) * alpha err cancels alpha,
    # so it fails the same comparison by a wide margin
    err_old = torch.where(avg, ALPHA * err, err)
    old = (err_old / (err_old.detach() + c)).mean()
    assert abs(old.item() - ref.item()) / ref.item() > 0.05
    assert rel(grads(old, net), g_ref) > 0.1


@pytest.mark.parametrize("weighting", [
    AdaptiveWeighting(p=0.75, c=1e-3), ConstantWeighting(scale=2.0), MinSNRWeighting(normalize=False),
])
def test_alpha_factor_survives_every_loss_weighting(weighting):
    net = TimeNet().to(DT)
    x, t, r, noise = batch(seed=3)
    out = AlphaFlow(alpha=ALPHA, target_clamp=None)(net, x, None, t, r, noise, progress=0.0)
    loss = loop_loss(out, weighting, t, r)
    err = reference_err(net, x, t, r, noise, ALPHA)
    w = weighting.weights(err.detach(), t, r)
    ref = (torch.where(r != t, ALPHA * w, w) * err).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads(loss, net), grads(ref, net), rtol=1e-10, atol=1e-14)


def test_loss_scale_is_one_where_no_alpha_applies():
    net = TimeNet().to(DT)
    x, t, r, noise = batch()
    ones = torch.ones_like(t)
    mf = MeanFlow()(net, x, None, t, r, noise, progress=0.0)
    assert torch.equal(mf.loss_scale, ones)          # the default of every other objective
    for kw, progress in (({"alpha": 1.0}, 0.0), ({"alpha": 0.0}, 0.0),
                         ({"alpha": ALPHA, "weight_by_alpha": False}, 0.0),
                         ({"alpha_start": 0.1, "alpha_end": 0.5}, 0.9)):
        out = AlphaFlow(**kw)(net, x, None, t, r, noise, progress=progress)
        assert torch.equal(out.loss_scale, ones), kw
    # along the sigmoid schedule the factor is alpha(progress)
    af = AlphaFlow(alpha_start=0.1, alpha_end=0.5)
    a = af.alpha_at(0.3)
    out = af(net, x, None, t, r, noise, progress=0.3)
    assert 0 < a < 1
    torch.testing.assert_close(out.loss_scale, torch.where(r != t, a, 1.0).to(DT))


def test_weight_by_alpha_must_be_a_bool():
    with pytest.raises(ValueError, match="weight_by_alpha"):
        AlphaFlow(weight_by_alpha="yes")


TOY = """
run: {name: af, seed: 1, device: cpu}
data: {name: toy2d, params: {kind: eight_gaussians, num_points: 512}}
backbone: {name: mlp, params: {hidden: 16, depth: 2}}
objective: {name: alphaflow, params: {alpha: 0.3, target_clamp: null}}
timestep_sampler: {name: logit_normal, params: {fm_ratio: 0.25}}
loss_weighting: {name: adaptive, params: {p: 1.0, c: 0.01}}
gap_schedule: {name: constant, params: {}}
train: {total_images: 128, global_batch_size: 64, lr: 1.0e-3, ema_decays: [0.9],
        log_every_images: 64, checkpoint_every_images: 128, progress_bar: false}
eval: {at_end: false}
"""


def test_trainer_loss_and_gradient_carry_alpha(tmp_path):
    """Through the real training step: the loss it returns and the gradient it steps with are
    the explicit alpha-weighted formula on what its objective saw."""
    path = tmp_path / "r.yaml"
    path.write_text(TOY)
    recipe, data = load_recipe(str(path), [])
    trainer = Trainer(recipe, data, str(tmp_path / "run"))
    seen = {}
    real_objective = trainer.objective

    def recording(net, x, y, t, r, noise, **kw):
        seen.update(x=x, t=t, r=r, noise=noise)
        return real_objective(net, x, y, t, r, noise, **kw)

    real_step = trainer.engine.step

    def capture_then_step():
        seen["grad"] = torch.cat([p.grad.flatten() for p in trainer.net.parameters()])
        real_step()

    trainer.objective = recording
    trainer.engine.step = capture_then_step
    before = copy.deepcopy(trainer.net).to(DT)
    mb = trainer.engine.micro_batch_size()
    loss, diag, _ = trainer._train_step(trainer.dataset.batches(mb), mb,
                                        trainer.engine.accumulation_steps())
    assert diag["obj/alpha"] == pytest.approx(ALPHA)

    x, t, r, noise = (seen[k].to(DT) for k in ("x", "t", "r", "noise"))
    avg = r != t
    assert 0 < int(avg.sum()) < len(t)
    z, v = (1 - t[:, None]) * x + t[:, None] * noise, noise - x
    s = ALPHA * r + (1 - ALPHA) * t
    with torch.no_grad():
        u_s = before(z - (t - s)[:, None] * v, s, s - r, None)
    target = torch.where(avg[:, None], ALPHA * v + (1 - ALPHA) * u_s, v)
    err = ((before(z, t, t - r, None) - target) ** 2).sum(1)
    den = err.detach() + 0.01
    ref = torch.where(avg, ALPHA * err / den, err / den).mean()
    g_ref = grads(ref, before)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert rel(seen["grad"].to(DT), g_ref) < 1e-4
    err_old = torch.where(avg, ALPHA * err, err)           # alpha folded into err: cancelled
    old = (err_old / (err_old.detach() + 0.01)).mean()
    assert abs(loss - old.item()) / old.item() > 0.05
