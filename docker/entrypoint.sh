#!/usr/bin/env bash
# Entrypoint of the xpar image (docker/Dockerfile):
#   (no arguments)              the default job on every GPU: launch/torchrun.sh
#   key=value ... / --opt ...   launch/torchrun.sh with these Hydra overrides and launcher options
#   COMMAND [ARGS...]           COMMAND itself: torchrun ..., python -m xpar.train ..., bash, ...
# XPAR_HOME is the xpar tree whose launch/torchrun.sh runs (/opt/xpar in the image).
#
# Signals: whatever runs is exec'd, so the job (torchrun or python) replaces this script and gets
# SIGTERM itself; xpar saves a checkpoint on SIGTERM. Under `docker run` the job is then PID 1,
# which the kernel spares the signals it has no handler for and which must reap orphans: run
# with `docker run --init` (tini as PID 1 forwards signals and reaps). Slurm's container plugins
# start tasks as ordinary processes and run this entrypoint only when asked (pyxis:
# --container-entrypoint; Apptainer: `run`, not `exec`); the image works without it.
set -euo pipefail

XPAR_HOME="${XPAR_HOME:-/opt/xpar}"

# Hydra overrides (key=value, group=option, +key=value, ++key=value, ~key) and launcher options
# (-x, --x) go to the launcher; a command name holds no '='.
is_job_argument() {
  [[ "$1" == *=* || "$1" == [-+~]* ]]
}

if (($# == 0)) || is_job_argument "$1"; then
  launcher="$XPAR_HOME/launch/torchrun.sh"
  if [[ ! -x "$launcher" ]]; then
    echo "xpar entrypoint: error: $launcher is not an executable file (XPAR_HOME=$XPAR_HOME)" >&2
    exit 2
  fi
  exec "$launcher" "$@"
fi

if ! command -v -- "$1" > /dev/null 2>&1; then
  echo "xpar entrypoint: error: '$1' is neither a command in the image nor a Hydra override" \
    "(key=value), e.g. trainer.max_steps=100 or torchrun ... -m xpar.train ..." >&2
  exit 127
fi
exec "$@"
