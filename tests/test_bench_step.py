"""tools/bench_step.py: its JSON contract, its port-style baseline against a finite-difference
reference, its peak-memory measurement, and its user errors. Timings are not asserted (noise)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from conftest import REPO, load_tool

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

TOY = os.path.join(REPO, "recipes", "toy2d_meanflow.yaml")
QUICK = os.path.join(REPO, "recipes", "quickstart.yaml")
F64 = torch.float64


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_step")


def _run_json(bench, capsys, *argv):
    assert bench.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_json_has_ratios_and_raw_medians(bench, capsys):
    res = _run_json(bench, capsys, TOY, "--batch", "32", "--repeats", "2", "--warmup", "1",
                    "--threads", "1", "--no-memory")
    assert set(res["variants"]) == set(bench.VARIANTS)
    assert res["batch"] == 32 and res["backbone"] == "mlp" and res["fm_ratio"] == 0.75
    for v in res["variants"].values():
        assert v["time_s"] > 0 and v["cpu_time_s"] >= 0 and 0 <= v["avg_share"] <= 1
    best = res["best_variant"]
    assert best.startswith("meanflow")
    mf_times = {k: v["time_s"] for k, v in res["variants"].items() if k.startswith("meanflow")}
    assert res["best_time_s"] == min(mf_times.values()) == mf_times[best]
    assert res["time_ratio"] == pytest.approx(res["best_time_s"] / res["fm_time_s"])
    assert res["memory_ratio"] is None  # not measured


def test_overrides_and_flags_reach_the_step(bench, capsys):
    res = _run_json(bench, capsys, QUICK, "objective.params.class_dropout=0.0",
                    "--backbone", "dit_tiny_4", "--input-shape", "1,8,8", "--num-classes", "none",
                    "--fm-ratio", "0.0", "--batch", "4", "--repeats", "1", "--warmup", "0",
                    "--variants", "flow_matching,meanflow_manual", "--no-memory")
    assert res["backbone"] == "dit_tiny_4" and res["num_classes"] is None
    assert res["fm_ratio"] == 0.0 and res["meanflow_params"] == {"class_dropout": 0.0}
    assert res["variants"]["meanflow_manual"]["avg_share"] == 1.0  # fm_ratio 0: every r != t
    assert set(res["variants"]) == {"flow_matching", "meanflow_manual"}


def test_avg_share_fixes_the_count_of_r_ne_t_rows(bench, capsys):
    res = _run_json(bench, capsys, TOY, "--avg-share", "0.25", "--batch", "12", "--repeats", "3",
                    "--warmup", "0", "--variants", "flow_matching,meanflow_manual", "--no-memory")
    for v in res["variants"].values():
        assert v["avg_share"] == 3 / 12  # exactly 3 of 12 rows in every repeat


def test_peak_memory_follows_the_batch(bench, capsys):
    """The CPU measure (peak resident set of a fresh process) grows with the activations:
    8x the batch must show well over 4x the step memory."""
    common = ["--repeats", "1", "--warmup", "0", "--threads", "1"]
    small = _run_json(bench, capsys, QUICK, "--batch", "16", *common,
                      "--variants", "flow_matching,meanflow_manual")
    large = _run_json(bench, capsys, QUICK, "--batch", "128", *common,
                      "--variants", "flow_matching")
    for res in (small, large):
        for v in res["variants"].values():
            assert "memory_error" not in v and v["step_bytes"] > 0
    assert small["memory_ratio"] == pytest.approx(
        small["variants"]["meanflow_manual"]["step_bytes"]
        / small["variants"]["flow_matching"]["step_bytes"])
    assert (large["variants"]["flow_matching"]["step_bytes"]
            > 4 * small["variants"]["flow_matching"]["step_bytes"])


class TinyNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.inp = nn.Linear(2, 16)
        self.time = nn.Linear(3, 16)
        self.emb = nn.Embedding(num_classes + 1, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, z, t, h, y=None):
        a = self.inp(z) + self.time(torch.stack([t, h, t * h], 1)) + self.emb(y)
        return self.out(torch.tanh(a)) * (1 + h[:, None])


@pytest.mark.parametrize("style", ["PortStyleMeanFlow", "OfficialStyleMeanFlow"])
@pytest.mark.parametrize("cfg", [{}, {"omega": 2.0}, {"omega": 1.0, "kappa": 0.5}])
def test_baselines_compute_the_meanflow_loss(bench, cfg, style):
    """The benchmark's baselines must cost what the public code costs *and* compute the same
    loss: compare with the target written out, du/dt by central differences in float64."""
    torch.manual_seed(0)
    net = TinyNet().to(F64)
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 8, 2, generator=g, dtype=F64).unbind(0)
    t = torch.rand(8, generator=g, dtype=F64) * 0.9 + 0.05
    r = torch.where(torch.arange(8) % 3 == 0, t, t * torch.rand(8, generator=g, dtype=F64))
    y = torch.randint(0, 3, (8,), generator=g)
    out = getattr(bench, style)(num_classes=3, **cfg)(net, x, y, t, r, noise, progress=0.0)

    omega, kappa = cfg.get("omega", 1.0), cfg.get("kappa", 0.0)
    z, v, h = (1 - t[:, None]) * x + t[:, None] * noise, noise - x, t - r
    with torch.no_grad():
        u_c = net(z, t, torch.zeros_like(t), y)
        u_u = net(z, t, torch.zeros_like(t), torch.full_like(y, 3))
        v_g = omega * v + kappa * u_c + (1 - omega - kappa) * u_u
        eps = 1e-6
        dudt = (net(z + eps * v_g, t + eps, h + eps, y)
                - net(z - eps * v_g, t - eps, h - eps, y)) / (2 * eps)
    err_ref = ((net(z, t, h, y) - (v_g - h[:, None] * dudt)) ** 2).sum(1)
    torch.testing.assert_close(out.err, err_ref, rtol=1e-7, atol=1e-9)
    assert out.err.requires_grad


def test_official_style_predicts_from_the_jvp_primal_in_float32(bench):
    """Under bf16 autocast the official-style baseline still runs its JVP, and so its
    prediction, in float32: u is the float32 network output and carries the gradient."""
    torch.manual_seed(0)
    net = TinyNet()
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(2, 6, 2, generator=g).unbind(0)
    t = torch.rand(6, generator=g) * 0.9 + 0.05
    r, y = t * 0.5, torch.randint(0, 3, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bench.OfficialStyleMeanFlow(num_classes=3)(net, x, y, t, r, noise, progress=0.0)
    z = (1 - t[:, None]) * x + t[:, None] * noise
    assert out.u.dtype == out.target.dtype == torch.float32
    torch.testing.assert_close(out.u, net(z, t, t - r, y).detach(), rtol=1e-6, atol=1e-7)
    out.err.sum().backward()
    assert net.out.weight.grad is not None and net.out.weight.grad.abs().sum() > 0


def test_dataset_without_static_shape_needs_the_flags(bench, tmp_path, capsys):
    recipe = tmp_path / "shards.yaml"
    recipe.write_text(
        f"base: {QUICK}\n"
        "data: {name: shards, params: {urls: '/nowhere/train-{000..001}.tar'}}\n")
    assert bench.main([str(recipe), "--no-memory", "--repeats", "1"]) == 2
    assert "--input-shape" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--variants", "meanflow_jax"], "unknown variant"),
    (["--dtype", "bf16", "--device", "cpu"], "bf16 is for CUDA"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--avg-share", "1.5"], "--avg-share must be in [0, 1]"),
    (["--avg-share", "0.25", "--fm-ratio", "0.75"], "exclude each other"),
])
def test_bad_arguments(bench, capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        bench.parse_args([TOY, *argv])
    assert info.value.code == 2
    assert match in capsys.readouterr().err


def test_bad_input_shape_is_a_user_error(bench, capsys):
    assert bench.main([QUICK, "--input-shape", "4x32x32", "--no-memory"]) == 2
    assert "--input-shape" in capsys.readouterr().err
