"""What each component kind promises the training loop, written down once.

Every kind has a ``typing.Protocol`` with its required method (what the loop calls on every step)
and the optional hooks the loop looks for. The loop asks for a hook through the small functions at
the end of the section (:func:`state_of`, :func:`description`, :func:`observer`, ...), never by
probing attributes itself, so this module is the one list of what a component may offer.

The output checks (:func:`sampler_checks`, ...) say, for one call's outputs, what was expected and
what came. The recipe builder runs them on a tiny probe batch when it builds the light components,
the trainer on the real batch of the first step of each stage (never later: they cost a few
reductions), and :func:`mfrecipes.testing.check_component` lets a plugin author run them on their
own names. A failed check is one :class:`~mfrecipes.errors.ContractError` naming the component
(kind, registered name), where it came from (module, or plugin distribution) and the expectation.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator, Optional, Protocol, runtime_checkable

import attrs
import torch

from mfrecipes.data.base import Dataset
from mfrecipes.errors import ContractError

__all__ = [
    "TimestepSampler", "LossWeighting", "GapSchedule", "Objective", "Backbone", "Dataset",
    "Stateful", "Describes", "Observes",
    "state_of", "load_state", "description", "observer", "takes_generator", "augment_dim",
    "label_dim", "v_noise",
    "Who", "who", "sampler_checks", "weighting_checks", "gap_checks", "objective_checks",
    "backbone_checks", "enforce",
]


# -- required methods, one protocol per kind ---------------------------------------------------------
class TimestepSampler(Protocol):
    """``sample(B, progress=, generator=, device=) -> (t, r)``: each ``[B]`` float32, finite,
    ``0 <= r <= t <= 1``, drawn only from ``generator`` (reproducible)."""

    def sample(self, batch_size: int, *, progress: float, generator: torch.Generator | None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


class LossWeighting(Protocol):
    """``weights(err, t, r) -> w``: ``[B]``, finite, ``>= 0``, no gradient (the loop detaches)."""

    def weights(self, err: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor: ...


class GapSchedule(Protocol):
    """``weights(t, r, progress) -> w``: ``[B]``, finite, ``>= 0`` and exactly 1 where ``r = t``
    (the flow-matching rows are never rescaled)."""

    def weights(self, t: torch.Tensor, r: torch.Tensor, progress: float) -> torch.Tensor: ...


class Objective(Protocol):
    """``objective(net, x, y, t, r, noise, progress=, ema_net=[, generator=])`` ->
    :class:`~mfrecipes.objectives.base.ObjectiveOutput` with ``err`` and ``is_average`` ``[B]``
    (``err`` carries the graph; a non-finite one is counted and skipped by the loop)."""

    def __call__(self, net: Any, x: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor,
                 r: torch.Tensor, noise: torch.Tensor, *, progress: float,
                 ema_net: Any = None) -> Any: ...


class Backbone(Protocol):
    """An ``nn.Module`` called as ``net(z, t, h, y)`` (``h = t - r``) returning a tensor of
    ``z``'s shape; optional attribute ``augment_dim`` (conditioning labels it takes)."""

    def __call__(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                 y: torch.Tensor | None = None) -> torch.Tensor: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


# ``Dataset`` (re-exported above) is declared beside DataInfo in mfrecipes.data.base.


# -- optional hooks ------------------------------------------------------------------------------
@runtime_checkable
class Stateful(Protocol):
    """Any light component (sampler, weighting, schedule, objective) with state worth a
    checkpoint: ``state_dict()`` is saved with the train state and given back to
    ``load_state_dict`` on resume."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class Describes(Protocol):
    """``describe() -> {key: number}``: logged at the start (sampler, weighting, schedule) and,
    for an observing sampler, at every log line."""

    def describe(self) -> dict: ...


@runtime_checkable
class Observes(Protocol):
    """A sampler that reacts to training: ``observe(loss, progress)`` after every finite update,
    with the mean unweighted error of the ``r = t`` rows."""

    def observe(self, loss: float, progress: float) -> None: ...


def state_of(component: Any) -> Optional[dict]:
    """The component's checkpoint state, or None if it keeps none."""
    return component.state_dict() if isinstance(component, Stateful) else None


def load_state(component: Any, state: Optional[dict]) -> None:
    """Give a saved state back (nothing happens without a state or a ``load_state_dict``)."""
    if state is not None and isinstance(component, Stateful):
        component.load_state_dict(state)


def description(component: Any) -> dict:
    """``describe()``'s record, or ``{}`` for a component without one."""
    return dict(component.describe()) if isinstance(component, Describes) else {}


def observer(component: Any) -> Optional[Observes]:
    """The component if it observes the training loss, else None."""
    return component if isinstance(component, Observes) else None


def takes_generator(objective: Any) -> bool:
    """Whether the objective's call accepts ``generator=`` (its own random stream); one that does
    not draws from torch's global RNG."""
    try:
        params = inspect.signature(objective.__call__).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                        for p in params.values())


def augment_dim(backbone: Any) -> Optional[int]:
    """Conditioning labels a backbone takes from an augmentation (``augment_dim``), or None."""
    return getattr(backbone, "augment_dim", None)


def label_dim(transform: Any) -> Optional[int]:
    """Conditioning labels a training-time transform produces (``label_dim``), or None."""
    return getattr(transform, "label_dim", None)


def v_noise(objective: Any) -> float:
    """The objective's velocity-corruption level (``v_noise``), 0 when it has none."""
    return getattr(objective, "v_noise", 0) or 0


# -- output checks -------------------------------------------------------------------------------
@attrs.frozen
class Who:
    """A component as errors name it."""

    kind: str
    name: str
    origin: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r} (from {self.origin})"


def who(kind: str, name: str) -> Who:
    """The registered component ``name`` of ``kind`` with its origin (``?`` if unregistered)."""
    from mfrecipes.registry import ALL_REGISTRIES

    reg = ALL_REGISTRIES.get(kind)
    origin = reg.entry(name).origin if reg is not None and name in reg else "?"
    return Who(kind, name, origin)


# A check is (what is checked, None when it holds or "expected ..., got ..." when not). A list
# of checks stops at its first failure: later ones assume the earlier held.
Check = tuple[str, Optional[str]]


def _shape(v: Any) -> str:
    if not isinstance(v, torch.Tensor):
        return f"a {type(v).__name__}, not a tensor"
    return f"shape [{', '.join(map(str, v.shape))}]"


def _vector(label: str, v: Any, b: int) -> Check:
    ok = isinstance(v, torch.Tensor) and tuple(v.shape) == (b,)
    return (f"{label} shape [B]", None if ok else f"expected shape [{b}], got {_shape(v)}")


def _finite(label: str, v: torch.Tensor) -> Check:
    bad = ~torch.isfinite(v.detach().float())
    n = int(bad.sum())
    return (f"{label} finite", None if not n else
            f"expected finite values, got {n} of {v.numel()} non-finite "
            f"(first {float(v.detach().float()[bad][0])!r})")


def _nonneg(label: str, v: torch.Tensor) -> Check:
    bad = v.detach() < 0
    n = int(bad.sum())
    return (f"{label} >= 0", None if not n else
            f"expected values >= 0, got {n} negative (min {float(v.detach().min()):.4g})")


def _run(checks: list[Callable[[], Check]]) -> list[Check]:
    """Run lazily built checks in order, stopping after the first failure."""
    out = []
    for make in checks:
        label, problem = make()
        out.append((label, problem))
        if problem is not None:
            break
    return out


def sampler_checks(t: Any, r: Any, batch_size: int) -> list[Check]:
    """``(t, r)`` of a sampler's ``sample(batch_size, ...)``."""
    def order() -> Check:
        bad = ~((0 <= r) & (r <= t) & (t <= 1))
        n = int(bad.sum())
        if not n:
            return ("0 <= r <= t <= 1", None)
        i = int(bad.nonzero()[0, 0])
        return ("0 <= r <= t <= 1", f"expected 0 <= r <= t <= 1 on every row, got {n} rows "
                                    f"outside (row {i}: t={float(t[i]):.4g}, r={float(r[i]):.4g})")

    return _run([lambda: _vector("t", t, batch_size), lambda: _vector("r", r, batch_size),
                 lambda: _finite("t", t), lambda: _finite("r", r), order])


def weighting_checks(w: Any, batch_size: int) -> list[Check]:
    """The weights of a loss weighting's ``weights(err, t, r)``."""
    return _run([lambda: _vector("weights", w, batch_size), lambda: _finite("weights", w),
                 lambda: _nonneg("weights", w)])


def gap_checks(w: Any, t: torch.Tensor, r: torch.Tensor) -> list[Check]:
    """The weights of a gap schedule's ``weights(t, r, progress)``; ``t, r`` the inputs."""
    def one_at_equal() -> Check:
        eq = t == r
        off = eq & ((w - 1).abs() > 1e-6)
        n = int(off.sum())
        return ("weight 1 where r = t", None if not n else
                f"expected weight 1 on the {int(eq.sum())} rows with r = t, got {n} rows "
                f"otherwise (e.g. {float(w[off][0]):.6g})")

    return _run([lambda: _vector("weight", w, t.shape[0]), lambda: _finite("weight", w),
                 lambda: _nonneg("weight", w), one_at_equal])


def objective_checks(out: Any, batch_size: int, *, finite: bool = True) -> list[Check]:
    """An objective's output on a batch of ``batch_size``. ``finite=False`` (the trainer) leaves
    a non-finite ``err`` to the loop, which counts and reports it and skips the update."""
    def has_fields() -> Check:
        missing = [f for f in ("err", "is_average", "diagnostics") if not hasattr(out, f)]
        return ("returns an ObjectiveOutput", None if not missing else
                f"expected an ObjectiveOutput (err, is_average, diagnostics), got "
                f"{type(out).__name__} without {', '.join(missing)}")

    def is_bool() -> Check:
        ok = out.is_average.dtype == torch.bool
        return ("is_average bool", None if ok else
                f"expected dtype torch.bool, got {out.is_average.dtype}")

    checks = [has_fields, lambda: _vector("err", out.err, batch_size),
              lambda: _vector("is_average", out.is_average, batch_size), is_bool,
              lambda: _vector("loss_scale", getattr(out, "loss_scale", None), batch_size)]
    if finite:
        checks += [lambda: _finite("err", out.err), lambda: _nonneg("err", out.err)]
    return _run(checks)


def backbone_checks(u: Any, z: torch.Tensor) -> list[Check]:
    """A backbone's output ``u = net(z, t, h, y)`` for the input ``z``."""
    ok = isinstance(u, torch.Tensor) and u.shape == z.shape
    return [("output shape = input shape", None if ok else
             f"expected shape [{', '.join(map(str, z.shape))}] (the input's), got {_shape(u)}")]


def enforce(component: Who, when: str, checks: list[Check]) -> None:
    """Raise one ContractError for the first failed check (``when``: "at build time", ...)."""
    for label, problem in checks:
        if problem is not None:
            raise ContractError(f"{component} breaks its contract {when}: {label}: {problem}")


def probe_light(sampler: Any, loss_weighting: Any, gap_schedule: Any, *, names: dict[str, Who],
                device: torch.device | str = "cpu", batch_size: int = 8) -> None:
    """The build-time probe: the sampler, weighting and schedule on a tiny batch, at the start
    and the end of training (``progress`` 0 and 1), from a private generator and with torch's
    RNG restored afterwards, so the run's draws are untouched. ``names`` maps
    ``timestep_sampler``, ``loss_weighting``, ``gap_schedule`` to who they are."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    when = f"at build time (probe batch of {batch_size})"
    with torch.random.fork_rng(devices=devices):
        g = torch.Generator().manual_seed(0)
        for progress in (0.0, 1.0):
            t, r = sampler.sample(batch_size, progress=progress, generator=g, device=device)
            enforce(names["timestep_sampler"], f"{when}, progress {progress:g}",
                    sampler_checks(t, r, batch_size))
            r = r.clone()
            r[:2] = t[:2]  # rows with r = t, whatever the sampler's fm_ratio
            err = (torch.rand(batch_size, generator=g) * 2).to(t.device)
            enforce(names["loss_weighting"], when,
                    weighting_checks(loss_weighting.weights(err, t, r), batch_size))
            enforce(names["gap_schedule"], f"{when}, progress {progress:g}",
                    gap_checks(gap_schedule.weights(t, r, progress), t, r))
