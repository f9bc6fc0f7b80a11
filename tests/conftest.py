"""Shared test set-up: one torch thread per process (2-core CI machines), markers."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by mpirun / subprocess ranks
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a local Slurm controller (root + apt)")
    config.addinivalue_line("markers", "mpi: launches mpirun with several ranks")
