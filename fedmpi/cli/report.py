"""`python -m fedmpi.report RUN_DIR|SWEEP_DIR ...`: the paper-layout tables of finished runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmpi.analysis.report import ReportError, find_runs, read_run, write_report
from fedmpi.errors import EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedmpi.report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2].split("\n\nThis module")[0],
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
    one = len(args.paths) == 1 and not (Path(args.paths[0]) / "config.yaml").is_file()
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
