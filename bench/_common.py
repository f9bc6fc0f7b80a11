"""Shared helpers of the benchmarks: environment report, launcher, statistics, charts.

Tables and CSV files are fedmpi's own (fedmpi.store.tables): `markdown_table` calls the
one formatter; the benchmarks write and read CSV with fedmpi.store.tables directly.

Not a benchmark itself. Importing it puts the repository root on sys.path, so the
benchmarks run as `python bench/NAME.py` from a checkout without installing fedmpi.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedmpi.store.tables import format_table

RESULTS = ROOT / "bench" / "results"

# A launcher template: {mpirun} is the venv's / PATH's mpirun, {n} the number of ranks.
DEFAULT_LAUNCHER = "{mpirun} -n {n} --oversubscribe --bind-to none"
LAUNCHER_HELP = (
    "launcher template for the ranks; {{n}} = ranks, {{mpirun}} = the venv's or "
    "PATH's mpirun (default: '{}'; Open MPI needs --oversubscribe with more ranks "
    "than cores). On Slurm, inside an allocation: 'srun --mpi=pmix -n {{n}}'; "
    "MPICH/Intel MPI: 'mpiexec -n {{n}}'. Without {{n}}, '-n {{n}}' is appended.".format(
        DEFAULT_LAUNCHER.replace("%", "%%")
    )
)


# ------------------------------------------------------------------ environment


def mpi_library_version() -> str:
    """First line of MPI_Get_library_version, without initialising MPI if it is not."""
    try:
        import mpi4py

        if "mpi4py.MPI" not in sys.modules:
            mpi4py.rc.initialize = False  # a driver process needs no MPI world
        from mpi4py import MPI

        return MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0].strip()
    except Exception as e:  # pragma: no cover - no MPI at all
        return f"unavailable ({type(e).__name__}: {e})"


def environment(world_size: int | str | None, backend: str | None, device=None) -> dict:
    import torch

    try:
        import mpi4py

        mpi4py_version = mpi4py.__version__
    except ImportError:  # pragma: no cover
        mpi4py_version = "missing"
    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev += f" ({torch.cuda.get_device_name(torch.device(dev))})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "host": socket.gethostname(),
        "mpi": mpi_library_version(),
        "mpi4py": mpi4py_version,
        "backend": backend or "-",
        "world_size": world_size if world_size is not None else "-",
        "device": dev,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "cpu_cores": cores,
        "python": platform.python_version(),
    }


def print_environment(title: str, env: dict) -> None:
    print(f"# {title}")
    for k, v in env.items():
        print(f"#   {k:<15} {v}")
    sys.stdout.flush()


# ------------------------------------------------------------------ launching ranks


def find_mpirun() -> str:
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else (shutil.which("mpirun") or "mpirun")


def launch_prefix(template: str, n: int) -> list[str]:
    """The launcher command for n ranks from a template ('srun --mpi=pmix -n {n}')."""
    if "{n}" not in template:
        template += " -n {n}"
    mpirun = find_mpirun()
    return shlex.split(template.format(n=n, mpirun=mpirun))


def launch_env() -> dict:
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_ranks(
    template: str,
    n: int,
    args: Sequence[str],
    log_path: Path | None = None,
    timeout: float | None = None,
    echo: bool = True,
    cwd: Path | None = None,
    code: Path | None = None,
) -> subprocess.CompletedProcess:
    """Launch `python ARGS` on n ranks; stdout+stderr echoed and kept in log_path.
    `code`: import fedmpi from this folder instead of this checkout (e.g. a baseline)."""
    cmd = launch_prefix(template, n) + [sys.executable, *args]
    print(f"$ {shlex.join(cmd)}", flush=True)
    env = launch_env()
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env["PYTHONPATH"]])
    proc = subprocess.run(
        cmd,
        cwd=cwd or ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(proc.stdout)
    if echo:
        sys.stdout.write(proc.stdout)
        sys.stdout.flush()
    return proc


def train_quickstart(run: Path, overrides: Sequence[str]) -> float:
    """A federated quickstart job (configs/quickstart.yaml, 1 federator + 2 clients) into
    run folder `run` with `overrides`; exits with the job's output tails if it fails.
    Returns its seconds."""
    env = dict(launch_env(), OMP_NUM_THREADS="1")
    cmd = launch_prefix(DEFAULT_LAUNCHER, 3) + [sys.executable, "-m", "fedmpi.train"]
    cmd += ["--config", "configs/quickstart.yaml", "--run-dir", str(run), *overrides]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{run.name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise ValueError("empty list")
    return values


# ------------------------------------------------------------------ statistics and output


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def save_result(out_dir, name: str, text: str) -> Path:
    """Write a benchmark's result text to OUT_DIR/NAME (the folder made if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(text + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: str = "") -> str:
    """A markdown table (fedmpi.store.tables.format_table); align: one char per column,
    'l' or 'r' (default r, first l)."""
    return format_table(headers, rows, align=align or None, markdown=True)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
