"""Stop requests from outside: the run finishes its step, saves a checkpoint and exits.

SIGTERM and SIGUSR1 are what Slurm sends before it kills or requeues a job; SIGINT is Ctrl-C.
All three ask for a clean stop. A second Ctrl-C aborts at once (Python's KeyboardInterrupt), for
a user who does not want to wait for the step and the save.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

# The exit code of a run stopped by a signal after saving: the launchers requeue on it.
REQUEUE_EXIT_CODE = 42
# A file the first rank writes (the step) once a stopped run has saved; set by the torchrun
# wrapper (competesmoe.launcher.torchrun), which cannot see its workers' exit codes after a signal.
STOP_MARKER_ENV = "COMPETESMOE_STOP_MARKER"

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Records a stop signal; `agreed()` makes every rank stop at the same step."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        for sig in _STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if signum == signal.SIGINT:
            # The next Ctrl-C raises KeyboardInterrupt wherever the run is.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to abort now)",
                  file=sys.stderr, flush=True)

    def agreed(self, device: torch.device, distributed: bool) -> bool:
        """Whether any rank was asked to stop (a collective when distributed)."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        if distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def mark_stopped(step: int) -> None:
    """Tell a waiting launcher that the run stopped at `step` with a checkpoint."""
    marker = os.environ.get(STOP_MARKER_ENV)
    if marker:
        Path(marker).write_text(str(step))
