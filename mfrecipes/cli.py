"""The ``mfr`` command: run | check | show | list | check-plugin | sample | eval | export.

Every error a user can cause ends in one message (what, where, what would be valid) on stderr and a
non-zero exit, never a traceback. Options and dotted overrides may come in any order
(``mfr run R --out DIR train.lr=2e-4``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from mfrecipes.errors import DataError, MfrError, RecipeError

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
    run.add_argument("--init-missing-ema", action="store_true",
                     help="on resume, start an EMA the checkpoint lacks from the raw weights "
                          "(recorded in the run's history) instead of refusing")

    check = sub.add_parser("check", help="validate a recipe without training")
    check.add_argument("recipe")
    check.add_argument("overrides", nargs="*")
    check.add_argument("--world-size", type=int, default=None, metavar="N",
                       help="ranks the run will have (torchrun/deepspeed): the global batch "
                            "must split over them (default: $WORLD_SIZE, else 1)")

    show = sub.add_parser("show", help="print the resolved recipe, every component parameter "
                                       "with its value (defaults filled in)")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")

    lst = sub.add_parser("list", help="list registered components")
    lst.add_argument("kind", nargs="?", help="backbone, objective, timestep_sampler, "
                                             "loss_weighting, gap_schedule or dataset")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    cp = sub.add_parser("check-plugin", help="run the contract checks on a registered component "
                                             "(a plugin's, or a built-in)")
    cp.add_argument("name", help="registered name, as in `mfr list`")
    cp.add_argument("--kind", default=None, help="timestep_sampler, loss_weighting, gap_schedule, "
                                                  "objective, backbone or dataset (default: every "
                                                  "kind that registers NAME)")
    cp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a component parameter (YAML value), repeatable")
    _add_sample_eval(sub)

    exp = sub.add_parser("export", help="write a trained model as a self-describing folder "
                                        "(config.json, model.safetensors, README.md)")
    exp.add_argument("run_dir", help="run directory written by `mfr run`")
    exp.add_argument("--out", required=True, help="folder to write")
    exp.add_argument("--ema", default=None, metavar="NAME",
                     help="weights group, e.g. ema_0.9999 (default: the first EMA); raw for the "
                          "trained weights")
    exp.add_argument("--checkpoint", help="checkpoint folder or name (default: latest)")
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Dotted overrides may follow options (argparse alone stops a positional list at the first
    option and calls the rest unrecognised)."""
    p = _parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            p.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = list(args.overrides) + list(extra)
    return args


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers such as 1 or 1,2; got {text!r}"
                                         ) from err


def _add_sample_eval(sub) -> None:
    """``mfr sample`` and ``mfr eval`` (logic: mfrecipes/evaluate/commands.py)."""

    def common(q):
        q.add_argument("run_dir", help="run directory written by `mfr run`")
        q.add_argument("--nfe", type=_int_list, default=[1],
                       help="average-velocity steps, e.g. 1 or 1,2 (default 1)")
        q.add_argument("--steps", type=_int_list, default=None,
                       help="Euler steps on u(z, t, t); needs --instantaneous")
        q.add_argument("--instantaneous", action="store_true",
                       help="Euler on the instantaneous velocity u(z, t, h=0) (Table 5)")
        q.add_argument("--weights", default="ema",
                       help="ema (first EMA, default), raw, or a group such as ema_0.9999")
        q.add_argument("--checkpoint", help="checkpoint folder or name (default: latest)")
        q.add_argument("--labels", default=None,
                       help="uniform | balanced | null | class list such as 0,3,7")
        q.add_argument("--seed", type=int, default=None)
        q.add_argument("--batch-size", type=int, default=256)
        q.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
        q.add_argument("--vae", help="VAE id or folder for latent data (default: the data's)")
        q.add_argument("--allow-imports", action="store_true",
                       help="import the modules the run's recipe lists under imports: (code "
                            "named by the run directory: only for runs you trust)")

    s = sub.add_parser("sample", help="draw samples from a run: PNG grid / scatter and .npz")
    common(s)
    s.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", help="output folder (default RUN_DIR/samples)")

    e = sub.add_parser("eval", help="FID (clean-fid) or the dataset's metrics of a checkpoint")
    common(e)
    e.add_argument("--num", type=int, default=None,
                   help="samples (default 50000 for FID, else the recipe's eval.num_samples)")
    e.add_argument("--ref", help="reference statistics .npz with mu, sigma (ADM's format)")
    e.add_argument("--ref-shards", help="shard URL whose samples give the reference statistics; "
                                        "'train': the run's own training shards")
    e.add_argument("--ref-num", type=int, default=50_000, help="real samples for --ref-shards")
    e.add_argument("--save-ref", help="write the --ref-shards statistics to this .npz")
    e.add_argument("--mode", default="legacy_tensorflow",
                   choices=["clean", "legacy_tensorflow", "legacy_pytorch"],
                   help="clean-fid mode (default legacy_tensorflow: the paper protocol)")
    e.add_argument("--inception", help="local Inception weights (clean-fid's "
                                       "inception-2015-12-05.pt); or set MFR_INCEPTION")
    e.add_argument("--json", action="store_true", help="print the record as JSON")


def _resolve_recipe_arg(path: str, overrides: Sequence[str], *, resume: bool = False):
    """A recipe file, or a run directory (its recipe.resolved.yaml). ``resume``: the recorded
    credentials (``***``) are dropped, to come from the environment or an override."""
    from mfrecipes.recipe import load_recipe
    from mfrecipes.run.layout import RESOLVED

    if os.path.isdir(path):
        resolved = os.path.join(path, RESOLVED)
        if not os.path.isfile(resolved):
            raise RecipeError(f"{path} is a directory but not a run directory (no {RESOLVED}); "
                              f"pass a recipe .yaml file or a run directory")
        if resume:
            from mfrecipes.run.records import load_for_resume

            recipe, data, _ = load_for_resume(path, list(overrides))
        else:  # check / show: the record as it is (credentials shown as ***)
            recipe, data = load_recipe(resolved, overrides)
        return recipe, data, path
    if not path.endswith((".yaml", ".yml")) and not os.path.exists(path):
        raise RecipeError(f"recipe {path!r} does not exist (expected a .yaml file or a run "
                          f"directory)")
    recipe, data = load_recipe(path, overrides)
    return recipe, data, None


def _env_world_size() -> int:
    """The launcher's ``WORLD_SIZE`` (torchrun, deepspeed), else 1."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    try:
        return int(raw)
    except ValueError:
        raise RecipeError(f"the WORLD_SIZE environment variable must be an integer, got "
                          f"{raw!r}", path="WORLD_SIZE") from None


def cmd_check(args) -> int:
    from mfrecipes.build import check_recipe, check_world_size

    import warnings

    recipe, _, _ = _resolve_recipe_arg(args.recipe, args.overrides)
    world = args.world_size if args.world_size is not None else _env_world_size()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        parts = check_recipe(recipe)
        check_world_size(recipe, world)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"ok: {args.recipe} ({recipe.run.name}: {recipe.data.name} -> {recipe.backbone.name}, "
          f"{recipe.objective.name}, {recipe.train.total_images} images)")
    for name, comp in parts.items():
        print(f"  {name}: {_one_line(comp)}")
    return 0


def _one_line(comp) -> str:
    from mfrecipes.build import describe

    text = describe(comp)
    return text if len(text) < 160 else text[:157] + "..."


def cmd_show(args) -> int:
    from mfrecipes.recipe import dump_yaml
    from mfrecipes.build import load_imports, with_component_defaults
    from mfrecipes.run.records import redact_recipe

    recipe, data, _ = _resolve_recipe_arg(args.recipe, args.overrides)
    load_imports(recipe)  # a recipe's own modules register components whose defaults we list
    sys.stdout.write(dump_yaml(redact_recipe(with_component_defaults(data))))
    return 0


def cmd_run(args) -> int:
    from mfrecipes.build import check_recipe, check_world_size
    from mfrecipes.run import records as rundir
    from mfrecipes.train.loop import train

    recipe, data, run_dir = _resolve_recipe_arg(args.recipe, args.overrides, resume=True)
    missing = []  # credentials the record holds as *** and no override gave again
    if run_dir is not None:
        missing = rundir.load_for_resume(run_dir, list(args.overrides))[2]
    if run_dir is None:
        run_dir = args.out or recipe.run.out_dir or os.path.join("runs", recipe.run.name)
    elif args.out and os.path.abspath(args.out) != os.path.abspath(run_dir):
        raise RecipeError("--out cannot be combined with a run directory argument (the run "
                          "directory is the output)")
    old = rundir.previous_recipe(run_dir)
    if old is not None:  # a resume: only keys that may change differ (checked again, locked)
        rundir.resume_changes(old, data)
    check_recipe(recipe, for_run=True)  # fail before any heavy work
    if recipe.engine == "deepspeed":  # the launcher's ranks split the global batch
        check_world_size(recipe, _env_world_size())
    try:
        result = train(recipe, data, run_dir, init_missing_ema=args.init_missing_ema)
    except DataError as err:
        hint = rundir.credentials_hint(err, missing)
        if hint is None:
            raise
        raise DataError(f"{err.message}\n  {hint}", path=err.path) from err
    if int(os.environ.get("RANK", "0")) == 0:  # launched on several ranks: rank 0 reports
        print(json.dumps({"run_dir": run_dir, **result}))
    return 0


def cmd_list(args) -> int:
    from mfrecipes import registry
    from mfrecipes.plugins import load_components

    load_components()
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
            row = {"name": e.name, "kind": kind, "origin": e.origin, "params": params,
                   "summary": e.summary()}
            if kind == "backbone":
                row["parameters"] = _backbone_count(e)
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1, default=repr))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for col in ("kind", "name", "description", "parameters", "origin"):
        table.add_column(col, overflow="fold")
    for r in rows:
        summary = r["summary"]
        if r.get("parameters"):
            from mfrecipes.backbones import format_count

            count, shape, classes = r["parameters"]
            summary = (f"{summary} [{format_count(count)} params on {'x'.join(map(str, shape))}"
                       f"{f', {classes} classes' if classes else ''}]")
        table.add_row(r["kind"], r["name"], summary,
                      ", ".join(f"{k}={v!r}" for k, v in r["params"].items()),
                      f"[dim]{r['origin']}[/dim]")
    Console(width=max(160, Console().width)).print(table)
    return 0


def cmd_check_plugin(args) -> int:
    """Print pass/fail per contract check; exit 0 when all pass, 1 when one fails."""
    from mfrecipes.recipe.load import safe_yaml
    from mfrecipes.testing import KINDS, check_component, kinds_of

    params = {}
    for i, text in enumerate(args.param):
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise RecipeError(f"expected KEY=VALUE, got {text!r}", path=f"--param[{i}]")
        params[key] = safe_yaml(value, "a --param value", f"--param {key}")
    if args.kind is not None:
        kinds = [args.kind]
    else:
        kinds = kinds_of(args.name)
        if not kinds:
            import difflib

            from mfrecipes.registry import ALL_REGISTRIES

            names = {n: k for k in KINDS for n in ALL_REGISTRIES[k].names()}
            close = difflib.get_close_matches(args.name, list(names), n=3, cutoff=0.5)
            hint = (f"; did you mean {', '.join(f'{n!r} ({names[n]})' for n in close)}?"
                    if close else "")
            raise RecipeError(f"no {', '.join(KINDS)} is registered as {args.name!r}{hint} "
                              f"(`mfr list` shows every name and the plugins loaded)",
                              path="NAME")
    failed = 0
    for kind in kinds:
        results = check_component(kind, args.name, **params)
        print(f"{results[0].component}" if results else f"{kind} {args.name}")
        for res in results:
            print(f"  {res.line()}")
        failed += sum(not r.ok for r in results)
    print(f"FAILED: {failed} check(s) failed" if failed else "ok: every check passed")
    return 1 if failed else 0


def _backbone_count(entry):
    """``(parameters, input_shape, num_classes)`` of a built-in backbone with its defaults, from
    the table the tests keep in step with the code (nothing is built), or None."""
    from mfrecipes.backbones import KNOWN_COUNTS, counted_on

    ref = counted_on(entry.name)
    if not entry.origin.startswith("mfrecipes.") or ref is None or entry.name not in KNOWN_COUNTS:
        return None
    return KNOWN_COUNTS[entry.name], list(ref[0]), ref[1]


def _allow_imports(args) -> None:
    """``--allow-imports``: import the run's recipe modules now; without it ``load_run``
    refuses a run whose recipe names modules not already imported."""
    if getattr(args, "allow_imports", False):
        from mfrecipes.evaluate.load import _read_recipe

        _read_recipe(args.run_dir, allow_imports=True)


def cmd_sample(args) -> int:
    from mfrecipes.evaluate import commands

    _allow_imports(args)

    spec, *more = commands.sampler_specs(args.nfe, args.steps, args.instantaneous)
    if more:
        raise RecipeError("mfr sample takes one step count (--nfe K or --steps N); mfr eval "
                          "takes several")
    summary = commands.sample_run(
        args.run_dir, spec=spec, weights=args.weights, checkpoint=args.checkpoint, num=args.num,
        labels=args.labels or "uniform", seed=0 if args.seed is None else args.seed,
        out=args.out, batch_size=args.batch_size, device=args.device, vae=args.vae)
    print(json.dumps(summary))
    return 0


def cmd_eval(args) -> int:
    from mfrecipes.evaluate import commands

    _allow_imports(args)

    record = commands.eval_run(
        args.run_dir, specs=commands.sampler_specs(args.nfe, args.steps, args.instantaneous),
        weights=args.weights, checkpoint=args.checkpoint, num=args.num, labels=args.labels,
        seed=args.seed, ref=args.ref, ref_shards=args.ref_shards, ref_num=args.ref_num,
        save_ref=args.save_ref, mode=args.mode, inception=args.inception,
        batch_size=args.batch_size, device=args.device, vae=args.vae)
    if args.json:
        print(commands.format_record(record, as_json=True))
    else:
        from rich.console import Console

        Console().print(commands.format_record(record))
    return 0


def cmd_export(args) -> int:
    from mfrecipes.export import export_run

    config = export_run(args.run_dir, args.out, weights=args.ema or "ema",
                        checkpoint=args.checkpoint)
    print(json.dumps({"out": args.out, "weights": config["weights"], "images": config["images"],
                      "backbone": config["backbone"]["name"]}))
    return 0


COMMANDS = {"export": cmd_export, "run": cmd_run, "check": cmd_check, "show": cmd_show, "list": cmd_list,
            "check-plugin": cmd_check_plugin,
            "sample": cmd_sample, "eval": cmd_eval}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return COMMANDS[args.command](args)
    except MfrError as err:
        from mfrecipes.run.records import redact_argv, scrub

        redact_argv(list(sys.argv[1:] if argv is None else argv))  # learns the secret values
        print(f"error: {scrub(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        from mfrecipes.run.layout import disk_full

        if not disk_full(err):
            raise
        print(f"error: cannot write {err.filename or 'a file'}: {err.strerror}; free disk space "
              f"and resume with `mfr run RUN_DIR` (the last checkpoint is intact)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
