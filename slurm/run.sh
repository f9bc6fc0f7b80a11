#!/bin/bash
# fedmpi on a Slurm cluster: one task per rank (rank 0 federator, ranks 1..K clients).
# Submit from the repository root (the job runs in the submit directory; relative CONFIG
# and OUT_DIR paths are resolved there):
#
#   sbatch --ntasks=11 slurm/run.sh configs/paper/fmnist_udec.yaml      # K = 10 clients
#   CONFIG=configs/quickstart.yaml RUN_NAME=qs sbatch --ntasks=3 slurm/run.sh
#   sbatch --ntasks=5 slurm/run.sh configs/quickstart.yaml --fed.rounds=50   # + overrides
#
# Environment knobs (sbatch exports the submitting environment):
#   CONFIG        config file when no first argument is given
#   RUN_NAME      run folder name (default <job name>-<job id>: a requeued job keeps its id
#                 and therefore its folder); OUT_DIR (default runs) or RUN_DIR (full path)
#   LAUNCHER      mpirun (default) | srun (needs an MPI built with PMIx/PMI support)
#   MPIRUN        mpirun executable (default: mpirun from PATH)
#   MPIRUN_FLAGS  extra mpirun flags, e.g. "--bind-to none" or "--oversubscribe"
#   SRUN_MPI      srun --mpi=... plugin (default pmix; `srun --mpi=list` shows yours)
#   SRUN_FLAGS    extra srun flags, e.g. "--cpu-bind=none"
#   PYTHON        python of the environment that has fedmpi (default: python from PATH)
#   REQUEUE       1 (default): requeue the job after a checkpoint signal; 0: just exit 75
#
# Preemption / time limit: Slurm sends SIGUSR1 to this script 120 s before the limit
# (--signal=B:USR1@120; by hand: scancel --signal=USR1 --batch JOBID). The script forwards
# it to the launcher, which passes it on to every rank; they abandon the current round,
# write the last complete round's checkpoint and exit 75. The script then requeues the job
# (`scontrol requeue`: same job id -> same run folder), and the next start resumes from that
# checkpoint. A plain resubmission with the same RUN_NAME resumes the same way. Requeueing
# needs --requeue below and a cluster that allows it (slurm.conf JobRequeue; some sites
# forbid requeue in certain partitions/QOS -- then the job ends FAILED with exit code 75
# and you resubmit with the same RUN_NAME).
#
# Adapt the #SBATCH lines (partition, account, time, GPUs) and the module lines below.
# Leave 120 s in --signal for at most one local round plus a checkpoint write.
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
# module load openmpi/4.1.6 cuda/12.4      # the MPI that mpi4py was built against
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
LAUNCHER=${LAUNCHER:-mpirun}
MPIRUN=${MPIRUN:-mpirun}
SRUN_MPI=${SRUN_MPI:-pmix}
REQUEUE=${REQUEUE:-1}
PYTHON=${PYTHON:-python}
EXIT_PREEMPTED=75
read -r -a mpirun_flags <<< "${MPIRUN_FLAGS:-}"
read -r -a srun_flags <<< "${SRUN_FLAGS:-}"

case "$LAUNCHER" in
  srun)   launch=(srun --mpi="$SRUN_MPI" --kill-on-bad-exit=1 "${srun_flags[@]}") ;;
  mpirun) launch=("$MPIRUN" -n "$NTASKS")
          if "$MPIRUN" --version 2>&1 | grep -qi "open mpi\|openrte\|prte"; then
            [ "$(id -u)" = 0 ] && launch+=(--allow-run-as-root)
          fi
          launch+=("${mpirun_flags[@]}") ;;
  *) echo "fedmpi: LAUNCHER must be srun or mpirun, got '$LAUNCHER'" >&2; exit 2 ;;
esac

echo "fedmpi: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}" \
     "| $NTASKS tasks (K=$CLIENTS) | config $CONFIG | run $RUN_DIR | launcher ${launch[*]}"

# Forward the checkpoint signal to the launcher, which passes it on to every rank
# (Open MPI's mpirun and srun both forward SIGUSR1 to the tasks). SIGTERM (scancel,
# time limit) is passed on too, so no rank outlives this script.
child="" interrupted=0
forward() {
  interrupted=1
  echo "fedmpi: $1 received, forwarding to the ranks"
  [ -n "$child" ] && kill -"$1" "$child" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"${launch[@]}" "$PYTHON" -m fedmpi.train --config "$CONFIG" --run-dir "$RUN_DIR" "$@" &
child=$!
# A trapped signal makes `wait` return early (128 + signal); wait again for the real exit
# code (bash keeps the status of a finished background child, so this cannot miss it).
while true; do
  interrupted=0
  wait "$child"; rc=$?
  [ "$interrupted" = 1 ] || break
done

if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
  echo "fedmpi: checkpoint written; resume with the same RUN_NAME ($RUN_NAME)"
  if [ "$REQUEUE" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    # The controller ends this run of the job and puts it back in the queue (same id).
    if scontrol requeue "$SLURM_JOB_ID"; then
      echo "fedmpi: job $SLURM_JOB_ID requeued"
    else
      echo "fedmpi: scontrol requeue failed; resubmit with RUN_NAME=$RUN_NAME" >&2
    fi
  fi
elif [ "$rc" -ne 0 ]; then
  echo "fedmpi: launcher exited with $rc" >&2
fi
exit "$rc"
