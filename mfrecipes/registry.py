"""Registries: one per component kind, all declared here, side by side.

A registry maps a stable snake_case name (public API, used by recipes) to a class or a factory.
Built-ins and plugins register the same way::

    @TIMESTEP_SAMPLERS.register("logit_normal")
    class LogitNormal: ...

and recipes build them from a ``{"name": ..., "params": {...}}`` block::

    TIMESTEP_SAMPLERS.build({"name": "logit_normal", "params": {"mu": -0.4}}, device=dev)

Runtime wiring (device, num_classes, the sampler a schedule depends on, ...) is offered as keyword
arguments to ``build``; a component receives only those it names in its signature, so a sampler
never sees the device unless it asks for it. A recipe may not set a runtime argument itself: that
number has one source of truth elsewhere.

This module only declares: it imports no component package and no plugin. Whoever resolves names
(recipe build and validation, ``mfr list``, export, evaluation) first calls
``mfrecipes.plugins.load_components()``, which imports the built-ins and the entry-point plugins
once; a lookup before that sees only what has been imported, and an unknown-name error says so.

Storage and lookup sit on mmengine's ``Registry`` through its public API (``register_module``,
``get``; no scope inference: every registry is created with an explicit scope and no parent);
naming, duplicate detection, provenance, error messages and build are ours, because the contract
asks for errors that list names and both origins.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from mmengine.registry import Registry as _MMRegistry

from mfrecipes.errors import RecipeError

__all__ = [
    "Registry",
    "RegistryEntry",
    "BACKBONES",
    "OBJECTIVES",
    "TIMESTEP_SAMPLERS",
    "LOSS_WEIGHTINGS",
    "GAP_SCHEDULES",
    "DATASETS",
    "LOGGERS",
    "TRANSFORMS",
    "ALL_REGISTRIES",
    "attributed_to",
    "record_loaded",
]


class RegistryEntry:
    """One registered name: the object plus where it came from."""

    __slots__ = ("name", "obj", "origin", "kind")

    def __init__(self, name: str, obj: Callable, origin: str, kind: str):
        self.name, self.obj, self.origin, self.kind = name, obj, origin, kind

    def parameters(self) -> dict[str, Any]:
        """Recipe parameters (keyword arguments) with their defaults; ``...`` marks required."""
        return {p.name: (... if p.default is inspect.Parameter.empty else p.default)
                for p in _signature_params(self.obj)}

    def summary(self) -> str:
        doc = inspect.getdoc(self.obj) or ""
        return doc.splitlines()[0] if doc else ""


def _signature_params(obj: Callable) -> list[inspect.Parameter]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    params = [p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if inspect.isclass(obj) and params and params[0].name == "self":
        params = params[1:]
    return params


# What the component loader told us: the plugin being imported now (registrations made during
# that import are attributed to its distribution), the plugins loaded, and whether it ran.
_loader: dict = {"current": None, "plugins": [], "ran": False}


@contextlib.contextmanager
def attributed_to(plugin: str) -> Iterator[None]:
    """Registrations inside this block name ``plugin`` in their origin (the plugin loader)."""
    _loader["current"] = plugin
    try:
        yield
    finally:
        _loader["current"] = None


def record_loaded(plugin_names: Iterable[str], *, builtins: bool = False) -> None:
    """The component loader reports the plugins loaded (for the unknown-name message) and, with
    ``builtins``, that the built-in components are loaded too."""
    _loader["plugins"] = list(plugin_names)
    _loader["ran"] = _loader["ran"] or builtins


class Registry:
    """Names -> components of one kind, with provenance and helpful errors."""

    def __init__(self, kind: str, runtime_args: Iterable[str] = ()):
        self.kind = kind
        # Runtime arguments this kind's components may receive from the builder (documentation and
        # the guard against recipes setting them).
        self.runtime_args = tuple(runtime_args)
        self._mm = _MMRegistry(kind, scope="mfrecipes")
        self._entries: dict[str, RegistryEntry] = {}

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator registering a class or factory under an explicit snake_case ``name``."""
        if not isinstance(name, str) or not name or not name.replace("_", "a").isalnum() \
                or name != name.lower():
            raise ValueError(f"{self.kind}: register() needs an explicit snake_case name, "
                             f"got {name!r}")

        def deco(obj: Callable) -> Callable:
            origin = getattr(obj, "__module__", "?") + "." + getattr(obj, "__qualname__", "?")
            if _loader["current"]:
                origin = f"{origin} (plugin {_loader['current']})"
            old = self._entries.get(name)
            if old is not None:
                if old.obj is obj:  # the same module imported twice (e.g. under two names)
                    return obj
                raise ValueError(f"duplicate {self.kind} name {name!r}: already registered by "
                                 f"{old.origin}, registered again by {origin}")
            self._entries[name] = RegistryEntry(name, obj, origin, self.kind)
            self._mm.register_module(name=name, module=obj)
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove a name (tests and interactive use)."""
        if self._entries.pop(name, None) is None:
            return
        self._mm = _MMRegistry(self.kind, scope="mfrecipes")  # mmengine has no public removal
        for entry in self._entries.values():
            self._mm.register_module(name=entry.name, module=entry.obj)

    # -- lookup -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[RegistryEntry]:
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str, *, where: str | None = None) -> RegistryEntry:
        if name not in self._entries:
            raise RecipeError(self.unknown_message(name), path=where)
        return self._entries[name]

    def get(self, name: str, *, where: str | None = None) -> Callable:
        self.entry(name, where=where)
        return self._mm.get(name)

    def unknown_message(self, name: Any) -> str:
        names = sorted(self._entries)
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        msg = f"unknown {self.kind} {name!r}"
        if close:
            msg += f"; did you mean {', '.join(map(repr, close))}?"
        msg += f"\n  available: {', '.join(names) if names else '(none)'}"
        loaded = _loader["plugins"]
        msg += "\n  plugins loaded: " + (", ".join(loaded) if loaded else "none")
        if not _loader["ran"]:
            msg += ("\n  built-ins and plugins are not loaded yet: call "
                    "mfrecipes.plugins.load_components() before resolving names")
        return msg

    # -- build --------------------------------------------------------------------------------
    def check_params(self, cfg: Mapping[str, Any], *, where: str | None = None) -> None:
        """Validate a ``{name, params}`` block against the component's signature (no building)."""
        name, params = _split_block(cfg, where)
        entry = self.entry(name, where=f"{where}.name" if where else "name")
        sig = {p.name: p for p in _signature_params(entry.obj)}
        accepts_kwargs = _accepts_var_kwargs(entry.obj)
        for key in params:
            path = f"{where}.params.{key}" if where else f"params.{key}"
            if key in self.runtime_args:
                raise RecipeError(f"{key!r} is set by the framework at build time, not by the "
                                  f"recipe", path=path)
            if key not in sig and not accepts_kwargs:
                valid = [k for k in sig if k not in self.runtime_args]
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise RecipeError(f"unknown parameter {key!r} for {self.kind} {name!r}{hint}\n"
                                  f"  valid: {', '.join(valid) or '(none)'}", path=path)
        missing = [p.name for p in sig.values() if p.default is inspect.Parameter.empty
                   and p.name not in params and p.name not in self.runtime_args]
        if missing:
            raise RecipeError(f"{self.kind} {name!r} needs parameter(s) "
                              f"{', '.join(missing)}", path=f"{where}.params" if where else None)

    def build(self, cfg: Mapping[str, Any], *, where: str | None = None, **runtime: Any) -> Any:
        """Build ``{"name": ..., "params": {...}}``; runtime kwargs go to those who name them."""
        self.check_params(cfg, where=where)
        name, params = _split_block(cfg, where)
        obj = self.get(name)
        names = {p.name for p in _signature_params(obj)}
        wanted = {k: v for k, v in runtime.items() if k in names}
        try:
            return obj(**params, **wanted)
        except (TypeError, ValueError) as err:
            raise RecipeError(f"cannot build {self.kind} {name!r}: {err}",
                              path=f"{where}.params" if where else None) from err

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} names)"


def _accepts_var_kwargs(obj: Callable) -> bool:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return False


def _split_block(cfg: Any, where: str | None) -> tuple[str, dict]:
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise RecipeError("a component block must be a mapping {name: ..., params: {...}}",
                          path=where)
    extra = set(cfg) - {"name", "params"}
    if extra:
        raise RecipeError(f"unknown key(s) {sorted(extra)} in a component block; valid: name, "
                          f"params", path=where)
    params = cfg.get("params") or {}
    if not isinstance(params, Mapping):
        raise RecipeError("params must be a mapping", path=f"{where}.params" if where else None)
    if not isinstance(cfg["name"], str):
        raise RecipeError(f"name must be a string, got {cfg['name']!r}",
                          path=f"{where}.name" if where else None)
    return cfg["name"], dict(params)


BACKBONES = Registry("backbone", runtime_args=("input_shape", "num_classes"))
OBJECTIVES = Registry("objective", runtime_args=("num_classes",))
TIMESTEP_SAMPLERS = Registry("timestep_sampler", runtime_args=("device",))
LOSS_WEIGHTINGS = Registry("loss_weighting", runtime_args=("timestep_sampler",))
GAP_SCHEDULES = Registry("gap_schedule", runtime_args=("timestep_sampler",))
DATASETS = Registry("dataset", runtime_args=("seed", "rank", "world_size", "cache_dir"))
LOGGERS = Registry("logger", runtime_args=("run_dir",))
TRANSFORMS = Registry("transform")  # training-time data transforms (train.augment)

# -- what a recipe's ``train.loggers`` means (the recipe checker and the run logger both ask) --
def default_loggers() -> tuple[str, ...]:
    """What a recipe without ``train.loggers`` gets: jsonl, and tensorboard when it is
    registered (``mfrecipes.train.log``, a built-in) and its package is installed."""
    if "tensorboard" in LOGGERS.names() and not LOGGERS.get("tensorboard").missing():
        return ("jsonl", "tensorboard")
    return ("jsonl",)


def logger_blocks(loggers: Sequence[Any] | None,
                  where: str = "train.loggers") -> list[tuple[str, dict]]:
    """``train.loggers`` as ``(dotted path, {name, params})`` pairs, checked against LOGGERS:
    known names, valid params, installed packages, and ``jsonl`` present (it is the record)."""
    if loggers is None:
        loggers = default_loggers()
    blocks, seen = [], set()
    for i, item in enumerate(loggers):
        path = f"{where}[{i}]"
        block = {"name": item, "params": {}} if isinstance(item, str) else item.as_dict()
        LOGGERS.check_params(block, where=path)
        if block["name"] in seen:
            raise RecipeError(f"logger {block['name']!r} is listed twice", path=path)
        seen.add(block["name"])
        why = getattr(LOGGERS.get(block["name"]), "missing", lambda: None)()
        if why:
            raise RecipeError(why, path=path)
        blocks.append((path, block))
    if "jsonl" not in seen:
        raise RecipeError("train.loggers must include 'jsonl': metrics.jsonl is the run's record "
                          "(resume, mfr eval and the comparison tools read it)\n  available: "
                          + ", ".join(LOGGERS.names()), path=where)
    return blocks


ALL_REGISTRIES: dict[str, Registry] = {
    "backbone": BACKBONES,
    "objective": OBJECTIVES,
    "timestep_sampler": TIMESTEP_SAMPLERS,
    "loss_weighting": LOSS_WEIGHTINGS,
    "gap_schedule": GAP_SCHEDULES,
    "dataset": DATASETS,
    "logger": LOGGERS,
    "transform": TRANSFORMS,
}
