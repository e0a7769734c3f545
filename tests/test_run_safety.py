"""A long unattended run must never lose its good state: divergence, changed configs on resume,
corrupt checkpoints, stop signals, and one-line errors for bad input."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from competesmoe.config import load_config
from competesmoe.errors import ConfigError
from competesmoe.export.ckpt_cli import main as ckpt_main
from competesmoe.train.checkpoint import CheckpointReader, resolve_checkpoint
from competesmoe.train.cli import main as train_main
from competesmoe.train.metrics import strict_json
from competesmoe.train.signals import REQUEUE_EXIT_CODE

from runs import overrides, train_losses

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def strict_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON: NaN / Infinity are refused."""
    def refuse(name):
        raise ValueError(f"{name} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def finite_weights(checkpoint: Path) -> bool:
    reader = CheckpointReader(checkpoint)
    return all(torch.isfinite(reader.read(t)).all() for t in reader.tensor_names() if t.startswith("model/"))


def run_cli(capsys, args) -> tuple[int, str, str]:
    code = train_main([str(SMOKE), *args])
    out, err = capsys.readouterr()
    return code, out, err


# -- divergence ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_run(corpus, tmp_path_factory):
    """8 healthy steps, checkpoints at 4 and 8, keep_last=1."""
    tmp = tmp_path_factory.mktemp("good")
    args = overrides(corpus, tmp / "run", tmp / "cache", **{"train.steps": 8, "train.ckpt_every": 4,
                                                             "train.keep_last": 1})
    assert train_main([str(SMOKE), *args]) == 0
    return tmp


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_divergence_keeps_the_good_checkpoint_and_exits_3(policy, good_run, corpus, tmp_path, capsys):
    """Resumed with a learning rate that blows the weights up: the non-finite steps are not applied,
    no checkpoint is written from them, the good one survives keep_last=1, metrics.jsonl stays strict
    JSON with the skipped steps counted, and the run stops with exit code 3 naming the step and the
    last good checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(good_run / "run", run_dir)
    args = overrides(corpus, run_dir, good_run / "cache", **{
        "train.steps": 30, "train.ckpt_every": 2, "train.keep_last": 1, "train.lr": 1e4, "train.warmup_steps": 0,
        "train.grad_clip": 0, "train.nonfinite": policy, "train.max_skipped_steps": 3,
        "run.allow_changes": "[train.lr,train.warmup_steps,train.grad_clip]"})
    code, out, err = run_cli(capsys, args)
    good = run_dir / "checkpoints" / "step_00000008"
    assert code == 3, out + err
    assert err.startswith("error: step ") and f"the last good checkpoint is {good}" in err
    assert len(err.strip().splitlines()) == 1
    records = strict_records(run_dir)
    skipped = sum(r.get("skipped_steps", 0) for r in records)
    assert skipped == (1 if policy == "stop" else 4)
    flagged = [r for r in records if r.get("skipped_steps")]
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("grad_norm" in r.get("nonfinite", []) for r in flagged)
    # every checkpoint left has finite weights, and the good one is among them
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert "step_00000008" in kept
    assert all(finite_weights(run_dir / "checkpoints" / name) for name in kept)
    assert ckpt_main(["verify", str(run_dir)]) == 0


def test_stop_policy_without_checkpoint_says_so(corpus, tmp_path, capsys):
    args = overrides(corpus, tmp_path / "run", tmp_path / "cache", **{
        "train.steps": 10, "train.lr": 1e4, "train.warmup_steps": 0, "train.grad_clip": 0, "train.nonfinite": "stop"})
    code, _, err = run_cli(capsys, args)
    assert code == 3 and "no checkpoint was written yet" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_strict_json_writes_null_and_names_the_keys():
    line = strict_json({"step": 3, "loss": math.nan, "routing": {"s_mean": [1.0, math.inf]}, "lr": 0.1})
    assert json.loads(line) == {"step": 3, "loss": None, "routing": {"s_mean": [1.0, None]}, "lr": 0.1,
                                "nonfinite": ["loss", "routing.s_mean[1]"]}


@pytest.mark.multiproc
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_nonfinite_on_one_rank_skips_the_step_on_every_rank(zero_stage):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tests/workers/nonfinite.py", str(zero_stage)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ok = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(ok) == (4 if zero_stage == 0 else 3), proc.stdout


# -- what resuming may change --------------------------------------------------------------------

@pytest.fixture()
def finished(good_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(good_run / "run", run_dir)
    return run_dir


def test_refused_resume_leaves_config_yaml_alone(finished, corpus, good_run, capsys):
    before = (finished / "config.yaml").read_text()
    args = overrides(corpus, finished, good_run / "cache", **{"train.steps": 10, "model.d_model": 256})
    code, _, err = run_cli(capsys, args)
    assert code == 2 and "model.d_model (32 -> 256)" in err
    assert (finished / "config.yaml").read_text() == before
    assert sorted(p.name for p in finished.glob("config*.yaml")) == ["config.yaml"]


def test_method_change_is_refused_naming_every_key(finished, corpus, good_run, capsys):
    args = overrides(corpus, finished, good_run / "cache", **{
        "train.steps": 10, "model.moe.router": "smoe", "model.moe.competition.omega": 0.5, "train.lr": 1e-3})
    code, _, err = run_cli(capsys, args)
    assert code == 2
    for key in ("model.moe.router ('competesmoe' -> 'smoe')", "model.moe.competition.omega (0.3 -> 0.5)",
                "train.lr (0.003 -> 0.001)"):
        assert key in err, err
    assert "run.allow_changes=[model.moe.competition.omega,model.moe.router,train.lr]" in err
    assert CheckpointReader(resolve_checkpoint(finished)).trainer["config"]["model"]["moe"]["router"] == "competesmoe"
    assert "router: competesmoe" in (finished / "config.yaml").read_text()


def test_allowed_and_harmless_changes_resume_with_notes_and_keep_the_old_config(finished, corpus, good_run, capsys):
    old_config = (finished / "config.yaml").read_text()
    args = overrides(corpus, finished, good_run / "cache", **{
        "train.steps": 10, "train.log_every": 2, "train.ckpt_every": 5, "model.moe.competition.omega": 0.5,
        "run.allow_changes": "[model.moe.competition]"})
    code, out, err = run_cli(capsys, args)
    assert code == 0, err
    assert "note: train.steps changed from 8 to 10" in out
    assert "note: model.moe.competition.omega changed from 0.3 to 0.5 (allowed by run.allow_changes)" in out
    assert "log_every" not in out  # harmless: no note
    assert (finished / "config.1.yaml").read_text() == old_config
    assert "omega: 0.5" in (finished / "config.yaml").read_text()
    assert sorted(train_losses(finished)) == [*range(1, 9), 10]  # log_every=2 from step 8 on


@pytest.mark.parametrize("key,value", [("seed", 5), ("train.seq_len", 16)])
def test_keys_that_define_the_data_position_cannot_change(key, value, finished, corpus, good_run, capsys):
    args = overrides(corpus, finished, good_run / "cache", **{"train.steps": 10, key: value,
                                                              "run.allow_changes": f"[{key}]"})
    code, _, err = run_cli(capsys, args)
    assert code == 2 and f"{key}=" in err and "cannot change on resume" in err


def test_changed_text_behind_the_same_sources_is_refused(good_run, corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(good_run / "run", run_dir)
    edited = tmp_path / "corpus"
    shutil.copytree(corpus, edited)
    first = sorted(edited.iterdir())[0]
    first.write_text(first.read_text() + "\nOne more sentence.\n")
    args = overrides(edited, run_dir, good_run / "cache", **{"train.steps": 10,
                                                             "run.allow_changes": "[data.sources]"})
    code, _, err = run_cli(capsys, args)
    assert code == 2 and "the text behind data.sources changed" in err and "run.allow_changes=[data]" in err


# -- corrupt checkpoints ---------------------------------------------------------------------------

def test_corrupt_latest_falls_back_to_the_newest_intact_one(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = overrides(corpus, run_dir, tmp_path / "cache", **{"train.steps": 6, "train.ckpt_every": 2,
                                                              "train.keep_last": 3})
    assert train_main([str(SMOKE), *args]) == 0
    reference = train_losses(run_dir)
    ckpts = run_dir / "checkpoints"
    shard = ckpts / "step_00000006" / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    (ckpts / "step_00000005").mkdir()  # a step directory without a commit record
    capsys.readouterr()

    assert ckpt_main(["verify", str(run_dir)]) == 1
    report = capsys.readouterr().out
    for line in ("ok          step_00000002", "ok          step_00000004", "incomplete  step_00000005",
                 "corrupt     step_00000006"):
        assert line in report, report

    code, out, err = run_cli(capsys, overrides(corpus, run_dir, tmp_path / "cache", **{
        "train.steps": 6, "train.ckpt_every": 2, "train.keep_last": 3}))
    assert code == 0, err
    assert f"warning: checkpoint {ckpts / 'step_00000006'} is damaged" in out and "fails its checksum" in out
    assert f"resumed from {ckpts / 'step_00000004'}" in out
    assert (ckpts / "step_00000006.corrupt" / "rank00000.safetensors").read_bytes() == bytes(data)
    assert train_losses(run_dir) == reference  # steps 5 and 6 recomputed bitwise


# -- stop signals and the log --------------------------------------------------------------------

def _start(args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "tests/workers/train_crash.py", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_mid_log_window_then_resume_logs_the_same_lines(sig, corpus, tmp_path):
    """log_every=4, a stop signal during step 13: the resumed run's metrics.jsonl equals the
    uninterrupted run's line for line (all values but the timings), and so do the weights."""
    extra = {"train.steps": 20, "train.log_every": 4, "train.ckpt_every": 10, "train.eval_every": 10}
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "stopped"
    assert train_main([str(SMOKE), *overrides(corpus, reference_dir, tmp_path / "cache", **extra)]) == 0
    args = [str(SMOKE), *overrides(corpus, run_dir, tmp_path / "cache", **extra)]
    proc = _start(["signal-at", f"13:{int(sig)}", *args], ROOT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == REQUEUE_EXIT_CODE, out
    assert "stopped by signal at step 13" in out
    assert train_main(args) == 0

    def comparable(run):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in strict_records(run)]
    assert comparable(run_dir) == comparable(reference_dir)
    a = CheckpointReader(resolve_checkpoint(run_dir))
    b = CheckpointReader(resolve_checkpoint(reference_dir))
    for name in b.tensor_names():
        if not name.startswith("rng/"):
            assert torch.equal(a.read(name), b.read(name)), name


def test_second_ctrl_c_aborts_at_once(corpus, tmp_path):
    """Two Ctrl-C during step 3: the first asks for a stop after the step, the second aborts at
    once (no step 3 logged, no checkpoint), with one line and exit code 130."""
    args = [str(SMOKE), *overrides(corpus, tmp_path / "run", tmp_path / "cache", **{"train.steps": 40})]
    proc = _start(["signal-at", f"3:{int(signal.SIGINT)}:2", *args], ROOT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, out
    assert out.rstrip().endswith("interrupted") and "Traceback" not in out
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- checks before any work, one line each ---------------------------------------------------------

def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lr: [0.1\nmodel:\n  d_model: 8\n")
    code = train_main([str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {bad}:4: not valid YAML") and "Traceback" not in err


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("x"), "is a file, not a directory"),
    (lambda p: None, "cannot be created"),
])
def test_bad_run_dir_is_one_line(make, message, tmp_path, capsys):
    target = tmp_path / "target"
    make(target)
    run_dir = target if target.exists() else tmp_path / "file" / "run"
    if not target.exists():
        (tmp_path / "file").write_text("x")
    code = train_main([str(SMOKE), f"run.dir={run_dir}", f"data.cache_dir={tmp_path}/cache"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()  # refused before any data preparation


@pytest.mark.parametrize("args,message", [
    (["model.moe.backend=megablocks"], "model.moe.backend must be one of auto, torch, triton"),
    (["model.moe.backend=triton"], "model.moe.backend=triton cannot run on cpu"),
    (["train.device=cuda"], "train.device=cuda but no CUDA device is available"),
])
def test_unrunnable_backend_or_device_fails_before_data(args, message, tmp_path, capsys, monkeypatch):
    if "cuda" in args[0] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the check is for machines without one")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = train_main([str(SMOKE), f"run.dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache").exists()


def test_megablocks_is_not_offered():
    with pytest.raises(ConfigError, match="backend must be one of auto, torch, triton, got 'megablocks'"):
        load_config(SMOKE, ["model.moe.backend=megablocks"])
    assert "megablocks" not in (ROOT / "setup.py").read_text()


def test_ckpt_export_to_an_existing_file_and_inspect_into_a_closed_pipe(good_run, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert ckpt_main(["export", str(good_run / "run"), str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: export: {target} exists and is not a directory; name a new or existing directory\n"
    # `competesmoe-ckpt inspect RUN | head -1`: the tool sees its reader go away
    proc = subprocess.run(f"{sys.executable} -m competesmoe.export.ckpt_cli inspect {good_run / 'run'} | head -1",
                          shell=True, capture_output=True, text=True, timeout=120, executable="/bin/bash")
    assert proc.stdout.startswith("checkpoint: ") and proc.stderr == "", proc.stderr


def test_malformed_jsonl_reason_is_whole(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "a\tb"}\n')
    code = train_main([str(SMOKE), f"run.dir={tmp_path}/run", f"data.cache_dir={tmp_path}/cache",
                       f"data.sources=[{bad}]"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {bad}:2: not valid JSON (Invalid control character at: column 12)\n"
