"""Time and peak memory of one training step: MeanFlow variants against flow matching.

    python tools/bench_step.py RECIPE [key=value ...] [--backbone NAME] [--batch N] [--json]

A training step is what the loop does for one batch: sample (t, r) with the recipe's sampler, the
objective, the recipe's loss weighting and gap schedule, backward, and an AdamW step (EMA and data
loading are left out). Every variant gets its own copy of the same initial network and the same
batch; in repeat i all variants see the same (t, r), noise and class dropout. After ``--warmup``
steps per variant the repeats are interleaved (variant order rotates every repeat), so a change in
machine load touches every variant alike, and the median of ``--repeats`` is reported.

Variants (``--variants``, default all):

- ``flow_matching``: the flow-matching objective (one forward and backward), the denominator.
- ``meanflow_official``: how the official PyTorch MeanFlow loss computes it (benchmark only, not
  a recipe component): ``torch.func.jvp`` over the whole batch, r = t samples included, the
  prediction taken from the JVP's own primal output, the JVP in float32 (autocast off).
- ``meanflow_port``: how other public PyTorch ports compute MeanFlow (benchmark only):
  ``torch.func.jvp`` over the whole batch in the ambient precision, and a second forward for the
  prediction.
- ``meanflow_torch_func``: the ``meanflow`` objective, selective JVP with ``torch.func.jvp``.
- ``meanflow_manual_split``: selective JVP with the backbone's ``forward_jvp`` on the r != t rows
  and a separate forward for the r = t rows.
- ``meanflow_manual``: selective JVP with ``forward_jvp``; on a ``jvp_leading_rows`` backbone all
  rows share one call and the tangent runs on the r != t rows only (the default path).

The MeanFlow variants take the recipe's ``objective.params`` that the ``meanflow`` objective knows
(guidance, class dropout, ...); flow matching takes its class dropout.

Peak memory is the growth of memory during one step over what is held before it (parameters,
optimiser state, batch), measured in a fresh process per variant after warm-up. CUDA:
``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (``VmHWM`` in
/proc/self/status, reset through /proc/self/clear_refs before the step) with glibc told to serve
every allocation above 16 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the
resident set at once and the peak follows live tensors, not the allocator's cache. Linux only.

Output: a table, or with ``--json`` one JSON object with ``time_ratio`` and ``memory_ratio`` (the
fastest MeanFlow variant over flow matching), ``best_variant``, the raw medians and every
variant's numbers.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

import attrs
import torch

from mfrecipes import plugins, registry
from mfrecipes.errors import MfrError, RecipeError
from mfrecipes.objectives.base import (
    ObjectiveOutput,
    apply_class_dropout,
    as_batch,
    check_inputs,
    interpolate,
    sum_sq,
)
from mfrecipes.objectives.flow_matching import FlowMatching
from mfrecipes.objectives.guidance import Guidance
from mfrecipes.objectives.meanflow import MeanFlow
from mfrecipes import build as rbuild
from mfrecipes.recipe import load_recipe
from mfrecipes.train.compile import compile_backbone

VARIANTS = ("flow_matching", "meanflow_official", "meanflow_port", "meanflow_torch_func",
            "meanflow_manual_split", "meanflow_manual")
PROGRESS = 0.5  # the training progress the components see (matters for curricula only)
_MMAP_THRESHOLD = 16384


@attrs.frozen
class PortStyleMeanFlow:
    """MeanFlow as public PyTorch ports compute it (benchmark baseline, not a recipe component):
    du/dt from ``torch.func.jvp`` over the whole batch, then a separate forward for the
    prediction. Same target as ``meanflow`` (Kim et al. 2025, Eq. 4), guidance on every sample."""

    class_dropout: float = 0.0
    omega: float = 1.0
    kappa: float = 0.0
    t_start: float = 0.0
    t_end: float = 1.0
    num_classes: Optional[int] = None

    def guided_inputs(self, net, x, y, t, r, noise, generator):
        """``(z_t, h, y after class dropout, v_g)``: guidance forwards on every sample."""
        check_inputs(x, t, r, noise, y)
        g = Guidance(self.omega, self.kappa, self.t_start, self.t_end, self.class_dropout)
        z, v = interpolate(x, noise, t)
        y, dropped = apply_class_dropout(y, self.class_dropout, self.num_classes, generator)
        guided = g.mask(t, y, dropped)
        if guided is None:
            return z, t - r, y, v
        every = torch.arange(len(t), device=t.device)
        u_cond, u_uncond = g.forwards(net, z, t, y, every if g.needs_cond else every[:0],
                                      every, self.num_classes)
        return z, t - r, y, g.mix(v, u_cond, u_uncond, guided)

    def __call__(self, net, x, y, t, r, noise, *, progress, ema_net=None, generator=None):
        z, h, y, v_g = self.guided_inputs(net, x, y, t, r, noise, generator)
        ones = torch.ones_like(t)
        with torch.no_grad():
            _, dudt = torch.func.jvp(lambda a, b, c: net(a, b, c, y), (z, t, h), (v_g, ones, ones))
        target = v_g - as_batch(h, x) * dudt  # MeanFlow target (Kim et al. 2025, Eq. 4)
        u = net(z, t, h, y)
        return ObjectiveOutput(err=sum_sq(u - target), is_average=h != 0, u=u.detach(),
                               target=target)


@attrs.frozen
class OfficialStyleMeanFlow(PortStyleMeanFlow):
    """MeanFlow as the official PyTorch loss computes it (benchmark baseline, not a recipe
    component): one ``torch.func.jvp`` over the whole batch with autocast off and float32 inputs;
    its primal output is the prediction (it carries the gradient) and its tangent du/dt enters
    the target. Same target as ``meanflow`` (Kim et al. 2025, Eq. 4), guidance on every sample."""

    def __call__(self, net, x, y, t, r, noise, *, progress, ema_net=None, generator=None):
        z, h, y, v_g = self.guided_inputs(net, x, y, t, r, noise, generator)
        f32 = [a.to(torch.promote_types(a.dtype, torch.float32)) for a in (z, t, h, v_g)]
        ones = torch.ones_like(f32[1])
        with torch.autocast(z.device.type, enabled=False):
            u, dudt = torch.func.jvp(lambda a, b, c: net(a, b, c, y), tuple(f32[:3]),
                                     (f32[3], ones, ones))
            # MeanFlow target (Kim et al. 2025, Eq. 4)
            target = (f32[3] - as_batch(f32[2], x) * dudt).detach()
        return ObjectiveOutput(err=sum_sq(u - target), is_average=h != 0, u=u.detach(),
                               target=target)


# -- setup ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*",
                   help="dotted recipe overrides, e.g. objective.params.omega=2")
    p.add_argument("--backbone", help="backbone name instead of the recipe's (e.g. dit_b_4)")
    p.add_argument("--input-shape", help="sample shape, e.g. 4,32,32 (default: the dataset's)")
    p.add_argument("--num-classes", help="number of classes, or 'none' (default: the dataset's)")
    p.add_argument("--batch", type=int, help="batch size (default: the recipe's micro batch)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: autocast on CUDA, parameters stay fp32 (as train.precision)")
    p.add_argument("--fm-ratio", type=float, help="share of r = t samples (default: the recipe's)")
    p.add_argument("--avg-share", type=float,
                   help="exactly round(F x batch) r != t rows in every step (instead of the "
                        "sampler's random count): the rest get r = t")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network's forward and forward_jvp in every variant, as "
                        "train.compile does")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement (one process per variant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        p.error(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    args.variant_list = names
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    if args.dtype == "bf16" and args.device != "cuda":
        p.error("--dtype bf16 is for CUDA (the training engine autocasts on CUDA only)")
    for name in ("batch", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.avg_share is not None and not 0 <= args.avg_share <= 1:
        p.error("--avg-share must be in [0, 1]")
    if args.avg_share is not None and args.fm_ratio is not None:
        p.error("--avg-share and --fm-ratio exclude each other (--avg-share fixes the count)")
    return args


def _data_shape(recipe, args) -> tuple[tuple[int, ...], Optional[int]]:
    info = None
    if args.input_shape is None or args.num_classes is None:
        factory = registry.DATASETS.get(recipe.data.name, where="data.name")
        info = rbuild._static_data_info(factory, recipe.data.params)
        if info is None:
            raise RecipeError(f"dataset {recipe.data.name!r} does not say its sample shape "
                              f"without reading the data; pass --input-shape C,H,W (or D) and "
                              f"--num-classes K (or 'none')", path="data.name")
    try:
        shape = (tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape
                 else tuple(info.sample_shape))
    except ValueError as err:
        raise RecipeError(f"--input-shape {args.input_shape!r} must be integers separated by "
                          f"commas, e.g. 4,32,32") from err
    if args.num_classes is None:
        classes = info.num_classes
    elif args.num_classes.lower() == "none":
        classes = None
    else:
        try:
            classes = int(args.num_classes)
        except ValueError as err:
            raise RecipeError(f"--num-classes {args.num_classes!r} must be an integer or "
                              f"'none'") from err
    return shape, classes


def build_setup(args) -> dict[str, Any]:
    """Recipe, parts, batch, and one objective per variant."""
    overrides = list(args.overrides)
    if args.backbone:
        overrides.append(f"backbone.name={args.backbone}")
    if args.fm_ratio is not None:
        overrides.append(f"timestep_sampler.params.fm_ratio={args.fm_ratio}")
    if args.avg_share is not None:  # every pair r != t; Runner.step sets r = t on the rest
        overrides.append("timestep_sampler.params.fm_ratio=0.0")
    recipe, _ = load_recipe(args.recipe, overrides)
    rbuild.load_imports(recipe)
    plugins.load_components()
    shape, classes = _data_shape(recipe, args)
    device = torch.device(args.device)
    parts = rbuild.build_light(recipe, num_classes=classes, device=device)
    torch.manual_seed(args.seed)
    info = attrs.make_class("Info", ["sample_shape", "num_classes"])(shape, classes)
    net = rbuild.build_backbone(recipe, info).to(device)

    params = dict(recipe.objective.params) if recipe.objective.name in (
        "meanflow", "alphaflow", "discrete_meanflow") else {}
    mf_fields = {f.name for f in attrs.fields(MeanFlow) if f.init}
    mf_params = {k: v for k, v in params.items() if k in mf_fields
                 and k not in ("selective", "jvp_impl", "num_classes")}
    port_fields = {f.name for f in attrs.fields(PortStyleMeanFlow)}
    port_params = {k: v for k, v in mf_params.items() if k in port_fields}
    dropout = float(mf_params.get("class_dropout", 0.0))
    objectives = {
        "flow_matching": FlowMatching(class_dropout=dropout, num_classes=classes),
        "meanflow_official": OfficialStyleMeanFlow(num_classes=classes, **port_params),
        "meanflow_port": PortStyleMeanFlow(num_classes=classes, **port_params),
        "meanflow_torch_func": MeanFlow(jvp_impl="torch_func", num_classes=classes, **mf_params),
        "meanflow_manual_split": MeanFlow(jvp_impl="manual", num_classes=classes, **mf_params),
        "meanflow_manual": MeanFlow(jvp_impl="manual", num_classes=classes, **mf_params),
    }
    batch = args.batch or recipe.train.micro_batch_size or recipe.train.global_batch_size
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(batch, *shape, generator=g).to(device)
    y = (torch.randint(0, classes, (batch,), generator=g).to(device)
         if classes is not None else None)
    return {"recipe": recipe, "parts": parts, "net": net, "objectives": objectives,
            "x": x, "y": y, "shape": shape, "classes": classes, "batch": batch,
            "device": device, "params": mf_params}


class Runner:
    """One variant: its own network copy, optimiser and objective."""

    def __init__(self, name: str, setup: dict, args):
        self.name, self.setup, self.args = name, setup, args
        self.net = copy.deepcopy(setup["net"])
        if name == "meanflow_manual_split":
            self.net.jvp_leading_rows = False  # forces a separate forward for the r = t rows
        if args.compile:  # what train.compile does
            compile_backbone(self.net)
        train = setup["recipe"].train
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=train.lr, betas=tuple(train.betas),
                                     weight_decay=train.weight_decay)
        self.objective = setup["objectives"][name]
        self.avg_rows: list[int] = []

    def step(self, i: int) -> None:
        s, parts, dev = self.setup, self.setup["parts"], self.setup["device"]
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + 17 * i)
        t, r = parts.timestep_sampler.sample(s["batch"], progress=PROGRESS, generator=g,
                                                device=dev)
        if self.args.avg_share is not None:
            n = round(self.args.avg_share * s["batch"])
            r = torch.cat([r[:n], t[n:]])
        noise = torch.randn(s["x"].shape, generator=g).to(dev)
        dropout = torch.Generator(device=dev).manual_seed(i)
        with _autocast(self.args):
            out = self.objective(self.net, s["x"], s["y"], t, r, noise, progress=PROGRESS,
                                 generator=dropout)
        err = out.err.float()
        w = parts.loss_weighting.weights(err, t, r) * parts.gap_schedule.weights(
            t, r, PROGRESS)
        (w.detach() * err).mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.avg_rows.append(int((t != r).sum()))


def _autocast(args):
    if args.dtype == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(args.device, enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing ---------------------------------------------------------------------------------------

def time_variants(setup: dict, args, keep_runners: bool = False):
    """Per-variant medians; with ``keep_runners`` also the warmed-up runners (for
    ``measure_memory_in_process``)."""
    runners, results = {}, {}
    for name in args.variant_list:
        try:
            runner = Runner(name, setup, args)
            t0 = time.perf_counter()
            for i in range(args.warmup):
                runner.step(-1 - i)
            _sync(setup["device"])
            runners[name] = runner
            results[name] = {"warmup_s": time.perf_counter() - t0, "wall_s": [], "cpu_s": []}
        except Exception as err:  # noqa: BLE001  (record why a variant cannot run, e.g. compile)
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    order = list(runners)
    for i in range(args.repeats):
        shift = i % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            _sync(setup["device"])
            w0, c0 = time.perf_counter(), time.process_time()
            runners[name].step(i)
            _sync(setup["device"])
            results[name]["wall_s"].append(time.perf_counter() - w0)
            results[name]["cpu_s"].append(time.process_time() - c0)
    for name in order:
        r = results[name]
        r["time_s"] = statistics.median(r.pop("wall_s"))
        r["cpu_time_s"] = statistics.median(r.pop("cpu_s"))
        rows = runners[name].avg_rows[-args.repeats:] if args.repeats else []
        r["avg_share"] = sum(rows) / max(len(rows) * setup["batch"], 1)
    return (results, runners) if keep_runners else results


# -- memory ---------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def measure_memory_here(name: str, setup: dict, args) -> dict[str, int]:
    """Peak memory of one step of ``name`` in this process (after warm-up)."""
    runner = Runner(name, setup, args)
    for i in range(max(args.warmup, 1)):
        runner.step(-1 - i)
    return step_memory(runner, setup["device"])


def step_memory(runner: Runner, dev: torch.device) -> dict[str, int]:
    """Peak memory of one step of a warmed-up ``runner`` (see the module docstring)."""
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        runner.step(0)
        _sync(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {"step_bytes": peak - before, "peak_bytes": peak}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _status_kib("VmRSS")
    runner.step(0)
    peak = _status_kib("VmHWM")
    return {"step_bytes": (peak - before) * 1024, "peak_bytes": peak * 1024}


def measure_memory_in_process(runners: dict[str, Runner], setup: dict) -> dict[str, dict]:
    """``step_memory`` of each timed runner in this process: exact on CUDA (allocated bytes);
    on a CPU the allocator's cache blurs it (the fresh-process ``measure_memory`` does not)."""
    return {name: step_memory(runner, setup["device"]) for name, runner in runners.items()}


def measure_memory(args, argv: list[str]) -> dict[str, dict[str, Any]]:
    """One fresh process per variant (see the module docstring)."""
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(_MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_="0",
               MALLOC_TOP_PAD_="0")
    for name in args.variant_list:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-child", name]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            out[name] = {"memory_error": tail[:300]}
        else:
            out[name] = json.loads(lines[-1])
    return out


# -- report ---------------------------------------------------------------------------------------

def summarise(setup: dict, args, times: dict, memory: dict) -> dict[str, Any]:
    variants = {name: {**times.get(name, {}), **memory.get(name, {})}
                for name in args.variant_list}
    fm = variants.get("flow_matching", {})
    for v in variants.values():
        if "time_s" in v and "time_s" in fm:
            v["time_ratio"] = v["time_s"] / fm["time_s"]
            v["cpu_time_ratio"] = v["cpu_time_s"] / fm["cpu_time_s"]
        if "step_bytes" in v and fm.get("step_bytes"):
            v["memory_ratio"] = v["step_bytes"] / fm["step_bytes"]
            v["peak_ratio"] = v["peak_bytes"] / fm["peak_bytes"]
    mf = {k: v for k, v in variants.items() if k.startswith("meanflow") and "time_s" in v}
    best = min(mf, key=lambda k: mf[k]["time_s"]) if mf else None
    b = variants.get(best, {})
    sampler = setup["recipe"].timestep_sampler
    return {
        "recipe": args.recipe, "backbone": setup["recipe"].backbone.name,
        "input_shape": list(setup["shape"]), "num_classes": setup["classes"],
        "batch": setup["batch"], "fm_ratio": sampler.params.get("fm_ratio"),
        "meanflow_params": setup["params"], "device": args.device, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
        "compile": args.compile, "torch": torch.__version__, "machine": platform.processor()
        or platform.machine(),
        "best_variant": best,
        "time_ratio": b.get("time_ratio"), "memory_ratio": b.get("memory_ratio"),
        "fm_time_s": fm.get("time_s"), "best_time_s": b.get("time_s"),
        "fm_step_bytes": fm.get("step_bytes"), "best_step_bytes": b.get("step_bytes"),
        "variants": variants,
    }


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def print_table(res: dict) -> None:
    print(f"{res['recipe']}: {res['backbone']} {tuple(res['input_shape'])}, "
          f"{res['num_classes']} classes, batch {res['batch']}, fm_ratio {res['fm_ratio']}, "
          f"{res['device']} {res['dtype']}, {res['threads']} threads, median of "
          f"{res['repeats']} after {res['warmup']} warm-up"
          + (" (compiled)" if res["compile"] else ""))
    print(f"{'variant':24s} {'ms/step':>9s} {'x FM':>6s} {'cpu x FM':>8s} {'step MiB':>9s} "
          f"{'x FM':>6s}  r!=t")
    for name, v in res["variants"].items():
        if "error" in v:
            print(f"{name:24s} failed: {v['error']}")
            continue
        mib = v["step_bytes"] / 2**20 if "step_bytes" in v else None
        print(f"{name:24s} {_fmt(v.get('time_s', 0) * 1e3, '9.1f')} "
              f"{_fmt(v.get('time_ratio'), '6.2f')} {_fmt(v.get('cpu_time_ratio'), '8.2f')} "
              f"{_fmt(mib, '9.1f')} {_fmt(v.get('memory_ratio'), '6.2f')}  "
              f"{_fmt(v.get('avg_share'), '.2f')}"
              + (f"  memory: {v['memory_error']}" if "memory_error" in v else ""))
    print(f"best MeanFlow variant: {res['best_variant']}, time x{_fmt(res['time_ratio'], '.3f')}, "
          f"memory x{_fmt(res['memory_ratio'], '.3f')} (over flow matching)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        setup = build_setup(args)
        if args.memory_child:
            print(json.dumps(measure_memory_here(args.memory_child, setup, args)))
            return 0
        times = time_variants(setup, args)
        parent_argv = [a for a in argv if a != "--json"]
        memory = measure_memory(args, parent_argv) if args.memory else {}
    except MfrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    res = summarise(setup, args, times, memory)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
