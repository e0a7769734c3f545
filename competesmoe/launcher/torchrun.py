"""torchrun for preemptible runs: `python -m competesmoe.launcher.torchrun [torchrun args]`.

Differences from plain torchrun, so that a stopped run can be requeued and a diverged one is
told apart:
- when a worker fails with one of the trainer's exit codes (42 stopped with a checkpoint, 3
  diverged, 2 bad input), torchrun exits with that code and one line instead of 1 and a report;
- it ignores SIGUSR1. Slurm signals every process of a job step, and the default action of
  SIGUSR1 would kill torchrun and then its workers before they reach the checkpoint. The
  workers inherit the ignored disposition until the trainer installs its own handler;
- stopped by SIGTERM or Ctrl-C, it passes SIGTERM to the workers, which finish their step and
  checkpoint within torchrun's 30 s grace; it then exits with 42 if they saved, else 128 + the
  signal, with one line. Ctrl-C is handled here rather than by torchrun (which would send the
  workers a second SIGINT, the trainer's signal to abort at once); a second Ctrl-C in a
  terminal reaches the workers directly and aborts them.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

from competesmoe.errors import DivergenceError
from competesmoe.train.signals import REQUEUE_EXIT_CODE, STOP_MARKER_ENV

# Exit codes of the trainer that mean something to a scheduler: passed through as they are.
_TRAINER_EXIT_CODES = {REQUEUE_EXIT_CODE: "stopped with a checkpoint",
                       DivergenceError.exit_code: "training diverged", 2: "bad input"}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    def interrupted(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SignalException("Ctrl-C", sigval=signal.SIGTERM)

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, interrupted)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGHUP,SIGQUIT"
    with tempfile.TemporaryDirectory(prefix="competesmoe-torchrun-") as tmp:
        marker = Path(tmp) / "stopped"
        os.environ[STOP_MARKER_ENV] = str(marker)
        try:
            torchrun_main(argv)
        except ChildFailedError as err:
            _, first = err.get_first_failure()
            if first.exitcode in _TRAINER_EXIT_CODES:
                print(f"torchrun: a training process exited with {first.exitcode} "
                      f"({_TRAINER_EXIT_CODES[first.exitcode]})", file=sys.stderr)
                return first.exitcode
            raise
        except SignalException as err:
            if marker.exists():
                print(f"torchrun: {err}; the run stopped at step {marker.read_text()} with a checkpoint",
                      file=sys.stderr)
                return REQUEUE_EXIT_CODE
            print(f"torchrun: {err}; its training processes were stopped", file=sys.stderr)
            return 128 + err.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
