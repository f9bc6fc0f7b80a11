#!/usr/bin/env bash
# The GPU checks of the speed work in one prepared run on a GPU node (one GPU is enough),
# with a baseline checkout measured in the same run:
#
#   git worktree add /tmp/base a45e1b2          # the code to compare against
#   bash bench/gpu_check.sh bench/results/gpu /tmp/base
#
# 1. environment: GPU, torch, MPI, whether that MPI is CUDA-aware (fedmpi.comm's answer);
# 2. one rank's training images/s and DDIM-100 sampling images/s (1,000 images) of the
#    baseline (fp32 eager) and of this checkout (GPU_CHECK_VARIANTS, default: bf16 with
#    CUDA graphs (train.compile_mode reduce-overhead) with and without channels_last, fp32
#    eager, fp32 with CUDA graphs, in that order), with the fraction of the device's peak
#    and the GPU's busy share of a few steps (bench/speed.py --profile);
# 3. a real round of the paper config with 6 ranks sharing the GPU (K = 5, E = 5,
#    fed.backend mpi), baseline vs this checkout with its fastest variant of 2.,
#    from metrics.jsonl (round 1 includes compilation; round 2 is the steady state; as in
#    the paper config no round samples: speed.py measures training after sampling);
# 4. host<->device copies of one aggregation per method, counted with torch.profiler
#    (bench/comm.py --count-copies, 3 ranks on the GPU, fed.backend mpi), after 3.;
# 5. virtual clients: M clients' local steps one after another against batched with
#    torch.func's vmap (bench/batched_clients.py, M = 1, 2, 4, 8);
# 6. if time is left: the same 6-rank round under CUDA MPS (nvidia-cuda-mps-control).
#
# Each part has its own time limit (GPU_CHECK_BUDGET seconds in all, default 720) and
# writes its log to OUT; OUT/summary.md collects the tables. PYTHON (python3) and
# MPIRUN (mpirun) may be set; as root, Open MPI's run-as-root variables are set here.
# GPU_CHECK_DRY=1 runs the same parts tiny on the CPU (a check of this script, no figures).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu}
BASE=${2:-}
PY=$(command -v "${PYTHON:-python3}") || { echo "no python: set PYTHON"; exit 2; }
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
MPIRUN=$(command -v "${MPIRUN:-mpirun}") || { echo "no mpirun: set MPIRUN"; exit 2; }
MPIRUN=$(cd "$(dirname "$MPIRUN")" && pwd)/$(basename "$MPIRUN")  # the rounds run elsewhere
BUDGET=${GPU_CHECK_BUDGET:-720}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && rm -f "$OUT"/*.log
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
DEV=cuda SPEED_SIZE=(--batch 128 --steps 100 --samples 1000 --ddim-steps 100)
ROUND_EXTRA="" VARIANTS=${GPU_CHECK_VARIANTS:-bf16+graphs+cl,bf16+graphs,fp32,fp32+graphs}
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then  # compilation takes minutes on a small CPU
  DEV=cpu SPEED_SIZE=(--batch 8 --steps 2 --samples 4 --ddim-steps 2) VARIANTS=fp32,bf16
  ROUND_EXTRA="--data.train_subset=200 --fed.local_steps=2 --checkpoint.every=1"
fi
MPI_FLAGS="--oversubscribe --bind-to none"  # more ranks than cores is fine for a check
export OUT PY MPIRUN MPI_FLAGS DEV ROUND_EXTRA
START=$(date +%s)

left() { echo $((BUDGET - ($(date +%s) - START))); }
# part NAME LIMIT CMD...: run CMD with at most LIMIT seconds (less if the budget is short)
part() {
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 20 ]; then echo "=== $name: skipped (budget spent)"; return 1; fi
  echo "=== $name (limit ${limit}s, $(date +%T))"
  timeout "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/$name.log" 2>&1  # functions too
  local rc=$?
  echo "--- $name: rc=$rc after $(( $(date +%s) - START ))s in all"
  tail -n 25 "$OUT/$name.log"
  return $rc
}
env_probe() {
  nvidia-smi || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'
  "$MPIRUN" --version | head -1
  "$PY" -c 'from fedmpi.dist.backends import cuda_aware_mpi; print("fedmpi cuda_aware_mpi:", cuda_aware_mpi())'
  "$MPIRUN" $MPI_FLAGS -n 2 "$PY" -c \
    'from mpi4py import MPI; print(MPI.COMM_WORLD.rank, MPI.Get_library_version().splitlines()[0])'
}
rounds() {  # rounds NAME SRC_DIR NROUNDS [overrides...]: a 6-rank job, its metrics
  local name=$1 src=$2 n=$3; shift 3
  rm -rf "$OUT/run_$name"
  (cd "$src" && "$MPIRUN" $MPI_FLAGS -n 6 "$PY" -m fedmpi.train \
     --config configs/paper/fmnist_full.yaml --fed.local_epochs=5 --fed.rounds="$n" \
     --eval.extractor=none --eval.grid=0 --run.device="$DEV" --run-dir "$OUT/run_$name" \
     $ROUND_EXTRA "$@") \
    || return $?
  "$PY" - "$OUT/run_$name/metrics.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if "round_s" in m:
        print(f"round {m['round']}: round_s {m['round_s']:.2f} train_s {m['train_s']:.2f} "
              f"agg_s {m['agg_s']:.3f} ckpt_s {m['ckpt_s']:.3f} eval_s {m.get('eval_s', 0):.2f}")
EOF
}

export -f env_probe rounds
part env 60 env_probe
MPI_OK=$?

SPEED=(bench/speed.py --device "$DEV" "${SPEED_SIZE[@]}" --sample-batch 250)
if [ -n "$BASE" ]; then
  part speed_base 120 "$PY" "${SPEED[@]}" --variants fp32 --fedmpi-src "$BASE" \
    --config "$BASE/configs/paper/fmnist_full.yaml"
fi
part speed 300 "$PY" "${SPEED[@]}" --variants "$VARIANTS" --profile
# this checkout's fastest variant of 2. (as train.* overrides) for the rounds
BEST=$("$PY" - "$OUT/speed.log" <<'EOF'
import re, sys
speed = {}
for line in open(sys.argv[1]):
    m = re.match(r"([a-z0-9+]+): (\d+) img/s train", line)
    if m:
        speed[m.group(1)] = int(m.group(2))
v = max(speed, key=speed.get) if speed else "fp32"
parts = v.split("+")
compiled = "compile" in parts or "graphs" in parts
print(f"--train.precision={parts[0]} --train.compile={str(compiled).lower()} "
      f"--train.channels_last={str('cl' in parts).lower()}"
      + (" --train.compile_mode=reduce-overhead" if "graphs" in parts else ""))
EOF
)
echo "rounds of this checkout with: $BEST"
if [ "$MPI_OK" = 0 ]; then
  [ -n "$BASE" ] && part round_base 150 rounds base "$BASE" 1
  # a compiled variant's round failed in 2026-11 (CUDNN_STATUS_INTERNAL_ERROR, 5 ranks
  # compiling at once): then the same round eager, for the several-ranks figure
  part round_new 240 rounds new . 2 $BEST \
    || { [[ "$BEST" == *compile=true* ]] && part round_eager 200 rounds eager . 2; }
  part copies 90 "$MPIRUN" $MPI_FLAGS -n 3 "$PY" bench/comm.py --quick --count-copies --device "$DEV" \
    --rounds 1 --out-dir "$OUT"
  part batched 120 "$PY" bench/batched_clients.py --device "$DEV" --out-dir "$OUT" \
    $([ "${GPU_CHECK_DRY:-0}" = 1 ] && echo --clients 1,2 --steps 1 --repeats 1 --batch 4)
  if command -v nvidia-cuda-mps-control >/dev/null && [ "$(left)" -gt 150 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
      part round_mps 200 rounds mps . 2 $BEST
      echo quit | nvidia-cuda-mps-control
    fi
  fi
fi

{
  echo "# GPU check $(date -u +%F) ($(( $(date +%s) - START )) s)"
  for f in env speed_base speed copies batched round_base round_new round_eager round_mps; do
    [ -f "$OUT/$f.log" ] || continue
    echo; echo "## $f"; echo '```'
    if [ "$f" = env ]; then head -c 4000 "$OUT/$f.log"; else
      grep -aE "^(\||# (fedmpi from|.*GFLOP|[a-z]+, round|profile)|(fp32|bf16)[a-z+]*: |round [0-9]+: |fedmpi: )|Error" \
        "$OUT/$f.log" | grep -v "^| *--" | tail -n 40; fi
    echo '```'
  done
} >"$OUT/summary.md"
echo "wrote $OUT/summary.md"
