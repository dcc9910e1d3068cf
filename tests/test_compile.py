"""train.compile: the compiled backbone computes what the eager one does, and a compiled run
trains, checkpoints under the eager parameter names, and resumes."""
from __future__ import annotations

import copy

import pytest
import torch

from mfrecipes.backbones.dit import DiT
from mfrecipes.errors import RecipeError
from mfrecipes.train import checkpoint as ckpt
from mfrecipes.train.compile import compile_backbone
from mfrecipes.train.loop import Trainer

from test_train import make, run


def test_compiled_dit_matches_eager_forward_and_tangent():
    torch.manual_seed(0)
    net = DiT((1, 8, 8), 10, depth=1, hidden_size=32, num_heads=2, patch_size=4)
    for p in net.parameters():  # leave the zero init, so the comparison sees every layer
        torch.nn.init.normal_(p, std=0.1)
    eager = copy.deepcopy(net)
    keys = list(net.state_dict())
    compile_backbone(net)
    assert list(net.state_dict()) == keys
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 1, 8, 8, generator=g)
    t, y = torch.rand(6, generator=g), torch.randint(0, 10, (6,), generator=g)
    h = t * torch.rand(6, generator=g)
    dz, ones = torch.randn(2, 1, 8, 8, generator=g), torch.ones(2)
    torch.testing.assert_close(net(z, t, h, y), eager(z, t, h, y), rtol=1e-4, atol=1e-5)
    u, du = net.forward_jvp(z, t, h, y, dz, ones, ones)
    u_ref, du_ref = eager.forward_jvp(z, t, h, y, dz, ones, ones)
    torch.testing.assert_close(u, u_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(du, du_ref, rtol=1e-4, atol=1e-5)
    u.square().mean().backward()   # gradients flow through the compiled primal
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_compiled_run_checkpoints_eager_names_and_resumes(tmp_path):
    rd = tmp_path / "run"
    half = ["train.compile=true", "train.total_images=640"]
    out = run(tmp_path, rd, half)
    assert out["images"] == 640 and out["nonfinite"] == 0
    weights = ckpt.load_weights(ckpt.latest_checkpoint(str(rd / "checkpoints")))
    assert not any("_orig_mod" in k for k in weights["net"])
    # an eager run resumes from the compiled run's checkpoint, and a compiled one from that
    recipe, data = make(tmp_path, ["train.total_images=960"])
    trainer = Trainer(recipe, data, str(rd))
    assert trainer.resume() and trainer.images == 640
    assert trainer.run()["images"] == 960
    recipe, data = make(tmp_path, ["train.compile=true"])
    trainer = Trainer(recipe, data, str(rd))
    assert trainer.resume() and trainer.images == 960
    assert trainer.run()["images"] == 1280


def test_bad_compile_mode_is_one_recipe_error(tmp_path):
    with pytest.raises(RecipeError) as err:
        make(tmp_path, ["train.compile_mode=fastest"])
    msg = str(err.value)
    assert "train.compile_mode" in msg and "reduce-overhead" in msg
