"""Task-affinity score of a checkpoint: gradient cosine of the v-loss and the u-loss per gap range.

    python tools/task_affinity.py RUN_DIR [--gap-ranges 0:0.1,0.1:0.3,...] [--num-batches N]
        [--batch-size B] [--weights ema|raw|ema_0.999] [--checkpoint FOLDER] [--weighted]
        [--seed S] [--device auto] [--json]

The definition (Kim et al., App. A, our reading) is in mfrecipes/evaluate/task_affinity.py.
Output: one row per gap range with the mean cosine, its standard deviation over batches and the
batch count; with --json one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from mfrecipes.errors import MfrError
    from mfrecipes.evaluate.task_affinity import parse_gap_ranges, task_affinity_run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--gap-ranges", help="a:b,... (default 0:0.1,0.1:0.3,0.3:0.5,0.5:0.7,"
                                        "0.7:0.9,0.9:1)")
    p.add_argument("--num-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the recipe's global batch size, at most 256")
    p.add_argument("--weights", default="ema")
    p.add_argument("--checkpoint")
    p.add_argument("--weighted", action="store_true",
                   help="weight each loss with the run's loss weighting (detached)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        out = task_affinity_run(args.run_dir, gap_ranges=parse_gap_ranges(args.gap_ranges),
                                num_batches=args.num_batches, batch_size=args.batch_size,
                                weights=args.weights, checkpoint=args.checkpoint,
                                seed=args.seed, weighted=args.weighted, device=args.device)
    except MfrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"task affinity: {out['checkpoint']} ({out['weights']}), "
                        f"{out['batch_size']} x {args.num_batches} samples")
    for col in ("gap range", "cos(g_v, g_u)", "std", "batches"):
        table.add_column(col, justify="right")
    for r in out["results"]:
        a, b = r["gap_range"]
        table.add_row(f"[{a:g}, {b:g}]", f"{r['mean']:.4f}", f"{r['std']:.4f}",
                      str(r["num_batches"]))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
