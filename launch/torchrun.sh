#!/bin/bash
# Pre-training on one node with torchrun: one process per visible GPU, or
# COMPETESMOE_PROCS_PER_NODE processes (on the CPU with gloo when there is no GPU).
#
#   bash launch/torchrun.sh CONFIG [key=value ...]
#
# To stop and keep the progress, send SIGTERM to torchrun: it passes the signal to the training
# processes, which finish their step, save a checkpoint within its 30 s grace and exit; the same
# command resumes the run. OMP_NUM_THREADS, NCCL_* and PYTORCH_ALLOC_CONF are kept when set.
# COMPETESMOE_PYTHON is the interpreter (competesmoe-launch sets it to its own; default python3).
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: bash launch/torchrun.sh CONFIG [key=value ...]" >&2
  exit 2
fi

python=${COMPETESMOE_PYTHON:-python3}
procs=${COMPETESMOE_PROCS_PER_NODE:-$("$python" -c 'import torch; print(torch.cuda.device_count())')}
if [ "$procs" -lt 1 ]; then
  echo "error: no GPU visible: set COMPETESMOE_PROCS_PER_NODE to run that many CPU processes" >&2
  exit 2
fi

threads=$(($(nproc) / procs))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}

exec "$python" -m competesmoe.launcher.torchrun --standalone --nproc-per-node="$procs" \
  -m competesmoe.train "$@"
