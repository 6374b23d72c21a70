# Shared by launch/*.sh (sourced, not run): argument check, device detection, thread counts,
# and the `llmkd distill` argument list. Every launcher runs the SAME YAML; only the process
# layout differs. Variables read here are documented in each launcher's usage header.
set -euo pipefail

usage() {   # print the calling script's header comment (from line 2 to the first blank line)
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
}
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
elif [[ $1 == -h || $1 == --help ]]; then
    usage
    exit 0
fi
CONFIG=$1
shift
if [[ ! -f $CONFIG ]]; then
    echo "$(basename "$0"): config file '$CONFIG' not found (run from the repository root?)" >&2
    exit 2
fi

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
NNODES=${NNODES:-1}
PORT_GIVEN=${MASTER_PORT:+1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-llmkd}}

# cpu or gpu: what torch sees unless DEVICE says otherwise
if [[ -z ${DEVICE:-} ]]; then
    GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [[ ${GPUS:-0} -gt 0 ]]; then DEVICE=gpu; else DEVICE=cpu; fi
fi
if [[ $DEVICE == gpu ]]; then
    GPUS=${GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
    NPROC=${NPROC:-$GPUS}
else
    NPROC=${NPROC:-${CPU_NPROC_DEFAULT:-1}}
fi
if [[ $NNODES -gt 1 && -z ${MASTER_ADDR:-} ]]; then
    echo "$(basename "$0"): NNODES=$NNODES needs MASTER_ADDR (the host name of node 0)" >&2
    exit 2
fi

# 2 processes on 2 cores must not each start 2 OpenMP threads
CORES=$(nproc 2>/dev/null || echo 1)
THREADS=$(( CORES / NPROC ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

# `llmkd distill CONFIG` + launcher overrides first, so the user's own --set values win
DISTILL_ARGS=(distill "$CONFIG")
if [[ $DEVICE == cpu ]]; then
    # use_cpu=true: accelerate then forms the gloo process group (without it a CPU-only
    # machine silently runs every rank as a separate single-process job)
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    DISTILL_ARGS+=(--set use_cpu=true)
else
    DISTILL_ARGS+=(--set use_cpu=false)   # a laptop YAML may say use_cpu: true
fi
if [[ -n ${DS_CONFIG:-} ]]; then
    DISTILL_ARGS+=(--set "deepspeed=$DS_CONFIG")
fi
DISTILL_ARGS+=("$@")

run() {   # run (exec) a command, or print it with DRY_RUN=1
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        printf '%q ' "$@"
        echo
    else
        echo "+ $*" >&2
        exec "$@"
    fi
}
