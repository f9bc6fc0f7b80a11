"""Experiment grids: a spec expands into named runs under one sweep folder.

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
      run.seed: [2023, 2024, 2025]

Run folders are SWEEP_DIR/<run name>, the name joining the grid values in grid order
(`K2-iid-full-s2023`; `E5` for fed.local_epochs, `lr_0.0002` for other keys): the same
spec always gives the same names. Every run's config is resolved and validated before
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

import functools
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedmpi.analysis.report import Progress, run_progress
from fedmpi.config import Config, ConfigError, load_config
from fedmpi.store.checkpoint import save_config
from fedmpi.store.tables import format_table

SPEC_KEYS = ("name", "base", "out", "overrides", "grid")
CLIENTS = "clients"  # spec shorthand for split.num_clients
# How grid values appear in run names: a prefix, or the bare value.
PREFIX = {
    "split.num_clients": "K",
    "fed.local_epochs": "E",
    "fed.local_steps": "steps",
    "fed.rounds": "R",
    "run.seed": "s",
    "split.seed": "splitseed",
    "train.batch_size": "B",
    "train.epochs": "epochs",
}
BARE = ("fed.method", "split.kind", "data.dataset", "eval.extractor")
ACTIVE_SLURM_STATES = (
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
)


class SweepError(ValueError):
    """A spec that cannot be expanded into valid runs (message names the spec and run)."""


@dataclass(frozen=True)
class Run:
    name: str
    values: dict  # this run's grid values (dotted keys)
    cfg: Config
    dir: Path

    @property
    def clients(self) -> int:
        return self.cfg.split.num_clients

    @property
    def centralized(self) -> bool:
        return self.clients == 1

    @property
    def world(self) -> int:
        return 1 if self.centralized else self.clients + 1


@dataclass
class Sweep:
    spec: Path
    name: str
    out: Path
    runs: list


# ---------------------------------------------------------------- expansion


def _value_text(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "x".join(map(_value_text, v))
    return str(v)


def run_name(values: dict) -> str:
    """Deterministic, filesystem-safe name from grid values (in grid order)."""
    tokens = []
    for key, v in values.items():
        text = re.sub(r"[^A-Za-z0-9._]+", "_", _value_text(v)).strip("_") or "x"
        if key in PREFIX:
            tokens.append(PREFIX[key] + text)
        elif key in BARE:
            tokens.append(text)
        else:
            tokens.append(f"{key.rsplit('.', 1)[-1]}_{text}")
    return "-".join(tokens)


def _dotted(mapping, what: str, spec: Path) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise SweepError(
            f"{spec}: '{what}' must be a mapping of dotted config keys "
            f"(e.g. fed.rounds: 15), got {mapping!r}"
        )
    out = {}
    for key, value in mapping.items():
        key = str(key)
        if key == CLIENTS:
            key = "split.num_clients"
        elif "." not in key:
            raise SweepError(
                f"{spec}: '{what}' key '{key}' is not a dotted config key "
                f"(section.key, e.g. fed.method) nor '{CLIENTS}'"
            )
        if key in out:
            raise SweepError(
                f"{spec}: '{what}' sets {key} twice ('{CLIENTS}' is split.num_clients)"
            )
        out[key] = value
    return out


def _resolve_base(spec: Path, base) -> Path:
    if not isinstance(base, str) or not base:
        raise SweepError(
            f"{spec}: 'base' must name the base config file, e.g. "
            f"base: ../fmnist_full.yaml (relative to the spec)"
        )
    for cand in (spec.parent / base, Path(base)):
        if cand.is_file():
            return cand
    raise SweepError(
        f"{spec}: base config '{base}' not found (looked in {spec.parent} and {Path.cwd()})"
    )


def _config_message(err: ConfigError) -> str:
    # load_config calls the overrides "command line"; here they come from the spec
    return (
        str(err)
        .replace("(with command-line overrides)", "(with the sweep's overrides)")
        .replace("command line: ", "", 1)
    )


def load_sweep(
    spec_path: str | Path, extra: dict | None = None, out: str | Path | None = None
) -> Sweep:
    """Read a spec, expand its grid and validate every run's config (nothing written)."""
    spec = Path(spec_path)
    if not spec.is_file():
        raise SweepError(f"sweep spec {spec} does not exist (see configs/paper/sweeps/)")
    try:
        data = yaml.safe_load(spec.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{spec}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{spec}: the top level must be a mapping ({', '.join(SPEC_KEYS)})")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise SweepError(
            f"{spec}: unknown spec key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (known: {', '.join(SPEC_KEYS)})"
        )
    base = _resolve_base(spec, data.get("base"))
    name = str(data.get("name") or spec.stem)
    overrides = _dotted(data.get("overrides"), "overrides", spec)
    grid = _dotted(data.get("grid"), "grid", spec)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{spec}: grid '{key}' must be a non-empty list, e.g. [{values!r}]")
        if key in overrides:
            raise SweepError(f"{spec}: {key} is both in 'grid' and in 'overrides'; keep one")
    for key, value in (extra or {}).items():
        if key in grid:
            raise SweepError(
                f"--{key} on the command line would replace the grid's "
                f"{key} {grid[key]}; edit the spec instead"
            )
        overrides[key] = value

    runs, errors = [], []
    try:
        base_cfg = load_config(base, overrides)
    except ConfigError as e:
        raise SweepError(f"{spec}: {_config_message(e)}") from None
    sweep_dir = Path(out or data.get("out") or Path(base_cfg.run.out_dir) / name)
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        rname = run_name(values) if values else name
        try:
            cfg = load_config(base, {**overrides, **values, "run.name": rname})
            if cfg.split.num_clients is None:
                raise ConfigError(
                    f"the number of clients is not set: add '{CLIENTS}: [K]' "
                    f"to the spec's grid (or '{CLIENTS}: K' to its overrides)"
                )
        except ConfigError as e:
            shown = ", ".join(
                f"{CLIENTS if k == 'split.num_clients' else k}={_value_text(v)}"
                for k, v in values.items()
            )
            errors.append(f"run '{rname}' ({shown}): {_config_message(e)}")
            continue
        runs.append(Run(rname, values, cfg, sweep_dir / rname))
    if errors:
        more = (
            f" ({len(errors)} of {len(errors) + len(runs)} runs fail; the first is shown)"
            if len(errors) > 1
            else ""
        )
        raise SweepError(f"{spec}: {errors[0]}{more}")
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(
            f"{spec}: the grid gives several runs the name {dupes[0]!r} (repeated "
            f"values in a grid list?)"
        )
    return Sweep(spec, name, sweep_dir, runs)


def _has_progress(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").is_file() or (run_dir / "checkpoints").is_dir()


def write_configs(sweep: Sweep) -> None:
    """Write every run's config.yaml. A folder that already has results must hold the
    same config (else the sweep stops before writing anything)."""
    for run in sweep.runs:
        path = run.dir / "config.yaml"
        if not (path.is_file() and _has_progress(run.dir)):
            continue
        try:
            old = load_config(path).to_dict()
        except ConfigError as e:
            raise SweepError(
                f"run '{run.name}': {run.dir} holds results but its config.yaml "
                f"cannot be read ({e}); move the folder away or use --out"
            ) from None
        new = run.cfg.to_dict()
        if old != new:
            diff = [
                f"{s}.{k}: {old[s][k]!r} -> {new[s][k]!r}"
                for s in new
                for k in new[s]
                if old.get(s, {}).get(k) != new[s][k]
            ]
            raise SweepError(
                f"run '{run.name}': {run.dir} holds results of a different config "
                f"({'; '.join(diff[:5])}); move the folder away, use another --out, "
                f"or undo the change in the spec"
            )
    for run in sweep.runs:
        run.dir.mkdir(parents=True, exist_ok=True)
        if not (run.dir / "config.yaml").is_file() or not _has_progress(run.dir):
            save_config(run.cfg, run.dir / "config.yaml")


def progress(run: Run) -> Progress | None:
    if not (run.dir / "config.yaml").is_file():
        return None
    return run_progress(run.dir, run.cfg)


# ---------------------------------------------------------------- dry run


def estimates(sweep: Sweep) -> list[dict]:
    """Per run: world size and the analytical parameters / bytes the run will move
    (fedmpi.fl.ledger.comparison, the table `python -m fedmpi.comm` prints, 'moved' rule)."""
    from fedmpi.fl.ledger import comparison
    from fedmpi.model.summary import model_region_sizes

    sizes_of: dict = {}
    out = []
    for run in sweep.runs:
        cfg = run.cfg
        if run.centralized:
            moved = {"params": 0, "bytes": 0}
        else:
            key = repr((cfg.model, cfg.data.dataset))
            if key not in sizes_of:
                sizes_of[key] = model_region_sizes(cfg)
            moved = comparison(
                cfg.fed.method, run.clients, cfg.fed.rounds, sizes_of[key], cfg.run.seed
            )["moved"]
        out.append(dict(run=run, world=run.world, params=moved["params"], bytes=moved["bytes"]))
    return out


def dry_run_text(sweep: Sweep) -> str:
    rows = []
    est = estimates(sweep)
    for e in est:
        run, cfg = e["run"], e["run"].cfg
        p = progress(run)
        status = "new" if p is None or (p.done == 0 and not p.finished) else p.text()
        local = f"{cfg.fed.local_steps} steps" if cfg.fed.local_steps else str(cfg.fed.local_epochs)
        rows.append(
            [
                run.name,
                e["world"],
                "centralized" if run.centralized else cfg.fed.method,
                run.clients,
                "-" if run.centralized else cfg.split.kind,
                f"{cfg.train.epochs} ep" if run.centralized else cfg.fed.rounds,
                "-" if run.centralized else local,
                f"{e['params']:,}",
                f"{e['bytes'] / 1e6:,.1f}",
                status,
            ]
        )
    table = format_table(
        ["run", "W", "method", "K", "split", "R", "E", "parameters", "MB", "status"],
        rows,
        align="lrlrlrrrrl",
    )
    total = sum(e["bytes"] for e in est)
    return (
        f"sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.out} (spec {sweep.spec})\n"
        f"{table}\n"
        f"W = world size (K + 1 ranks; 1 = centralized baseline, one process). Parameters "
        f"and MB: what each run moves by the analytical table (initial model + R uploads + "
        f"R downloads, float32, the weight w_k included): {total / 1e6:,.1f} MB in all; largest world "
        f"{max((e['world'] for e in est), default=0)} ranks."
    )


# ---------------------------------------------------------------- local launcher


def _default_mpirun() -> str:
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else "mpirun"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1


@functools.cache
def _is_open_mpi(mpirun: str) -> bool:
    try:
        version = subprocess.run(
            [mpirun, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SweepError(
            f"cannot run '{mpirun} --version' ({e}); give the MPI launcher with --mpirun PATH"
        ) from None
    return bool(re.search(r"open mpi|openrte|prte", version, re.I))


def mpirun_flags(mpirun: str, np_: int) -> list[str]:
    """launch/local.sh's logic: Open MPI refuses root and more ranks than cores unless told."""
    flags = []
    if _is_open_mpi(mpirun):
        if os.geteuid() == 0:
            flags.append("--allow-run-as-root")
        if np_ > _cores():
            flags.append("--oversubscribe")
    return flags


def train_command(run: Run, python: str, mpirun: str, extra_flags: list[str]) -> list[str]:
    train = [python, "-m", "fedmpi.train", "--run-dir", str(run.dir)]
    if run.centralized:
        return train
    return [mpirun, *mpirun_flags(mpirun, run.world), *extra_flags, "-n", str(run.world), *train]


def _last_line(path: Path) -> str:
    lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    errs = [l for l in lines if "error" in l.lower()]
    return (errs or lines or [""])[-1].strip()[:300]


def launch_local(sweep: Sweep, python: str, mpirun: str, extra_flags: list[str], log=print) -> int:
    """Run the sweep's runs one after another; returns the number that did not finish."""
    failed = 0
    n = len(sweep.runs)
    for i, run in enumerate(sweep.runs, 1):
        head = f"[{i}/{n}] {run.name} (W={run.world})"
        p = progress(run)
        if p is not None and p.finished:
            log(f"{head}: {p.text()}, skipped")
            continue
        resume = f"resuming after {p.unit[:-1]} {p.checkpoint}, " if p and p.checkpoint else ""
        cmd = train_command(run, python, mpirun, extra_flags)
        logfile = run.dir / "train.log"
        print(f"{head}: {resume}running ... ", end="", flush=True)
        t0 = time.perf_counter()
        with logfile.open("a") as f:
            f.write(
                f"\n== fedmpi.analysis.sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n"
            )
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        p = progress(run)
        took = f"{time.perf_counter() - t0:.0f}s"
        if rc == 0 and p.finished:
            print(f"done, {p.text()} in {took}", flush=True)
        else:
            failed += 1
            why = f"exit {rc}" if rc else "exit 0 but not finished"
            print(
                f"FAILED ({why}, {p.text()}, {took}): {_last_line(logfile)} -- see {logfile}",
                flush=True,
            )
    log(
        f"sweep {sweep.name}: {n - failed} of {n} runs finished"
        + (f", {failed} failed (rerun the same command to resume them)" if failed else "")
    )
    return failed


# ---------------------------------------------------------------- Slurm launcher


def _default_script() -> Path:
    repo = Path(__file__).resolve().parents[1] / "slurm" / "run.sh"
    return repo if repo.is_file() else Path("slurm/run.sh")


def sbatch_command(
    run: Run, sweep: Sweep, sbatch: str, script: Path, extra: list[str]
) -> list[str]:
    return [
        sbatch,
        "--parsable",
        f"--ntasks={run.world}",
        f"--job-name={sweep.name}-{run.name}",
        f"--output={run.dir.resolve()}/slurm-%j.out",
        *extra,
        str(script),
    ]


def job_env(run: Run) -> dict:
    """What slurm/run.sh reads: the run folder and its config (absolute, so the submit
    directory does not matter); the submitter's python and venv mpirun unless set."""
    env = dict(os.environ)
    env.update(
        RUN_DIR=str(run.dir.resolve()),
        CONFIG=str((run.dir / "config.yaml").resolve()),
        RUN_NAME=run.name,
    )
    env.setdefault("PYTHON", sys.executable)
    venv_mpirun = Path(sys.executable).parent / "mpirun"
    if venv_mpirun.exists():
        env.setdefault("MPIRUN", str(venv_mpirun))
    return env


def parse_job_id(stdout: str) -> str | None:
    m = re.search(r"Submitted batch job (\d+)", stdout) or re.match(r"\s*(\d+)", stdout)
    return m.group(1) if m else None


def _queued(run: Run, squeue: str) -> str | None:
    """The job id of a job this sweep submitted for the run that is still queued/running."""
    ids = run.dir / "slurm_jobs.txt"
    if not ids.is_file() or not ids.read_text().split():
        return None
    job = ids.read_text().split()[-1]
    try:
        p = subprocess.run(
            [squeue, "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None  # no squeue here: cannot tell
    state = p.stdout.strip().split("\n")[0].strip()
    return job if state in ACTIVE_SLURM_STATES else None


def launch_slurm(sweep: Sweep, sbatch: str, script: Path, extra: list[str], log=print) -> int:
    """Submit one job per unfinished run; returns the number of failed submissions."""
    if not Path(script).is_file():
        raise SweepError(
            f"batch script {script} not found; give it with --script "
            f"(the repository's slurm/run.sh)"
        )
    squeue = str(Path(sbatch).with_name("squeue")) if os.sep in sbatch else "squeue"
    failed, ids = 0, []
    n = len(sweep.runs)
    for i, run in enumerate(sweep.runs, 1):
        head = f"[{i}/{n}] {run.name} (--ntasks={run.world})"
        p = progress(run)
        if p is not None and p.finished:
            log(f"{head}: {p.text()}, skipped")
            continue
        job = _queued(run, squeue)
        if job:
            log(f"{head}: job {job} is still queued or running, not submitted again")
            continue
        cmd = sbatch_command(run, sweep, sbatch, script, extra)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=job_env(run), timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            res = subprocess.CompletedProcess(cmd, 1, "", str(e))
        job = parse_job_id(res.stdout) if res.returncode == 0 else None
        if job is None:
            failed += 1
            log(
                f"{head}: sbatch FAILED (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[:300]}"
            )
            continue
        with (run.dir / "slurm_jobs.txt").open("a") as f:
            f.write(job + "\n")
        ids.append(job)
        resume = f", resumes after {p.unit[:-1]} {p.checkpoint}" if p and p.checkpoint else ""
        log(f"{head}: submitted job {job}{resume}")
    log(
        f"sweep {sweep.name}: {len(ids)} jobs submitted"
        + (f": {' '.join(ids)}" if ids else "")
        + (f"; {failed} submissions failed" if failed else "")
    )
    return failed


# ---------------------------------------------------------------- CLI
