"""torchrun for preemptible runs: `python -m competesmoe.launcher.torchrun [torchrun args]`.

Two differences from plain torchrun, both so that a run stopped by Slurm can be requeued:
- it exits with the trainer's REQUEUE_EXIT_CODE when the first worker to exit did so (plain
  torchrun turns any failing worker into exit code 1);
- it ignores SIGUSR1. Slurm signals every process of a job step, and the default action of
  SIGUSR1 would kill torchrun and then its workers before they reach the checkpoint. The
  workers inherit the ignored disposition until the trainer installs its own handler.
"""
from __future__ import annotations

import signal
import sys

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
