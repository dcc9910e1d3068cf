"""Checks of component parameters, in one place.

Three kinds, one module:

- attrs validators (``number``, ``optional_number``, ``integer``, ``one_of``) and the converter
  ``as_tuple``, for the fields of attrs components: they raise ``ValueError`` with the parameter
  name, the value and the valid range; the recipe builder adds the dotted path
  (``timestep_sampler.params``);
- plain checks (``check_real``, ``check_probability``) for components that validate in
  ``__init__`` (the objectives);
- ``check_param_types``: every parameter of a component against its annotated type, before it is
  built, as a ``RecipeError`` at its full key path.
"""
from __future__ import annotations

import math
from typing import Any

from mfrecipes.errors import RecipeError


# -- attrs validators --------------------------------------------------------------------------
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


# -- plain checks ------------------------------------------------------------------------------
def check_real(name: str, value) -> None:
    """A real number (int or float, not bool): the message says which type was expected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def check_probability(name: str, value: float) -> None:
    check_real(name, value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


# -- annotated types ---------------------------------------------------------------------------
def _type_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _expectation(tp: Any):
    """``(accepts(value) -> bool, "what is expected")`` for an annotation, or None when the
    annotation says nothing checkable (the component's own validation decides)."""
    import collections.abc
    import types
    import typing

    if tp is bool:
        return (lambda v: isinstance(v, bool)), "true or false"
    if tp is int:
        # An integral float (YAML's 1e5) is left to the component.
        return (lambda v: not isinstance(v, bool) and (isinstance(v, int) or (
            isinstance(v, float) and v.is_integer()))), "an integer"
    if tp is float:
        return (lambda v: not isinstance(v, bool) and isinstance(v, (int, float))), "a number"
    if tp is str:
        return (lambda v: isinstance(v, str)), "a string"
    if tp is type(None):
        return (lambda v: v is None), "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return (lambda v: any(v == a and type(v) is type(a) for a in args)), \
            f"one of {', '.join(map(repr, args))}"
    if origin in (typing.Union, types.UnionType):
        parts = [_expectation(a) for a in args]
        if any(p is None for p in parts):
            return None
        return (lambda v: any(ok(v) for ok, _ in parts)), " or ".join(d for _, d in parts)
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        item = _expectation(args[0]) if len(args) == 1 or (len(args) == 2 and args[1] is ...) \
            else None
        if item is None:
            return (lambda v: isinstance(v, (list, tuple))), "a list"
        ok_item, what = item
        return (lambda v: isinstance(v, (list, tuple)) and all(ok_item(x) for x in v)), \
            f"a list of {what.removeprefix('an ').removeprefix('a ')}s" \
            if what.startswith(("a ", "an ")) else f"a list (items: {what})"
    if origin in (dict, collections.abc.Mapping) or tp in (dict,):
        return (lambda v: isinstance(v, dict)), "a mapping"
    return None


def _annotation(factory: Any, ann: Any) -> Any:
    """A parameter's annotation as a type: postponed ones (strings) are read in the namespace
    of the module that defines the component or one of its bases; None if none can."""
    import sys

    if not isinstance(ann, str):
        return ann
    owners = factory.__mro__ if isinstance(factory, type) else (factory,)
    for owner in owners:
        module = sys.modules.get(getattr(owner, "__module__", ""))
        if module is None:
            continue
        try:
            return eval(ann, dict(vars(module)))  # noqa: S307 - annotation text of imported code
        except Exception:  # noqa: BLE001 - a name this module lacks: try the next
            continue
    return None


def check_param_types(factory: Any, params: dict, where: str, *, skip=()) -> None:
    """Every parameter of a component against its annotated type: a wrong one is a
    ``RecipeError`` at its full key path saying what was expected and what came
    (``objective.params.beta_cv: expected a number, got 'x' (str)``). The default value (None
    included) is always accepted; annotations that cannot be read are not checked."""
    import inspect

    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    for name, value in params.items():
        p = sig.parameters.get(name)
        if p is None or name in skip or p.annotation is inspect.Parameter.empty:
            continue
        if value is None and p.default is None:
            continue
        want = _expectation(_annotation(factory, p.annotation))
        if want is None or want[0](value):
            continue
        raise RecipeError(f"expected {want[1]}, got {value!r} ({_type_of(value)})",
                          path=f"{where}.{name}")
