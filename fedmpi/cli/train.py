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
from fedmpi.train.loop import run_job
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
    if cfg.eval.extractor == "inception":
        from fedmpi.eval.extractors import MissingWeightsError, check_inception_weights

        try:
            check_inception_weights(cfg.eval)
        except MissingWeightsError as e:
            raise ConfigError(str(e)) from None


def _prepare(args, overrides, is_root: bool) -> tuple[Config, Path, bool]:
    """Load the config and pick the run folder; raises ConfigError on bad input."""
    resume_dir = args.resume or args.run_dir
    if args.resume and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume {args.resume}: no such run folder")
    if resume_dir and (Path(resume_dir) / "config.yaml").is_file():
        cfg = load_config(args.config or Path(resume_dir) / "config.yaml", overrides)
        _check_eval(cfg)
        return cfg, Path(resume_dir), True
    if args.config is None:
        raise ConfigError("give --config CONFIG (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
    cfg = load_config(args.config, overrides)
    _check_eval(cfg)
    if resume_dir:
        run_dir = Path(resume_dir)
        if is_root:
            run_dir.mkdir(parents=True, exist_ok=True)
            RunFolder(run_dir).write_config(cfg)
        return cfg, run_dir, False
    return cfg, None, False


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

    try:
        cfg, run_dir, resume = _decide(args, overrides, world if distributed else None)
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
        if world is not None:
            world.close()


def _decide(args, overrides, world) -> tuple[Config, Path, bool]:
    """Rank 0 alone decides (config, run folder, resume) and tells the others, so that no
    rank can see a folder another rank is creating at the same moment. A bad config or
    folder ends every rank with the same one-line message (exit 2)."""
    decision, error = None, None
    if world is None or world.rank == 0:
        try:
            cfg, run_dir, resume = _prepare(args, overrides, True)
            run_dir = run_dir or RunFolder.create(cfg).path
            RunFolder(run_dir).stop_file.unlink(missing_ok=True)  # served by an earlier start
            decision = (cfg.to_dict(), str(run_dir), resume)
        except UserError as e:
            error = str(e)
    if world is not None:
        decision, error = world.bcast_obj((decision, error))
    if error:
        if world is None or world.rank == 0:
            print(f"error: {error}", flush=True)
        raise SetupError(error)  # collective: every rank has the same decision
    cfg = from_dict(decision[0], "<resolved>")
    return cfg, Path(decision[1]), decision[2]


if __name__ == "__main__":
    sys.exit(main())
