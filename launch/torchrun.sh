#!/usr/bin/env bash
# launch/torchrun.sh: run `llmkd distill CONFIG` on NPROC processes per node, NNODES nodes.
#
# Usage:  [VAR=value ...] launch/torchrun.sh CONFIG.yaml [--set key=value ...]
# Run from the repository root (DeepSpeed JSON paths inside the YAML are relative to it).
#
#   NPROC        processes per node (default: the number of GPUs; 1 on a CPU-only machine)
#   NNODES       nodes (default 1 = standalone rendezvous on a free port). With NNODES>1 run the
#                same command on every node; MASTER_ADDR (node 0's host) is then required.
#   MASTER_PORT  rendezvous port for NNODES>1 (default 29500)
#   RDZV_ID      rendezvous id shared by the nodes (default: $SLURM_JOB_ID, else "llmkd")
#   NODE_RANK    optional; the c10d rendezvous assigns ranks itself
#   DEVICE       cpu | gpu (default: gpu when torch sees CUDA): adds --set use_cpu=true|false;
#                on CPU the ranks talk over gloo (DDP and DeepSpeed ZeRO-2/3 both work there)
#   DS_CONFIG    DeepSpeed JSON (adds --set deepspeed=$DS_CONFIG; default: what the YAML says),
#                e.g. configs/deepspeed/zero2.json, zero3.json, zero3_offload.json
#   OMP_NUM_THREADS  default: cores / NPROC, at least 1
#   PYTHON       interpreter with llmkd installed (default: python on PATH)
#   DRY_RUN=1    print the command instead of running it
#
# Examples:
#   launch/torchrun.sh configs/distill/zero3_example.yaml --set deepspeed=null     # 1 CPU process
#   NPROC=2 launch/torchrun.sh configs/distill/zero3_example.yaml                  # 2 CPU processes
#   NPROC=8 DS_CONFIG=configs/deepspeed/zero2.json launch/torchrun.sh CFG --set bf16=true
#   NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh CFG --set bf16=true              # on each node

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $NNODES -gt 1 ]]; then
    RDZV=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
          --rdzv_id "$RDZV_ID")
    [[ -n ${NODE_RANK:-} ]] && RDZV+=(--node_rank "$NODE_RANK")
else
    RDZV=(--standalone --nnodes 1)
fi
run "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "$NPROC" \
    -m llmkd.cli "${DISTILL_ARGS[@]}"
