"""The single-device trainer end to end on a small real corpus."""
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from competesmoe.config import load_config
from competesmoe.train.cli import main as train_main
from competesmoe.train.trainer import REQUEUE_EXIT_CODE, train

from runs import assert_same_weights, final_weights, overrides, read_metrics, train_losses

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.mark.parametrize("router", ["smoe", "competesmoe"])
def test_short_run_learns(router, corpus, tmp_path):
    cfg = load_config(None, overrides(corpus, tmp_path / "run", tmp_path / "cache", **{"model.moe.router": router}))
    result = train(cfg)
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert result.step == 40 and len(losses) == 40
    assert losses[0] == pytest.approx(math.log(512), rel=0.1)  # an untrained model is near uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 0.8
    val_steps = [r["step"] for r in records if "val_loss" in r]
    assert val_steps == [0, 20, 40] and vals[0] == pytest.approx(math.log(512), rel=0.1)
    assert vals[-1] < vals[0] - 0.8 and result.val_loss == vals[-1]
    routing = records[-2]["routing"] if "routing" in records[-2] else records[-1]["routing"]
    assert len(routing["load"]) == 2 and all(abs(sum(layer) - 1) < 1e-6 for layer in routing["load"])
    competed = [r["competing_layers"] for r in records if "loss" in r]  # per step: log_every=1
    if router == "competesmoe":
        assert max(competed) <= 1 and any(c > 0 for c in competed), competed  # a_max=1 caps every step
        assert any(a is not None for r in records if "routing" in r for a in r["routing"]["agreement"])
    else:
        assert sum(competed) == 0
    assert (tmp_path / "run" / "config.yaml").read_text().count("router: " + router) == 1
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000040"


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    full = train(load_config(None, overrides(corpus, tmp_path / "a", tmp_path / "cache", **{"train.steps": 6})))
    accum = train(load_config(None, overrides(corpus, tmp_path / "b", tmp_path / "cache",
                                              **{"train.steps": 6, "train.micro_batch": 2})))
    assert full.step == accum.step == 6
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5)


def test_sigterm_then_rerun_reproduces_the_uninterrupted_run_exactly(corpus, tmp_path):
    args = overrides(corpus, tmp_path / "full", tmp_path / "cache", **{"train.steps": 30})
    reference = train(load_config(SMOKE, args))
    assert reference.step == 30

    run_dir = tmp_path / "stopped"
    args = overrides(corpus, run_dir, tmp_path / "cache", **{"train.steps": 30})
    proc = subprocess.Popen([sys.executable, "-m", "competesmoe.train", str(SMOKE), *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(train_losses(run_dir), default=0) >= 13:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    stopped_at = max(train_losses(run_dir))
    assert 13 <= stopped_at < 30
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"

    # the same command again resumes from the checkpoint written on SIGTERM
    assert train_main([str(SMOKE), *args]) == 0
    resumed, uninterrupted = train_losses(run_dir), train_losses(tmp_path / "full")
    assert sorted(resumed) == list(range(1, 31))  # no step logged twice
    assert resumed == uninterrupted  # bitwise: the same float in every line
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "full"))


def test_larger_steps_continues_the_run(corpus, tmp_path):
    args = overrides(corpus, tmp_path / "run", tmp_path / "cache", **{"train.steps": 10})
    assert train(load_config(None, args)).step == 10
    longer = overrides(corpus, tmp_path / "run", tmp_path / "cache", **{"train.steps": 14})
    assert train(load_config(None, longer)).step == 14
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, 15))


@pytest.mark.parametrize("args,message", [
    (["train.stepz=3"], "train.stepz"),
    (["train.steps=abc"], "train.steps"),
    (["data.sources=[/no/such/dir]"], "/no/such/dir"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path, capsys):
    code = train_main([str(SMOKE), f"run.dir={tmp_path}", f"data.cache_dir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_corrupt_shard_is_reported(corpus, tmp_path, capsys):
    args = overrides(corpus, tmp_path / "run", tmp_path / "cache", **{"train.steps": 2})
    train(load_config(None, args))
    shard = next((tmp_path / "cache").rglob("train_*.bin"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    code = train_main([str(SMOKE), *overrides(corpus, tmp_path / "run2", tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and shard.name in err and "Traceback" not in err


def test_step_profiler_reports_competition_cost(tmp_path):
    from competesmoe.profiling.steps import profile_training_steps

    cfg = load_config(SMOKE, ["model.vocab_size=512", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                              "model.moe.num_experts=4", "model.moe.expert_hidden=8", "train.seq_len=16",
                              "train.global_batch=2"])
    import torch

    rows = profile_training_steps(cfg, torch.device("cpu"), warmup=1, steps=2, trace_dir=tmp_path,
                                  out=tmp_path / "r.json")
    by_name = {r["variant"]: r for r in rows}
    assert by_name["smoe"]["competition_flops"] == 0 and by_name["smoe"]["flop_ratio"] == 1.0
    # forced: both layers run all 4 experts on 32 tokens, forward (2*32*8 + 2*8*32 FLOPs each) + 2x backward
    tokens, expert = 2 * 16, 4 * 32 * 8
    assert by_name["forced"]["competition_flops"] == 2 * 3 * tokens * 4 * expert
    assert by_name["forced"]["competing_layers"] == 2
    for name in ("smoe", "competesmoe", "forced"):
        assert (tmp_path / f"{name}.json").stat().st_size > 10_000  # a chrome trace with events


def test_wandb_when_configured_offline(corpus, tmp_path, monkeypatch):
    """wandb is optional and off by default; configured (offline here: no network), it logs."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = overrides(corpus, tmp_path / "run", tmp_path / "cache",
                     **{"train.steps": 2, "run.wandb_project": "competesmoe-test", "run.wandb_mode": "offline"})
    train(load_config(SMOKE, args))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_adaptive_budget_stop_and_resume_continues_exactly(corpus, tmp_path, monkeypatch):
    """mode=adaptive: a run stopped by a signal at step 13 and resumed logs the same losses, the
    same competing layers and the same schedule state at every step as an uninterrupted run."""
    import os

    import competesmoe.train.trainer as trainer

    extra = {"train.steps": 30, "train.ckpt_every": 100, "model.moe.competition.mode": "adaptive",
             "model.moe.competition.omega": 0.4, "model.moe.competition.a_max": 1}
    train(load_config(None, overrides(corpus, tmp_path / "full", tmp_path / "cache", **extra)))

    real_step, calls = trainer.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    args = overrides(corpus, tmp_path / "stopped", tmp_path / "cache", **extra)
    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    stopped = train(load_config(None, args))
    assert stopped.stopped_early and stopped.step == 13
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert train(load_config(None, args)).step == 30

    def per_step(run_dir):
        return {r["step"]: (r["loss"], r["routing"]["competed"], r["schedule"])
                for r in read_metrics(run_dir) if "loss" in r}

    full, resumed = per_step(tmp_path / "full"), per_step(tmp_path / "stopped")
    assert sorted(resumed) == list(range(1, 31)) and resumed == full  # bitwise, every step
    competed = np.array([full[s][1] for s in range(1, 31)])
    assert competed.sum(1).max() == 1 and competed[13:].sum() > 0  # a_max = 1; it competed after the stop
    estimates = full[30][2]["agreement_estimate"]
    assert all(a is not None for a in estimates)  # both layers were measured and fed back
    assert full[30][2]["rates"] != full[1][2]["rates"]  # and the rates moved with them


def test_gradients_reduce_in_bounded_buckets_in_order():
    import torch

    from competesmoe.train.engine import _buckets

    tensors = [torch.zeros(n) for n in (10, 20, 5, 40, 1, 1)]  # fp32: 40, 80, 20, 160, 4, 4 bytes
    buckets = list(_buckets(tensors, 100))
    assert [[t.numel() for t in b] for b in buckets] == [[10], [20, 5], [40], [1, 1]]
    assert [t for b in buckets for t in b] == tensors  # every tensor once, in order
