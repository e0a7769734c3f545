#!/bin/bash
# Pre-training on one device: the GPU if there is one, else the CPU. The smoke run:
#
#   bash launch/local.sh configs/smoke.yaml [key=value ...]
#
# SIGTERM, SIGUSR1 or Ctrl-C stops it after the current step with a checkpoint (exit code 42); the
# same command resumes the run. COMPETESMOE_PYTHON is the interpreter (competesmoe-launch sets it
# to its own, so that the run uses the environment competesmoe is installed in; default python3).
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: bash launch/local.sh CONFIG [key=value ...]" >&2
  exit 2
fi

exec "${COMPETESMOE_PYTHON:-python3}" -m competesmoe.train "$@"
