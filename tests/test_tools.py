"""The benchmark tools run: each at a tiny size, so a stale import or a renamed function in the
code they drive fails here rather than in the hands of whoever reruns a benchmark."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.multiproc
def test_comm_benchmark_counts_the_bytes_of_the_weight_exchange(tmp_path):
    out = tmp_path / "comm.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tools/comm_benchmark.py", "configs/smoke.yaml", "parallel.ep=2", "--tokens", "64",
                           "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    measured = result["measured"]
    # configs/smoke.yaml: E=16 experts of d=128, h=64, relu (w1 [d, h], w2 [h, d]), fp32. Under the
    # weight exchange each of the 2 ranks sends its 8 experts forward and their gradients backward.
    half = 8 * (128 * 64 + 64 * 128) * 4
    assert measured["weights"]["sent_fwd_bytes"] == half
    assert measured["weights"]["sent_bwd_bytes"] == half
    for kind in ("normal", "tokens"):  # the winners spread unevenly: counted bytes near the model's
        counted = measured[kind]["sent_fwd_bytes"] + measured[kind]["sent_bwd_bytes"]
        assert counted == pytest.approx(measured["model_bytes"][kind], rel=0.1), kind
    # OLMoE-1B-7B-like layer: 64 experts, d=2048, h=1024 swiglu (w1 [d, 2h], w2 [h, d]), bf16
    olmoe = result["projected"]["OLMoE-1B-7B-like"]
    assert [row["gpus"] for row in olmoe] == [8, 16, 32, 64, 128, 256, 512]
    assert olmoe[0]["gathered_weights_MB"] == pytest.approx(64 * (2048 * 2048 + 1024 * 2048) * 2 / 1e6)


def test_generate_benchmark_times_every_prompt_and_batch(tmp_path):
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, "tools/generate_benchmark.py", "configs/smoke.yaml", "--prompt-lens", "4,8",
                           "--batch-sizes", "1,2", "--new-tokens", "3", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["prompt_len"], r["batch"]) for r in rows] == [(4, 1), (4, 2), (8, 1), (8, 2)]
    assert all(r["cached_tokens_per_s"] > 0 and r["uncached_tokens_per_s"] > 0 for r in rows)
