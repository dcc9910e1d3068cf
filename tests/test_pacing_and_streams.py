"""Components that react to training, run through the real trainer: DTD's pacing watches a loss
that falls as the model learns; the random streams do not depend on the evaluation cadence."""
from __future__ import annotations

import json

import pytest
import torch

from mfrecipes import evaluate
from mfrecipes.recipe import load_recipe
from mfrecipes.train import checkpoint as ckpt
from mfrecipes.train.loop import Trainer

PATIENCE = 6

DIGITS_DTD = """
base: {base}
run: {{name: pacing, seed: 0}}
timestep_sampler: {{name: dtd, params: {{fm_ratio: 0.75, patience: {patience}, loss_ema: 0.9,
                   min_improvement: 0.01, curriculum_end: 1.0}}}}
gap_schedule: {{name: constant, params: {{}}}}
train: {{total_images: {images}, global_batch_size: 32, lr: {lr}, ema_decays: [0.9],
        log_every_images: 32, checkpoint_every_images: {images}, progress_bar: false}}
eval: {{at_end: false, every_images: null}}
"""


def _dtd_run(tmp_path, name, lr, steps):
    from pathlib import Path

    base = Path(__file__).resolve().parents[1] / "recipes" / "_base" / "digits.yaml"
    path = tmp_path / f"{name}.yaml"
    path.write_text(DIGITS_DTD.format(base=base, patience=PATIENCE, images=32 * steps, lr=lr))
    recipe, data = load_recipe(str(path))
    run_dir = tmp_path / name
    Trainer(recipe, data, str(run_dir)).run()
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]  # one log line per step


def test_dtd_paces_on_learning_not_on_time(tmp_path):
    """A model that learns keeps the first cluster while its unweighted v error falls; a frozen
    model (lr ~ 0) opens a cluster every `patience` + 1 steps. Fed the adaptive-weighted loss
    (w * err ~ 1, flat), the learning run would open clusters like the frozen one."""
    learn = _dtd_run(tmp_path, "learn", "1.0e-3", 36)
    frozen = _dtd_run(tmp_path, "frozen", "1.0e-12", 5 * (PATIENCE + 1))
    for recs in (learn, frozen):  # the pacing is visible at every log line
        assert all("sampler/stage" in r and "sampler/watched_loss" in r
                   and "sampler/watched_loss_ema" in r for r in recs)
    stage_l = [r["sampler/stage"] for r in learn]
    loss_l = [r["sampler/watched_loss"] for r in learn]
    # Learning: the watched loss falls a lot, and no cluster opens while it does.
    assert loss_l[-1] < 0.8 * loss_l[0], loss_l
    assert stage_l == [1] * len(stage_l), stage_l
    # Frozen: a plateau from the start; the k-th cluster opens after k (patience + 1) steps.
    stage_f = [r["sampler/stage"] for r in frozen]
    opened = [i + 1 for i in range(1, len(stage_f)) if stage_f[i] > stage_f[i - 1]]
    assert stage_f[-1] == 5, stage_f
    assert opened == [k * (PATIENCE + 1) for k in range(1, 5)], stage_f


TOY = """
run: {name: cadence, seed: 1}
data: {name: toy2d, params: {kind: eight_gaussians, num_points: 2000}}
backbone: {name: mlp, params: {hidden: 32, depth: 2}}
objective: {name: meanflow, params: {v_noise: 0.1, fm_anchor_weight: 0.1}}
timestep_sampler: {name: logit_normal, params: {fm_ratio: 0.5}}
loss_weighting: {name: adaptive, params: {}}
gap_schedule: {name: constant, params: {}}
train: {total_images: 1280, global_batch_size: 64, lr: 1.0e-3, ema_decays: [0.9],
        log_every_images: 320, checkpoint_every_images: 1280, progress_bar: false}
eval: {at_end: false, num_samples: 64, nfe: [1]}
"""


def test_final_weights_do_not_depend_on_the_evaluation_cadence(tmp_path, monkeypatch):
    """The objective's draws (v-noise, the anchor's delta) come from their own stream and
    evaluation runs in a forked RNG: a metric that reseeds and draws from the global RNG (as
    some metric models do when they are built) cannot change the trajectory."""
    real = evaluate.QUALITY_BY_MODALITY["points"]

    def meddling_metric(dataset, samples, **kw):
        torch.manual_seed(12345)
        torch.rand(1000)
        return real(dataset, samples, **kw)
    monkeypatch.setitem(evaluate.QUALITY_BY_MODALITY, "points", meddling_metric)
    path = tmp_path / "toy.yaml"
    path.write_text(TOY)
    weights = []
    for every in (128, 640, None):
        recipe, data = load_recipe(str(path), [f"eval.every_images={every or 'null'}"])
        run_dir = tmp_path / f"every{every}"
        Trainer(recipe, data, str(run_dir)).run()
        weights.append(ckpt.load_weights(ckpt.latest_checkpoint(str(run_dir / "checkpoints"))))
        if every:
            evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
            assert sum("eval/nfe1/swd" in r for r in evals) == 1280 // every - 1
    for other in weights[1:]:
        for group in ("net", "ema_0.9"):
            for k, v in weights[0][group].items():
                assert torch.equal(v, other[group][k]), (group, k)


def test_streams_are_independent_per_purpose():
    """Seeded from (run seed, purpose[, rank]): purposes and ranks differ, seeds reproduce."""
    from mfrecipes.train.streams import RandomStreams

    a, b, c = RandomStreams(0), RandomStreams(0), RandomStreams(0, rank=1)
    draws = {k: torch.rand(4, generator=getattr(a, k)) for k in ("timesteps", "noise", "objective")}
    assert not torch.equal(draws["timesteps"], draws["noise"])
    assert not torch.equal(draws["noise"], draws["objective"])
    assert torch.equal(torch.rand(4, generator=b.noise), draws["noise"])
    assert torch.equal(torch.rand(4, generator=c.noise), draws["noise"])        # shared by ranks
    assert not torch.equal(torch.rand(4, generator=c.objective), draws["objective"])  # per rank
