"""Under mpirun: a training job in which every rank logs each file it opens.

usage: mpirun -n W python tests/mpi_scripts/audit_opens.py LOG_DIR -- <fedmpi.cli.train args>

Each rank writes LOG_DIR/opens_rank<R>.txt, one opened path a line, from a Python audit
hook ('open' events: builtins.open, gzip, os.open, numpy and torch file reads made
through Python). The hook is installed before fedmpi is imported, so nothing is missed.
"""

import os
import sys
from pathlib import Path

# The launcher's rank, read without MPI: the hook must be in place before any import.
rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMIX_RANK")
if rank is None:
    sys.exit("audit_opens.py: no OMPI_COMM_WORLD_RANK / PMIX_RANK; run it under mpirun")
log = open(Path(sys.argv[1]) / f"opens_rank{rank}.txt", "w", buffering=1)  # line-buffered


def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        log.write(f"{os.fsdecode(args[0])}\n")  # written as it happens: survives os._exit


sys.addaudithook(hook)
from fedmpi.cli.train import main

sys.exit(main(sys.argv[3:]))
