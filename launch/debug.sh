#!/usr/bin/env bash
# One process on one GPU (or the CPU): the same trainer, model and MoE code path as a
# multi-GPU job at EP=1, for a first run on a new machine and for chasing a bug.
#   launch/debug.sh [--anomaly] [--cpu] [OVERRIDES...]
#     --anomaly  autograd anomaly detection: the first NaN/inf in backward names the forward
#                op that made it (slow)
#     --cpu      run on the CPU even when a GPU is visible
# The preset is debug=single (the tiny model, 50 steps, every step logged); Hydra overrides
# change anything, e.g. launch/debug.sh model=moe_300m data.vocab_size=1024 trainer.max_steps=5
set -euo pipefail

XPAR_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
overrides=(debug=single)
while (($#)); do
  case "$1" in
    --anomaly) overrides+=(trainer.detect_anomaly=true); shift ;;
    --cpu) overrides+=(trainer.device=cpu); shift ;;
    --help | -h) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "launch/debug.sh: error: unknown option $1 (options: --anomaly, --cpu)" >&2; exit 2 ;;
    *) overrides+=("$1"); shift ;;
  esac
done

# One process even inside a torchrun or Slurm allocation, on the first visible GPU.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT
if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # set, maybe empty (no GPU): keep its first
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES%%,*}"
else
  export CUDA_VISIBLE_DEVICES=0
fi
export PYTHONPATH="$XPAR_HOME${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m xpar.train "${overrides[@]}"
