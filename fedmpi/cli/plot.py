"""`python -m fedmpi.plot RUN_DIR [RUN_DIR ...]`: score, loss, bytes, per-client and split plots of run folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmpi.analysis.plot import METRICS, RunError, _unique_names, load_run, make_plots
from fedmpi.errors import EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedmpi.plot",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument(
        "--out", help="output folder (default: RUN_DIR/plots for one run, ./plots for several)"
    )
    p.add_argument(
        "--metric", choices=METRICS, help="score to plot (default: the one the runs have)"
    )
    args = p.parse_args(argv)
    try:
        runs = [load_run(r) for r in args.runs]
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    _unique_names(runs)
    out = (
        Path(args.out)
        if args.out
        else (runs[0].path / "plots" if len(runs) == 1 else Path("plots"))
    )
    written = make_plots(runs, out, args.metric)
    for path in written:
        print(path)
    if not written:
        print("error: nothing to plot (no rounds in metrics.jsonl)", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
