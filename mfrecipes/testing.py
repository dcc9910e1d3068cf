"""Contract checks a plugin author runs on their own components (``mfr check-plugin NAME``).

:func:`check_component` builds one registered component with the given parameters and runs the
checks of its kind (``mfrecipes.contracts``: the same ones the recipe builder and the trainer's
first step run), plus a few that only make sense outside a run (reproducible draws, a gradient
that reaches the network, a JVP through the backbone, a dataset's batches and reference)::

    from mfrecipes.testing import check_component

    results = check_component("loss_weighting", "my_weighting", gamma=0.5)
    assert all(r.ok for r in results), "\\n".join(map(str, results))

Everything runs on the CPU with small batches and fixed seeds; nothing is written except a
dataset's cache, into a temporary directory removed afterwards.
"""
from __future__ import annotations

import shutil
import tempfile
from typing import Any, Callable, Optional

import attrs
import torch

from mfrecipes import contracts
from mfrecipes.errors import MfrError, RecipeError

__all__ = ["CheckResult", "check_component", "kinds_of", "KINDS"]

KINDS = ("timestep_sampler", "loss_weighting", "gap_schedule", "objective", "backbone", "dataset")
CPU = torch.device("cpu")


@attrs.frozen
class CheckResult:
    """One check: what (``label``), whether it held, and if not, why (expected vs got)."""

    component: contracts.Who
    label: str
    problem: Optional[str] = None   # None: passed
    skipped: bool = False           # not run, because an earlier check failed

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.skipped

    def line(self) -> str:
        """``pass|FAIL|skip  label[: problem]`` (the component named elsewhere)."""
        status = "skip" if self.skipped else ("pass" if self.problem is None else "FAIL")
        return f"{status}  {self.label}{f': {self.problem}' if self.problem else ''}"

    def __str__(self) -> str:
        return f"{self.component}: {self.line()}"


def kinds_of(name: str) -> list[str]:
    """The component kinds that register ``name`` (built-ins and plugins loaded)."""
    from mfrecipes.plugins import load_components
    from mfrecipes.registry import ALL_REGISTRIES

    load_components()
    return [k for k in KINDS if name in ALL_REGISTRIES[k]]


def check_component(kind: str, name: str, **params: Any) -> list[CheckResult]:
    """Build ``name`` of ``kind`` with ``params`` and run its kind's contract checks.

    Returns one :class:`CheckResult` per check, in order; after the first failure of a group
    the rest of the group is reported as skipped. An unknown kind or name, or parameters the
    component rejects, is a ``RecipeError``. A backbone also takes ``input_shape`` among
    ``params`` (default ``(2,)`` for a class with ``modality = "points"``, else ``(1, 16, 16)``
    when it builds on that, else ``(2,)``).
    """
    from mfrecipes.plugins import load_components
    from mfrecipes.registry import ALL_REGISTRIES

    if kind not in KINDS:
        raise RecipeError(f"unknown component kind {kind!r}; valid: {', '.join(KINDS)}",
                          path="--kind")
    load_components()
    ALL_REGISTRIES[kind].entry(name, where="name")  # unknown name: the registry's message
    who = contracts.who(kind, name)
    checker = _CHECKERS[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            groups = checker(name, dict(params))
        except MfrError:
            raise
        except Exception as err:  # noqa: BLE001 - a plugin's own bug in building: a failure
            groups = [[("builds", f"expected it to build, got {type(err).__name__}: {err}")]]
    out = []
    for group in groups:
        failed = False
        for label, problem in group:
            out.append(CheckResult(who, label, None if failed else problem, skipped=failed))
            failed = failed or problem is not None
    return out


# -- per kind: each returns groups of checks (a group stops at its first failure) ------------------
Group = list[contracts.Check]


def _built(kind: str, name: str, params: dict, **runtime: Any) -> Any:
    from mfrecipes.registry import ALL_REGISTRIES

    return ALL_REGISTRIES[kind].build({"name": name, "params": params}, where=kind, **runtime)


def _guard(label: str, fn: Callable[[], Group]) -> Group:
    """A group whose calls may raise: an exception is the group's failed check."""
    try:
        return fn()
    except MfrError:
        raise
    except Exception as err:  # noqa: BLE001 - the component's own bug, reported as a failure
        return [(label, f"expected it to run, got {type(err).__name__}: {err}")]


def _reference_sampler():
    return _built("timestep_sampler", "logit_normal", {}, device=CPU)


def _pairs(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t, r = _reference_sampler().sample(n, progress=0.3,
                                       generator=torch.Generator().manual_seed(seed), device=CPU)
    r = r.clone()
    r[:4] = t[:4]  # rows with r = t in any case
    return t, r


def _check_sampler(name: str, params: dict) -> list[Group]:
    s = _built("timestep_sampler", name, params, device=CPU)
    groups = []
    for progress in (0.0, 0.5, 1.0):
        def run(progress=progress) -> Group:
            draw = lambda: s.sample(257, progress=progress,  # noqa: E731
                                    generator=torch.Generator().manual_seed(1), device=CPU)
            t, r = draw()
            group = [(f"progress {progress:g}: {label}", problem)
                     for label, problem in contracts.sampler_checks(t, r, 257)]
            if all(p is None for _, p in group):
                t2, r2 = draw()
                same = torch.equal(t, t2) and torch.equal(r, r2)
                group.append((f"progress {progress:g}: reproducible from the generator",
                              None if same else "expected the same (t, r) from the same "
                                                "generator seed, got different draws"))
            return group
        groups.append(_guard(f"progress {progress:g}: sample()", run))
    return groups


def _check_weighting(name: str, params: dict) -> list[Group]:
    w_ = _built("loss_weighting", name, params, timestep_sampler=_reference_sampler())
    t, r = _pairs()
    err = torch.rand(64, generator=torch.Generator().manual_seed(2)) * 3
    return [_guard("weights()", lambda: contracts.weighting_checks(w_.weights(err, t, r), 64))]


def _check_gap(name: str, params: dict) -> list[Group]:
    g = _built("gap_schedule", name, params, timestep_sampler=_reference_sampler())
    t, r = _pairs()
    return [_guard(f"progress {p:g}: weights()", lambda p=p: [
        (f"progress {p:g}: {label}", problem)
        for label, problem in contracts.gap_checks(g.weights(t, r, p), t, r)])
        for p in (0.0, 0.5, 1.0)]


def _check_objective(name: str, params: dict) -> list[Group]:
    groups = []
    for num_classes in (None, 3):
        obj = _built("objective", name, params, num_classes=num_classes)
        net = _built("backbone", "mlp", {"hidden": 16, "depth": 1}, input_shape=(2,),
                     num_classes=num_classes)
        tag = "unconditional" if num_classes is None else f"{num_classes} classes"

        def run(obj=obj, net=net, num_classes=num_classes, tag=tag) -> Group:
            x, noise = torch.randn(64, 2), torch.randn(64, 2)
            y = torch.randint(0, 3, (64,)) if num_classes else None
            t, r = _pairs()
            out = obj(net, x, y, t, r, noise, progress=0.5, ema_net=None)
            group = [(f"{tag}: {label}", problem)
                     for label, problem in contracts.objective_checks(out, 64)]
            if all(p is None for _, p in group):
                out.err.mean().backward()
                reached = any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                              for p in net.parameters())
                group.append((f"{tag}: err's gradient reaches the network", None if reached else
                              "expected a non-zero gradient on the backbone's parameters, "
                              "got none"))
            return group
        groups.append(_guard(f"{tag}: call", run))
    return groups


def _check_backbone(name: str, params: dict) -> list[Group]:
    from mfrecipes.registry import BACKBONES

    shape = params.pop("input_shape", None)
    if shape is None and getattr(BACKBONES.get(name), "modality", None) == "points":
        shape = (2,)
    if shape is None:
        try:
            with torch.device("meta"):
                _built("backbone", name, dict(params), input_shape=(1, 16, 16), num_classes=None)
            shape = (1, 16, 16)
        except RecipeError:
            shape = (2,)
    shape = tuple(shape)
    groups = []
    for num_classes in (None, 10):
        net = _built("backbone", name, dict(params), input_shape=shape, num_classes=num_classes)
        tag = f"input {'x'.join(map(str, shape))}, " + (
            "unconditional" if num_classes is None else f"{num_classes} classes")

        def run(net=net, num_classes=num_classes, tag=tag) -> Group:
            z = torch.randn(3, *shape)
            t, h = torch.rand(3), torch.rand(3) * 0.5
            y = torch.randint(0, 10, (3,)) if num_classes else None
            u = net(z, t, h, y)
            group = [(f"{tag}: {label}", problem)
                     for label, problem in contracts.backbone_checks(u, z)]
            if group[0][1] is None:
                _, du = torch.func.jvp(lambda z_, t_, h_: net(z_, t_, h_, y), (z, t, h),
                                       (torch.randn_like(z), torch.ones(3), torch.ones(3)))
                ok = du.shape == z.shape and bool(torch.isfinite(du).all())
                group.append((f"{tag}: JVP (torch.func.jvp) has the input's shape, finite",
                              None if ok else f"expected a finite tangent of shape "
                                              f"{list(z.shape)}, got {contracts._shape(du)}"))
            return group
        groups.append(_guard(f"{tag}: forward", run))
    return groups


def _check_dataset(name: str, params: dict) -> list[Group]:
    cache = tempfile.mkdtemp(prefix="mfr-check-")
    try:
        ds = _built("dataset", name, params, seed=0, rank=0, world_size=1, cache_dir=cache)

        def run() -> Group:
            info = ds.info
            x, y = next(iter(ds.batches(8)))
            want = (8, *info.sample_shape)
            group: Group = [("batch x shape [B, *sample_shape] float32",
                             None if isinstance(x, torch.Tensor) and tuple(x.shape) == want
                             and x.dtype == torch.float32 else
                             f"expected float32 of shape {list(want)}, got "
                             f"{contracts._shape(x)}"
                             f"{'' if not isinstance(x, torch.Tensor) else ' ' + str(x.dtype)}")]
            if info.num_classes is None:
                group.append(("labels None (unconditional)", None if y is None else
                              f"expected None (info.num_classes is None), got {contracts._shape(y)}"))
            else:
                ok = (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and
                      tuple(y.shape) == (8,) and bool(((0 <= y) & (y < info.num_classes)).all()))
                group.append((f"labels [B] int64 in [0, {info.num_classes})", None if ok else
                              f"expected int64 [8] in range, got {contracts._shape(y)}"))
            ref = ds.reference(16, seed=0)
            group.append(("reference(n) shape [n, *sample_shape]",
                          None if isinstance(ref, torch.Tensor) and tuple(ref.shape) ==
                          (16, *info.sample_shape) else
                          f"expected shape {[16, *info.sample_shape]}, got {contracts._shape(ref)}"))
            group.append(("counters() a dict", None if isinstance(ds.counters(), dict) else
                          f"expected a dict, got {type(ds.counters()).__name__}"))
            return group
        return [_guard("batches()", run)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)


_CHECKERS: dict[str, Callable[[str, dict], list[Group]]] = {
    "timestep_sampler": _check_sampler,
    "loss_weighting": _check_weighting,
    "gap_schedule": _check_gap,
    "objective": _check_objective,
    "backbone": _check_backbone,
    "dataset": _check_dataset,
}
