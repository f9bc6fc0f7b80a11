"""After the runs: experiment grids, tables and plots.

Owns sweeps (`sweep.py`: a grid of configs launched with mpirun or Slurm and followed), the
paper-layout report (`report.py`) and plots (`plot.py`). Run folders are read only through
fedmpi.store.RunFolder.

May import: fedmpi.store, fedmpi.eval, fedmpi.fl, fedmpi.model, fedmpi.config,
fedmpi.errors.
"""
