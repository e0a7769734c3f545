"""Progress of long work, shown one way everywhere: a tqdm bar when stderr is a terminal, otherwise
a log line every `every_percent` percent (logs and batch jobs get a few readable lines, not a bar
redrawn into a file).

    with Progress(total_chars, "data: tokenizing", unit="char", log=log) as progress:
        for batch in batches:
            ...
            progress.update(len(batch))

This is the ground floor: it imports nothing of ours, so every layer can use it.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional


class Progress:
    """Counts `update(n)` calls towards `total` units of work.

    bar: True or False forces the tqdm bar on or off; None (the default) shows it when stderr is
    a terminal. Without a bar, `log` gets a line each time another `every_percent` percent is done,
    at most one per `min_interval_s` seconds except the line at 100% (percent_lines=False: none,
    for work that logs its own lines, such as training). enabled=False shows nothing (for example
    on every rank but the first). `write` prints a line above the bar (or logs it); `status` sets
    the bar's trailing text. `initial` units were done before (a resumed run).
    """

    def __init__(self, total: int, description: str, unit: str = "it", *, log: Callable[[str], None] = print,
                 bar: Optional[bool] = None, enabled: bool = True, every_percent: int = 10,
                 min_interval_s: float = 0.0, initial: int = 0, percent_lines: bool = True):
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        if not 1 <= every_percent <= 100:
            raise ValueError(f"every_percent must be in 1..100, got {every_percent}")
        self.total, self.description, self.unit = total, description, unit
        self.log, self.enabled, self.percent_lines = log, enabled, percent_lines
        self.every_percent, self.min_interval_s = every_percent, min_interval_s
        self.done = initial
        self._next_percent = (100 * initial // max(total, 1)) // every_percent * every_percent + every_percent
        self._start = self._last_line = time.monotonic()
        self._bar = None
        if enabled and (sys.stderr.isatty() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, unit_scale=True, leave=False,
                             dynamic_ncols=True, file=sys.stderr, initial=initial)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.percent_lines:
            self._maybe_log()

    @property
    def has_bar(self) -> bool:
        return self._bar is not None

    def write(self, text: str) -> None:
        """A line of its own: above the bar, or to `log`."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        elif self.enabled:
            self.log(text)

    def status(self, text: str) -> None:
        """The bar's trailing text (nothing without a bar)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def _maybe_log(self) -> None:
        percent = 100 * self.done // max(self.total, 1)
        if percent < self._next_percent:
            return
        now = time.monotonic()
        if percent < 100 and now - self._last_line < self.min_interval_s:
            return
        rate = self.done / max(now - self._start, 1e-9)
        self.log(f"{self.description} {min(percent, 100)}% ({self.done:,}/{self.total:,} {self.unit}, "
                 f"{rate:,.0f} {self.unit}/s)")
        self._last_line = now
        self._next_percent = percent // self.every_percent * self.every_percent + self.every_percent

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
