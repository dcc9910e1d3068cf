#!/usr/bin/env python
"""One command that checks correctness and speed on one CUDA device, and writes what it found.

    python tools/gpu_check.py [--out gpu_check.json] [--parts numerics,speed,deepspeed,data]
                              [--quick]

Parts:

- ``numerics``: DiT-B/4's tangent pass (``forward_jvp``) and the MeanFlow loss and gradients on
  the device, in fp32 (TF32 off) and under bf16 autocast, with every SDPA backend the device
  offers (``torch.nn.attention.sdpa_kernel``; a backend the device or dtype lacks is skipped),
  and ``jvp_dtype: float32`` under bf16, against a float64 CPU reference on the same weights and
  inputs. The reference is independent of the code under test: ``torch.func.jvp`` of the plain
  forward with attention written out as ``softmax(q k^T / sqrt(d)) v``, the loss written out,
  gradients by autograd; it is itself checked against central finite differences.
- ``speed``: ``tools/bench_step.py``'s step, bf16, 25 % r != t, no training-time guidance, for
  DiT-B/4 at batch 32 (the paper's 256 over 8 GPUs) and at the largest power of two that fits,
  and DiT-XL/2 at batch 32; torch.compile off, and on for DiT-B/4 at batch 32.
- ``deepspeed``: the shipped DiT-B/4 recipe (``recipes/_base/dit_b4.yaml``: fp32, adaptive
  weighting, the B/4 training-time CFG) for 20 steps at batch 32 on local shards, twice, as
  ``mfr run`` subprocesses with the same seed: ``engine: single`` and ``engine: deepspeed`` with
  ZeRO-2 in one process. Both log every step; per step the loss, the unweighted u and v errors
  and the gradient norm must be finite and agree to a relative ``DS_TOL = 1e-4``. Why that
  tolerance: both runs draw the same batches, (t, r) and noise and compute the same fp32
  forward and backward; they differ only in how the update is applied (ZeRO's flat fp32
  gradient buffer and partitioned AdamW against per-tensor AdamW), a few units of 2^-24 per
  weight per step (on the CPU dry run: loss and errors bit-identical over 20 steps, gradient
  norm 2e-7 apart). A wrong update is far larger: there, the DeepSpeed run at 1.1x the learning
  rate ends 4e-3 apart in the u error and 1e-2 in the gradient norm.
- ``data``: the shard reader's samples/s with workers, against the img/s of the DiT-B/4 step.

Tolerance (numerics). For every compared quantity q (u, du, the target, the loss, the
gradient) the script measures the condition factor ``kappa_q``: the relative change of the
float64 reference when every weight and input is multiplied by ``1 + d e``, e ~ U(-1, 1), over
``d`` (clamped to >= 1). Rounding to a format of unit roundoff ``u`` (2^-24 fp32, 2^-8 bf16)
happens again in each of the ``L`` blocks, and independent errors add up like a random walk:
``sqrt(L)``. In fp32 the matmuls also accumulate in fp32, adding ``sqrt(m)`` for inner
products of length m = the hidden size; bf16 autocast accumulates in fp32, so there m = 1. The
tolerance is ``SAFETY x kappa_q x u x sqrt(L m)`` with ``SAFETY = 4``: on the tiny CPU model
the measured errors sit 4-20x below it, and a 2 % error in one tangent term fails it by orders.

Without CUDA the script runs all of it on the CPU with tiny models (``dit_tiny_4``; DeepSpeed on
its CPU accelerator with gloo, one process) and says so: CI exercises its whole logic that way
(``tests/test_gpu_check.py``; ``--quick`` there, the full dry run as a slow test).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
PARTS = ("numerics", "speed", "deepspeed", "data")
SAFETY = 4.0
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8}
PAPER_BATCH = 32  # global batch 256 over 8 GPUs


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- SDPA backends ------------------------------------------------------------------------------

def sdpa_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, bool]:
    """Which of flash, memory-efficient, cuDNN and math attention run here for this dtype."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    q = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype)
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q)
            out[name.lower()] = True
        except RuntimeError:
            out[name.lower()] = False
    return out


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, name.upper())


# -- numerics -----------------------------------------------------------------------------------

def _explicit_attention(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


@contextlib.contextmanager
def _written_out_attention():
    from mfrecipes.backbones import attention as attn_mod

    saved = attn_mod.attention
    attn_mod.attention = _explicit_attention
    try:
        yield
    finally:
        attn_mod.attention = saved


def numerics_problem(backbone: str, shape, classes: int, batch: int = 8, seed: int = 0) -> dict:
    """A DiT with every branch active (the zero-initialised adaLN and output layers drawn from
    N(0, 0.02^2)), a batch, (t, r) with the first half r != t, noise and labels."""
    from mfrecipes import registry

    from mfrecipes.plugins import load_components

    load_components()
    torch.manual_seed(seed)
    net = registry.BACKBONES.get(backbone)(input_shape=shape, num_classes=classes)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(seed + 1)
    x, noise = torch.randn(2, batch, *shape, generator=g).unbind(0)
    t = torch.rand(batch, generator=g) * 0.8 + 0.1
    k = batch // 2
    r = torch.cat([t[:k] * torch.rand(k, generator=g), t[k:]])
    y = torch.randint(0, classes, (batch,), generator=g)
    return {"net": net, "x": x, "noise": noise, "t": t, "r": r, "y": y, "k": k}


def _reference_quantities(net, x, noise, t, r, y, k) -> dict[str, torch.Tensor]:
    """u, du (r != t rows), target (r != t rows), loss and gradient, written out."""
    tb = t.reshape(-1, *[1] * (x.dim() - 1))
    z, v = (1 - tb) * x + tb * noise, noise - x
    h = t - r
    with _written_out_attention():
        u, du = torch.func.jvp(lambda a, b, c: net(a, b, c, y), (z, t, h),
                               (v, torch.ones_like(t), torch.ones_like(t)))
        # MeanFlow target (Kim et al. 2025, Eq. 4)
        target = (v - h.reshape(tb.shape) * du).detach()
        # r = t rows: target v (Kim et al. 2025, Eq. 5)
        target[k:] = v[k:]
        loss = (u - target).pow(2).flatten(1).sum(1).mean()
        grad = torch.autograd.grad(loss, list(net.parameters()))
    return {"u": u.detach(), "du": du[:k].detach(), "target": target[:k], "loss": loss.detach(),
            "grad": torch.cat([gr.flatten() for gr in grad])}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def reference(problem: dict, delta: float = 1e-7) -> dict:
    """The float64 CPU reference, its finite-difference check, and the condition factors."""
    net64 = copy.deepcopy(problem["net"]).double().cpu()
    args = {k: (problem[k].double() if problem[k].is_floating_point() else problem[k])
            for k in ("x", "noise", "t", "r", "y")}
    ref = _reference_quantities(net64, **args, k=problem["k"])
    # central differences of u along (v, 1, 1) for the r != t rows
    tb = args["t"].reshape(-1, *[1] * (args["x"].dim() - 1))
    z, v, h = (1 - tb) * args["x"] + tb * args["noise"], args["noise"] - args["x"], \
        args["t"] - args["r"]
    eps, kk = 1e-6, problem["k"]
    with torch.no_grad(), _written_out_attention():
        fd = (net64(z + eps * v, args["t"] + eps, h + eps, args["y"])
              - net64(z - eps * v, args["t"] - eps, h - eps, args["y"]))[:kk] / (2 * eps)
    # condition factors: relative change under a relative perturbation delta of all inputs
    g = torch.Generator().manual_seed(7)
    pert = copy.deepcopy(net64)
    with torch.no_grad():
        for p in pert.parameters():
            p.mul_(1 + delta * (2 * torch.rand(p.shape, generator=g, dtype=p.dtype) - 1))
    pargs = dict(args)
    for name in ("x", "noise"):
        a = args[name]
        pargs[name] = a * (1 + delta * (2 * torch.rand(a.shape, generator=g, dtype=a.dtype) - 1))
    moved = _reference_quantities(pert, **pargs, k=kk)
    kappa = {q: max(_rel(moved[q], ref[q]) / delta, 1.0) for q in ref}
    return {"ref": ref, "kappa": kappa, "fd_rel_err": _rel(fd, ref["du"])}


def numerics_case(problem: dict, refd: dict, device: torch.device, dtype: str,
                  backend: str, jvp_dtype: Optional[str] = None) -> dict[str, Any]:
    """One (dtype, backend, jvp_dtype) case: relative errors, tolerances, pass/fail."""
    from torch.nn.attention import sdpa_kernel

    from mfrecipes.objectives.meanflow import MeanFlow

    net = copy.deepcopy(problem["net"]).float().to(device)
    x, noise, t, r, y = (problem[k].to(device) for k in ("x", "noise", "t", "r", "y"))
    k = problem["k"]
    auto = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
            else contextlib.nullcontext())
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel([_backend(backend)]), auto:
            tb = t.reshape(-1, *[1] * (x.dim() - 1))
            z, v = (1 - tb) * x + tb * noise, noise - x
            with torch.no_grad():
                u_j, du = net.forward_jvp(z, t, t - r, y, v[:k], 1.0, 1.0)
            out = MeanFlow(jvp_dtype=jvp_dtype, num_classes=None)(net, x, y, t, r, noise,
                                                                   progress=0.5)
            loss = out.err.float().mean()
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    grad = torch.cat([p.grad.flatten() for p in net.parameters()])
    got = {"u": u_j, "du": du, "target": out.target[:k], "loss": loss.detach(), "grad": grad}
    # jvp_dtype float32: the r != t rows' prediction and target are computed in float32
    fmt = {q: dtype for q in got}
    if jvp_dtype == "float32":
        fmt["target"] = "fp32"
    depth, hidden = len(net.blocks), net.blocks[0].attn.qkv.in_features
    res = {"dtype": dtype, "backend": backend, "jvp_dtype": jvp_dtype, "errors": {},
           "tolerances": {}, "ok": True}
    for q, val in got.items():
        err = _rel(val, refd["ref"][q])
        growth = math.sqrt(depth * (hidden if fmt[q] == "fp32" else 1))
        tol = SAFETY * refd["kappa"][q] * UNIT_ROUNDOFF[fmt[q]] * growth
        ok = math.isfinite(err) and err <= tol
        res["errors"][q], res["tolerances"][q] = err, tol
        res["ok"] &= ok
    return res


def numerics_cases(device: torch.device, backbone: str, shape, classes: int,
                   head_dim: int) -> list[tuple[str, str, Optional[str]]]:
    """Every (dtype, backend, jvp_dtype) the device offers; lacking backends marked skipped."""
    cases = []
    for dtype, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for backend, ok in sdpa_backends(device, tdt, head_dim).items():
            for jd in ((None,) if dtype == "fp32" else (None, "float32")):
                cases.append((dtype, backend, jd, ok))
    return cases


def run_numerics(device, cfg) -> dict:
    t0 = time.perf_counter()
    problem = numerics_problem(cfg["numerics_backbone"], cfg["numerics_shape"], cfg["classes"])
    refd = reference(problem)
    rows = []
    for dtype, backend, jd, available in numerics_cases(device, cfg["numerics_backbone"],
                                                        cfg["numerics_shape"], cfg["classes"],
                                                        cfg["head_dim"]):
        if not available:
            rows.append({"dtype": dtype, "backend": backend, "jvp_dtype": jd, "skipped":
                         "the device lacks this backend for this dtype"})
            continue
        try:
            rows.append(numerics_case(problem, refd, device, dtype, backend, jd))
        except Exception as err:  # noqa: BLE001  (a failing case is a finding, not a crash)
            rows.append({"dtype": dtype, "backend": backend, "jvp_dtype": jd, "ok": False,
                         "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
    return {"backbone": cfg["numerics_backbone"], "fd_rel_err": refd["fd_rel_err"],
            "kappa": refd["kappa"], "safety": SAFETY, "cases": rows,
            "wall_s": time.perf_counter() - t0}


# -- speed --------------------------------------------------------------------------------------

def bench_config(bench, backbone: str, batch: int, cfg: dict, *, compile_: bool = False,
                 variants: Optional[list[str]] = None) -> dict:
    argv = [os.path.join(REPO, "recipes", "quickstart.yaml"), "--backbone", backbone,
            "--input-shape", ",".join(map(str, cfg["shape"])), "--num-classes",
            str(cfg["classes"]), "--batch", str(batch), "--avg-share", "0.25",
            "--dtype", cfg["dtype"], "--device", cfg["device"], "--repeats",
            str(cfg["repeats"]), "--warmup", str(cfg["warmup"]),
            "--variants", ",".join(variants or bench.VARIANTS), "--no-memory"]
    if compile_:
        argv.append("--compile")
    args = bench.parse_args(argv)
    setup = bench.build_setup(args)
    times, runners = bench.time_variants(setup, args, keep_runners=True)
    memory = bench.measure_memory_in_process(runners, setup)
    res = bench.summarise(setup, args, times, memory)
    for v in res["variants"].values():
        if "time_s" in v:
            v["img_per_s"] = batch / v["time_s"]
    return res


def largest_batch(bench, backbone: str, cfg: dict) -> int:
    """The largest power of two from the paper's batch up to ``cfg['max_batch']`` at which one
    step of every whole-batch variant (the most memory-hungry) runs."""
    best = cfg["paper_batch"]
    batch = best * 2
    while batch <= cfg["max_batch"]:
        try:
            res = bench_config(bench, backbone, batch, dict(cfg, repeats=1, warmup=0),
                               variants=["meanflow_official", "meanflow_port"])
        except torch.cuda.OutOfMemoryError:
            break
        if any("error" in v for v in res["variants"].values()):
            break
        best, batch = batch, batch * 2
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()
    return best


def run_speed(cfg) -> dict:
    bench = _tool("bench_step")
    t0 = time.perf_counter()
    rows = []
    b4, xl = cfg["speed_backbones"]
    big = largest_batch(bench, b4, cfg)
    if cfg["device"] == "cuda":
        torch.cuda.empty_cache()  # what the probe's last (failed) batch left in the cache
    plan = [(b4, cfg["paper_batch"], False), (b4, cfg["paper_batch"], True)]
    if cfg["speed_big"]:
        plan.append((b4, big, False))
    if cfg["speed_xl"]:
        plan.append((xl, cfg["paper_batch"], False))
    for backbone, batch, comp in plan:
        variants = ["flow_matching", "meanflow_manual"] if comp else None
        with _compile_backend(cfg["compile_backend"]):
            res = bench_config(bench, backbone, batch, cfg, compile_=comp, variants=variants)
        rows.append(res)
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()
    return {"configs": rows, "largest_batch": big, "wall_s": time.perf_counter() - t0}


@contextlib.contextmanager
def _compile_backend(backend: str):
    """torch.compile with ``backend`` (the CPU dry run traces with 'eager': no C++ build)."""
    if backend == "inductor":
        yield
        return
    import functools

    saved = torch.compile
    torch.compile = functools.partial(saved, backend=backend)
    try:
        yield
    finally:
        torch.compile = saved


# -- deepspeed ----------------------------------------------------------------------------------

# Compared per step (logged every step): the weighted loss is nearly flat under adaptive weighting
# (err / (err + c) ~ 1), so the unweighted errors and the gradient norm carry the comparison.
DS_KEYS = ("loss", "obj/u_err", "obj/v_loss", "grad_norm")
DS_TOL = 1e-4


def _mfr_env(cfg: dict) -> dict:
    """The environment of a one-process run: the launcher's variables cleared (a plain ``mfr
    run`` with ``engine: deepspeed`` becomes a group of one), DeepSpeed's CPU accelerator off
    CUDA, the worktree first on the path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(
                   os.pathsep))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        env.pop(k, None)
    if cfg["device"] != "cuda":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def ds_overrides(cfg: dict, urls: str) -> list[str]:
    """The shipped DiT-B/4 recipe (fp32, adaptive weighting, B/4 training-time CFG), cut to
    ``ds_steps`` steps on local shards, logged every step, no evaluation."""
    b = cfg["ds_batch"]
    out = [f"data.params.urls={urls}", f"train.global_batch_size={b}",
           f"train.total_images={b * cfg['ds_steps']}", f"train.log_every_images={b}",
           "train.checkpoint_every_images=null", "train.progress_bar=false",
           "eval.every_images=null", "eval.at_end=false", f"run.device={cfg['device']}"]
    if cfg["ds_backbone"] != "dit_b_4":
        out.append(f"backbone.name={cfg['ds_backbone']}")
    return out


def read_metrics(path: str) -> dict[int, dict]:
    """step -> the record of that step (records without a step, e.g. sampler notes, dropped)."""
    from mfrecipes.run.layout import read_jsonl

    return {int(rec["step"]): rec for rec in read_jsonl(path) if "loss" in rec and "step" in rec}


def compare_runs(single: dict[int, dict], ds: dict[int, dict], steps: int,
                 tol: float = DS_TOL) -> dict:
    """Per step and key, ``|ds - single| / max(|single|, 1e-12)``; ok when every step logged in
    both, everything finite, every difference <= tol."""
    worst = {k: 0.0 for k in DS_KEYS}
    problems = []
    for step in range(1, steps + 1):
        a, b = single.get(step), ds.get(step)
        if a is None or b is None:
            problems.append(f"step {step} missing from the {'single' if a is None else 'deepspeed'}"
                            " run's metrics")
            continue
        for k in DS_KEYS:
            x, y = a.get(k), b.get(k)
            if not (isinstance(x, (int, float)) and isinstance(y, (int, float))
                    and math.isfinite(x) and math.isfinite(y)):
                problems.append(f"step {step} {k}: single {x}, deepspeed {y} (not finite)")
                worst[k] = math.inf
                continue
            worst[k] = max(worst[k], abs(y - x) / max(abs(x), 1e-12))
    for k, w in worst.items():
        if w > tol and math.isfinite(w):
            problems.append(f"{k}: max relative difference {w:.2e} > {tol:.0e}")
    return {"max_rel_diff": worst, "tolerance": tol, "problems": problems, "ok": not problems}


def run_deepspeed(cfg: dict, ds_extra: tuple[str, ...] = ()) -> dict:
    """The same recipe and seed twice as ``mfr run`` subprocesses, ``engine: single`` and
    ``engine: deepspeed`` with ZeRO-2 in one process, compared step by step. ``ds_extra``:
    overrides for the DeepSpeed run only (a test uses it to show that a difference is caught)."""
    import shutil
    import subprocess
    import tempfile

    data = _tool("bench_data")
    t0 = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="mfr-gpu-check-ds-")
    try:
        n = cfg["ds_batch"] * cfg["ds_steps"]
        paths = data.write_set(os.path.join(folder, "shards"), n, 2)
        urls = os.path.join(folder, "shards", f"shard-{{000000..{len(paths) - 1:06d}}}.tar")
        recipe = os.path.join(REPO, "recipes", "_base", "dit_b4.yaml")
        common = ds_overrides(cfg, urls)
        runs = {"single": ["engine=single"],
                "deepspeed": ["engine=deepspeed", "deepspeed.zero_stage=2", *ds_extra]}
        procs, codes = {}, {}
        try:
            for name, extra in runs.items():  # both at once: one start-up's wall time
                with open(os.path.join(folder, f"{name}.log"), "wb") as log:
                    procs[name] = subprocess.Popen(
                        [sys.executable, "-m", "mfrecipes.cli", "run", recipe, *common, *extra,
                         "--out", os.path.join(folder, name)], cwd=REPO, env=_mfr_env(cfg),
                        stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + cfg["ds_timeout_s"]
            for name, p in procs.items():
                try:
                    codes[name] = p.wait(timeout=max(deadline - time.monotonic(), 1))
                except subprocess.TimeoutExpired:
                    codes[name] = f"timed out after {cfg['ds_timeout_s']} s"
        finally:
            for p in procs.values():  # never leave a run behind
                if p.poll() is None:
                    p.kill()
                    p.wait()
        res: dict[str, Any] = {"backbone": cfg["ds_backbone"], "batch": cfg["ds_batch"],
                               "steps": cfg["ds_steps"], "zero_stage": 2,
                               "ds_extra": list(ds_extra)}
        failed = [name for name, c in codes.items() if c != 0]
        if failed:
            tails = {}
            for name in failed:
                with open(os.path.join(folder, f"{name}.log"), errors="replace") as f:
                    tails[name] = f.read()[-1500:]
            res.update(ok=False, error="; ".join(f"{name} run: exit {codes[name]}"
                                                   for name in failed), log_tails=tails)
        else:
            m = {name: read_metrics(os.path.join(folder, name, "metrics.jsonl")) for name in runs}
            res.update(compare_runs(m["single"], m["deepspeed"], cfg["ds_steps"]))
            res["losses"] = {name: [m[name][s]["loss"] for s in sorted(m[name])] for name in m}
            res["u_err"] = {name: [m[name][s].get("obj/u_err") for s in sorted(m[name])]
                            for name in m}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    res["wall_s"] = time.perf_counter() - t0
    return res


# -- data ---------------------------------------------------------------------------------------

def run_data(cfg, step_img_per_s: Optional[float]) -> dict:
    import shutil
    import tempfile

    data = _tool("bench_data")
    t0 = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="mfr-gpu-check-")
    try:
        paths = data.write_set(folder, cfg["data_samples"], cfg["data_shards"])
        pattern = os.path.join(folder, f"shard-{{000000..{len(paths) - 1:06d}}}.tar")
        n = cfg["data_samples"]
        rate = data.best_rate(data.ours(pattern, n, cfg["data_batch"], cfg["workers"]), n, 2)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"samples": n, "workers": cfg["workers"], "samples_per_s": rate,
            "step_img_per_s": step_img_per_s,
            "headroom": rate / step_img_per_s if step_img_per_s else None,
            "wall_s": time.perf_counter() - t0}


# -- report -------------------------------------------------------------------------------------

def config(device: torch.device, quick: bool = False) -> dict:
    """What each part runs on this device; ``quick``: every part's logic once, on fewer and
    smaller cases (a smoke run, not the check)."""
    cuda = device.type == "cuda"
    cfg = {
        "device": device.type, "dry_run": not cuda,
        "numerics_backbone": "dit_b_4" if cuda else "dit_tiny_4",
        "speed_backbones": ("dit_b_4", "dit_xl_2") if cuda else ("dit_tiny_4", "dit_tiny_2"),
        "shape": (4, 32, 32) if cuda else (4, 16, 16), "classes": 1000 if cuda else 10,
        "numerics_shape": (4, 32, 32) if cuda else (4, 16, 16),
        "head_dim": 64 if cuda else 32,
        "dtype": "bf16" if cuda else "fp32", "repeats": 10 if cuda else 2,
        "warmup": 3 if cuda else 1, "paper_batch": PAPER_BATCH if cuda else 4,
        "max_batch": 8192 if cuda else 8,
        "compile_backend": "inductor" if cuda else "eager",
        "workers": min(8, os.cpu_count() or 1) if cuda else 2,
        "data_samples": 4096 if cuda else 512, "data_shards": 16 if cuda else 4,
        "data_batch": 256 if cuda else 64,
        "speed_big": True, "speed_xl": True,
        "ds_backbone": "dit_b_4" if cuda else "dit_tiny_4", "ds_batch": PAPER_BATCH if cuda else 8,
        "ds_steps": 20, "ds_timeout_s": 300, "quick": quick,
    }
    if quick:
        # the largest-batch probe still doubles once; its configuration is not timed
        cfg.update(repeats=1, warmup=1, max_batch=2 * cfg["paper_batch"], speed_big=False,
                   speed_xl=False, numerics_shape=(4, 8, 8),
                   data_samples=128, data_shards=2, data_batch=32, ds_steps=3)
    return cfg


def rows_of(res: dict) -> list[tuple[str, str, str, str, str]]:
    """(part, check, value, target or tolerance, status) for the one table."""
    rows = []
    num = res.get("numerics")
    if num:
        rows.append(("numerics", "float64 reference vs finite differences",
                     f"{num['fd_rel_err']:.1e}", "<= 1e-6",
                     "ok" if num["fd_rel_err"] <= 1e-6 else "FAIL"))
        for c in num["cases"]:
            name = f"{c['dtype']} {c['backend']}" + (f" jvp {c['jvp_dtype']}" if c["jvp_dtype"]
                                                      else "")
            if "skipped" in c:
                rows.append(("numerics", name, "-", "-", "skip (backend not offered)"))
            elif "error" in c:
                rows.append(("numerics", name, c["error"][:60], "-", "FAIL"))
            else:
                worst = max(c["errors"], key=lambda q: c["errors"][q] / c["tolerances"][q])
                rows.append(("numerics", name + f" (worst: {worst})",
                             f"{c['errors'][worst]:.1e}", f"<= {c['tolerances'][worst]:.1e}",
                             "ok" if c["ok"] else "FAIL"))
    sp = res.get("speed")
    if sp:
        for c in sp["configs"]:
            tag = f"{c['backbone']} b{c['batch']}" + (" compiled" if c["compile"] else "")
            for name, v in c["variants"].items():
                if "error" in v:
                    rows.append(("speed", f"{tag} {name}", v["error"][:60], "-", "FAIL"))
                    continue
                mem = v.get("memory_ratio")
                value = (f"{v['time_s'] * 1e3:.1f} ms x{v['time_ratio']:.2f}, "
                         f"{v['img_per_s']:.0f} img/s"
                         + (f", memory x{mem:.2f}" if isinstance(mem, float) else ""))
                rows.append(("speed", f"{tag} {name}", value, "", ""))
            for check, value, target, met in targets(c):
                rows.append(("speed", f"{tag} {check}", value, target, met))
    ds = res.get("deepspeed")
    if ds:
        name = f"{ds['backbone']} b{ds['batch']}, {ds['steps']} steps, ZeRO-2 vs single"
        if "error" in ds:
            rows.append(("deepspeed", name, ds["error"][:60], "-", "FAIL"))
        else:
            for k, w in ds["max_rel_diff"].items():
                rows.append(("deepspeed", f"{name}: {k}", f"{w:.1e}",
                             f"<= {ds['tolerance']:.0e} rel.", "ok" if w <= ds["tolerance"]
                             else "FAIL"))
            if not ds["ok"] and all(w <= ds["tolerance"] for w in ds["max_rel_diff"].values()):
                rows.append(("deepspeed", name, ds["problems"][0][:60], "-", "FAIL"))
    dd = res.get("data")
    if dd:
        rows.append(("data", f"shard reader, {dd['workers']} workers",
                     f"{dd['samples_per_s']:.0f} samples/s", "", ""))
        if dd["headroom"]:
            rows.append(("data", "reader / DiT-B/4 step consumption", f"{dd['headroom']:.1f}x",
                         ">= 10x", "met" if dd["headroom"] >= 10 else "missed"))
    return rows


def targets(c: dict) -> list[tuple[str, str, str, str]]:
    v = c["variants"]
    ours, port = v.get("meanflow_manual", {}), v.get("meanflow_port", {})
    out = []
    if "time_ratio" in ours:
        out.append(("MeanFlow / FM time", f"{ours['time_ratio']:.2f}x", "<= 1.15x",
                    "met" if ours["time_ratio"] <= 1.15 else "missed"))
    if ours.get("memory_ratio"):
        out.append(("MeanFlow / FM memory", f"{ours['memory_ratio']:.2f}x", "<= 1.25x",
                    "met" if ours["memory_ratio"] <= 1.25 else "missed"))
    if "time_s" in ours and "time_s" in port:
        sp = port["time_s"] / ours["time_s"]
        out.append(("speed-up over port style", f"{sp:.2f}x", ">= 1.5x",
                    "met" if sp >= 1.5 else "missed"))
    return out


def print_table(res: dict) -> None:
    rows = rows_of(res)
    head = ("part", "check", "value", "target", "status")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    print(f"gpu_check on {res['device_name']}"
          + (" -- DRY RUN on the CPU with tiny models (no CUDA device)" if res["dry_run"]
             else "") + f", torch {res['torch']}, {res['wall_s']:.0f} s")
    for r in [head, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


def failures(res: dict) -> list[str]:
    return [f"{r[0]}: {r[1]}: {r[2]}" for r in rows_of(res) if r[4] == "FAIL"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {', '.join(PARTS)}")
    p.add_argument("--quick", action="store_true",
                   help="every part's logic once on fewer, smaller cases (a smoke run: fewer "
                        "speed configurations, a 3-step DeepSpeed comparison)")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    if not parts or any(x not in PARTS for x in parts):
        p.error(f"--parts must be a comma-separated subset of {', '.join(PARTS)}")
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config(device, quick=args.quick)
    res: dict[str, Any] = {
        "device": device.type, "dry_run": cfg["dry_run"], "torch": torch.__version__,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"CPU ({platform.processor() or platform.machine()})"),
        "config": cfg}

    def save():
        res["wall_s"] = time.perf_counter() - t0
        res["failures"] = failures(res)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)

    if cfg["dry_run"]:
        print("no CUDA device: dry run on the CPU with tiny models (the figures mean nothing)",
              flush=True)
    if "numerics" in parts:
        res["numerics"] = run_numerics(device, cfg)
        save()
    step_rate = None
    if "speed" in parts:
        res["speed"] = run_speed(cfg)
        step_rate = max(c["variants"]["meanflow_manual"].get("img_per_s", 0)
                        for c in res["speed"]["configs"]
                        if c["backbone"] == cfg["speed_backbones"][0])
        save()
    if "deepspeed" in parts:
        res["deepspeed"] = run_deepspeed(cfg)
        save()
    if "data" in parts:
        res["data"] = run_data(cfg, step_rate)
    save()
    print_table(res)
    print(f"wrote {args.out}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
