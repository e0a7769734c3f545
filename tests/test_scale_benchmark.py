"""tools/scale_benchmark.py runs end to end at tiny sizes and reports what it claims to."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


FORK_THEN_EXEC = """
import os, subprocess, sys, time
held = bytearray(300 << 20)  # the root's pages: a forked copy shares them until it execs
pid = os.fork()
if pid == 0:  # a copy that never execs: its RSS is the root's, none of it its own
    time.sleep(2.0)
    os._exit(0)
worker = subprocess.Popen([sys.executable, "-c", "x = bytearray(60 << 20); import time; time.sleep(1.5)"])
worker.wait()
os.waitpid(pid, 0)
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS (VmHWM) from /proc")
def test_tree_sampler_counts_workers_from_their_exec(tmp_path):
    """Data workers start by fork then exec: before the exec a worker's RSS is the parent's shared
    pages (the 4- and 8-worker runs once reported the parent's 164 MiB as a worker's peak)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from scale_benchmark import TreeSampler
    finally:
        sys.path.remove(str(ROOT / "tools"))
    root = subprocess.Popen([sys.executable, "-c", FORK_THEN_EXEC])
    sampler = TreeSampler(root.pid, interval=0.02)
    sampler.start()
    assert root.wait(timeout=30) == 0
    sampler.stop.set()
    sampler.join()
    peaks = sorted(sampler.descendant_peaks.values())
    assert peaks and 60 <= peaks[-1] < 150, peaks  # the exec'd worker's 60 MiB, not the root's 300
    assert max(rss for _, rss in sampler.samples) / 2**20 < 300 + 150  # no shared page counted twice


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
    subprocess.run([sys.executable, str(ROOT / "tools" / "scale_benchmark.py"), "data-report",
                    str(out.with_suffix(".json"))], check=True, timeout=60)
    assert out.with_suffix(".md").read_text() == markdown


def _section(tmp_path, section: str, *extra: str) -> dict:
    out = tmp_path / section
    cmd = [sys.executable, str(ROOT / "tools" / "scale_benchmark.py"), section, "--sizes", "tiny", "--out", str(out),
           *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    assert f"tools/scale_benchmark.py {section} --sizes tiny" in out.with_suffix(".md").read_text()
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_build_section_measures_each_rank_and_predicts_its_share(tmp_path):
    report = _section(tmp_path, "build", "--procs", "1", "2")
    assert [(r["procs"], len(r["ranks"])) for r in report["runs"]] == [(1, 1), (2, 2)]
    for run in report["runs"]:
        for rank in run["ranks"]:
            ep = run["procs"]
            assert rank["ep"] == ep and rank["build"]["seconds"] > 0 and rank["build"]["peak_growth_mib"] >= 0
            own = rank["params_dense"] + rank["params_experts"] // ep
            assert rank["build"]["param_mib"] == round(4 * own / 2**20, 1) == rank["build"]["predicted_mib"]
    one, two = report["runs"][0]["ranks"][0], report["runs"][1]["ranks"][1]
    assert one["params_experts"] == two["params_experts"] > 0


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_step_section_times_normal_and_competing_steps(tmp_path):
    report = _section(tmp_path, "step", "--procs", "2", "--batches", "2", "--steps", "2", "--compete-steps", "1")
    (run,) = report["runs"]
    assert run["checkpointing"] == "none" and not run["compile"]
    for rank in run["ranks"]:
        assert rank["tokens_per_step"] == 2 * 2 * 16 and rank["micro_tokens"] == 2 * 16
        step = rank["step"]
        assert step["first_seconds"] > 0 and step["seconds"] > 0 and step["first_peak_growth_mib"] > 0
        assert step["activations_predicted_mib"] > 0 and step["first_predicted_mib"] > step["predicted_mib"]
        assert rank["compete_step"]["seconds"] > 0
        assert rank["compete_step"]["activations_predicted_mib"] >= step["activations_predicted_mib"]


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_ckpt_section_writes_every_weight_and_moment_once(tmp_path):
    report = _section(tmp_path, "ckpt", "--procs", "2")
    (run,) = report["runs"]
    ranks = run["ranks"]
    total = ranks[0]["params_total"]
    written = sum(r["ckpt"]["written_bytes"] for r in ranks)
    # weights + exp_avg + exp_avg_sq in fp32, once each, plus per file a header and an RNG state
    assert 12 * total <= written <= 12 * total + 2 * 40_000
    assert ranks[0]["ckpt"]["written_bytes"] > ranks[1]["ckpt"]["written_bytes"]  # rank 0 also writes the dense
    for r in ranks:
        assert r["ckpt"]["save_seconds"] > 0 and r["ckpt"]["load_seconds"] > 0


def test_fits_section_prints_a_layout_for_each_model_and_cluster(tmp_path):
    out = tmp_path / "fits"
    subprocess.run([sys.executable, str(ROOT / "tools" / "scale_benchmark.py"), "fits", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    fits = json.loads(out.with_suffix(".json").read_text())["fits"]
    assert {(f["model"], f["gpus"]) for f in fits} == {(m, g) for m in ("reference_lm (154M)", "OLMoE-1B-7B-like",
                                                                        "Mixtral-8x7B-like") for g in (8, 64)}
    for f in fits:
        assert f["micro_batch"] == 0 or f["total_gb"] <= 80 - 6
        assert f["gpus"] % f["ep"] == 0
    # full recomputation never fits fewer sequences than none
    by = {(f["model"], f["gpus"], f["checkpointing"]): f["micro_batch"] for f in fits}
    assert all(by[(m, g, "full")] >= by[(m, g, "none")] for m, g, _ in by)
