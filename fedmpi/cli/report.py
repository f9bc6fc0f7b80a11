"""`python -m fedmpi.report RUN_DIR|SWEEP_DIR ...`: the paper-layout tables of finished runs.

    python -m fedmpi.report SWEEP_DIR | RUN_DIR [RUN_DIR ...] [--out DIR]

Reads each run folder (config.yaml, metrics.jsonl, eval.csv, comm_summary.json) and
writes to DIR (default SWEEP_DIR/report, or ./report for several arguments):

- report.md            one table per setting in the paper's layout: rows K x split,
                       columns the methods, cells the final round's score as mean +- sample
                       std over runs (seeds); for personal models (UDEC, ULATDEC) over all
                       clients of all runs, pooled as the reference does. The paper's
                       published value stands beside a cell when the setting is the
                       paper's (Fashion-MNIST, paper model, R=15, E=5 or the K x E study,
                       B=128, metric fid). Then the parameters exchanged per method and a
                       list of every run with its status.
- table.csv            the same tables as numbers (one row per K x split, columns per method)
- runs.csv             one row per run
- score_vs_params.png  final score against the parameters the run exchanged, one point per
                       run (one PNG per metric when the runs were scored differently)

Runs that did not finish are shown as such ("incomplete (3/15 rounds)"), never dropped.
The metric keeps its name: `fid` (Inception) and `fd_classifier` (offline classifier)
never share a table, and an fd_classifier table says it is not comparable with FID.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmpi.analysis.report import ReportError, find_runs, read_run
from fedmpi.analysis.report_output import write_report
from fedmpi.errors import EXIT_USER_ERROR
from fedmpi.store.runfolder import RunFolder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedmpi.report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("paths", nargs="+", metavar="SWEEP_DIR|RUN_DIR")
    p.add_argument(
        "--out",
        help="output folder (default: SWEEP_DIR/report for one folder argument, else ./report)",
    )
    args = p.parse_args(argv)
    try:
        runs = [read_run(d) for d in find_runs(args.paths)]
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    one = len(args.paths) == 1 and not RunFolder(args.paths[0]).is_run()
    out = (
        Path(args.out) if args.out else (Path(args.paths[0]) / "report" if one else Path("report"))
    )
    written = write_report(runs, out, list(args.paths))
    print(written["markdown"].read_text())
    for key in ("markdown", "table_csv", "runs_csv"):
        print(f"wrote {written[key]}")
    for png in written["png"]:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
