#!/usr/bin/env bash
# Train with torchrun on one node or many:
#   launch/torchrun.sh [--nnodes N] [--nproc-per-node P] [--max-restarts R] [OVERRIDES...]
#
# Every other argument is a Hydra override passed to `python -m xpar.train` unchanged.
# The environment may set the same things (flags win):
#   NNODES          nodes in the job (1)
#   NPROC_PER_NODE  processes per node (the GPU count; without GPUs, the CPU count)
#   MAX_RESTARTS    torchrun restarts after a failure; each resumes the newest checkpoint (0)
#   NODE_RANK       this node's index, 0..NNODES-1 (SLURM_NODEID under Slurm; 0)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous, hosted by node 0 (elastic, restart-safe)
#   RDZV_ID         the job's rendezvous id, the same on every node (xpar)
#   MASTER_ADDR     without RDZV_ENDPOINT: node 0's address for a static rendezvous
#   MASTER_PORT     its port (29500)
#   RUN_NAME        the run's name, hence runs/RUN_NAME; must be the same on every node
#   PYTHON          the interpreter with xpar's dependencies (python)
# One node with neither endpoint runs torchrun --standalone.
set -euo pipefail

XPAR_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
  echo "launch/torchrun.sh: error: $*" >&2
  exit 2
}

gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    local ids
    IFS=, read -ra ids <<< "$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

is_count() {
  if ! [[ "$2" =~ ^[0-9]+$ ]] || (("$2" < $3)); then
    die "$1=$2 must be an integer >= $3"
  fi
}

nnodes="${NNODES:-1}"
nproc="${NPROC_PER_NODE:-}"
max_restarts="${MAX_RESTARTS:-0}"
overrides=()
while (($#)); do
  case "$1" in
    --nnodes) nnodes="${2:-}"; shift 2 || die "--nnodes needs a value" ;;
    --nnodes=*) nnodes="${1#*=}"; shift ;;
    --nproc-per-node) nproc="${2:-}"; shift 2 || die "--nproc-per-node needs a value" ;;
    --nproc-per-node=*) nproc="${1#*=}"; shift ;;
    --max-restarts) max_restarts="${2:-}"; shift 2 || die "--max-restarts needs a value" ;;
    --max-restarts=*) max_restarts="${1#*=}"; shift ;;
    --help | -h) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; overrides+=("$@"); break ;;
    -*) die "unknown option $1 (options: --nnodes, --nproc-per-node, --max-restarts; the rest are Hydra overrides key=value)" ;;
    *) overrides+=("$1"); shift ;;
  esac
done

if [[ -z "$nproc" ]]; then
  nproc="$(gpu_count)"
  ((nproc > 0)) || nproc="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # usable CPUs
fi
is_count NNODES "$nnodes" 1
is_count NPROC_PER_NODE "$nproc" 1
is_count MAX_RESTARTS "$max_restarts" 0
node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
is_count NODE_RANK "$node_rank" 0
((node_rank < nnodes)) || die "NODE_RANK=$node_rank must be below NNODES=$nnodes"

args=(--nnodes "$nnodes" --nproc-per-node "$nproc" --max-restarts "$max_restarts")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  host=false
  ((node_rank == 0)) && host=true
  args+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-xpar}")
  args+=(--rdzv-conf "is_host=$host")
elif [[ -n "${MASTER_ADDR:-}" ]]; then
  args+=(--node-rank "$node_rank" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
elif ((nnodes == 1)); then
  args+=(--standalone)
else
  die "NNODES=$nnodes needs RDZV_ENDPOINT=host:port (c10d) or MASTER_ADDR (static) of node 0"
fi

# A restart must find the checkpoints of the attempt it replaces: fix the run's name.
named=false
for o in "${overrides[@]}"; do [[ "$o" == run_name=* ]] && named=true; done
if ! $named && [[ -n "${RUN_NAME:-}" ]]; then
  overrides+=("run_name=$RUN_NAME")
elif ! $named && ((max_restarts > 0)); then
  ((nnodes == 1)) || die "MAX_RESTARTS=$max_restarts on $nnodes nodes needs RUN_NAME (the same on every node)"
  overrides+=("run_name=$(date +%Y-%m-%d_%H-%M-%S)")
fi

export PYTHONPATH="$XPAR_HOME${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m torch.distributed.run "${args[@]}" -m xpar.train "${overrides[@]}"
