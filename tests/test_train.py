"""Single-process training: smoke run, run records, bitwise resume, non-finite losses."""
from __future__ import annotations

import json
import os

import pytest
import torch

from mfrecipes.errors import TrainingError
from mfrecipes.recipe import load_recipe
from mfrecipes.registry import OBJECTIVES
from mfrecipes.train import checkpoint as ckpt
from mfrecipes.train.loop import Trainer
from shared_parts import TOY_RECIPE

TOY = TOY_RECIPE


def make(tmp_path, overrides=(), name="r.yaml"):
    path = tmp_path / name
    path.write_text(TOY)
    return load_recipe(str(path), overrides)


def run(tmp_path, run_dir, overrides=()):
    recipe, data = make(tmp_path, overrides)
    return Trainer(recipe, data, str(run_dir)).run()


def test_smoke_run_writes_records(tmp_path):
    out = run(tmp_path, tmp_path / "run", ["eval.at_end=true", "eval.num_samples=256"])
    rd = tmp_path / "run"
    assert out["images"] == 1280 and out["step"] == 20
    for f in ("recipe.resolved.yaml", "plugins.json", "env.json", "metrics.jsonl"):
        assert (rd / f).is_file(), f
    recs = [json.loads(l) for l in (rd / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 4 and all(l == l for l in losses)
    assert any("eval/nfe1/swd" in r for r in recs) and "eval/nfe1/swd" in out
    assert list((rd / "samples").glob("nfe1-*.png")) and list((rd / "samples").glob("nfe2-*.png"))
    latest = ckpt.latest_checkpoint(str(rd / "checkpoints"))
    groups = ckpt.load_weights(latest)
    assert set(groups) == {"net", "ema_0.9", "ema_0.99"}
    env = json.loads((rd / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__


class Interrupt(Exception):
    pass


def test_resume_is_bitwise_equal(tmp_path, monkeypatch):
    run(tmp_path, tmp_path / "full")

    # Interrupt the second run right after its first checkpoint (640 images), then resume.
    real_save = Trainer.save

    def save_then_die(self):
        folder = real_save(self)
        raise Interrupt
    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Interrupt):
        run(tmp_path, tmp_path / "cut")
    monkeypatch.setattr(Trainer, "save", real_save)
    assert ckpt.latest_checkpoint(str(tmp_path / "cut" / "checkpoints")).endswith("000000000640")
    out = run(tmp_path, tmp_path / "cut")
    assert out["images"] == 1280

    a = ckpt.load_weights(ckpt.latest_checkpoint(str(tmp_path / "full" / "checkpoints")))
    b = ckpt.load_weights(ckpt.latest_checkpoint(str(tmp_path / "cut" / "checkpoints")))
    assert set(a) == set(b)
    for group in a:
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}.{k} differs after resume"
    la = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    pick = lambda recs: [(r["images"], r["loss"]) for r in recs if "loss" in r]
    assert pick(la) == pick(lb)


@pytest.fixture
def nan_objective():
    """flow_matching whose error is NaN for steps in a chosen set."""
    from mfrecipes.objectives.flow_matching import FlowMatching

    state = {"bad_steps": set(), "calls": 0}

    @OBJECTIVES.register("nan_on_steps")
    class NanOnSteps(FlowMatching):
        def __call__(self, net, x, y, t, r, noise, *, progress, ema_net=None):
            out = super().__call__(net, x, y, t, r, noise, progress=progress, ema_net=ema_net)
            if state["calls"] in state["bad_steps"]:
                out.err = out.err * float("nan")
            state["calls"] += 1
            return out
    yield state
    OBJECTIVES.unregister("nan_on_steps")


def test_one_nan_is_skipped_not_stepped(tmp_path, nan_objective):
    nan_objective["bad_steps"] = {3}
    recipe, data = make(tmp_path, ["objective.name=nan_on_steps", "train.max_nonfinite=2"])
    trainer = Trainer(recipe, data, str(tmp_path / "run"))
    seen = []
    real_step = trainer.engine.step
    trainer.engine.step = lambda: (seen.append(trainer.step), real_step())
    out = trainer.run()
    assert out["nonfinite"] == 1 and out["images"] == 1280
    assert 3 not in seen and len(seen) == 19  # the NaN step took no optimiser step
    groups = ckpt.load_weights(ckpt.latest_checkpoint(str(tmp_path / "run" / "checkpoints")))
    assert all(torch.isfinite(v).all() for g in groups.values() for v in g.values())


def test_repeated_nans_stop_the_run_and_keep_checkpoints(tmp_path, nan_objective):
    nan_objective["bad_steps"] = set(range(12, 100))
    recipe, data = make(tmp_path, ["objective.name=nan_on_steps", "train.max_nonfinite=3"])
    with pytest.raises(TrainingError, match="non-finite"):
        Trainer(recipe, data, str(tmp_path / "run")).run()
    latest = ckpt.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert latest.endswith("000000000640")  # the good checkpoint survives
    groups = ckpt.load_weights(latest)
    assert all(torch.isfinite(v).all() for g in groups.values() for v in g.values())


def test_checkpoint_writes_are_atomic(tmp_path):
    root = str(tmp_path / "ck")
    w = {"net": {"a": torch.ones(3)}}
    ckpt.save_checkpoint(root, images=10, step=1, weights=w, train_state={"x": 1}, meta={})
    # A crash mid-write leaves a hidden temporary that is never taken for a checkpoint.
    os.makedirs(os.path.join(root, ".tmp-img-000000000020-999999"))
    os.makedirs(os.path.join(root, "img-000000000030"))  # no meta.json: incomplete
    assert ckpt.latest_checkpoint(root).endswith("img-000000000010")
    ckpt.save_checkpoint(root, images=40, step=4, weights=w, train_state={"x": 4}, meta={},
                         keep=1)
    assert ckpt.latest_checkpoint(root).endswith("img-000000000040")
    assert not os.path.exists(os.path.join(root, ".tmp-img-000000000020-999999"))
    assert not os.path.exists(os.path.join(root, "img-000000000010"))


def test_cli_run_resumes_run_directory_and_refuses_other_recipe(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    path = tmp_path / "r.yaml"
    path.write_text(TOY.replace("total_images: 1280", "total_images: 256"))
    out = tmp_path / "run"
    env = dict(os.environ, MFR_CACHE_DIR=str(tmp_path / "cache"))
    cli = [sys.executable, "-m", "mfrecipes.cli"]
    first = subprocess.run(cli + ["run", str(path), "--out", str(out)], capture_output=True,
                           text=True, cwd=REPO, env=env)
    assert first.returncode == 0, first.stderr
    # Resume the finished run with a larger budget, through the run directory itself.
    again = subprocess.run(cli + ["run", str(out), "train.total_images=512"], capture_output=True,
                           text=True, cwd=REPO, env=env)
    assert again.returncode == 0, again.stderr
    assert "resumed from 256 images" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["images"] == 512
    other = subprocess.run(cli + ["run", str(path), "train.lr=0.5", "--out", str(out)],
                           capture_output=True, text=True, cwd=REPO, env=env)
    assert other.returncode == 2 and "holds a different recipe" in other.stderr
    assert ckpt.latest_checkpoint(str(out / "checkpoints")).endswith("000000000512")
