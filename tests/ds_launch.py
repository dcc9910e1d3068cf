"""Launching ``mfr run`` on several CPU processes (gloo) for the DeepSpeed tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ROWS = str(REPO / "tests" / "ds_rows_data.py")

# Few points, an MLP, 32 samples a step in micro batches of 8: 2 accumulation steps on 2 ranks,
# 4 on one. grad_clip is low enough to clip, so clipping is compared too.
RECIPE = f"""
run: {{name: ds, seed: 3, device: cpu}}
imports: [{ROWS}]
data: {{name: ds_rows, params: {{num_points: 256}}}}
backbone: {{name: mlp, params: {{hidden: 32, depth: 2}}}}
objective: {{name: meanflow, params: {{}}}}
timestep_sampler: {{name: logit_normal, params: {{fm_ratio: 0.5}}}}
loss_weighting: {{name: adaptive, params: {{}}}}
gap_schedule: {{name: constant, params: {{}}}}
train: {{total_images: 320, global_batch_size: 32, micro_batch_size: 8, lr: 1.0e-2,
        grad_clip: 1.0, ema_decays: [0.9], log_every_images: 32,
        checkpoint_every_images: 160, progress_bar: false}}
engine: deepspeed
deepspeed: {{zero_stage: 2}}
eval: {{at_end: false}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def spawn(args: list[str], nproc: int, log: Path, *, torchrun: bool = False) -> list:
    """Start ``mfr run ARGS`` on ``nproc`` ranks in one new process group (killable at once).

    ``torchrun`` launches through ``torch.distributed.run``; otherwise the ranks are started
    directly with the environment torchrun would give them (faster: one interpreter fewer).
    """
    port = str(free_port())
    out = open(log, "ab")
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", port, "-m", "mfrecipes.cli",
               "run", *args]
        return [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)]
    procs: list = []
    try:
        for rank in range(nproc):
            env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            # Rank 0 leads a new process group; the others join it, so one killpg stops all.
            procs.append(subprocess.Popen([sys.executable, "-m", "mfrecipes.cli", "run", *args],
                                          cwd=REPO, env=env, stdout=out,
                                          stderr=subprocess.STDOUT,
                                          process_group=procs[0].pid if procs else 0))
    except BaseException:
        if procs:
            kill(procs)
        raise
    return procs


def wait(procs: list, log: Path, timeout: float = 240) -> None:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        kill(procs)
        raise AssertionError(f"run timed out; log:\n{log.read_text()[-4000:]}")
    assert codes == [0] * len(procs), f"exit codes {codes}; log:\n{log.read_text()[-4000:]}"


def kill(procs: list) -> None:
    """SIGKILL every rank at once (the whole process group)."""
    try:
        os.killpg(procs[0].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in procs:
        p.wait()


def run(args: list[str], nproc: int, log: Path, **kw) -> None:
    wait(spawn(args, nproc, log, **kw), log)


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from mfrecipes.train import checkpoint as ckpt

    return ckpt.load_weights(ckpt.latest_checkpoint(str(run_dir / "checkpoints")))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[g][k] - b[g][k]).abs().max()) for g in a for k in a[g])
