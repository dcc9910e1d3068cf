"""Compare training runs: recipe keys that differ, final and best metric, images to a threshold.

    python tools/compare_recipes.py RUN_DIR... [--metric eval/nfe1/fd_digits] [--threshold X]
        [--direction auto|lower|higher] [--group-seeds] [--md OUT.md] [--csv OUT.csv]
        [--plot OUT.png] [--logy] [--baseline NAME [--paired-md P.md] [--paired-csv P.csv]
        [--paired-plot P.png]]

One row per run, or with --group-seeds per recipe (runs that differ only in run.seed, run.name
or run.out_dir), as mean ± std over seeds. Columns: the dotted recipe keys that differ (from
each run's recipe.resolved.yaml), the final and best value of the metric (metrics.jsonl, then
eval.jsonl), and the images seen when the metric first reached --threshold. Prints a table;
--md, --csv and --plot (the metric against images seen, one curve per row) write files.

With --baseline NAME the runs are also analysed in pairs (mfrecipes/evaluate/paired.py): an arm
is a run folder's name without its ``-s<seed>`` suffix, runs of two arms are paired by seed, and
each arm gets the mean per-seed difference of its primary figure (the mean of log(metric) over
the second half of training) from the baseline's, a 95 % t interval, the minimum detectable
effect, the final value and the images to the baseline's final quality. Without --metric the
primary metric eval/exact/map1 is used when every run logged it.
Logic: mfrecipes/evaluate/compare.py and mfrecipes/evaluate/paired.py.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from mfrecipes.errors import MfrError
    from mfrecipes.evaluate.compare import compare, pick_metric, run_metrics
    from mfrecipes.evaluate.paired import PRIMARY_METRIC, group_by_arm, paired_analysis

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
    p.add_argument("--baseline", help="paired analysis of every arm against this arm (a run "
                                      "folder's name without -s<seed>)")
    p.add_argument("--paired-md")
    p.add_argument("--paired-csv")
    p.add_argument("--paired-plot")
    args = p.parse_args(argv)
    try:
        if args.metric is None and args.baseline and all(
                PRIMARY_METRIC in run_metrics(d) for d in args.run_dirs):
            args.metric = PRIMARY_METRIC
            print(f"metric: {args.metric} (the primary figure; choose another with --metric)",
                  file=sys.stderr)
        if args.metric is None:
            args.metric = pick_metric(args.run_dirs)
            print(f"metric: {args.metric} (choose another with --metric)", file=sys.stderr)
        cmp = compare(args.run_dirs, args.metric, threshold=args.threshold,
                      direction=args.direction, group_seeds=args.group_seeds)
        paired = None if not args.baseline else paired_analysis(
            group_by_arm(args.run_dirs), args.baseline, args.metric, direction=args.direction)
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
    if paired is not None:
        for path, text in ((args.paired_md, paired.markdown), (args.paired_csv, paired.csv)):
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text())
        if args.paired_plot:
            paired.plot(args.paired_plot)
    from rich.console import Console

    Console(width=max(120, Console().width)).print(cmp.rich_table())
    if paired is not None:
        print(paired.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
