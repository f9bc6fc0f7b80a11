#!/usr/bin/env bash
# Run a federated job on this machine: launch/local.sh NPROCS CONFIG [--section.key=value ...]
#   NPROCS = K + 1 (rank 0 federator, ranks 1..K clients). Handles root and more ranks than
#   cores for Open MPI; with MPICH (hydra) neither flag is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${1:?usage: launch/local.sh NPROCS CONFIG [overrides]}; CONFIG=${2:?config file}; shift 2
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
MPIRUN=${MPIRUN:-mpirun}
# The ranks' output reaches this terminal through mpirun's pipes, so they cannot see it
# is one: ask for the live progress bar (not batch-log lines) when it is.
if [ -t 2 ]; then
  export FEDMPI_PROGRESS=${FEDMPI_PROGRESS:-bar}
  export COLUMNS=${COLUMNS:-$(tput cols 2>/dev/null || echo 100)}
fi
PY=${PY:-python}
flags=()
if "$MPIRUN" --version 2>&1 | grep -qi "open mpi\|openrte\|prte"; then
  [ "$(id -u)" = 0 ] && flags+=(--allow-run-as-root)
  [ "$NP" -gt "$(nproc)" ] && flags+=(--oversubscribe)
fi
exec "$MPIRUN" "${flags[@]}" -n "$NP" "$PY" -m fedmpi.train --config "$CONFIG" "$@"
