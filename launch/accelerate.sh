#!/usr/bin/env bash
# launch/accelerate.sh: run `llmkd distill CONFIG` with `accelerate launch`.
#
# Usage:  [VAR=value ...] launch/accelerate.sh CONFIG.yaml [--set key=value ...]
# Run from the repository root. The accelerate YAML only lays out processes; DeepSpeed and
# precision come from the llmkd YAML (`deepspeed:`, `bf16:`), as with the other launchers.
#
#   ACCELERATE_CONFIG  accelerate YAML (default: configs/accelerate/gpu_8x.yaml on GPU,
#                      configs/accelerate/cpu_2proc.yaml on a CPU-only machine)
#   NPROC        processes per node (default: the number of GPUs; 2 on a CPU-only machine)
#   NNODES       machines (default 1); with NNODES>1 set MASTER_ADDR and run the command on
#                every node with its own NODE_RANK (0..NNODES-1)
#   NODE_RANK    this machine's rank (default 0); MASTER_PORT (default 29500)
#   DEVICE       cpu | gpu (default: gpu when torch sees CUDA): adds --set use_cpu=true|false
#   DS_CONFIG    DeepSpeed JSON (adds --set deepspeed=$DS_CONFIG; default: what the YAML says)
#   OMP_NUM_THREADS, PYTHON, DRY_RUN=1  as in launch/torchrun.sh
#
# Examples:
#   launch/accelerate.sh configs/distill/zero3_example.yaml                      # 2 CPU processes
#   NPROC=8 launch/accelerate.sh configs/distill/zero3_example.yaml --set bf16=true
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/accelerate.sh CFG --set bf16=true

CPU_NPROC_DEFAULT=2
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $DEVICE == gpu ]]; then
    ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/gpu_8x.yaml}
else
    ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/cpu_2proc.yaml}
fi
LAYOUT=(--num_processes $(( NPROC * NNODES )) --num_machines "$NNODES")
if [[ $NNODES -gt 1 ]]; then
    LAYOUT+=(--machine_rank "${NODE_RANK:-0}" --main_process_ip "$MASTER_ADDR"
             --main_process_port "$MASTER_PORT")
elif [[ -n $PORT_GIVEN ]]; then
    LAYOUT+=(--main_process_port "$MASTER_PORT")
fi
run "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" "${LAYOUT[@]}" \
    -m llmkd.cli "${DISTILL_ARGS[@]}"
