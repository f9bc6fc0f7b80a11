"""`python -m fedmpi.evaluate RUN_DIR`: re-score a run's checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmpi.config import Config, ConfigError, get
from fedmpi.data import DataError
from fedmpi.errors import EXIT_USER_ERROR
from fedmpi.eval.rescore import rescore
from fedmpi.store.checkpoint import CheckpointError
from fedmpi.store.runfolder import RunFolder

_CLI_OPTIONS = {
    "extractor": "eval.extractor",
    "num_samples": "eval.num_samples",
    "sampler": "eval.sampler",
    "ddim_steps": "eval.ddim_steps",
}


def _rescore_config(run_dir: Path, args, overrides: list[str]) -> Config:
    """The run's config with the CLI's eval options and dotted overrides applied."""
    from fedmpi.config import parse_overrides

    run = RunFolder(run_dir)
    if not run.is_run():
        raise ConfigError(f"{run_dir} is not a fedmpi run folder (no config.yaml)")
    dotted = parse_overrides(overrides)
    for opt, key in _CLI_OPTIONS.items():
        if getattr(args, opt) is not None:
            dotted[key] = getattr(args, opt)
    cfg = run.read_config(dotted)
    if cfg.eval.extractor == "none":
        raise ConfigError(
            "eval.extractor is 'none': nothing to score; "
            "give --extractor classifier or --extractor inception"
        )
    from fedmpi.eval.extractors import require_weights

    require_weights(cfg.eval)  # before any model, data or sampling
    # Relative data / cache folders name places seen from where the run was launched;
    # when they are not here, use the usual places (overridable on the command line).
    fix = {}
    for key, instead in (
        ("data.root", "looking in the usual places"),
        ("eval.cache_dir", "using ~/.cache/fedmpi"),
    ):
        folder = get(cfg, key)
        if folder and key not in dotted and not Path(folder).expanduser().is_dir():
            print(
                f"note: {key} {folder} not found here; {instead} (or give --{key}=...)",
                file=sys.stderr,
            )
            fix[key] = None
    return cfg.replace(fix) if fix else cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedmpi.evaluate",
        description="Re-score a finished run's checkpoints in one process (no mpirun): the "
        "global model (FULL, USPLIT, centralized) or every client's personal "
        "model (UDEC, ULATDEC, with mean +- sample std) at the run's eval.personal "
        "(local: right after the client's local training; aggregated: after the "
        "averaging). Writes RUN_DIR/rescore_<extractor>[_reference][_local]_round_<N>.csv; "
        "eval.csv is left alone.",
        epilog="Extra --section.key=value arguments override the run's config "
        "(e.g. --eval.personal=aggregated --eval.batch_size=100 --run.device=cpu "
        "--eval.inception_weights=PATH).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder with checkpoints/")
    p.add_argument(
        "--round", type=int, help="checkpoint to score (default: the latest complete one)"
    )
    p.add_argument(
        "--extractor",
        choices=("classifier", "inception"),
        help="feature extractor (default: the run's eval.extractor)",
    )
    p.add_argument(
        "--num-samples",
        dest="num_samples",
        type=int,
        help="samples per model (default: the run's eval.num_samples)",
    )
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: the run's eval.sampler")
    p.add_argument(
        "--ddim-steps", dest="ddim_steps", type=int, help="default: the run's eval.ddim_steps"
    )
    args, overrides = p.parse_known_args(argv)
    run_dir = Path(args.run_dir)
    try:
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: no such folder")
        cfg = _rescore_config(run_dir, args, overrides)
        rescore(run_dir, args.round, cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
