"""The one progress display: log lines without a terminal, a tqdm bar with one."""
from __future__ import annotations

import re

import pytest

from competesmoe.progress import Progress


def lines_for(updates, total, **kwargs):
    lines = []
    with Progress(total, "job: counting", unit="char", log=lines.append, bar=False, **kwargs) as progress:
        for n in updates:
            progress.update(n)
    return lines


def test_a_line_at_every_ten_percent_with_counts():
    lines = lines_for([7] * 100, total=700)
    percents = [int(re.match(r"job: counting (\d+)% \((\d[\d,]*)/700 char, [\d,]+ char/s\)$", line).group(1))
                for line in lines]
    assert percents == list(range(10, 101, 10))
    assert lines[-1].startswith("job: counting 100% (700/700 char")


def test_big_steps_give_one_line_each_not_one_per_threshold_crossed():
    lines = lines_for([350, 350, 300], total=1000)
    assert [line.split()[2] for line in lines] == ["35%", "70%", "100%"]


def test_min_interval_keeps_only_the_last_line():
    lines = lines_for([1] * 10, total=10, min_interval_s=3600)
    assert len(lines) == 1 and " 100% " in lines[0]


def test_disabled_and_empty_work_show_nothing():
    assert lines_for([5, 5], total=10, enabled=False) == []
    assert lines_for([], total=0) == []


def test_bar_goes_to_stderr_and_closes(capsys):
    lines = []
    progress = Progress(50, "job: bar", unit="doc", log=lines.append, bar=True)
    progress.update(50)
    progress.close()
    progress.close()  # closing twice is harmless
    err = capsys.readouterr().err
    assert err.startswith("\rjob: bar:") and "doc/s" in err
    assert err.endswith("\r")  # cleared when closed (leave=False): later log lines start clean
    assert lines == []


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total"):
        Progress(-1, "x")
    with pytest.raises(ValueError, match="every_percent"):
        Progress(10, "x", every_percent=0)
