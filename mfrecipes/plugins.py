"""Third-party plugins, found through the entry-point group ``mfrecipes.plugins``.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."mfrecipes.plugins"]
    my_plugin = "my_package.components"

and registers components in that module with the ordinary decorators. ``load_plugins()`` imports
each entry point once, records (entry point, distribution, version), skips the names listed in
``MFR_DISABLE_PLUGINS=a,b`` and turns a plugin that fails to import into one error naming it.
A recipe may also list ``imports: [module, ...]`` for local modules (see ``import_modules``).

``load_components()`` is the one explicit load: it imports the built-in component packages
(``BUILTIN_PACKAGES``) and then the plugins, once; recipe building and validation, ``mfr list``,
export and evaluation call it before they resolve a name. The registries themselves
(mfrecipes/registry.py) import nothing of this.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from importlib import metadata

from mfrecipes import registry
from mfrecipes.errors import PluginError

GROUP = "mfrecipes.plugins"
DISABLE_ENV = "MFR_DISABLE_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    name: str          # entry-point name
    value: str         # module path it points to
    distribution: str  # installing distribution, or "?" when unknown
    version: str
    status: str        # "loaded" | "disabled"

    def as_dict(self) -> dict:
        return asdict(self)


# The packages whose import registers the built-in components, in this order.
BUILTIN_PACKAGES = (
    "mfrecipes.backbones",
    "mfrecipes.objectives",
    "mfrecipes.timestep_samplers",
    "mfrecipes.loss_weightings",
    "mfrecipes.gap_schedules",
    "mfrecipes.data",
    "mfrecipes.train.log",
)

_state: dict = {"loaded": None, "imported_modules": [], "components": False}


def load_components() -> list["PluginInfo"]:
    """Import the built-in components, then the entry-point plugins; each only once (later
    calls return at once). Returns the plugins' provenance (``load_plugins``)."""
    if not _state["components"]:
        for mod in BUILTIN_PACKAGES:
            importlib.import_module(mod)
        infos = load_plugins()
        registry.record_loaded((p.name for p in infos if p.status == "loaded"), builtins=True)
        _state["components"] = True
    return all_plugins()


def _disabled() -> set[str]:
    return {s.strip() for s in os.environ.get(DISABLE_ENV, "").split(",") if s.strip()}


def load_plugins(*, reload: bool = False) -> list[PluginInfo]:
    """Import every ``mfrecipes.plugins`` entry point once; return their provenance."""
    if _state["loaded"] is not None and not reload:
        return _state["loaded"]
    infos: list[PluginInfo] = []
    disabled = _disabled()
    eps = sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name)
    seen: set[str] = set()
    for ep in eps:
        if ep.name in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.name)
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        if ep.name in disabled:
            infos.append(PluginInfo(ep.name, ep.value, dist_name, version, "disabled"))
            continue
        try:
            with registry.attributed_to(f"{ep.name} from {dist_name} {version}"):
                ep.load()
        except Exception as err:  # noqa: BLE001 - any import failure is the plugin's, name it
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}, distribution {dist_name} {version}) failed to "
                f"import: {type(err).__name__}: {err}\n  disable it with "
                f"{DISABLE_ENV}={ep.name} or fix/uninstall the distribution") from err
        infos.append(PluginInfo(ep.name, ep.value, dist_name, version, "loaded"))
    _state["loaded"] = infos
    registry.record_loaded(p.name for p in infos if p.status == "loaded")
    return infos


def loaded_plugins() -> list[PluginInfo]:
    """Plugins imported so far (empty before ``load_plugins``)."""
    return [p for p in (_state["loaded"] or []) if p.status == "loaded"]


def all_plugins() -> list[PluginInfo]:
    return list(_state["loaded"] or [])


def import_modules(modules: list[str], *, base_dir: str | None = None,
                   where: str = "imports") -> None:
    """Import a recipe's local ``imports:`` modules (a dotted name or a ``.py`` path)."""
    from mfrecipes.errors import RecipeError

    for i, mod in enumerate(modules):
        path = f"{where}[{i}]"
        try:
            if mod.endswith(".py"):
                file = mod if os.path.isabs(mod) or base_dir is None else os.path.join(base_dir, mod)
                if not os.path.exists(file):
                    raise RecipeError(f"module file {file!r} does not exist", path=path)
                name = "mfr_local_" + os.path.splitext(os.path.basename(file))[0]
                if name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(name, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                if base_dir and base_dir not in sys.path:
                    sys.path.insert(0, base_dir)
                importlib.import_module(mod)
        except RecipeError:
            raise
        except Exception as err:  # noqa: BLE001
            raise RecipeError(f"cannot import {mod!r}: {type(err).__name__}: {err}",
                              path=path) from err
        _state["imported_modules"].append(mod)


def imported_modules() -> list[str]:
    return list(_state["imported_modules"])
