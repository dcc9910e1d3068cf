"""Parameter validators for the training-signal components (samplers, weightings, gap schedules).

attrs validators that raise ``ValueError`` with the parameter name, the value and the valid range;
the recipe builder adds the dotted path (``timestep_sampler.params``).
"""
from __future__ import annotations

import math
from typing import Any


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False):
    """A finite real number in the interval ``[lo, hi]`` (``(`` / ``)`` where open)."""
    interval = (("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}") + ", "
                + ("inf" if hi is None else f"{hi:g}") + (")" if hi_open else "]"))

    def check(_inst, attribute, value):
        ok = _is_number(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            got = f"{type(value).__name__} {value!r}" if not _is_number(value) else repr(value)
            raise ValueError(f"{attribute.name} must be a number in {interval}, got {got}")

    return check


def optional_number(lo: float | None = None, hi: float | None = None, **kw):
    """``None`` or a number as in :func:`number`."""
    inner = number(lo, hi, **kw)

    def check(inst, attribute, value):
        if value is not None:
            inner(inst, attribute, value)

    return check


def integer(lo: int | None = None, hi: int | None = None):
    """An integer in ``[lo, hi]`` (either end may be open: None)."""
    def check(_inst, attribute, value):
        if (isinstance(value, bool) or not isinstance(value, int)
                or (lo is not None and value < lo) or (hi is not None and value > hi)):
            valid = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{attribute.name} must be an integer {valid}, got "
                             f"{type(value).__name__} {value!r}")

    return check


def one_of(*choices: str):
    """One of the given strings."""
    def check(_inst, attribute, value):
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(map(repr, choices))}, "
                             f"got {value!r}")

    return check


def as_tuple(value: Any) -> Any:
    """Converter: a YAML list becomes a tuple (hashable, frozen); anything else is left for the
    validator to reject."""
    return tuple(value) if isinstance(value, list) else value
