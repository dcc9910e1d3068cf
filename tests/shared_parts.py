"""Small pieces several test files share (imported as a module beside them, like data_fixtures)."""
from __future__ import annotations

import contextlib
import signal

import torch
from torch import nn


class Hang(Exception):
    """Raised by :func:`time_limit` when the guarded code is still running."""


@contextlib.contextmanager
def time_limit(seconds: float = 20):
    """Fail with ``Hang`` instead of hanging: a SIGALRM after ``seconds`` (main thread only)."""
    def on_alarm(*_):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class TimeNet(nn.Module):
    """net(z, t, h, y): nonlinear in z, t and h (with a t-h term), unconditional."""

    def __init__(self, dim: int = 3, hidden: int = 12):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Linear(3, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, z, t, h, y=None):
        a = torch.tanh(self.inp(z) + self.time(torch.stack([t, h, t * h], dim=1)))
        return self.out(a) * (1 + h[:, None])


# A toy2d MeanFlow run of 20 steps with two checkpoints (the trainer tests' usual recipe).
TOY_RECIPE = """
run: {name: toy, seed: 3}
data: {name: toy2d, params: {kind: eight_gaussians, num_points: 2000}}
backbone: {name: mlp, params: {hidden: 32, depth: 2}}
objective: {name: meanflow, params: {}}
timestep_sampler: {name: logit_normal, params: {fm_ratio: 0.5}}
loss_weighting: {name: adaptive, params: {}}
gap_schedule: {name: progressive, params: {mc_draws: 20000}}
train: {total_images: 1280, global_batch_size: 64, lr: 1.0e-3, ema_decays: [0.9, 0.99],
        log_every_images: 320, checkpoint_every_images: 640, progress_bar: false}
eval: {at_end: false}
"""


def install_plugin(package_dir: str, site: str) -> str:
    """``pip install`` an example plugin package into the private folder ``site``."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), package_dir], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(site)


def run_mfr(args, site: str, cwd: str, **env):
    """The CLI in a subprocess with ``site`` (an installed plugin) first on PYTHONPATH."""
    import os
    import subprocess
    import sys

    full = dict(os.environ, PYTHONPATH=site + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **env)
    return subprocess.run([sys.executable, "-m", "mfrecipes.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=full)


def tiny_mixture_recipe(name: str, seed: int, train: str, eval: str) -> str:
    """A MeanFlow recipe on the 8x8 mixture test-bed data (2 components a class) with the
    paper's B/4 guidance; ``train`` and ``eval`` are the inline YAML of those sections."""
    return f"""
run: {{name: {name}, seed: {seed}, device: cpu}}
data: {{name: mixture, params: {{resolution: 8, components_per_class: 2}}}}
backbone: {{name: dit_tiny_4, params: {{}}}}
objective: {{name: meanflow, params: {{omega: 1.0, kappa: 0.5, class_dropout: 0.1}}}}
timestep_sampler: {{name: logit_normal, params: {{mu: -0.4, sigma: 1.0, fm_ratio: 0.75}}}}
loss_weighting: {{name: adaptive, params: {{p: 1.0, c: 0.01}}}}
gap_schedule: {{name: constant, params: {{}}}}
train: {train}
eval: {eval}
"""
