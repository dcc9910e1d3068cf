"""Multi-stage recipes and init_from: stage switching, stage-local progress, resume, errors."""
from __future__ import annotations

import json

import pytest
import torch

from mfrecipes.errors import CheckpointError, RecipeError
from mfrecipes.recipe import load_recipe
from mfrecipes.build import check_recipe, stage_plan
from mfrecipes.train import checkpoint as ckpt
from mfrecipes.train.loop import Trainer

STAGED = """
run: {name: staged, seed: 5}
data: {name: toy2d, params: {kind: two_moons, num_points: 2000}}
backbone: {name: mlp, params: {hidden: 32, depth: 2}}
timestep_sampler: {name: logit_normal, params: {fm_ratio: 0.5}}
train: {total_images: 1280, global_batch_size: 64, lr: 1.0e-3, ema_decays: [0.9],
        log_every_images: 64, checkpoint_every_images: 384, progress_bar: false}
eval: {at_end: false}
stages:
  - {name: v_pretrain, images: 640, overrides: {timestep_sampler.params.fm_ratio: 1.0,
                                                train.lr: 2.0e-3}}
  - {name: u_finetune, images: 640, overrides: {}}
"""


def load(tmp_path, text=STAGED, overrides=()):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(str(path), overrides)


def records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stage_plan_and_switch(tmp_path):
    recipe, data = load(tmp_path)
    plan = stage_plan(recipe)
    assert [(s.name, s.start, s.end) for s in plan] == [("v_pretrain", 0, 640),
                                                        ("u_finetune", 640, 1280)]
    assert plan[0].recipe.timestep_sampler.params["fm_ratio"] == 1.0
    assert plan[0].recipe.train.lr == 2e-3 and plan[1].recipe.train.lr == 1e-3
    trainer = Trainer(recipe, data, str(tmp_path / "run"))
    lrs = []
    real_step = trainer.engine.step
    trainer.engine.step = lambda: (lrs.append(trainer.engine.optimizer.param_groups[0]["lr"]),
                                   real_step())
    trainer.run()
    assert lrs == [2e-3] * 10 + [1e-3] * 10
    recs = [r for r in records(tmp_path / "run") if "obj/avg_share" in r]
    # Stage 1 samples only r = t (pure v-learning); stage 2 about half r != t.
    assert all(r["obj/avg_share"] == 0.0 for r in recs if r["images"] <= 640)
    assert all(r["obj/avg_share"] > 0.1 for r in recs if r["images"] > 640)
    assert any(r.get("stage") == "u_finetune" for r in records(tmp_path / "run"))


def test_staged_resume_is_bitwise(tmp_path, monkeypatch):
    recipe, data = load(tmp_path)
    Trainer(recipe, data, str(tmp_path / "full")).run()
    real_save = Trainer.save
    calls = {"n": 0}

    def save_and_stop(self):
        out = real_save(self)
        calls["n"] += 1
        if calls["n"] == 2:  # 768 images: inside the second stage
            raise KeyboardInterrupt
        return out
    monkeypatch.setattr(Trainer, "save", save_and_stop)
    with pytest.raises(KeyboardInterrupt):
        Trainer(recipe, data, str(tmp_path / "cut")).run()
    monkeypatch.setattr(Trainer, "save", real_save)
    Trainer(recipe, data, str(tmp_path / "cut")).run()
    a = ckpt.load_weights(ckpt.latest_checkpoint(str(tmp_path / "full" / "checkpoints")))
    b = ckpt.load_weights(ckpt.latest_checkpoint(str(tmp_path / "cut" / "checkpoints")))
    for g in a:
        for k in a[g]:
            assert torch.equal(a[g][k], b[g][k]), (g, k)


def test_stage_errors(tmp_path):
    bad_sum = STAGED.replace("images: 640, overrides: {}", "images: 100, overrides: {}")
    recipe, _ = load(tmp_path, bad_sum)
    with pytest.raises(RecipeError, match="add up to 740") as info:
        check_recipe(recipe)
    assert info.value.path == "stages"
    fixed = STAGED.replace("overrides: {}", "overrides: {backbone.params.hidden: 8}")
    recipe, _ = load(tmp_path, fixed)
    with pytest.raises(RecipeError, match="cannot override 'backbone.params.hidden'"):
        check_recipe(recipe)
    wrong = STAGED.replace("overrides: {}", "overrides: {timestep_sampler.params.fm_ratio: 7}")
    recipe, _ = load(tmp_path, wrong)
    with pytest.raises(RecipeError, match="fm_ratio") as info:
        check_recipe(recipe)
    assert "stages[1]" in info.value.path


SINGLE = STAGED.split("stages:")[0]


def test_init_from_loads_ema_weights(tmp_path):
    recipe, data = load(tmp_path, SINGLE)
    Trainer(recipe, data, str(tmp_path / "src")).run()
    src = ckpt.load_weights(ckpt.latest_checkpoint(str(tmp_path / "src" / "checkpoints")))
    text = SINGLE + f"init_from: {{path: {tmp_path / 'src'}, weights: ema}}\n"
    recipe, data = load(tmp_path, text)
    check_recipe(recipe)
    trainer = Trainer(recipe, data, str(tmp_path / "dst"))
    trainer.init_weights()
    for k, v in trainer.net.state_dict().items():
        assert torch.equal(v, src["ema_0.9"][k])
        assert torch.equal(trainer.ema.module().state_dict()[k], src["ema_0.9"][k])
    trainer = Trainer(*load(tmp_path, text.replace("weights: ema", "weights: raw")),
                      str(tmp_path / "dst2"))
    trainer.init_weights()
    assert all(torch.equal(v, src["net"][k]) for k, v in trainer.net.state_dict().items())


def test_init_from_errors(tmp_path):
    recipe, _ = load(tmp_path, SINGLE + f"init_from: {{path: {tmp_path / 'nowhere'}}}\n")
    with pytest.warns(UserWarning, match="no weights at"):
        check_recipe(recipe)
    with pytest.raises(CheckpointError, match="no weights at") as info:
        check_recipe(recipe, for_run=True)
    assert info.value.path == "init_from.path"
    recipe, data = load(tmp_path, SINGLE)
    Trainer(recipe, data, str(tmp_path / "src")).run()
    other = SINGLE.replace("hidden: 32", "hidden: 16") + \
        f"init_from: {{path: {tmp_path / 'src'}}}\n"
    recipe, data = load(tmp_path, other)
    with pytest.raises(CheckpointError, match="do not fit"):
        Trainer(recipe, data, str(tmp_path / "dst")).run()
