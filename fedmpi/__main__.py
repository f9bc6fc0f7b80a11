"""`fedmpi COMMAND ...` (or `python -m fedmpi COMMAND ...`): one command for every entry point.

fedmpi train --config configs/quickstart.yaml      # = python -m fedmpi.train ...
fedmpi evaluate RUN_DIR | sweep SPEC | report DIR | plot DIR | summary | comm | data split
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "train your config (the federated job under mpirun, else the centralized baseline)",
    "evaluate": "re-score a run's checkpoints",
    "sweep": "write, launch and follow an experiment grid",
    "report": "the paper-layout tables of finished runs",
    "plot": "plots of run folders",
    "summary": "a config's UNet regions, parameters and bytes",
    "comm": "the analytical communication table",
    "data": "`data split`: a split's per-client table, HDF5 shards",
    "extractors": "train or check the offline classifier",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: fedmpi COMMAND [options]  (fedmpi COMMAND --help for its options)\n")
        for name, what in COMMANDS.items():
            print(f"  {name:<11} {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command = importlib.import_module(f"fedmpi.cli.{argv[0]}")
    sys.argv[0] = f"fedmpi {argv[0]}"
    return command.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
