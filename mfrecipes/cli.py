"""The ``mfr`` command: run | check | show | list.

Every error a user can cause ends in one message (what, where, what would be valid) on stderr and a
non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from mfrecipes.errors import MfrError, RecipeError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mfr", description="Train one-step generative models with MeanFlow recipes.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="train a recipe (or resume a run directory)")
    run.add_argument("recipe", help="recipe YAML, or an existing run directory to resume")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4")
    run.add_argument("--out", help="run directory (default: runs/<run.name>)")

    check = sub.add_parser("check", help="validate a recipe without training")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*")

    show = sub.add_parser("show", help="print the resolved recipe")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")

    lst = sub.add_parser("list", help="list registered components")
    lst.add_argument("kind", nargs="?", help="backbone, objective, timestep_sampler, "
                                             "loss_weighting, gap_schedule or dataset")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _resolve_recipe_arg(path: str, overrides: Sequence[str]):
    """A recipe file, or a run directory (its recipe.resolved.yaml)."""
    from mfrecipes.recipe import load_recipe
    from mfrecipes.train.rundir import RESOLVED

    if os.path.isdir(path):
        resolved = os.path.join(path, RESOLVED)
        if not os.path.isfile(resolved):
            raise RecipeError(f"{path} is a directory but not a run directory (no {RESOLVED}); "
                              f"pass a recipe .yaml file or a run directory")
        recipe, data = load_recipe(resolved, overrides)
        return recipe, data, path
    if not path.endswith((".yaml", ".yml")) and not os.path.exists(path):
        raise RecipeError(f"recipe {path!r} does not exist (expected a .yaml file or a run "
                          f"directory)")
    recipe, data = load_recipe(path, overrides)
    return recipe, data, None


def cmd_check(args) -> int:
    from mfrecipes.recipe.build import check_recipe

    recipe, _, _ = _resolve_recipe_arg(args.recipe, args.overrides)
    parts = check_recipe(recipe)
    print(f"ok: {args.recipe} ({recipe.run.name}: {recipe.data.name} -> {recipe.backbone.name}, "
          f"{recipe.objective.name}, {recipe.train.total_images} images)")
    for name, comp in parts.items():
        print(f"  {name}: {_one_line(comp)}")
    return 0


def _one_line(comp) -> str:
    from mfrecipes.recipe.build import describe

    text = describe(comp)
    return text if len(text) < 160 else text[:157] + "..."


def cmd_show(args) -> int:
    from mfrecipes.recipe import dump_yaml

    _, data, _ = _resolve_recipe_arg(args.recipe, args.overrides)
    sys.stdout.write(dump_yaml(data))
    return 0


def cmd_run(args) -> int:
    from mfrecipes.recipe.build import check_recipe
    from mfrecipes.recipe.load import read_yaml
    from mfrecipes.train.loop import train
    from mfrecipes.train.rundir import RESOLVED

    recipe, data, run_dir = _resolve_recipe_arg(args.recipe, args.overrides)
    check_recipe(recipe)  # fail before any heavy work
    if run_dir is None:
        run_dir = args.out or recipe.run.out_dir or os.path.join("runs", recipe.run.name)
        existing = os.path.join(run_dir, RESOLVED)
        if os.path.isfile(existing):
            old = read_yaml(existing)
            if _comparable(old) != _comparable(data):
                raise RecipeError(
                    f"run directory {run_dir} holds a different recipe; resume it with "
                    f"`mfr run {run_dir}`, or choose a new directory with --out")
    elif args.out and os.path.abspath(args.out) != os.path.abspath(run_dir):
        raise RecipeError("--out cannot be combined with a run directory argument (the run "
                          "directory is the output)")
    result = train(recipe, data, run_dir)
    print(json.dumps({"run_dir": run_dir, **result}))
    return 0


def _comparable(data: dict) -> dict:
    """Recipes equal up to what may change on resume (the image budget, logging cadence)."""
    import copy

    d = copy.deepcopy(data)
    for key in ("total_images", "log_every_images", "progress_bar"):
        d.get("train", {}).pop(key, None)
    return d


def cmd_list(args) -> int:
    from mfrecipes import registry

    kinds = registry.ALL_REGISTRIES
    if args.kind:
        kind = args.kind.rstrip("s") if args.kind.rstrip("s") in kinds else args.kind
        if kind == "data":
            kind = "dataset"
        if kind not in kinds:
            raise RecipeError(f"unknown kind {args.kind!r}; valid: {', '.join(kinds)}")
        selected = {kind: kinds[kind]}
    else:
        selected = kinds
    rows = []
    for kind, reg in selected.items():
        for e in reg.entries():
            params = {k: ("<required>" if v is ... else v) for k, v in e.parameters().items()
                      if k not in reg.runtime_args}
            rows.append({"name": e.name, "kind": kind, "origin": e.origin,
                         "params": params, "summary": e.summary()})
    if args.json:
        print(json.dumps(rows, indent=1, default=repr))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for col in ("kind", "name", "origin", "parameters"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["kind"], r["name"], r["origin"],
                      ", ".join(f"{k}={v!r}" for k, v in r["params"].items()))
    Console(width=max(160, Console().width)).print(table)
    return 0


COMMANDS = {"run": cmd_run, "check": cmd_check, "show": cmd_show, "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MfrError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
