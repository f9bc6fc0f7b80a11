"""Launching a sweep's runs: one after another under mpirun, or one Slurm job each.

`launch_local` runs `python -m fedmpi.train --run-dir RUN_DIR` for each unfinished run
(under `mpirun -n K+1`, or alone for the centralized baseline) and follows it through
its run folder; `launch_slurm` submits `slurm/run.sh` with `sbatch --ntasks=K+1` and
records the job ids in RUN_DIR/slurm_jobs.txt, so a run whose job is still queued or
running is not submitted twice. Finished runs (fedmpi.analysis.report.run_progress)
are skipped by both.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fedmpi.analysis.sweep import Run, Sweep, SweepError, progress

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


# ---------------------------------------------------------------- local launcher


def default_mpirun() -> str:
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


def default_script() -> Path:
    repo = Path(__file__).resolve().parents[2] / "slurm" / "run.sh"
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
        CONFIG=str(run.folder.config_file.resolve()),
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
