"""Loading recipes: YAML files, ``base:`` inheritance, dotted command-line overrides.

Merge rules (DESIGN.md section 3):
- ``base:`` names one parent file, relative to the file that names it; parents may have parents.
- Mappings merge key by key, the child winning; lists and scalars are replaced.
- A component block (``{name, params}``) whose ``name`` changes is replaced, not merged: the old
  component's params mean nothing to the new one. The same holds for an override
  ``timestep_sampler.name=uniform``: the params go back to the new component's defaults.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Iterable

import yaml

from mfrecipes.errors import RecipeError
from mfrecipes.recipe.schema import COMPONENT_SECTIONS, Recipe


def read_yaml(path: str, *, where: str | None = None) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file {path!r} does not exist", path=where)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}", path=where) from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level, got "
                          f"{type(data).__name__}", path=where)
    return data


def deep_merge(parent: dict, child: dict, *, top: bool = True) -> dict:
    """Child over parent; top-level component blocks that change name are replaced."""
    out = copy.deepcopy(parent)
    for key, value in child.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if (top and key in COMPONENT_SECTIONS and "name" in value
                    and value["name"] != old.get("name")):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = deep_merge(old, value, top=False)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(path: str, _chain: tuple[str, ...] = ()) -> dict:
    """The merged mapping of ``path`` and its ``base:`` ancestors (``base`` removed)."""
    real = os.path.realpath(path)
    if real in _chain:
        raise RecipeError(f"base: cycle {' -> '.join(_chain + (real,))}", path="base")
    data = read_yaml(path, where="base" if _chain else None)
    base = data.pop("base", None)
    if base is None:
        merged = data
    else:
        if not isinstance(base, str):
            raise RecipeError(f"base must be a path (relative to {path}), got {base!r}",
                              path="base")
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base)
        if not os.path.isfile(base_path):
            raise RecipeError(f"base file {base!r} not found (looked for {base_path}, relative to "
                              f"{path})", path="base")
        merged = deep_merge(load_raw(base_path, _chain + (real,)), data)
    # `imports:` paths are relative to the file that names them.
    if "imports" in data and isinstance(data["imports"], list):
        here = os.path.dirname(os.path.abspath(path))
        merged["imports"] = [os.path.join(here, m) if isinstance(m, str) and m.endswith(".py")
                             and not os.path.isabs(m) else m for m in data["imports"]]
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=2e-4`` -> (["train", "lr"], 0.0002); values are parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} must look like key.path=value "
                          f"(e.g. train.lr=2e-4)", path=None)
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise RecipeError(f"override {text!r}: empty key path", path=key or None)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({err})",
                          path=key) from err
    # YAML 1.1 reads 2e-4 as a string (no dot before the exponent); numbers are meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else int(value)
        except ValueError:
            pass
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(parts[:i + 1])} is a "
                                  f"{type(nxt).__name__}, not a mapping",
                                  path=".".join(parts[:i + 1]))
            node = nxt
        last = parts[-1]
        # Changing a component's name resets its params to the new component's defaults.
        if (len(parts) == 2 and parts[0] in COMPONENT_SECTIONS and last == "name"
                and node.get("name") != value):
            node["params"] = {}
        node[last] = value
    return out


def load_recipe(path: str, overrides: Iterable[str] = ()) -> tuple[Recipe, dict]:
    """Load, merge and override a recipe; return (typed Recipe, resolved plain mapping)."""
    raw = apply_overrides(load_raw(path), overrides)
    recipe = Recipe.from_dict(raw)
    return recipe, recipe.to_dict()


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
