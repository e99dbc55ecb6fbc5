# Sourced by the zoscale batch scripts in this folder (not a job by itself).
#
# Sets, from SLURM's variables and the training arguments in ZO_ARGS (an array):
#   ZOSCALE_ROOT   the zoscale checkout (default: the directory sbatch was called from). The job
#                  runs in the submission directory: relative paths (--ds_config, --data,
#                  --output_dir, the log) are relative to it
#   VENV_BIN       its virtual environment's bin/ (override with ZOSCALE_VENV)
#   MASTER_ADDR    the address of the job's first node (`scontrol show hostnames`, then DNS, then
#                  the node's NodeAddr from `scontrol show node`, for clusters whose node names
#                  do not resolve)
#   MASTER_PORT    a port derived from the job id (override with MASTER_PORT); the same after a
#                  requeue, which keeps the job id
#   PROCS_PER_NODE ranks per node: ZOSCALE_PROCS_PER_NODE, else the GPUs SLURM gave this node, else 1
#   OUTPUT_DIR     --output_dir from ZO_ARGS, else runs/slurm/<job name>-<job id> (added to ZO_ARGS)
# and appends to ZO_ARGS:
#   --checkpoint_every N   unless the arguments set it (ZOSCALE_CHECKPOINT_EVERY, default 50):
#                          a preempted job can only resume from a checkpoint it wrote
#   --resume               when OUTPUT_DIR holds a complete checkpoint: a requeued job (same job
#                          id, same OUTPUT_DIR) or a resubmission with the same --output_dir picks
#                          up where the last checkpoint left off. Without a checkpoint the run
#                          starts from step 0 (the trainer's --resume refuses an empty directory).

set -euo pipefail

ZOSCALE_ROOT=${ZOSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
TRAIN=$ZOSCALE_ROOT/launch/train.py
VENV_BIN=${ZOSCALE_VENV:-$ZOSCALE_ROOT/.venv}/bin
export PYTHONPATH=$ZOSCALE_ROOT${PYTHONPATH:+:$PYTHONPATH}

zo_log() { echo "[zoscale-slurm $(date +%T) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }
# Under set -e a failing command ends the script; say which one, so the job log shows why.
trap 'zo_log "failed (exit $?) at ${BASH_SOURCE[0]}:${LINENO}: ${BASH_COMMAND}" >&2' ERR

# --- rendezvous: first node of the allocation, a port from the job id --------------------------
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if getent hosts "$HEAD_NODE" >/dev/null 2>&1; then
  MASTER_ADDR=$HEAD_NODE
else
  MASTER_ADDR=$(scontrol show node "$HEAD_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
fi
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# --- ranks and threads per node -----------------------------------------------------------------
PROCS_PER_NODE=${ZOSCALE_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# One OpenMP pool per rank, sized to the CPUs SLURM gave the task: without it every rank starts
# one thread per core of the node and they oversubscribe it (10-100x slower on CPU ranks).
CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / PROCS_PER_NODE > 0 ? CPUS / PROCS_PER_NODE : 1 ))}

# --- GPU clusters: NCCL ---------------------------------------------------------------------------
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1 makes a stuck NCCL collective raise after --dist_timeout
#   instead of hanging (zoscale's watchdog names a dead rank sooner: --heartbeat_timeout).
# NCCL_SOCKET_IFNAME=ib0 (or eth0, ...): the interface NCCL bootstraps over, when the default
#   route is a management network; GLOO_SOCKET_IFNAME the same for gloo (CPU ranks).
# NCCL_IB_HCA=mlx5 (InfiniBand adapters to use), NCCL_IB_DISABLE=1 only to force TCP.
# On AWS EFA: FI_PROVIDER=efa, FI_EFA_USE_DEVICE_RDMA=1 and the aws-ofi-nccl plugin.
# NCCL_DEBUG=WARN (INFO to see the rings/trees and which transport each hop uses).
# A ZO step needs no gradient traffic: what crosses nodes is ZeRO-3's / FSDP's parameter
# all-gathers (none across replica groups with HSDP) and one 2-float all-reduce per query.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1
# CPU-only nodes: DeepSpeed's CPU accelerator, and no JIT build of its shared-memory comm op.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

# --- output directory, checkpoints, automatic resume ----------------------------------------------
zo_arg_value() {  # zo_arg_value NAME ARGS...: the value of --NAME V, --NAME=V or NAME=V (last one wins)
  local name=$1 prev="" out="" a
  shift
  for a in "$@"; do
    [ "$prev" = "--$name" ] && out=$a
    case "$a" in --"$name"=*|"$name"=*) out=${a#*=} ;; esac
    prev=$a
  done
  printf '%s' "$out"
}

OUTPUT_DIR=$(zo_arg_value output_dir "${ZO_ARGS[@]}")
if [ -z "$OUTPUT_DIR" ]; then
  OUTPUT_DIR=runs/slurm/${SLURM_JOB_NAME:-zoscale}-$SLURM_JOB_ID
  ZO_ARGS+=(--output_dir "$OUTPUT_DIR")
fi
if [ -z "$(zo_arg_value checkpoint_every "${ZO_ARGS[@]}")" ]; then
  ZO_ARGS+=(--checkpoint_every "${ZOSCALE_CHECKPOINT_EVERY:-50}")
fi
RESUMED_FROM=""
if compgen -G "$OUTPUT_DIR/checkpoints/step_*/done" >/dev/null; then
  for done in "$OUTPUT_DIR"/checkpoints/step_*/done; do RESUMED_FROM=$(dirname "$done"); done  # newest last
elif [ -s "$OUTPUT_DIR/steps.jsonl" ]; then  # killed before any checkpoint: the step log alone
  RESUMED_FROM=$OUTPUT_DIR/steps.jsonl
fi
if [ -n "$RESUMED_FROM" ]; then
  case " ${ZO_ARGS[*]} " in *" --resume "*) ;; *) ZO_ARGS+=(--resume) ;; esac
fi
mkdir -p "$OUTPUT_DIR"

zo_log "nodes $SLURM_JOB_NODELIST (head $HEAD_NODE = $MASTER_ADDR:$MASTER_PORT), $PROCS_PER_NODE rank(s) per node," \
       "OMP_NUM_THREADS=$OMP_NUM_THREADS, output $OUTPUT_DIR${RESUMED_FROM:+, resuming from $RESUMED_FROM}"

# --- preemption: checkpoint before the time limit, then requeue ----------------------------------
# The scripts ask SLURM for SIGUSR1 to this batch shell 120 s before the time limit
# (--signal=B:USR1@120). Signalling the ranks directly would also hit the per-node launchers
# (deepspeed, torchrun), which a SIGUSR1 kills; instead the shell creates the run folder's stop
# file (zoscale.train.preemption.STOP_FILE) on the shared file system, every rank sees it after
# its step, they write a checkpoint and exit 75, and the job requeues itself (same id, same
# OUTPUT_DIR: it resumes there). SIGTERM (scancel, a preemption) still reaches every process.
STOP_FILE=$OUTPUT_DIR/PREEMPT
ZO_PREEMPTED=0
zo_on_usr1() {
  ZO_PREEMPTED=1
  zo_log "SIGUSR1: the ranks stop after their current step with a checkpoint ($STOP_FILE)"
  touch "$STOP_FILE"
}

zo_run() {  # zo_run CMD...: the job step, in the background so that the shell takes SIGUSR1 at once
  local pid rc
  rm -f "$STOP_FILE"
  trap zo_on_usr1 USR1
  "$@" &
  pid=$!
  while true; do
    rc=0
    wait "$pid" || rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # the trap ran: still going
    break
  done
  if [ "$rc" -gt 128 ]; then  # interrupted as the step ended: its own status
    rc=0
    wait "$pid" 2>/dev/null || rc=$?
  fi
  trap - USR1
  if [ "$ZO_PREEMPTED" = 1 ] && [ "$rc" != 0 ]; then
    zo_log "stopped for the time limit (exit $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}
