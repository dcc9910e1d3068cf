"""Compare training runs: recipe keys that differ, final and best metric, images to a threshold.

    python tools/compare_recipes.py RUN_DIR... [--metric eval/nfe1/fd_digits] [--threshold X]
        [--direction auto|lower|higher] [--group-seeds] [--md OUT.md] [--csv OUT.csv]
        [--plot OUT.png] [--logy]

One row per run, or with --group-seeds per recipe (runs that differ only in run.seed, run.name
or run.out_dir), as mean ± std over seeds. Columns: the dotted recipe keys that differ (from
each run's recipe.resolved.yaml), the final and best value of the metric (metrics.jsonl, then
eval.jsonl), and the images seen when the metric first reached --threshold. Prints a table;
--md, --csv and --plot (the metric against images seen, one curve per row) write files.
Logic: mfrecipes/evaluate/compare.py.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from mfrecipes.errors import MfrError
    from mfrecipes.evaluate.compare import compare, pick_metric

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--metric", default=None,
                   help="default: an eval/ metric every run logged (1-NFE first)")
    p.add_argument("--threshold", type=float)
    p.add_argument("--direction", default="auto", choices=["auto", "lower", "higher"])
    p.add_argument("--group-seeds", action="store_true")
    p.add_argument("--md")
    p.add_argument("--csv")
    p.add_argument("--plot")
    p.add_argument("--logy", action="store_true", help="log scale for the plot's y axis")
    args = p.parse_args(argv)
    try:
        if args.metric is None:
            args.metric = pick_metric(args.run_dirs)
            print(f"metric: {args.metric} (choose another with --metric)", file=sys.stderr)
        cmp = compare(args.run_dirs, args.metric, threshold=args.threshold,
                      direction=args.direction, group_seeds=args.group_seeds)
    except MfrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, text in ((args.md, cmp.markdown), (args.csv, cmp.csv)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text())
    if args.plot:
        cmp.plot(args.plot, logy=args.logy)
    from rich.console import Console

    Console(width=max(120, Console().width)).print(cmp.rich_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
