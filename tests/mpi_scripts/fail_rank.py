"""Under mpirun: a training job in which one client raises in its second round.

usage: mpirun -n W python tests/mpi_scripts/fail_rank.py FAIL_RANK -- <fedmpi.cli.train args>
"""

import sys

import fedmpi.train.trainer as trainer
from fedmpi.dist.world import World

fail_rank = int(sys.argv[1])
rank = World().rank
original = trainer.LocalTrainer.run
calls = {"n": 0}


def run(self, *args, **kwargs):
    calls["n"] += 1
    if rank == fail_rank and calls["n"] == 2:
        raise RuntimeError(f"injected failure on rank {rank}")
    return original(self, *args, **kwargs)


trainer.LocalTrainer.run = run
from fedmpi.cli.train import main

sys.exit(main(sys.argv[3:]))
