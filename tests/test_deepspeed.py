"""DeepSpeed ZeRO 1/2 on 2 CPU processes (gloo): same parameters as one process, batch plan,
resumption across world sizes and engines.

The 2-rank runs read a fixture dataset (``ds_rows_data.py``) whose rank k reads rows k::2 of the
one-process stream, and the loop draws (t, r, noise) for the global batch and slices rows k::2,
so both runs see the same samples with the same draws. The reference is the plain-torch
single-process engine. Tolerance 1e-5 (absolute, on weights of size ~0.1-1): the runs differ
only in the order of fp32 sums (per-rank means, then the all-reduce average over ranks),
about 1e-7 per step; 10 AdamW steps at lr 1e-2 with clipping move the weights by more than 1e-2.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ds_launch import REPO, ROWS, RECIPE, final_weights, max_diff, run
from mfrecipes.errors import RecipeError
from mfrecipes.registry import DATASETS
from mfrecipes.recipe import load_recipe
from mfrecipes.run import layout
from mfrecipes.train import checkpoint as ckpt
from mfrecipes.train.loop import Trainer

TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process reference, and a 2-rank ZeRO-2 run launched through torchrun."""
    root = tmp_path_factory.mktemp("ds")
    (root / "r.yaml").write_text(RECIPE)
    recipe, data = load_recipe(str(root / "r.yaml"), ["engine=single"])
    Trainer(recipe, data, str(root / "single")).run()
    run([str(root / "r.yaml"), "--out", str(root / "zero2")], 2, root / "zero2.log",
        torchrun=True)
    yield root
    # The fixture dataset was imported here for the in-process runs: leave no trace for others.
    DATASETS.unregister("ds_rows")
    sys.modules.pop("mfr_local_ds_rows_data", None)


def test_single_reference_moves(runs):
    """The comparison below is not vacuous: the weights change by far more than TOL."""
    first = ckpt.load_weights(str(runs / "single" / "checkpoints" / ckpt.checkpoint_name(160)))
    assert max_diff(first, final_weights(runs / "single")) > 1e-2


@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_match_one_process(runs, stage):
    if stage == 2:
        out = runs / "zero2"  # launched through torchrun
    else:
        out = runs / f"zero{stage}"
        run([str(runs / "r.yaml"), f"deepspeed.zero_stage={stage}", "--out", str(out)], 2,
            runs / f"zero{stage}.log")
    d = max_diff(final_weights(runs / "single"), final_weights(out))
    print(f"ZeRO-{stage}, 2 ranks vs 1 process after 10 steps: max |diff| {d:.3g}")
    assert d < TOL, f"ZeRO-{stage}, 2 ranks vs 1 process: max |diff| {d:.3g}"
    folder = Path(ckpt.latest_checkpoint(str(out / "checkpoints")))
    native = sorted(p.name for p in (folder / "deepspeed" / "state").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in native
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in native
    state = ckpt.load_train_state(str(folder))
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert [r["data_position"] for r in state["ranks"]] == [160, 160]


def _cut_to_first_checkpoint(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / ckpt.checkpoint_name(320))
    (dst / "checkpoints" / "latest").write_text(ckpt.checkpoint_name(160) + "\n")


def test_resume_on_one_rank_from_two(runs, tmp_path):
    """World size 2 -> 1: the AdamW moments come from the consolidated copy."""
    cut = tmp_path / "cut"
    _cut_to_first_checkpoint(runs / "zero2", cut)
    log = tmp_path / "resume.log"
    run([str(cut)], 1, log)  # `mfr run RUN_DIR` with engine deepspeed: a group of one
    text = " ".join(log.read_text().split())  # rich wraps long lines
    assert "consolidated optimiser state (world size 2, ZeRO 2)" in text
    d = max_diff(final_weights(runs / "zero2"), final_weights(cut))
    print(f"resumed on 1 rank vs uninterrupted on 2: max |diff| {d:.3g}")
    assert d < TOL, f"resumed on 1 rank vs uninterrupted on 2: max |diff| {d:.3g}"


def test_resume_deepspeed_checkpoint_with_single_engine(runs, tmp_path):
    cut = tmp_path / "cut"
    _cut_to_first_checkpoint(runs / "zero2", cut)
    recipe, data = load_recipe(str(cut / "recipe.resolved.yaml"), ["engine=single"])
    Trainer(recipe, data, str(cut)).run()
    d = max_diff(final_weights(runs / "zero2"), final_weights(cut))
    print(f"single engine resumed from ZeRO-2: max |diff| {d:.3g}")
    assert d < TOL, f"single engine resumed from ZeRO-2: max |diff| {d:.3g}"

    # Without the optimiser state the same resume lands measurably elsewhere.
    lost = tmp_path / "lost"
    _cut_to_first_checkpoint(runs / "zero2", lost)
    folder = lost / "checkpoints" / ckpt.checkpoint_name(160)
    state = ckpt.load_train_state(str(folder))
    state["engine"] = {}
    torch.save(state, folder / "train_state.pt")
    meta = layout.load_meta(str(folder))  # a valid checkpoint, only without optimiser state
    meta["files"]["train_state.pt"] = ckpt.file_digest(str(folder / "train_state.pt"))
    (folder / "meta.json").write_text(json.dumps(meta))
    recipe, data = load_recipe(str(lost / "recipe.resolved.yaml"), ["engine=single"])
    Trainer(recipe, data, str(lost)).run()
    d = max_diff(final_weights(runs / "zero2"), final_weights(lost))
    print(f"same resume without the optimiser state: max |diff| {d:.3g}")
    assert d > 100 * TOL


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_all(runs, tmp_path):
    """A NaN loss on rank 1 alone (the step from 64 images): every rank skips that update
    (the loss is averaged across ranks; DeepSpeed checks the reduced gradient) and goes on."""
    nan_module = str(REPO / "tests" / "ds_nan_objective.py")
    out = tmp_path / "nan"
    log = tmp_path / "nan.log"
    run([str(runs / "r.yaml"), f"imports=[{ROWS},{nan_module}]", "objective.name=ds_nan_rank1",
         "--out", str(out)], 2, log)
    text = " ".join(log.read_text().split())
    assert "non-finite loss/gradient at 64 images (1/10 allowed); update skipped" in text
    assert '"nonfinite": 1' in text
    groups = final_weights(out)
    assert all(torch.isfinite(v).all() for g in groups.values() for v in g.values())
    assert max_diff(final_weights(runs / "zero2"), groups) > 100 * TOL  # one update fewer


def _recipe(tmp_path, overrides=()):
    (tmp_path / "r.yaml").write_text(RECIPE)
    return load_recipe(str(tmp_path / "r.yaml"), list(overrides))[0]


def test_batch_plan_and_config(tmp_path):
    from mfrecipes.train.deepspeed_engine import batch_plan, deepspeed_config

    recipe = _recipe(tmp_path, ["deepspeed.config={zero_optimization: {overlap_comm: true}}"])
    cfg = deepspeed_config(recipe, 2)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
            cfg["gradient_accumulation_steps"]) == (32, 8, 2)
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert cfg["gradient_clipping"] == 1.0
    assert batch_plan(_recipe(tmp_path, ["train.micro_batch_size=null"]).train, 4) == (8, 1)
    with pytest.raises(RecipeError, match="multiple of 24"):
        batch_plan(recipe.train, 3)
    with pytest.raises(RecipeError, match="divisible by the world size 3"):
        batch_plan(_recipe(tmp_path, ["train.micro_batch_size=null"]).train, 3)


@pytest.mark.parametrize("override, match", [
    ("deepspeed.config={optimizer: {type: Adam}}", "train.lr"),
    ("deepspeed.config={gradient_clipping: 1.0}", "train.grad_clip"),
    ("deepspeed.config={zero_optimization: {stage: 1}}", "deepspeed.zero_stage"),
    ("deepspeed.config={fp16: {enabled: true}}", "fp16 is not supported"),
])
def test_config_refuses_second_sources(tmp_path, override, match):
    from mfrecipes.train.deepspeed_engine import deepspeed_config

    with pytest.raises(RecipeError, match=match):
        deepspeed_config(_recipe(tmp_path, [override]), 2)


def test_native_bf16_refuses_float32_jvp(tmp_path):
    from mfrecipes.train.deepspeed_engine import deepspeed_config

    recipe = _recipe(tmp_path, ["deepspeed.config={bf16: {enabled: true}}",
                                "objective.params.jvp_dtype=float32"])
    with pytest.raises(RecipeError, match="fp32 module weights") as err:
        deepspeed_config(recipe, 2)
    assert err.value.path == "deepspeed.config.bf16"
