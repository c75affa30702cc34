#!/bin/bash
# Multi-node training with SLURM: one `accelerate launch` per node, each starting one process per GPU.
#   sbatch accelerate_configs/slurm_multinode.sh --config recipes/qwen2.5-0.5b-lora.yaml
#SBATCH --job-name=sft-hf
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts GPUS_PER_NODE processes
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}   # or fsdp.yaml / deepspeed_zero3.yaml

# \$SLURM_NODEID must be expanded on each node, hence the single quotes around the srun command.
export MAIN_IP GPUS_PER_NODE CONFIG
srun bash -c 'accelerate launch --config_file "$CONFIG" \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_IP" --main_process_port 29500 \
    --rdzv_backend c10d \
    recipes/train.py "$@"' _ "$@"
