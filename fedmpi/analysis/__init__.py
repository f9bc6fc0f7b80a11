"""After the runs: experiment grids, tables and plots.

Owns sweeps (`sweep.py`: a spec expanded into a grid of validated configs and repeats,
runs two sweeps share linked, the dry run; `launch.py`: the runs started with mpirun or as
Slurm jobs and followed), the paper-layout report (`report.py`: run folders read and
grouped into tables; `paper.py`: the paper's numbers, when they apply, and the cells;
`paper_tables.py`: communication, pairwise tests, method order, the K x E matrix, LaTeX;
`report_output.py`: report.md, the CSV and LaTeX files, the PNGs) and plots
(`runs.py`: run folders read as series; `plot.py`: the figures). Run folders are read only
through fedmpi.store.RunFolder.

May import: fedmpi.store, fedmpi.eval, fedmpi.fl, fedmpi.model, fedmpi.config,
fedmpi.errors.
"""
