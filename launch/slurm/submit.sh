#!/usr/bin/env bash
# Submit launch/slurm/train.sbatch with the cluster settings taken from the environment:
#   ACCOUNT=my_acct PARTITION=gpu NODES=4 TIME=08:00:00 launch/slurm/submit.sh [OVERRIDES...]
#     ACCOUNT        Slurm account (-A), unset: the user's default
#     PARTITION      partition (-p), unset: the cluster's default
#     NODES          nodes (2)
#     GPUS_PER_NODE  GPUs per node, hence processes per node (8)
#     TIME           time limit (04:00:00)
#     JOB_NAME       job name (xpar)
# Run it from the xpar checkout; the job's log is slurm-JOB_NAME-<id>.out there.
set -euo pipefail

XPAR_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
args=(
  --job-name "${JOB_NAME:-xpar}"
  --nodes "${NODES:-2}"
  --gpus-per-node "${GPUS_PER_NODE:-8}"
  --time "${TIME:-04:00:00}"
  --export "ALL,XPAR_HOME=$XPAR_HOME"
)
[[ -n "${ACCOUNT:-}" ]] && args+=(--account "$ACCOUNT")
[[ -n "${PARTITION:-}" ]] && args+=(--partition "$PARTITION")
exec sbatch "${args[@]}" "$XPAR_HOME/launch/slurm/train.sbatch" "$@"
