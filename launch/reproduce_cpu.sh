#!/usr/bin/env bash
# The paper's tables, reduced to fit a CPU (configs/reproduce/): the main table (K in
# {2, 5} x IID / label skew x the four methods), the K x E study (FULL, IID, E in {1, 2};
# its E = 1 runs are the main table's, trained once) and the centralized baseline, two
# repeats each, then the report.
#   bash launch/reproduce_cpu.sh [REPORT_DIR]     (default runs/reproduce_cpu/report)
# About 52 minutes on a 2-core VM. Finished runs are skipped, so a second call resumes where a
# stopped one left off. The committed result is docs/reproduce/cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv/bin ] && export PATH="$PWD/.venv/bin:$PATH"
PY=${PY:-python}
OUT=${1:-runs/reproduce_cpu/report}
for sweep in cpu_main cpu_k_by_e cpu_centralized; do
  "$PY" -m fedmpi.sweep "configs/reproduce/sweeps/$sweep.yaml" --launcher local
done
"$PY" -m fedmpi.report runs/reproduce_cpu/main runs/reproduce_cpu/k_by_e \
  runs/reproduce_cpu/centralized --out "$OUT"
