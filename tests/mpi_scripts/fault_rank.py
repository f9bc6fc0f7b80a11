"""Under mpirun: a training job in which one client misbehaves in one round.

usage: mpirun -n W python tests/mpi_scripts/fault_rank.py FAULT RANK ROUND -- <fedmpi.cli.train args>
FAULT: nan  (the client's weights become NaN after its local training, as after divergence)
       stop (the client stops making progress: SIGSTOP to itself before training)
"""

import os
import signal
import sys

import torch

import fedmpi.train.trainer as trainer
from fedmpi.dist.world import World

fault, fault_rank, fault_round = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rank = World().rank
original = trainer.LocalTrainer.run
calls = {"n": 0}


def run(self, *args, **kwargs):
    calls["n"] += 1
    hit = rank == fault_rank and calls["n"] == fault_round
    if hit and fault == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    out = original(self, *args, **kwargs)
    if hit and fault == "nan":
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float("nan"))
        out["loss"] = float("nan")
    return out


trainer.LocalTrainer.run = run
from fedmpi.cli.train import main

sys.exit(main(sys.argv[5:]))
