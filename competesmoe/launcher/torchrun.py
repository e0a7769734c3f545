"""torchrun for preemptible runs: `python -m competesmoe.launcher.torchrun [torchrun args]`.

Differences from plain torchrun, so that a stopped run can be requeued:
- it exits with the trainer's REQUEUE_EXIT_CODE when the first worker to exit did so (plain
  torchrun turns any failing worker into exit code 1);
- it ignores SIGUSR1. Slurm signals every process of a job step, and the default action of
  SIGUSR1 would kill torchrun and then its workers before they reach the checkpoint. The
  workers inherit the ignored disposition until the trainer installs its own handler;
- stopped by SIGTERM (torchrun passes it to the workers, which checkpoint on it, and waits up
  to 30 s for them), it exits with 128 + 15 and a one-line message instead of a traceback.
"""
from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from competesmoe.train.trainer import REQUEUE_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        torchrun_main(argv)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode == REQUEUE_EXIT_CODE:
            return REQUEUE_EXIT_CODE
        raise
    except SignalException as err:
        print(f"torchrun: {err}; its training processes were stopped", file=sys.stderr)
        return 128 + err.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
