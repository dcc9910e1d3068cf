"""tools/gpu_check.py: its CPU dry run (the whole logic, tiny models; --quick in the default
suite, the full dry run marked slow), its numerics against the float64 reference (and that they
catch a wrong tangent), the DeepSpeed comparison (and that it catches a wrong update), and the
same numerics on CUDA with DiT-B/4 (``-m gpu``; the script runs the very same functions for its
part (a))."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import load_tool

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def gc():
    return load_tool("gpu_check")


@pytest.fixture(scope="module")
def tiny(gc):
    problem = gc.numerics_problem("dit_tiny_4", (4, 8, 8), 10)
    return problem, gc.reference(problem)


def test_reference_agrees_with_finite_differences(tiny):
    _, refd = tiny
    assert refd["fd_rel_err"] < 1e-6
    assert all(k >= 1 for k in refd["kappa"].values())


@pytest.mark.parametrize("dtype, jvp_dtype", [("fp32", None), ("bf16", None),
                                              ("bf16", "float32")])
def test_cpu_numerics_within_tolerance(gc, tiny, dtype, jvp_dtype):
    problem, refd = tiny
    res = gc.numerics_case(problem, refd, torch.device("cpu"), dtype, "math", jvp_dtype)
    assert res["ok"], res


def test_numerics_catch_a_wrong_tangent(gc, tiny, monkeypatch):
    """A 2 % error in one tangent term (the LayerNorm tangent) must fail the fp32 check."""
    from mfrecipes.backbones import tangents

    problem, refd = tiny
    real = tangents.layer_norm
    monkeypatch.setattr(tangents, "layer_norm", lambda *a, **k: 1.02 * real(*a, **k))
    res = gc.numerics_case(problem, refd, torch.device("cpu"), "fp32", "math")
    assert not res["ok"] and res["errors"]["du"] > res["tolerances"]["du"]


def _dry_run(gc, tmp_path, capsys, *extra):
    out = tmp_path / "check.json"
    code = gc.main(["--out", str(out), *extra])
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert "DRY RUN on the CPU" in text and res["dry_run"] is True
    assert code == (1 if res["failures"] else 0) and not res["failures"], res["failures"]
    cases = res["numerics"]["cases"]
    assert {c["backend"] for c in cases} >= {"math", "efficient_attention"}
    assert any("skipped" in c for c in cases)  # no memory-efficient kernel on a CPU
    configs = res["speed"]["configs"]
    assert any(c["compile"] for c in configs)
    assert res["speed"]["largest_batch"] >= 2 * res["config"]["paper_batch"]  # probe doubled
    assert set(configs[0]["variants"]) == set(load_tool("bench_step").VARIANTS)
    for c in configs:
        for v in c["variants"].values():
            assert v["time_s"] > 0 and "step_bytes" in v
    ds = res["deepspeed"]
    assert ds["ok"], ds
    assert set(ds["max_rel_diff"]) == set(gc.DS_KEYS)
    assert all(len(v) == ds["steps"] for v in ds["losses"].values())
    assert ds["u_err"]["single"][0] != ds["u_err"]["single"][-1]  # it trained: weights moved
    assert res["data"]["samples_per_s"] > 0 and res["data"]["headroom"] > 0
    assert "MeanFlow / FM time" in text and "reader / DiT-B/4" in text
    assert "ZeRO-2 vs single: obj/u_err" in text
    return res


def test_quick_dry_run_on_cpu_writes_table_and_json(gc, tmp_path, capsys):
    """--quick: every part's logic once (the default suite's run of the script)."""
    res = _dry_run(gc, tmp_path, capsys, "--quick")
    assert len(res["speed"]["configs"]) == 2 and res["deepspeed"]["steps"] == 3


@pytest.mark.slow
def test_dry_run_on_cpu_writes_table_and_json(gc, tmp_path, capsys):
    res = _dry_run(gc, tmp_path, capsys)
    assert len(res["speed"]["configs"]) == 4 and res["deepspeed"]["steps"] == 20


def _records(u_errs, changed=None):
    return {i + 1: {"loss": 1.0, "obj/u_err": u, "obj/v_loss": 2.0, "grad_norm": 0.5,
                    **(changed or {}).get(i + 1, {})} for i, u in enumerate(u_errs)}


def test_compare_runs_flags_differences_gaps_and_non_finite_values(gc):
    single = _records([3.0, 2.0, 1.0])
    assert gc.compare_runs(single, _records([3.0, 2.0, 1.0 + 5e-5]), 3)["ok"]
    bad = gc.compare_runs(single, _records([3.0, 2.0, 1.001]), 3)
    assert not bad["ok"] and bad["max_rel_diff"]["obj/u_err"] == pytest.approx(1e-3)
    gap = _records([3.0, 2.0, 1.0])
    del gap[2]
    assert "step 2 missing from the deepspeed" in gc.compare_runs(single, gap, 3)["problems"][0]
    nan = gc.compare_runs(single, _records([3.0, 2.0, 1.0], {3: {"grad_norm": float("nan")}}), 3)
    assert not nan["ok"] and "not finite" in nan["problems"][0]


@pytest.mark.slow
def test_deepspeed_check_catches_a_wrong_update(gc):
    """The DeepSpeed run at 2x the learning rate (3 steps): the comparison must fail, by far
    (1.1x over 20 steps ends 4e-3 apart in the u error, 40x the tolerance)."""
    cfg = gc.config(torch.device("cpu"), quick=True)
    res = gc.run_deepspeed(cfg, ds_extra=("train.lr=2.0e-4",))
    assert "error" not in res, res
    assert not res["ok"] and max(res["max_rel_diff"].values()) > 10 * res["tolerance"], res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_numerics_dit_b4(gc):
    """DiT-B/4 on CUDA, every (dtype, SDPA backend, jvp_dtype) the device offers, against the
    float64 CPU reference with the tolerance gpu_check states (same function as its part a)."""
    res = gc.run_numerics(torch.device("cuda"), gc.config(torch.device("cuda")))
    assert res["fd_rel_err"] < 1e-6
    bad = [c for c in res["cases"] if not c.get("ok", "skipped" in c)]
    assert not bad, bad
