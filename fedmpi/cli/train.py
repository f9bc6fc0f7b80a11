"""Entry point: `python -m fedmpi.train --config CONFIG [--resume RUN_DIR] [--section.key=value ...]`.

Without an MPI launcher (or with a world of one rank) this trains the centralized
"datacenter" baseline on the whole training set; under `mpirun -n K+1` it runs the
federated job (rank 0 federator, ranks 1..K clients). Both run through the one round loop
(`fedmpi.train.loop.run_job`). main() always tears down: user errors exit 2 on every rank, an
unexpected exception on any rank aborts the whole MPI job (no rank left hanging), and
a preemption signal exits 75 after a checkpoint so that a requeue resumes.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from fedmpi.config import Config, ConfigError, from_dict, load_config
from fedmpi.config.describe import describe_config
from fedmpi.errors import (
    EXIT_USER_ERROR,
    CheckpointError,
    DiskError,
    StallError,
    UserError,
    exit_code,
)
from fedmpi.store.runfolder import RunFolder
from fedmpi.train.stop import JobStop, SetupError


def _evaluator_factory(cfg: Config):
    if cfg.eval.extractor == "none" and not cfg.eval.grid:
        return None
    from fedmpi.eval.evaluate import Evaluator

    return Evaluator


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fedmpi.train",
        description=__doc__.split("\n\n")[0],
        epilog="Any config key can be overridden as --section.key=value (e.g. --train.lr=2e-4 "
        "--fed.rounds=30). --print-config lists every key with its value and meaning.",
    )
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument(
        "--run-dir",
        metavar="RUN_DIR",
        help="use this run folder (created if missing; resumed if it has checkpoints)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (--config, or the run's, plus overrides; "
        "defaults without either) as YAML with a comment for every key, and exit",
    )
    return p.parse_known_args(argv)


def _check_eval(cfg: Config) -> None:
    """Missing Inception weights are a user error, reported before any work."""
    from fedmpi.eval.extractors import require_weights

    require_weights(cfg.eval)


def _prepare(args, overrides, log) -> tuple[Config, RunFolder, bool, object]:
    """Rank 0: load the config, pick the run folder and take its lock (before anything in
    it is written); raises UserError on bad input, DiskError on an unwritable folder,
    FolderBusy when another job holds the folder."""
    resume_dir = args.resume or args.run_dir
    if args.resume and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume {args.resume}: no such run folder")
    if args.resume and not RunFolder(args.resume).is_run():
        raise ConfigError(
            f"--resume {args.resume}: not a run folder (it has no config.yaml); give the folder "
            f"a job wrote (runs/NAME-DATE), or start a run there with --run-dir and --config"
        )
    if resume_dir and RunFolder(resume_dir).is_run():
        run = RunFolder(resume_dir)
        cfg = load_config(args.config or run.config_file, overrides)
        _check_eval(cfg)
        return cfg, run, True, run.lock(log)
    if args.config is None:
        raise ConfigError("give --config CONFIG (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
    cfg = load_config(args.config, overrides)
    _check_eval(cfg)
    if resume_dir:
        run = RunFolder(resume_dir)
        lock = run.lock(log)
        run.write_config(cfg)
    else:
        run = RunFolder.create(cfg)
        lock = run.lock(log)
    return cfg, run, False, lock


def main(argv: list[str] | None = None) -> int:
    from fedmpi.dist.world import launched_by_mpi

    args, overrides = parse_args(argv)
    if args.print_config:
        try:
            run = args.resume or args.run_dir
            source = args.config or (Path(run) / "config.yaml" if run else None)
            print(describe_config(load_config(source, overrides)), end="")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    world = None
    if launched_by_mpi():
        from fedmpi.dist.world import World

        world = World()
    rank = world.rank if world else 0
    distributed = world is not None and world.size > 1

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    lock = None  # rank 0: the run folder's lock, held until the job ends
    try:
        cfg, run_dir, resume, lock = _decide(args, overrides, world if distributed else None, log)
        from fedmpi.train.loop import run_job  # torch: imported once the input is known good

        if distributed:
            world.backend_name = cfg.fed.backend
        run_job(
            cfg,
            world if distributed else None,
            run_dir,
            resume=resume,
            log=log,
            evaluator_factory=_evaluator_factory(cfg),
        )
        return 0
    except BaseException as e:
        code = exit_code(e)
        if isinstance(e, JobStop) and e.collective:
            return code  # every rank got here together; the federator said why
        if isinstance(e, (UserError, CheckpointError, DiskError, StallError, JobStop)):
            tail = "; earlier checkpoints are intact" if isinstance(e, DiskError) else ""
            print(f"[rank {rank}] error: {e}{tail}", file=sys.stderr, flush=True)
        elif not isinstance(e, KeyboardInterrupt):
            print(f"[rank {rank}] unhandled error, stopping the job:", file=sys.stderr)
            traceback.print_exc()
        if distributed:
            world.abort(code)  # the other ranks may be inside a collective: take them down
        if not isinstance(e, Exception | KeyboardInterrupt):
            raise
        return code
    finally:
        if lock is not None:
            lock.release()
        if world is not None:
            world.close()


def _decide(args, overrides, world, log):
    """Rank 0 alone decides (config, run folder, resume) and tells the others, so that no
    rank can see a folder another rank is creating at the same moment. A bad config or
    folder ends every rank with the same exit code; rank 0 prints the one-line reason."""
    decision, error, lock = None, None, None
    if world is None or world.rank == 0:
        try:
            cfg, run, resume, lock = _prepare(args, overrides, log)
            run.stop_file.unlink(missing_ok=True)  # a stop request served by an earlier start
            decision = (cfg.to_dict(), str(run), resume)
        except (UserError, DiskError) as e:
            error = (str(e), exit_code(e))
    if world is not None:
        decision, error = world.bcast_obj((decision, error))
    if error:
        if world is None or world.rank == 0:
            print(f"error: {error[0]}", flush=True)
        stop = SetupError(error[0])  # collective: every rank has the same decision
        stop.exit_code = error[1]
        raise stop
    return from_dict(decision[0], "<resolved>"), Path(decision[1]), decision[2], lock


if __name__ == "__main__":
    sys.exit(main())
