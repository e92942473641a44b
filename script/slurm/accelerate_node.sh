#!/usr/bin/env bash
# One node's share of a (multi-node) `accelerate launch`: run it once per node (srun does, in
# script/slurm/train_multinode.sbatch); accelerate then starts one training process per GPU of the node.
#
#   script/slurm/accelerate_node.sh ACCELERATE_CONFIG TRAINER.py [TRAINER ARGS ...]
#
# Where each launch setting comes from (the first that is set):
#   nodes           SLURM_NNODES, NNODES, 1
#   this node       SLURM_NODEID, NODE_RANK, 0
#   main node       MAIN_PROCESS_IP, the first host of SLURM_JOB_NODELIST (scontrol), 127.0.0.1 on one node
#   port            MAIN_PROCESS_PORT, 29500
#   processes/node  PROCS_PER_NODE, SLURM_GPUS_ON_NODE, the GPUs nvidia-smi lists, 1
# DRY_RUN=1 prints the command instead of running it. Run from the repository root; the launcher is
# ACCELERATE (an accelerate executable) if set, else LAUNCH / .env's Python as every script (script/lib/python.sh).
# Preemption: SIGUSR1 / SIGTERM sent to this script are passed on to the training processes (the launcher's
# children: torchrun itself would die on SIGUSR1), which finish their step, checkpoint it and exit 75; this
# script then exits with the launcher's status. docs/scaling.md
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 ACCELERATE_CONFIG TRAINER.py [TRAINER ARGS ...]" >&2
  exit 2
fi
CONFIG=$1
shift
[ -f "$CONFIG" ] || { echo "error: accelerate config $CONFIG not found (see configs/accelerate/)" >&2; exit 2; }

NNODES=${SLURM_NNODES:-${NNODES:-1}}
NODE_RANK=${SLURM_NODEID:-${NODE_RANK:-0}}
if [ -z "${MAIN_PROCESS_IP:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
    MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  elif [ "$NNODES" -eq 1 ]; then
    MAIN_PROCESS_IP=127.0.0.1
  else
    echo "error: $NNODES nodes but no main node: set MAIN_PROCESS_IP (or run under SLURM with scontrol)" >&2
    exit 2
  fi
fi
PORT=${MAIN_PROCESS_PORT:-29500}
if [ -z "${PROCS_PER_NODE:-}" ]; then
  PROCS_PER_NODE=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
  [ "${PROCS_PER_NODE:-0}" -ge 1 ] || PROCS_PER_NODE=1
fi
NUM_PROCESSES=$((NNODES * PROCS_PER_NODE))
source script/lib/python.sh
if [ -n "${ACCELERATE:-}" ]; then
  launcher=("$ACCELERATE" launch)
else
  read -r -a launcher <<< "$LAUNCH"
fi

cmd=("${launcher[@]}" --config_file "$CONFIG"
  --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes "$NUM_PROCESSES"
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$PORT")
if [ "$NUM_PROCESSES" -gt 1 ]; then
  cmd+=(--multi_gpu)  # torchrun under the hood; on a machine without GPUs the core forms a gloo group
fi
cmd+=("$@")
echo "[node $NODE_RANK/$NNODES, $PROCS_PER_NODE processes, main $MAIN_PROCESS_IP:$PORT] ${cmd[*]}" >&2
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
# not exec: this shell stays to pass SLURM's early-warning signal on to the training processes
"${cmd[@]}" &
launcher_pid=$!
forward() {
  echo "[node $NODE_RANK] $1: passed on to the training processes (they checkpoint and exit 75)" >&2
  pkill "-$1" -P "$launcher_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while :; do
  status=0
  wait "$launcher_pid" || status=$?
  kill -0 "$launcher_pid" 2>/dev/null || break  # a trapped signal interrupts `wait`: wait again
done
exit "$status"
