#!/bin/bash
# fedmpi on a Slurm cluster: one task per rank (rank 0 federator, ranks 1..K clients;
# one task: the centralized baseline on the whole training set, as in
# configs/paper/sweeps/centralized.yaml).
# Submit from the repository root (the job runs in the submit directory; relative CONFIG
# and OUT_DIR paths are resolved there):
#
#   sbatch --ntasks=11 slurm/run.sh configs/paper/fmnist_udec.yaml      # K = 10 clients
#   CONFIG=configs/quickstart.yaml RUN_NAME=qs sbatch --ntasks=3 slurm/run.sh
#   sbatch --ntasks=5 slurm/run.sh configs/quickstart.yaml --fed.rounds=50   # + overrides
#   RUN_NAME=qs sbatch --ntasks=3 slurm/run.sh --fed.rounds=80   # continue qs: more rounds
#
# Environment knobs (sbatch exports the submitting environment):
#   CONFIG        config file when the first argument is not one (default: the run folder's
#                 config.yaml if it exists, else configs/paper/fmnist_full.yaml)
#   RUN_NAME      run folder name (default <job name>-<job id>: a requeued job keeps its id
#                 and therefore its folder), a plain name without '/' or '..';
#                 OUT_DIR (default runs) or RUN_DIR (full path)
#   CLIENTS       expected number of clients K; the job must have K + 1 tasks (K = 0: one
#                 task, the centralized baseline)
#   LAUNCHER      mpirun (default) | srun (needs an MPI built with PMIx/PMI support)
#   MPIRUN        mpirun executable (default: mpirun from PATH)
#   MPIRUN_FLAGS  extra mpirun flags. Open MPI binds each rank to one core by default; with
#                 --cpus-per-task > 1 give it "--map-by slot:PE=4" (= cpus-per-task) or
#                 "--bind-to none" so that torch's threads get the cores Slurm allotted
#                 ("--bind-to none" is also the fix for "binding more cpus than available"
#                 on nodes that declare more CPUs than they have)
#   SRUN_MPI      srun --mpi=... plugin (default pmix; `srun --mpi=list` shows yours)
#   SRUN_FLAGS    extra srun flags, e.g. "--cpu-bind=none"
#   SRUN_WAIT     seconds srun lets the other ranks finish once one has exited (default 60)
#   PYTHON        python of the environment that has fedmpi (default: python from PATH)
#   REQUEUE       1 (default): requeue the job after a checkpoint signal if this start wrote
#                 a new checkpoint; 0: just exit 75 (the job ends FAILED, exit code 75)
#   TORCHINDUCTOR_CACHE_DIR  torch.compile's cache (default: .compile_cache beside the run
#                 folder, shared by the jobs of a sweep: a warm cache compiles in seconds)
#   MPS           1: start the CUDA Multi-Process Service on this node for the job (several
#                 ranks sharing one GPU run their kernels concurrently instead of
#                 time-slicing); single-node jobs; 0 (default): no MPS
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
# The 120 s of --signal must cover the end of the local step under way plus writing one
# checkpoint (the ranks stop after the current step). GPUs: every rank uses
# cuda:(node-local rank % GPUs it sees), so either give each task its own GPU
# (--gpus-per-task=1, the federator gets one too) or let the ranks of a node share its
# GPUs (--gpus-per-node=G).
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

# First argument: the config, unless it is already an override (then CONFIG from the env,
# else the run folder's own config.yaml when resuming, else the default below).
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then CONFIG=$1; shift; fi

# The knobs are checked before anything is launched or created: a typo stops the job here
# with exit 2 (a non-integer in `[ -ne ]` only prints an error, and the script would go on).
# need_int NAME VALUE MIN: VALUE must be a plain decimal integer >= MIN (no sign, no
# leading zero: bash arithmetic would read 010 as octal).
need_int() {
  if ! [[ "$2" =~ ^(0|[1-9][0-9]{0,8})$ ]] || [ "$2" -lt "$3" ]; then
    echo "fedmpi: $1 must be an integer >= $3, got '$2'" >&2
    exit 2
  fi
}
NTASKS=${SLURM_NTASKS:-${SLURM_NPROCS:-2}}
need_int "NTASKS (SLURM_NTASKS: sbatch --ntasks, 1 federator + the clients)" "$NTASKS" 1
CLIENTS=${CLIENTS:-$((NTASKS - 1))}
need_int CLIENTS "$CLIENTS" 0
if [ "$CLIENTS" -ne $((NTASKS - 1)) ]; then
  echo "fedmpi: CLIENTS=$CLIENTS needs --ntasks=$((CLIENTS + 1)), job has $NTASKS tasks" >&2
  exit 2
fi
SRUN_WAIT=${SRUN_WAIT:-60}
need_int SRUN_WAIT "$SRUN_WAIT" 0
REQUEUE=${REQUEUE:-1}
if [ "$REQUEUE" != 0 ] && [ "$REQUEUE" != 1 ]; then
  echo "fedmpi: REQUEUE must be 1 (requeue after a checkpoint signal) or 0, got '$REQUEUE'" >&2
  exit 2
fi
MPS=${MPS:-0}
if [ "$MPS" != 0 ] && [ "$MPS" != 1 ]; then
  echo "fedmpi: MPS must be 1 (start CUDA MPS for this job) or 0, got '$MPS'" >&2
  exit 2
fi
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-fedmpi}-${SLURM_JOB_ID:-local}}
# RUN_NAME is one folder under OUT_DIR: 'a/b', '../x' or '.x' would write the run (and
# look for checkpoints to resume) somewhere else. RUN_DIR is the way to choose any path.
if [ -z "${RUN_DIR:-}" ]; then
  case "$RUN_NAME" in
    ""|.*|*/*|*..*)
      echo "fedmpi: RUN_NAME='$RUN_NAME' must be a plain folder name (no '/', no '..', not" \
           "starting with '.'): the run goes to ${OUT_DIR:-runs}/RUN_NAME; set RUN_DIR to a" \
           "full path to put it elsewhere" >&2
      exit 2 ;;
  esac
fi
RUN_DIR=${RUN_DIR:-${OUT_DIR:-runs}/$RUN_NAME}
if [ -z "${CONFIG:-}" ] && [ -f "$RUN_DIR/config.yaml" ]; then CONFIG=$RUN_DIR/config.yaml; fi
CONFIG=${CONFIG:-configs/paper/fmnist_full.yaml}
LAUNCHER=${LAUNCHER:-mpirun}
MPIRUN=${MPIRUN:-mpirun}
SRUN_MPI=${SRUN_MPI:-pmix}
PYTHON=${PYTHON:-python}
EXIT_PREEMPTED=75
# torch.compile's cache (train.compile): compiled kernels kept next to the runs, shared by
# the ranks, a requeued job and the other jobs of a sweep (a compute node's /tmp, torch's
# default, is often per job; a cold compilation costs minutes per process, a warm one
# seconds). Set TORCHINDUCTOR_CACHE_DIR yourself to put it elsewhere.
if [ -z "${TORCHINDUCTOR_CACHE_DIR:-}" ]; then
  TORCHINDUCTOR_CACHE_DIR=$(dirname "$RUN_DIR")/.compile_cache
  [[ "$TORCHINDUCTOR_CACHE_DIR" == /* ]] || TORCHINDUCTOR_CACHE_DIR=$PWD/$TORCHINDUCTOR_CACHE_DIR
fi
export TORCHINDUCTOR_CACHE_DIR
read -r -a mpirun_flags <<< "${MPIRUN_FLAGS:-}"
read -r -a srun_flags <<< "${SRUN_FLAGS:-}"

case "$LAUNCHER" in
  # srun: no --kill-on-bad-exit=1: after a checkpoint signal every rank exits 75 within a
  # moment, and killing the later ones would turn srun's exit code into 143 (no requeue).
  # --wait instead ends the remaining tasks SRUN_WAIT s after the first one exited (a rank
  # that crashed cannot leave the others hanging until the time limit).
  # Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it on.
  srun)   launch=(srun --mpi="$SRUN_MPI" --kill-on-bad-exit=0 --wait="$SRUN_WAIT")
          [ -n "${SLURM_CPUS_PER_TASK:-}" ] && launch+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
          launch+=(${srun_flags[@]+"${srun_flags[@]}"}) ;;
  mpirun) launch=("$MPIRUN" -n "$NTASKS")
          if "$MPIRUN" --version 2>&1 | grep -qi "open mpi\|openrte\|prte"; then
            [ "$(id -u)" = 0 ] && launch+=(--allow-run-as-root)
            launch+=(-x TORCHINDUCTOR_CACHE_DIR)  # Open MPI passes on only what it is told
          fi
          launch+=(${mpirun_flags[@]+"${mpirun_flags[@]}"}) ;;
  *) echo "fedmpi: LAUNCHER must be srun or mpirun, got '$LAUNCHER'" >&2; exit 2 ;;
esac

what="K=$CLIENTS"
[ "$NTASKS" = 1 ] && what="the centralized baseline"
echo "fedmpi: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}" \
     "| $NTASKS tasks ($what) | config $CONFIG | run $RUN_DIR | launcher ${launch[*]}"

# Forward the checkpoint signal to the launcher, which passes it on to every rank
# (Open MPI 5's mpirun and srun forward SIGUSR1 to the tasks; Open MPI 4's mpirun does
# not, so the script also writes RUN_DIR/PREEMPT, which every rank watches). SIGTERM to
# this script (scancel --batch, kill) is turned into the same clean stop: Open MPI's
# mpirun would kill its ranks 0.25 s after a forwarded SIGTERM, too soon to checkpoint;
# Slurm's SIGKILL after KillWait still ends anything left, so no rank outlives the job.
child="" interrupted=0
forward() {
  interrupted=1
  echo "fedmpi: $1 received: asking the ranks to checkpoint and stop"
  touch "$RUN_DIR/PREEMPT" 2>/dev/null
  [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# Newest complete checkpoint (round_NNNNNN/COMPLETE; zero-padded, so sort works).
latest_checkpoint() {
  local last
  last=$(ls -1d "$RUN_DIR"/checkpoints/round_*/COMPLETE 2>/dev/null | sort | tail -n 1)
  echo "${last%/COMPLETE}"
}
checkpoint_at_start=$(latest_checkpoint)

if [ "$MPS" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-${TMPDIR:-/tmp}/mps-${SLURM_JOB_ID:-$$}}
  export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-$CUDA_MPS_PIPE_DIRECTORY}
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY"
  nvidia-cuda-mps-control -d || { echo "fedmpi: could not start CUDA MPS (nvidia-cuda-mps-control -d)" >&2; exit 2; }
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  echo "fedmpi: CUDA MPS started ($CUDA_MPS_PIPE_DIRECTORY)"
fi

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
    # Requeue only after progress: a time limit too short for one round would otherwise
    # requeue the job forever.
    if [ "$(latest_checkpoint)" = "$checkpoint_at_start" ]; then
      echo "fedmpi: no new checkpoint since this start (${checkpoint_at_start:-none});" \
           "not requeueing -- is --time long enough for one round?" >&2
    # The controller ends this run of the job and puts it back in the queue (same id).
    # Ending it signals this script and its children (scontrol among them) at once: ignore
    # TERM/USR1 from here on (the launcher has exited; nothing is left to forward), or the
    # signal would kill scontrol before its answer and a done requeue read as failed.
    elif trap '' TERM USR1 && scontrol requeue "$SLURM_JOB_ID"; then
      echo "fedmpi: job $SLURM_JOB_ID requeued"
    else
      echo "fedmpi: scontrol requeue failed; resubmit with RUN_NAME=$RUN_NAME" >&2
    fi
  fi
elif [ "$rc" -ne 0 ]; then
  echo "fedmpi: launcher exited with $rc" >&2
fi
exit "$rc"
