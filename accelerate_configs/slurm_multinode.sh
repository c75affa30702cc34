#!/bin/bash
# Multi-node training with SLURM: one `sft-hf launch` per node, each starting one process per GPU.
#   bash accelerate_configs/slurm_multinode.sh --config recipes/qwen2.5-0.5b-lora.yaml   # makes logs/, then sbatch
# 120 s before the time limit SLURM sends SIGUSR1: the training saves a checkpoint at the end of its step and stops
# (exit 143), the job requeues itself, and the requeued job goes on from that checkpoint (docs/scale.md).
#SBATCH --job-name=sft-hf
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts GPUS_PER_NODE processes
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --output=logs/%x-%j.out      # SLURM does not create logs/: submit with `bash <this script>`, which does
#SBATCH --open-mode=append           # a requeued job appends to its log
#SBATCH --signal=B:USR1@120          # SIGUSR1 to this script (B:) 120 s before the time limit
#SBATCH --requeue
set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then  # run with bash, not sbatch: make the log folder, then submit this script
    mkdir -p logs
    exec sbatch "$0" "$@"
fi
mkdir -p logs

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # not head: under pipefail its early exit fails the job
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # two jobs sharing a node do not share a port
CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}  # or fsdp.yaml / deepspeed_zero3.yaml
TRAIN_SCRIPT=${TRAIN_SCRIPT:-recipes/train.py}

# On each node ($SLURM_NODEID is expanded there, hence the single quotes) `sft-hf launch` forwards SIGUSR1 and
# SIGTERM to the training processes and waits while they save. --resume_from_checkpoint true: the first job starts
# fresh, a requeued one goes on from the newest complete checkpoint (the same command for both).
export MAIN_IP MAIN_PORT GPUS_PER_NODE CONFIG TRAIN_SCRIPT
requeue=false
SRUN=""
trap 'requeue=true; echo "SIGUSR1: the time limit is near; saving a checkpoint"; [ -z "$SRUN" ] || kill -USR1 "$SRUN"' USR1
srun bash -c 'exec sft-hf launch --config_file "$CONFIG" \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
    "$TRAIN_SCRIPT" --resume_from_checkpoint true "$@"' _ "$@" &
SRUN=$!  # srun forwards the signal to the launcher of each node
while kill -0 "$SRUN" 2>/dev/null; do
    wait "$SRUN" || true  # returns early whenever the trap runs
done
status=0
wait "$SRUN" || status=$?  # srun's exit code: the highest of the nodes'
if $requeue && [ "$status" -eq 143 ]; then  # stopped at a checkpoint because of the time limit
    echo "requeueing job $SLURM_JOB_ID: the requeued job goes on from the newest complete checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
