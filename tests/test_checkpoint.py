"""Sharded checkpoints: atomic saves, exact resume, resharding, bad input, the ckpt tool."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from competesmoe.config import load_config
from competesmoe.errors import CheckpointError
from competesmoe.export.ckpt_cli import main as ckpt_main
from competesmoe.train.checkpoint import CheckpointReader, load_for_inference, resolve_checkpoint
from competesmoe.train.trainer import train

from runs import (
    MULTIPROCESS_ADAM_EPS,
    assert_follows_reference,
    assert_same_weights,
    final_weights,
    overrides,
    train_losses,
)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


def run(nproc: int, script: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + script
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def module(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    return run(nproc, ["-m", "competesmoe.train", str(SMOKE), *args])


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A single-process run of 6 steps with a checkpoint every 2."""
    tmp = tmp_path_factory.mktemp("trained")
    args = overrides(corpus, tmp / "run", tmp / "cache", **{"train.steps": 6, "train.ckpt_every": 2,
                                                             "train.keep_last": 2})
    train(load_config(SMOKE, args))
    return tmp / "run", tmp / "cache"


def test_keeps_the_last_n_and_points_latest_at_the_newest(trained):
    run_dir, _ = trained
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert resolve_checkpoint(run_dir) == ckpts / "step_00000006"
    commit = json.loads((ckpts / "step_00000006" / "COMMIT.json").read_text())
    assert set(commit["files"]) == {"rank00000.safetensors", "trainer.json", "tokenizer.model"}


def _copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy / "checkpoints" / "step_00000006"


def test_corrupt_truncated_and_missing_files_are_detected(trained, tmp_path):
    ckpt = _copy(trained, tmp_path)
    shard = ckpt / "rank00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x55
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rank00000.safetensors fails its checksum"):
        load_for_inference(ckpt)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(CheckpointError, match="truncated"):
        load_for_inference(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match="rank00000.safetensors is missing"):
        load_for_inference(ckpt)
    (ckpt / "COMMIT.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        CheckpointReader(ckpt)


def test_checkpoint_of_another_model_names_the_tensor(trained, corpus):
    """Allowed past the config comparison (run.allow_changes), a model of another shape is still
    refused when its tensors are read, naming the tensor."""
    run_dir, cache = trained
    wider = overrides(corpus, run_dir, cache, **{"train.steps": 8, "model.d_model": 48,
                                                  "run.allow_changes": "[model.d_model]"})
    with pytest.raises(CheckpointError,
                       match=r"'model/embed.weight' has shape \(512, 32\), the model expects \(512, 48\)"):
        train(load_config(SMOKE, wider))
    xmoe = overrides(corpus, run_dir, cache, **{"train.steps": 8, "model.moe.router": "xmoe",
                                                 "run.allow_changes": "[model.moe]"})
    with pytest.raises(CheckpointError,
                       match=r"lacks, e.g. 'blocks.0.ffn.router.weight' \(a checkpoint of a different model"):
        train(load_config(SMOKE, xmoe))


def test_crash_during_save_leaves_previous_checkpoint(trained, corpus, tmp_path):
    """In one process: the shard of step 8 is written, then the process dies before the commit.
    Rerunning resumes from step 6 and ends where a run that was never stopped ends."""
    cache = trained[1]
    args = overrides(corpus, tmp_path / "full", cache, **{"train.steps": 10, "train.ckpt_every": 2})
    train(load_config(SMOKE, args))
    run_dir = tmp_path / "run"
    args = overrides(corpus, run_dir, cache, **{"train.steps": 10, "train.ckpt_every": 2})
    result = run(1, ["tests/workers/train_crash.py", "during-save", "8", str(SMOKE), *args])
    assert result.returncode == -9, result.stdout[-3000:] + result.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_00000008.tmp").is_dir() and not (ckpts / "step_00000008").exists()
    assert resolve_checkpoint(run_dir).name == "step_00000006"
    # the same command again resumes from step 6 and finishes; the stale directory is cleaned up
    assert train(load_config(SMOKE, args)).step == 10
    assert not (ckpts / "step_00000008.tmp").exists()
    assert sorted(train_losses(run_dir)) == list(range(1, 11))
    assert train_losses(run_dir) == train_losses(tmp_path / "full")  # bitwise, every step
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "full"))


def test_export_matches_the_trained_model(trained, tmp_path):
    run_dir, _ = trained
    assert ckpt_main(["export", str(run_dir), str(tmp_path / "export")]) == 0
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    cfg, model, tokenizer = load_for_inference(run_dir)
    state = dict(model.named_parameters())
    assert set(tensors) == set(state)
    for name, value in tensors.items():
        torch.testing.assert_close(value, state[name].detach(), rtol=0, atol=0)
    assert tokenizer.vocab_size == cfg.model.vocab_size
    assert "router: competesmoe" in (tmp_path / "export" / "config.yaml").read_text()


def test_ckpt_tool_inspect_verify_and_errors(trained, tmp_path, capsys):
    run_dir, _ = trained
    assert ckpt_main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step: 6" in out and "model/blocks.0.ffn.experts.w1" in out and "(4, 32, 16)" in out
    assert ckpt_main(["verify", str(run_dir)]) == 0
    assert "match the commit record" in capsys.readouterr().out
    assert ckpt_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: no complete checkpoint")


# -- multi-process -------------------------------------------------------------------------------

MP = {"train.steps": 12, "train.ckpt_every": 3, "train.eval_every": 12, "parallel.ep": 2}


@pytest.mark.multiproc
@pytest.mark.slow
def test_multiprocess_crash_and_exact_resume(corpus, tmp_path):
    """2 processes, EP=2, ZeRO-1. (a) SIGKILL right after the checkpoint of step 6; (b) SIGKILL
    of one rank in the middle of the save of step 9: the checkpoint of step 6 stays the latest.
    Either way, rerunning the command continues bitwise-identically to an uninterrupted run."""
    cache = tmp_path / "cache"
    full = overrides(corpus, tmp_path / "full", cache, **MP, **{"parallel.zero_stage": 1})
    assert module(2, full).returncode == 0
    reference = train_losses(tmp_path / "full")

    crashed = overrides(corpus, tmp_path / "crashed", cache, **MP, **{"parallel.zero_stage": 1})
    result = run(2, ["tests/workers/train_crash.py", "after-save", "6", str(SMOKE), *crashed])
    assert result.returncode != 0
    assert resolve_checkpoint(tmp_path / "crashed").name == "step_00000006"
    assert module(2, crashed).returncode == 0
    assert train_losses(tmp_path / "crashed") == reference  # every step, bitwise
    assert_same_weights(final_weights(tmp_path / "crashed"), final_weights(tmp_path / "full"))

    dying = overrides(corpus, tmp_path / "dying", cache, **MP, **{"parallel.zero_stage": 1})
    result = run(2, ["tests/workers/train_crash.py", "during-save", "9", str(SMOKE), *dying])
    assert result.returncode != 0
    ckpts = tmp_path / "dying" / "checkpoints"
    assert (ckpts / "step_00000009.tmp").is_dir() and not (ckpts / "step_00000009").exists()
    assert resolve_checkpoint(tmp_path / "dying").name == "step_00000006"
    assert module(2, dying).returncode == 0
    assert train_losses(tmp_path / "dying") == reference
    assert_same_weights(final_weights(tmp_path / "dying"), final_weights(tmp_path / "full"))


@pytest.mark.multiproc
@pytest.mark.slow
def test_reshard_2x2_to_1x1_4x1_1x4(corpus, tmp_path):
    """A DP=2 x EP=2 run (ZeRO-1) killed after its checkpoint of step 6 resumes in 1x1, 4x1 and
    1x4 (and 2x2) and finishes its 8 steps. The loader position is global, so every layout sees
    the batches of the run never stopped: all 8 losses and the final weights must be those of
    the one-device reference run (tests/reference_train.py). Only float32 summation order
    differs between layouts, and MULTIPROCESS_ADAM_EPS keeps Adam from magnifying it."""
    cache = tmp_path / "cache"
    base = {"train.steps": 8, "train.ckpt_every": 6, "train.eval_every": 8, "train.adam_eps": MULTIPROCESS_ADAM_EPS}
    src = overrides(corpus, tmp_path / "src", cache, **base, **{"parallel.ep": 2, "parallel.zero_stage": 1})
    result = run(4, ["tests/workers/train_crash.py", "after-save", "6", str(SMOKE), *src])
    assert result.returncode != 0 and resolve_checkpoint(tmp_path / "src").name == "step_00000006"
    layouts = {"2x2": (4, 2, 1), "1x1": (1, 1, 0), "4x1": (4, 1, 1), "1x4": (4, 4, 0)}
    next_losses = {}
    for name, (nproc, ep, zero) in layouts.items():
        shutil.copytree(tmp_path / "src", tmp_path / name)
        args = overrides(corpus, tmp_path / name, cache, **base, **{"parallel.ep": ep, "parallel.zero_stage": zero})
        result = module(nproc, args)
        assert result.returncode == 0, name + result.stdout[-3000:] + result.stderr[-3000:]
        assert "resumed from" in result.stdout
        losses = train_losses(tmp_path / name)
        assert sorted(losses) == list(range(1, 9))
        next_losses[name] = losses[7]
        assert_follows_reference(tmp_path / name, load_config(SMOKE, args), loss_rtol=1e-6, norm_rtol=1e-5,
                                 weight_atol=3e-6)
    assert max(next_losses.values()) - min(next_losses.values()) < 1e-5, next_losses


def test_milestones_survive_pruning(corpus, tmp_path):
    args = overrides(corpus, tmp_path / "run", tmp_path / "cache", **{"train.steps": 8, "train.ckpt_every": 2,
                                                                       "train.keep_last": 1, "train.keep_every": 4})
    train(load_config(SMOKE, args))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["latest", "step_00000004", "step_00000008"]


def test_streamed_safetensors_file_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    from competesmoe.train.checkpoint import StreamingSafetensors

    want = {"a/w@0": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2, 2).double(),
            "d": torch.randn(4).bfloat16(), "rng": torch.get_rng_state(), "empty": torch.zeros(0, 3),
            "flag": torch.tensor([True, False]), "view": torch.randn(4, 6)[:, ::2]}
    path = tmp_path / "x.safetensors"
    with StreamingSafetensors(path, entries=len(want), longest_key=10) as out:
        for key, t in want.items():
            out.write(key, t)
    got = load_file(str(path))
    assert got.keys() == want.keys()
    for key, t in want.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(want)
    with pytest.raises(CheckpointError, match="outgrew"):
        with StreamingSafetensors(tmp_path / "y.safetensors", entries=1, longest_key=1) as out:
            for i in range(40):
                out.write(f"a_rather_long_tensor_name_{i}", torch.zeros(1))


def test_save_holds_one_gathered_tensor_at_a_time(tmp_path):
    """The engine hands out each parameter's (gathered) state lazily; the save must write and drop
    each before asking for the next, as DeepSpeed's would otherwise hold the model's whole optimizer
    state at once. Counted with weak references to what the engine handed out."""
    import weakref

    from competesmoe.model.build import build_shard
    from competesmoe.model.config import ModelConfig, MoEConfig
    from competesmoe.parallel.mesh import Mesh
    from competesmoe.train.checkpoint import Checkpointer

    model = build_shard(ModelConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2,
                                    moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8)), seed=0)
    handed, most_alive = [], 0

    def hand(t: torch.Tensor) -> torch.Tensor:
        nonlocal most_alive
        copy = t.detach().clone()  # what a gather returns: a fresh tensor
        handed.append(weakref.ref(copy))
        most_alive = max(most_alive, sum(r() is not None for r in handed))
        return copy

    class GatheringEngine:
        def param_tensors(self):
            for name, p in model.named_parameters():
                yield name, hand(p)

        def state_tensors(self):
            for name, p in model.named_parameters():
                yield name, {"exp_avg": hand(p * 0 + 1), "exp_avg_sq": hand(p * 0 + 2)}

        def scalar_state(self):
            return {"adam_step": 1.0}

    path = Checkpointer(tmp_path, Mesh(world=1, rank=0, ep=1, device=torch.device("cpu")), 1).save(
        1, model, GatheringEngine(), {})
    assert len(handed) == 3 * len(list(model.parameters())) and most_alive <= 2
    reader = CheckpointReader(path)
    for name, p in model.named_parameters():
        assert torch.equal(reader.read(f"model/{name}"), p.detach())
        assert torch.equal(reader.read(f"optim.exp_avg_sq/{name}"), torch.full_like(p, 2.0))


def test_load_reads_one_parameter_state_at_a_time(tmp_path):
    """Loading hands the engine mappings read on demand: walking them holds one parameter's state
    at a time (weak references to what was read), and the values are the saved ones."""
    import weakref

    from competesmoe.model.build import build_shard
    from competesmoe.model.config import ModelConfig, MoEConfig
    from competesmoe.parallel.mesh import Mesh
    from competesmoe.train.checkpoint import Checkpointer
    from competesmoe.train.config import TrainConfig
    from competesmoe.train.engine import TorchEngine

    cfg = ModelConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8))
    mesh = Mesh(world=1, rank=0, ep=1, device=torch.device("cpu"))
    model = build_shard(cfg, seed=0)
    engine = TorchEngine(model, TrainConfig(), mesh)
    model(torch.randint(0, 32, (2, 6))).logits.sum().backward()
    engine.optimizer.step()
    path = Checkpointer(tmp_path, mesh, 1).save(1, model, engine, {})

    seen, most_alive = [], 0

    class Watching:
        def load_state(self, params, states, scalars):
            nonlocal most_alive
            for name in params:
                value = params[name]
                seen.append(weakref.ref(value))
                assert torch.equal(value, model.get_parameter(name).detach())
                del value
            for name, state in states.items():
                seen.extend(weakref.ref(v) for v in state.values())
                most_alive = max(most_alive, sum(r() is not None for r in seen))
                assert torch.equal(state["exp_avg"], engine.optimizer.state[model.get_parameter(name)]["exp_avg"])
            assert len(states) == len(list(model.parameters()))

    Checkpointer(tmp_path, mesh, 1).load(CheckpointReader(path), build_shard(cfg, seed=1), Watching())
    assert most_alive <= 2
