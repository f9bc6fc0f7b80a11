"""`python -m fedmpi.plot RUN_DIR [RUN_DIR ...]`: score, loss, bytes, per-client and split plots of run folders.

    python -m fedmpi.plot RUN_DIR [RUN_DIR ...] [--out DIR] [--metric fd_classifier|fid]

Writes PNG files (matplotlib, Agg backend, no display needed) and prints their paths:

- score_vs_round.png   the score (FID or fd_classifier; lower is better) after each
                       round, one line per run; personal-model runs (UDEC, ULATDEC) show
                       the mean over clients with a +-1 sample-std band. Centralized
                       runs are plotted against their epochs.
- score_vs_bytes.png   the same scores against the cumulative bytes every client sent
                       and received (comm.csv, round 0's initial model included): the
                       communication / quality trade-off. Centralized runs move nothing
                       and are left out.
- loss.png             the training loss per round (epoch), with the min..max band of
                       the clients' losses for federated runs.
- per_client_<run>.png personal-model runs: each client's score per round (eval.csv).
- split_<run>.png      federated runs: the class counts of every client, recomputed
                       from the run's config (needs the dataset's labels only).

The default output folder is RUN_DIR/plots for one run and ./plots for several.
Exit status 2 for a folder that is not a run folder or a bad option.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmpi.analysis.plot import make_plots, unique_names
from fedmpi.analysis.runs import METRICS, RunError, load_run
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
    unique_names(runs)
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
