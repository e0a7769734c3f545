"""tools/scale_benchmark.py runs end to end at tiny sizes and reports what it claims to."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS (VmHWM) from /proc")
def test_data_section_measures_each_size_and_worker_count(tmp_path):
    out = tmp_path / "result"
    cmd = [sys.executable, str(ROOT / "tools" / "scale_benchmark.py"), "data", "--sizes-mib", "0.25", "0.5",
           "--part-mib", "0.25", "--workers", "1", "2", "--vocab-size", "400", "--tokenizer-train-chars", "50000",
           "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(out.with_suffix(".json").read_text())
    runs = report["runs"]
    assert [(r["workers"], r["sources"]) for r in runs] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    corpus = json.loads((tmp_path / "work" / "corpus" / "corpus.json").read_text())
    assert [r["text_mib"] for r in runs] == [round(sum(p["text_bytes"] for p in corpus["parts"][:n]) / 2**20, 1)
                                             for n in (1, 1, 2, 2)]
    for r in runs:
        assert r["parent_peak_rss_mib"] > 10 and r["tree_rss_peak_mib"] > 10 and r["wall_s"] > 0
        assert [p["phase"] for p in r["phases"]] == ["fingerprint", "scan", "tokenizer", "tokenize", "verify"]
    assert runs[0]["worker_peak_rss_mib"] == 0  # one worker: tokenized in the preparing process
    # The corpus is small enough for one task, so two workers also tokenize in-process: same tokens.
    assert runs[0]["tokens"] == runs[1]["tokens"] and runs[2]["tokens"] == runs[3]["tokens"]
    assert runs[2]["tokens"]["train"] > runs[0]["tokens"]["train"]
    markdown = out.with_suffix(".md").read_text()
    assert "tools/scale_benchmark.py data --sizes-mib 0.25 0.5" in markdown and markdown.count("\n| 0.") >= 8
    out.with_suffix(".md").unlink()
    subprocess.run([sys.executable, str(ROOT / "tools" / "scale_benchmark.py"), "data-report", str(out.with_suffix(".json"))],
                   check=True, timeout=60)
    assert out.with_suffix(".md").read_text() == markdown
