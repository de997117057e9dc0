#!/usr/bin/env bash
# Everything GPU-only checked and measured in one command, for a new cluster node: the GPU
# tests (the layer and the trainer on CUDA), the MoE layer benchmark on shapes A/B/C, the
# training backends and the recompute modes on moe_300m; about 5 minutes on one H200.
#   launch/gpu_check.sh [--cpu]
#     --cpu   tiny shapes on the CPU, GPU tests skipped (the test suite runs it)
# Writes $OUT/gpu_report.md and $OUT/gpu_report.jsonl (OUT unset: ./gpu_check_<time>) and exits
# 1 if any step failed, after running the others. Without deepspeed, hydra, pytest and the
# rest installed, it installs the wheels in $XPAR_WHEELS (default: .whl in the checkout) into a
# scratch directory first: on a machine without registry access, collect them beforehand where
# there is one (../shared/gpu/wheels.sh .whl, and pytest's:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     pytest pluggy iniconfig).
set -euo pipefail

XPAR_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
case "${1:-}" in
  --help | -h) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
  "" | --cpu) ;;
  *) echo "launch/gpu_check.sh: error: unknown option $1 (options: --cpu)" >&2; exit 2 ;;
esac

wheels="${XPAR_WHEELS:-$XPAR_HOME/.whl}"
if ! "$py" -c 'import deepspeed, hydra, omegaconf, wandb, datasets, pytest' 2> /dev/null; then
  if ! compgen -G "$wheels/*.whl" > /dev/null; then
    echo "launch/gpu_check.sh: error: deepspeed, hydra-core, wandb, datasets or pytest is missing and" \
      "$wheels holds no wheels; pip install -e . (or collect them with wheels.sh)" >&2
    exit 2
  fi
  site="$(mktemp -d)"
  echo "installing $(find "$wheels" -name '*.whl' | wc -l) wheels from $wheels into $site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$XPAR_HOME${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
exec "$py" -m xpar.bench.gpu_check "$@"
