"""train.lr_schedule: the factor against explicit values, recipe errors, and through the real
trainer the optimiser's rate, the logged rate and the rate after a resume."""
from __future__ import annotations

import json
import math

import pytest

from mfrecipes.errors import RecipeError
from mfrecipes.recipe import load_recipe
from mfrecipes.recipe.schema import LrScheduleCfg
from mfrecipes.train.loop import Trainer

TOY = """
run: {name: toy, seed: 3}
data: {name: toy2d, params: {kind: eight_gaussians, num_points: 2000}}
backbone: {name: mlp, params: {hidden: 16, depth: 2}}
objective: {name: meanflow, params: {}}
train: {total_images: 1280, global_batch_size: 64, lr: 1.0e-3, ema_decays: [0.9],
        log_every_images: 64, checkpoint_every_images: 640, progress_bar: false,
        lr_schedule: {kind: cosine, warmup_images: 320, final_ratio: 0.1}}
eval: {at_end: false}
"""


def test_constant_is_the_default_and_warms_up_linearly():
    assert LrScheduleCfg().factor(64, 1000) == 1.0
    warm = LrScheduleCfg(warmup_images=256)
    assert [warm.factor(i, 1000) for i in (64, 128, 256, 512, 1000)] == [0.25, 0.5, 1, 1, 1]


def test_cosine_values():
    cos = LrScheduleCfg(kind="cosine", warmup_images=200, final_ratio=0.2)
    assert cos.factor(100, 1200) == 0.5                      # in the warm-up
    assert cos.factor(200, 1200) == pytest.approx(1.0)       # the peak
    assert cos.factor(700, 1200) == pytest.approx(0.6)       # half way: (1 + 0.2) / 2
    assert cos.factor(450, 1200) == pytest.approx(0.2 + 0.8 * (1 + math.sqrt(0.5)) / 2)
    assert cos.factor(1200, 1200) == pytest.approx(0.2)      # the end
    assert LrScheduleCfg(kind="cosine").factor(0, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("override, path", [
    ("train.lr_schedule.kind=linear", "train.lr_schedule.kind"),
    ("train.lr_schedule.warmup_images=-5", "train.lr_schedule.warmup_images"),
    ("train.lr_schedule.final_ratio=2", "train.lr_schedule.final_ratio"),
    ("train.lr_schedule.warmup=5", "train.lr_schedule.warmup"),
])
def test_bad_schedules_are_recipe_errors(tmp_path, override, path):
    (tmp_path / "r.yaml").write_text(TOY)
    with pytest.raises(RecipeError) as err:
        load_recipe(str(tmp_path / "r.yaml"), [override])
    assert err.value.path == path


def _rates(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["images"]: r["lr"] for r in recs if "lr" in r}


class Interrupt(Exception):
    pass


def test_trainer_steps_logs_and_resumes_the_schedule(tmp_path, monkeypatch):
    (tmp_path / "r.yaml").write_text(TOY)
    recipe, data = load_recipe(str(tmp_path / "r.yaml"))
    seen = []
    real_step = Trainer._train_step

    def spy(self, *a, **k):  # the rate the optimiser actually steps with
        seen.append(self.engine.optimizer.param_groups[0]["lr"])
        return real_step(self, *a, **k)
    monkeypatch.setattr(Trainer, "_train_step", spy)
    Trainer(recipe, data, str(tmp_path / "full")).run()
    expected = [1e-3 * recipe.train.lr_schedule.factor(64 * (i + 1), 1280) for i in range(20)]
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(1e-3 * 0.2) and seen[-1] == pytest.approx(1e-4)
    logged = _rates(tmp_path / "full")
    assert [logged[i] for i in sorted(logged)] == pytest.approx(expected)

    # interrupted after its first checkpoint and resumed: the same rates from there on
    real_save = Trainer.save

    def save_then_die(self):
        real_save(self)
        raise Interrupt
    monkeypatch.setattr(Trainer, "save", save_then_die)
    seen.clear()
    with pytest.raises(Interrupt):
        Trainer(recipe, data, str(tmp_path / "cut")).run()
    monkeypatch.setattr(Trainer, "save", real_save)
    seen.clear()
    recipe, data = load_recipe(str(tmp_path / "r.yaml"))
    Trainer(recipe, data, str(tmp_path / "cut")).run()
    assert seen == pytest.approx(expected[10:])
