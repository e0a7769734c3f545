"""A function applied to a stream of items in worker processes, results in the items' order.

At most `2 * processes` items are in flight (handed out but not yet given back), so memory stays
bounded however long the stream is; the results come back in order, so whatever the number of
processes, the caller sees the same sequence. Workers are started with "spawn" (never forked from
a process that may hold threads: torch, gloo), so, as with any multiprocessing code, a script
that calls this must keep its own work under `if __name__ == "__main__":`. Workers ignore the
signals that stop the preparing process (Ctrl-C, SIGTERM, SIGUSR1): that process decides (the
trainer, for one, finishes its setup on SIGTERM), and its workers finish their current item and
exit; if it is killed outright, they notice within a second and exit too. A worker that dies
(killed, out of memory) stops the map with a DataError instead of a hang.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple

from competesmoe.errors import DataError

# Most worker processes "auto" starts: beyond this the one reading process becomes the bottleneck.
MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: what Slurm or taskset granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | str) -> int:
    """`data.workers` as a number: "auto" is one per available core, at most MAX_AUTO_WORKERS."""
    return min(available_cores(), MAX_AUTO_WORKERS) if workers == "auto" else int(workers)


def _exit_when_orphaned(parent: int) -> None:
    # A killed parent cannot stop its workers, and they would wait for work forever.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _start_worker(parent: int, initializer: Optional[Callable], initargs: Tuple) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], processes: int,
                initializer: Optional[Callable] = None, initargs: Tuple = ()) -> Iterator[Any]:
    """fn(item) for each item, in order, computed by `processes` worker processes, each of which
    first calls initializer(*initargs) once. fn, the items and the results must be picklable.
    Close the generator (or exhaust it) to stop the workers."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            if len(pending) == 2 * processes:
                yield pending.popleft().result()
            pending.append(pool.submit(fn, item))
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise DataError(f"one of {processes} worker processes exited unexpectedly: killed or out of "
                        "memory (try fewer: data.workers), or it failed to start (its error is above; "
                        "a script must run its work under `if __name__ == '__main__':`)") from None
    finally:
        # Never wait for work nobody will read: an error or Ctrl-C here cancels what has not started.
        pool.shutdown(wait=True, cancel_futures=True)
