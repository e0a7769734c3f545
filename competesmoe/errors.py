"""Errors a user can act on, and how the command-line tools report them.

Every console entry point runs through `cli_main`: an error of ours is printed as one line
(`error: ...`) and exits with its `exit_code`; a closed output pipe (`... | head`) ends the tool
quietly; Ctrl-C outside training (which handles it itself) exits 130 without a traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


class CompeteSMoEError(Exception):
    """Base class: something in the user's input or files is wrong, and the message says what."""

    exit_code = 2


class ConfigError(CompeteSMoEError, ValueError):
    """A config key is unknown, has the wrong type, or has a value out of range; the key is named."""


class DataError(CompeteSMoEError):
    """A data source or a prepared shard is missing, truncated or corrupt."""


class CheckpointError(CompeteSMoEError):
    """A checkpoint is incomplete, corrupt, or belongs to a different model."""


class DivergenceError(CompeteSMoEError):
    """Training produced non-finite values and the run's policy says to stop. Its exit code differs
    from a usage error's (2) and from a requeue (42), so a scheduler can tell the three apart."""

    exit_code = 3


def cli_main(main: Callable[[], int]) -> int:
    """Run a command-line tool's body and turn what can go wrong into an exit code."""
    try:
        return main()
    except CompeteSMoEError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        # The reader went away (`| head`). Point stdout at /dev/null so that the interpreter's
        # own flush at exit does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
