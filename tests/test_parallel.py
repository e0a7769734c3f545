"""Expert and data parallelism under torchrun (gloo, CPU) against one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from competesmoe.config import load_config
from competesmoe.errors import ConfigError
from competesmoe.parallel.config import check_layout
from competesmoe.parallel.exchange import ExchangePolicy, ExchangeShape
from competesmoe.parallel.mesh import Mesh
from competesmoe.train.cli import main as train_main
from competesmoe.train.trainer import train

from runs import overrides, read_metrics, train_losses

ROOT = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.multiproc
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 2), (4, 4)])
def test_expert_parallel_layer_equals_single_process(world, ep):
    """Outputs, every aux loss and all gradients of the sharded layer equal the single-process
    layer's in float64 (rtol 1e-9), for every router, normal and competition steps, both
    competition exchanges (tokens, gathered weights) with and without the detached balance term,
    a rank whose experts receive no token, and the expert-gradient reduction group; `auto`
    chooses the same exchange on every rank; under bf16 autocast the gathered weights are bf16
    and their gradients are reduced in fp32 (see tests/workers/ep_layer.py)."""
    result = torchrun(world, "tests/workers/ep_layer.py", str(ep))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    ok = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(ok) == 17, result.stdout


@pytest.fixture(scope="module")
def single_process_losses(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    train(load_config(None, overrides(corpus, tmp / "run", tmp / "cache", **E2E)))
    return train_losses(tmp / "run"), tmp / "cache"


# 24 steps, competition on a third of the layer-steps, every step logged.
E2E = {"train.steps": 24, "train.eval_every": 24, "train.ckpt_every": 24, "model.moe.competition.omega": 0.35}


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,exchange", [(0, "tokens"), (1, "tokens"), (2, "tokens"),
                                                 (1, "weights"), (2, "weights")])
def test_dp2_ep2_training_matches_single_process(zero_stage, exchange, corpus, single_process_losses, tmp_path):
    """DP=2 x EP=2 on 4 processes follows the single-process loss curve on the same global
    batches. The runs differ only in the order of float32 sums: gradients differ by ~1e-9 at the
    first step (DeepSpeed reduces in buckets that mix expert and dense tensors, a different
    order from ours). Adam turns such differences into different updates for elements whose
    gradient is near its eps, so they grow over the steps: the first 4 losses must agree to
    1e-5, and all 24 to 5e-3 absolute (losses are ~6-8; measured: <= 1e-6 with zero_stage=0
    and <= 3.4e-3 with ZeRO-1/2). With competition_exchange=weights the competing layers gather
    the expert weights and reduce-scatter their gradients; under ZeRO the owners' optimizer state
    must receive them once (measured: <= 1e-6 with ZeRO-1 and <= 3.9e-4 with ZeRO-2; doubling
    the reduce-scattered gradients moves step 4's loss by 1.6e-4)."""
    reference, cache = single_process_losses
    args = overrides(corpus, tmp_path / "run", cache, **E2E, **{"parallel.ep": 2, "parallel.zero_stage": zero_stage,
                                                                "parallel.competition_exchange": exchange})
    result = torchrun(4, "-m", "competesmoe.train", str(ROOT / "configs" / "smoke.yaml"), *args)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == sorted(reference) == list(range(1, 25))
    diffs = [abs(losses[s] - reference[s]) for s in sorted(reference)]
    assert max(diffs[:4]) < 1e-5 and max(diffs) < 5e-3, diffs
    assert reference[24] < reference[1] - 0.5  # the runs learn, so the comparison is not trivial
    # the log lines say which exchange the competing layers took
    logged = {f for r in read_metrics(tmp_path / "run") if "routing" in r for f in r["routing"]["weight_exchange"]}
    assert logged - {None} == {1.0 if exchange == "weights" else 0.0}, logged


def test_layouts_that_do_not_divide_fail_clearly():
    with pytest.raises(ConfigError, match=r"parallel\.ep=3 does not divide the world size 4"):
        check_layout(world=4, ep=3, num_experts=12)
    with pytest.raises(ConfigError, match=r"model\.moe\.num_experts=6"):
        check_layout(world=4, ep=4, num_experts=6)
    check_layout(world=8, ep=4, num_experts=16)


def test_mesh_layout_matches_deepspeed_ordering():
    """Expert-parallel groups are consecutive ranks; experts are split in order."""
    import torch

    mesh = Mesh(world=8, rank=5, ep=4, device=torch.device("cpu"))
    assert (mesh.ep_rank, mesh.expert_dp) == (1, 2)
    assert mesh.local_experts(16) == range(4, 8)


def reference_shape(tokens, ep=8, **kw) -> ExchangeShape:
    """One MoE layer of the reference LM (d=512, 64 relu experts of width 128, top-8), bf16."""
    base = dict(tokens=tokens, d_model=512, num_experts=64, top_k=8, w1_cols=128, hidden=128, ep=ep,
                act_itemsize=2, weight_itemsize=2, grad_itemsize=2)
    return ExchangeShape(**(base | kw))


def test_exchange_byte_counts_and_crossover_by_hand():
    """Reference LM, bf16, ep=8. Expert weights: 64 x (512 x 128 + 128 x 512) = 8,388,608.
    Weights: 7/8 of them gathered forward and reduce-scattered backward, 2 + 2 bytes each:
    7/8 x 8,388,608 x 4 = 29,360,128 bytes per rank. Tokens, per token: forward gather
    7 x 512 values, score return 7 x 8, winners' dispatch and combine 2 x 7/8 x 8 x 512, at
    2 bytes, the backward the same: 2 x 2 x (3584 + 56 + 7168) = 43,232 bytes. Crossover:
    29,360,128 / 43,232 = 679.13 tokens per rank."""
    shape = reference_shape(2048)
    assert shape.expert_weights == 8_388_608
    assert shape.gathered_bytes == 16_777_216
    assert shape.weight_bytes() == 29_360_128
    assert shape.token_bytes() == pytest.approx(2048 * 43_232, rel=1e-12)
    assert shape.crossover_tokens() == pytest.approx(29_360_128 / 43_232, rel=1e-12)
    auto = ExchangePolicy("auto")
    assert auto.choose(reference_shape(679)) == "tokens"
    assert auto.choose(reference_shape(680)) == "weights"
    # fp32 master weights under bf16 autocast: the gradients are reduce-scattered in fp32
    assert reference_shape(0, grad_itemsize=4).crossover_tokens() == pytest.approx(7 / 8 * 8_388_608 * 6 / 43_232)
    # at ep=64 the token gather grows with the group: 2 x 2 x 63/64 x (64 x 512 + 64 + 2 x 8 x 512)
    assert reference_shape(0, ep=64).crossover_tokens() == pytest.approx(8_388_608 * 4 / (4 * 41_024))


def test_exchange_memory_cap_and_forced_modes():
    """A Mixtral-8x7B-like layer (8 swiglu experts, d=4096, h=14336, top-2) gathers
    8 x (4096 x 28672 + 14336 x 4096) x 2 bytes = 2,818.6 MB: above the default cap `auto` keeps
    the tokens even where the weights would send fewer bytes (crossover 28,667 tokens at ep=8)."""
    mixtral = dict(d_model=4096, num_experts=8, top_k=2, w1_cols=2 * 14336, hidden=14336)
    big = reference_shape(40_000, **mixtral)
    assert big.gathered_bytes == 2_818_572_288
    assert big.crossover_tokens() == pytest.approx(1_409_286_144 * 4 / (4 * (8 * 4096 + 8 + 4 * 4096)))
    assert big.weight_bytes() < big.token_bytes()
    assert ExchangePolicy("auto").choose(big) == "tokens"
    assert ExchangePolicy("auto", max_gathered_mb=2819).choose(big) == "weights"
    assert ExchangePolicy("auto", max_gathered_mb=2819).choose(reference_shape(28_000, **mixtral)) == "tokens"
    small = reference_shape(2048)
    assert ExchangePolicy("auto", max_gathered_mb=16).choose(small) == "tokens"  # 16.8 MB gathered
    assert ExchangePolicy("weights", max_gathered_mb=0).choose(small) == "weights"
    assert ExchangePolicy("tokens").choose(small) == "tokens"


@pytest.mark.parametrize("override,message", [
    ("parallel.competition_exchange=experts",
     "parallel.competition_exchange must be one of auto, tokens, weights, got 'experts'"),
    ("parallel.competition_weights_max_mb=-1", "parallel.competition_weights_max_mb must be >= 0"),
])
def test_bad_competition_exchange_is_one_line_naming_the_key(override, message, tmp_path, capsys):
    code = train_main([str(ROOT / "configs" / "smoke.yaml"), f"run.dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # failed before any work


@pytest.mark.multiproc
def test_adaptive_budget_takes_the_same_decisions_on_every_rank(corpus, tmp_path):
    """DP=2: the ranks train on different data, so their own agreement values differ; reduced over
    ranks they are identical, and so is every competition decision. Fed their local values
    instead, two schedules would have decided differently (so the reduction is what makes them agree)."""
    import json

    from competesmoe.model.moe.schedule import AdaptiveSchedule

    extra = {"train.steps": 40, "train.eval_every": 40, "train.ckpt_every": 40, "train.log_every": 10,
             "model.moe.competition.mode": "adaptive", "model.moe.competition.omega": 0.45,
             "model.moe.competition.adaptive.ema": 1.0}
    args = overrides(corpus, tmp_path / "run", tmp_path / "cache", **extra)
    result = torchrun(2, "tests/workers/adaptive_ranks.py", str(tmp_path / "out"), str(ROOT / "configs" / "smoke.yaml"),
                      *args)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 40
    assert [s["compete"] for s in ranks[0]] == [s["compete"] for s in ranks[1]]
    assert [s["reduced"] for s in ranks[0]] == [s["reduced"] for s in ranks[1]]
    local = [(a, b) for s0, s1 in zip(*ranks) for a, b in zip(s0["local"], s1["local"]) if a is not None]
    assert sum(a != b for a, b in local) > len(local) // 2  # the ranks measured different values
    for s0, s1 in zip(*ranks):  # the reduced value is the mean of the ranks' own
        for a, b, r in zip(s0["local"], s1["local"], s0["reduced"]):
            assert (r is None and a is None) or r == pytest.approx((a + b) / 2, abs=1e-6)

    def replay(steps, key):
        """A schedule fed the recorded values `key` of one rank (a layer the recorded run did not
        pick, once the replay has diverged from it, is fed 0.5)."""
        sched = AdaptiveSchedule(0, 2, 40, 0.45, 1, chance=0.5, ema=1.0)
        decisions = []
        for t, s in enumerate(steps):
            c = sched.competes(t)
            decisions.append(c)
            sched.update(t, [(s[key][i] if s["compete"][i] else 0.5) if c[i] else None for i in range(2)])
        return decisions

    recorded = [s["compete"] for s in ranks[0]]
    assert replay(ranks[0], "reduced") == recorded  # the trainer decided as the rule says
    assert replay(ranks[0], "local") != replay(ranks[1], "local")
