"""SIGKILL a 2-rank DeepSpeed run at random moments, resume each time: nothing is lost.

After every kill each complete checkpoint folder loads (plain weights, train state, every rank's
DeepSpeed partition), and the final weights, EMAs included, equal an uninterrupted 2-rank run's
bit for bit: on the CPU, the same world size replays the same gloo reductions, and a resume
restores DeepSpeed's fp32 partitions and AdamW moments, the shared (t, r, noise) generator, each
rank's RNG and data position, and the sampler state.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch

from ds_launch import RECIPE, final_weights, kill, run, spawn, wait
from mfrecipes.run import layout
from mfrecipes.train import checkpoint as ckpt

STEPS = 40                     # 32 images a step
OVERRIDES = [f"train.total_images={32 * STEPS}", "train.checkpoint_every_images=96",
             "train.keep_checkpoints=3", "timestep_sampler.name=dtd",
             "timestep_sampler.params={patience: 3}"]


def images_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    best = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                best = max(best, int(json.loads(line).get("images", 0)))
            except (ValueError, AttributeError):
                pass  # a line being written
    return best


def check_checkpoints(run_dir: Path) -> list[str]:
    """Every visible checkpoint folder is complete and loads; returns their names."""
    root = run_dir / "checkpoints"
    names = sorted(n for n in os.listdir(root) if n.startswith("img-")) if root.is_dir() else []
    for name in names:
        folder = str(root / name)
        meta = layout.load_meta(folder)
        assert meta["complete"] and meta["world_size"] == 2
        groups = ckpt.load_weights(folder)
        assert set(groups) == {"net", "ema_0.9"}
        assert all(torch.isfinite(v).all() for g in groups.values() for v in g.values())
        state = ckpt.load_train_state(folder)
        assert len(state["ranks"]) == 2 and state["engine"]["world_size"] == 2
        native = Path(folder) / "deepspeed" / "state"
        for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                  "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
            torch.load(native / f, map_location="cpu", weights_only=False)
    latest = ckpt.latest_checkpoint(str(root)) if root.is_dir() else None
    assert latest is None or os.path.basename(latest) in names
    return names


def kill_and_resume(tmp_path: Path, kills: int) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run([str(tmp_path / "r.yaml"), *OVERRIDES, "--out", str(ref)], 2, tmp_path / "ref.log")

    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    args = [str(tmp_path / "r.yaml"), *OVERRIDES, "--out", str(cut)]
    log = tmp_path / "cut.log"
    killed = 0
    for k in range(kills):
        # A random moment in the k-th slice of the run: a step count, then a delay of up to
        # a few steps, so kills land in steps, checkpoint writes and start-up alike.
        target = 32 * rng.randint(STEPS * k // kills + 1, STEPS * (k + 1) // kills - 1)
        delay = rng.uniform(0.0, 0.4)
        procs = spawn(args, 2, log)
        args = [str(cut)]  # later runs resume the run directory
        deadline = time.time() + 240
        while images_logged(cut) < target and all(p.poll() is None for p in procs):
            assert time.time() < deadline, f"no progress; log:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
        time.sleep(delay)
        if all(p.poll() is None for p in procs):
            killed += 1
        kill(procs)
        names = check_checkpoints(cut)
        print(f"kill {k + 1} (seed {seed}): target {target} images + {delay:.2f} s, "
              f"logged {images_logged(cut)}, checkpoints {names}")
    wait(spawn([str(cut)], 2, log), log)
    check_checkpoints(cut)
    assert killed >= 1, f"every run finished before its kill (seed {seed})"

    a, b = final_weights(ref), final_weights(cut)
    for group in a:
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), \
                f"{group}.{key} differs after {killed} kills (seed {seed})"


def test_sigkill_twice_then_resume_bitwise(tmp_path):
    kill_and_resume(tmp_path, kills=2)


@pytest.mark.slow
def test_sigkill_six_times_then_resume_bitwise(tmp_path):
    kill_and_resume(tmp_path, kills=6)
