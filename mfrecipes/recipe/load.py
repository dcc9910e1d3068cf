"""Loading recipes: YAML files, ``base:`` inheritance, dotted command-line overrides.

Merge rules:
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


# A recipe is a few hundred values a few levels deep; far beyond these is hostile or broken YAML
# (aliases expanding a billion times, recursive aliases, thousands of nested brackets).
MAX_DEPTH = 64
MAX_NODES = 200_000


def safe_yaml(text: str, what: str, where: str | None = None) -> Any:
    """``yaml.safe_load`` that refuses nesting beyond ``MAX_DEPTH`` (before building anything,
    so the recursive composer never overflows), recursive aliases, and documents that expand
    to more than ``MAX_NODES`` values once aliases are followed."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeError(f"{what} nests deeper than {MAX_DEPTH} levels (line "
                                      f"{event.start_mark.line + 1}); a recipe is a few levels "
                                      f"of mappings", path=where)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{what} is not valid YAML: {err}", path=where) from err
    check_size(data, what, where)
    return data


def check_size(data: Any, what: str, where: str | None = None) -> None:
    """Refuse recursive structures, nesting beyond ``MAX_DEPTH`` and more than ``MAX_NODES``
    values counted with aliases expanded (counted, never expanded: shared nodes are memoised)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node, depth: int, path: str) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise RecipeError(f"{what} holds a recursive alias (a value that contains itself)",
                              path=path or where)
        if depth > MAX_DEPTH:
            raise RecipeError(f"{what} nests deeper than {MAX_DEPTH} levels", path=path or where)
        open_.add(key)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        n = 1
        for k, v in items:
            n += size(v, depth + 1, f"{path}.{k}" if path else str(k))
            if n > MAX_NODES:
                raise RecipeError(f"{what} expands to more than {MAX_NODES} values (YAML "
                                  f"aliases repeated over and over?)", path=path or where)
        open_.discard(key)
        sizes[key] = n
        return n

    size(data, 0, "")


def read_yaml(path: str, *, where: str | None = None) -> dict:
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file {path!r} does not exist", path=where)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read {path}: {err}", path=where) from err
    data = safe_yaml(text, path, where)
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
    value = safe_yaml(raw, f"override {text[:80]!r}: the value", key) if raw.strip() else None
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
    check_size(raw, "the recipe with its overrides")  # e.g. 2,000 dotted levels in an override
    recipe = Recipe.from_dict(raw)
    return recipe, recipe.to_dict()


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
