"""Shared test set-up: one torch thread per process (2-core CI machines), markers, and the
tests that change the machine.

Tests marked `slurm` install Slurm and munge with apt-get and start their daemons as root.
They run in CI (CI=true) and when asked (FEDMPI_SLURM_TESTS=1); elsewhere they are
reported as skipped, with the command that runs them.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by mpirun / subprocess ranks
torch.set_num_threads(1)

SLURM_COMMAND = "FEDMPI_SLURM_TESTS=1 .venv/bin/python -m pytest -m slurm"


def machine_changing_tests_wanted() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("FEDMPI_SLURM_TESTS") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slurm: installs and starts a local Slurm (root + apt); CI or FEDMPI_SLURM_TESTS=1",
    )
    config.addinivalue_line("markers", "mpi: launches mpirun with several ranks")


# Seconds each of the longest test files takes alone on the 2-core machine. The suite runs
# a file per worker (pytest-xdist, --dist loadfile); starting the longest files first
# keeps one worker from being left with a long file at the end.
FILE_SECONDS = {
    "test_sweep.py": 310,
    "test_virtual_clients.py": 200,
    "test_federated.py": 240,
    "test_train.py": 180,
    "test_secure_mpi.py": 150,
    "test_compress_mpi.py": 120,
    "test_wan.py": 45,
    "test_faults.py": 145,
    "test_slurm_job.py": 120,
    "test_precision.py": 110,
    "test_guards.py": 90,
    "test_progress.py": 65,
    "test_plot_evaluate.py": 65,
    "test_fid.py": 45,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: file order kept
    if machine_changing_tests_wanted():
        return
    skip = pytest.mark.skip(
        reason=f"changes this machine (apt-get install slurm munge, daemons as root): run with "
        f"`{SLURM_COMMAND}`"
    )
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)
