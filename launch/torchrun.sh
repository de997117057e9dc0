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
#   LOCAL_ADDR      this node's address as the other nodes reach it (torchrun --local-addr);
#                   set it where the host name resolves to a loopback address, or the workers
#                   of other nodes wait for node 0's store at "localhost"
#   RUN_NAME        the run's name, hence runs/RUN_NAME; must be the same on every node
#   SHUTDOWN_TIMEOUT  seconds workers get to save after SIGTERM before SIGKILL (110)
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
  if ! [[ "$2" =~ ^[0-9]+$ ]] || ((10#$2 < $3)); then
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
node_rank="${NODE_RANK:-${SLURM_NODEID:-}}"
if [[ -n "$node_rank" ]]; then
  is_count NODE_RANK "$node_rank" 0
  ((10#$node_rank < nnodes)) || die "NODE_RANK=$node_rank must be below NNODES=$nnodes"
fi
shutdown_timeout="${SHUTDOWN_TIMEOUT:-110}"
is_count SHUTDOWN_TIMEOUT "$shutdown_timeout" 1

args=(--nnodes "$nnodes" --nproc-per-node "$nproc" --max-restarts "$max_restarts")
args+=(--shutdown-timeout "$shutdown_timeout")
[[ -z "${LOCAL_ADDR:-}" ]] || args+=(--local-addr "$LOCAL_ADDR")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  args+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-xpar}")
  if [[ -n "$node_rank" ]]; then  # else torch asks whether the endpoint names this host
    host=false
    ((10#$node_rank == 0)) && host=true
    args+=(--rdzv-conf "is_host=$host")
  fi
elif [[ -n "${MASTER_ADDR:-}" ]]; then
  ((nnodes == 1 || max_restarts == 0)) \
    || die "MAX_RESTARTS=$max_restarts on $nnodes nodes needs RDZV_ENDPOINT (c10d): a static rendezvous does not restart other nodes"
  args+=(--node-rank "${node_rank:-0}" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
elif ((nnodes == 1)); then
  args+=(--standalone)
else
  die "NNODES=$nnodes needs RDZV_ENDPOINT=host:port (c10d) or MASTER_ADDR (static) of node 0"
fi

# A restart must find the checkpoints of the attempt it replaces: fix the run's name.
named=false
for o in ${overrides[@]+"${overrides[@]}"}; do [[ "$o" == run_name=* ]] && named=true; done
if ! $named && [[ -n "${RUN_NAME:-}" ]]; then
  overrides+=("run_name=$RUN_NAME")
elif ! $named && ((max_restarts > 0)); then
  ((nnodes == 1)) || die "MAX_RESTARTS=$max_restarts on $nnodes nodes needs RUN_NAME (the same on every node)"
  overrides+=("run_name=$(date +%Y-%m-%d_%H-%M-%S)")
fi

# Each rendezvous round gets a fresh store: keys a killed attempt left in a shared one would be
# read as the next attempt's addresses.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export PYTHONPATH="$XPAR_HOME${PYTHONPATH:+:$PYTHONPATH}"
# xpar.torchrun is torchrun that ends a job its workers refused (bad input) with their one
# `xpar: error:` line last and exit code 2, as one process would.
exec "${PYTHON:-python}" -m xpar.torchrun "${args[@]}" \
  -m xpar.train ${overrides[@]+"${overrides[@]}"}
