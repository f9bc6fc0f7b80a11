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


def pytest_collection_modifyitems(config, items):
    if machine_changing_tests_wanted():
        return
    skip = pytest.mark.skip(
        reason=f"changes this machine (apt-get install slurm munge, daemons as root): run with "
        f"`{SLURM_COMMAND}`"
    )
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)
