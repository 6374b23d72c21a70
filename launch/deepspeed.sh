#!/usr/bin/env bash
# launch/deepspeed.sh: run `llmkd distill CONFIG` with DeepSpeed's own launcher (`deepspeed`).
#
# Usage:  [VAR=value ...] launch/deepspeed.sh CONFIG.yaml [--set key=value ...]
# Run from the repository root. Which ZeRO stage is used comes from the YAML's `deepspeed:` key
# or DS_CONFIG; without either the run is plain DDP (the launcher alone does not enable ZeRO).
#
#   DS_CONFIG    DeepSpeed JSON (adds --set deepspeed=$DS_CONFIG), e.g. configs/deepspeed/zero2.json,
#                zero3.json, zero3_offload.json (default: what the YAML says)
#   NPROC        processes per node (default: the number of GPUs; 1 on a CPU-only machine)
#   NNODES       nodes (default 1). NNODES>1 needs HOSTFILE ("host slots=8" lines, passwordless
#                ssh/pdsh from node 0) and MASTER_ADDR; run the command on node 0 only
#   HOSTFILE     DeepSpeed hostfile for NNODES>1
#   MASTER_PORT  default 29500 (set another one to run two jobs on one machine)
#   DEVICE       cpu | gpu (default: gpu when torch sees CUDA): adds --set use_cpu=true|false;
#                cpu also sets DS_ACCELERATOR=cpu; ranks then talk over gloo
#   OMP_NUM_THREADS, PYTHON, DRY_RUN=1  as in launch/torchrun.sh
#
# Examples:
#   NPROC=2 DS_CONFIG=configs/deepspeed/zero2.json launch/deepspeed.sh configs/distill/zero3_example.yaml
#   NPROC=8 launch/deepspeed.sh configs/distill/zero3_example.yaml --set bf16=true
#   NNODES=2 NPROC=8 HOSTFILE=hostfile MASTER_ADDR=node0 launch/deepspeed.sh CFG --set bf16=true

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LAYOUT=(--num_gpus "$NPROC" --master_port "$MASTER_PORT")
if [[ $NNODES -gt 1 ]]; then
    if [[ -z ${HOSTFILE:-} ]]; then
        echo "$(basename "$0"): NNODES=$NNODES needs HOSTFILE (lines like 'node0 slots=8')" >&2
        exit 2
    fi
    LAYOUT+=(--num_nodes "$NNODES" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
fi
run "$PYTHON" -m deepspeed.launcher.runner "${LAYOUT[@]}" --no_local_rank \
    --module llmkd.cli "${DISTILL_ARGS[@]}"
