#!/bin/bash
# fedmpi on a Slurm cluster: one task per rank (rank 0 federator, ranks 1..K clients).
#
#   sbatch --ntasks=11 slurm/run.sh configs/paper/fmnist_udec.yaml      # K = 10 clients
#   CONFIG=configs/quickstart.yaml RUN_NAME=qs sbatch --ntasks=3 slurm/run.sh
#
# Preemption / time limit: Slurm sends SIGUSR1 to this script 120 s before the limit
# (--signal=B:USR1@120). The script forwards it to the ranks; they abandon the current
# round, write the last complete round's checkpoint and exit 75. The script then
# requeues the job (same job id -> same run folder), and the next start resumes from
# that checkpoint. A plain resubmission with the same RUN_NAME resumes the same way.
#
# Adapt the #SBATCH lines (partition, account, time, GPUs) and the module lines below.
#SBATCH --job-name=fedmpi
#SBATCH --ntasks=11
#SBATCH --cpus-per-task=4
##SBATCH --gpus-per-task=1          # one GPU per rank where nodes have GPUs
##SBATCH --partition=gpu
##SBATCH --account=my_project
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# --- environment (adapt) ------------------------------------------------------------
# module load openmpi/4.1.6 cuda/12.4
# source $HOME/fedmpi/.venv/bin/activate
set -uo pipefail

CONFIG=${1:-${CONFIG:-configs/paper/fmnist_full.yaml}}
shift $(( $# > 0 ? 1 : 0 ))
NTASKS=${SLURM_NTASKS:-${SLURM_NPROCS:-2}}
CLIENTS=${CLIENTS:-$((NTASKS - 1))}
if [ "$CLIENTS" -ne $((NTASKS - 1)) ]; then
  echo "fedmpi: CLIENTS=$CLIENTS needs --ntasks=$((CLIENTS + 1)), job has $NTASKS tasks" >&2
  exit 2
fi
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-fedmpi}-${SLURM_JOB_ID:-local}}
RUN_DIR=${RUN_DIR:-${OUT_DIR:-runs}/$RUN_NAME}
LAUNCHER=${LAUNCHER:-mpirun}          # srun (MPI built with PMI/PMIx support) | mpirun
SRUN_MPI=${SRUN_MPI:-pmix}            # srun --mpi=... (pmix, pmi2; see `srun --mpi=list`)
REQUEUE=${REQUEUE:-1}                 # requeue automatically after a checkpoint signal
PYTHON=${PYTHON:-python}
EXIT_PREEMPTED=75

case "$LAUNCHER" in
  srun)   launch=(srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1) ;;
  mpirun) launch=(mpirun -n "$NTASKS")
          if mpirun --version 2>&1 | grep -qi "open mpi"; then
            [ "$(id -u)" = 0 ] && launch+=(--allow-run-as-root)
          fi ;;
  *) echo "fedmpi: LAUNCHER must be srun or mpirun, got '$LAUNCHER'" >&2; exit 2 ;;
esac

echo "fedmpi: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} | $NTASKS tasks " \
     "(K=$CLIENTS) | config $CONFIG | run $RUN_DIR | launcher ${launch[*]}"

# Forward the checkpoint signal to the launcher, which passes it on to every rank.
child=""
forward() { echo "fedmpi: checkpoint signal received, forwarding to ranks"; \
            [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null; }
trap forward USR1

"${launch[@]}" "$PYTHON" -m fedmpi.train --config "$CONFIG" --run-dir "$RUN_DIR" "$@" &
child=$!
# `wait` returns early when a trapped signal arrives; wait again for the real exit code.
while true; do
  wait "$child"; rc=$?
  kill -0 "$child" 2>/dev/null || break
done

if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
  echo "fedmpi: checkpoint written; resume with the same RUN_NAME ($RUN_NAME)"
  if [ "$REQUEUE" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID" && echo "fedmpi: job $SLURM_JOB_ID requeued"
  fi
fi
exit "$rc"
