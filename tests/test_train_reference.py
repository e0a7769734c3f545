"""The trainer, step by step, against the plain reference of tests/reference_train.py: per-step
losses, learning rates, gradient norms and competing layers from the trainer's own metrics.jsonl
(log_every=1), and the final weights from its final checkpoint.

The runs are set so that every part of the step shows: a warm-up of 4 of 16 steps, then a
cosine to a floor of 0.3 x lr; gradient clipping at 2.0 with gradient norms of 1.5-6 (clipped
early, not late; both are asserted); weight decay 0.1 (ten times the reference LM's, so that
decaying the wrong parameters moves layer-norm weights by ~3e-4 a step); competition on about
a third of the layer-steps.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from competesmoe.config import load_config
from competesmoe.model.config import ROUTERS
from competesmoe.train.trainer import train

from reference_train import initial_model
from runs import MULTIPROCESS_ADAM_EPS, assert_follows_reference, overrides

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"

STEPS, WARMUP, CLIP = 16, 4, 2.0
BASE = {"train.steps": STEPS, "train.warmup_steps": WARMUP, "train.min_lr_ratio": 0.3, "train.weight_decay": 0.1,
        "train.grad_clip": CLIP, "train.eval_every": STEPS, "train.eval_batches": 1, "train.ckpt_every": STEPS,
        "model.moe.competition.omega": 0.3, "model.moe.competition.a_max": 1}

# XMoE routes in num_experts / 2 = 2 dimensions by default here: its normalisation of the
# projected token then sits near its singularity and turns a 1-ulp difference (validation at
# step 0 renormalises the expert embeddings once more than the reference does) into 1e-3
# within 16 steps. 32 routing dimensions keep both runs within float32 rounding (8 did with the
# initial weights of torch's global generator; from the per-tensor generators of model/init.py the
# same 1 ulp grew to 1e-4 by step 14 with 8, and stayed within rounding with 32).
CASES = {router: {"model.moe.router": router} for router in ROUTERS}
CASES["xmoe"]["model.moe.xmoe_dim"] = 32
CASES["competesmoe-always"] = {"model.moe.competition.mode": "always"}
CASES["competesmoe-never"] = {"model.moe.competition.mode": "never"}
CASES["competesmoe-micro2"] = {"train.micro_batch": 2}  # 4 forwards per step, gradients accumulated
CASES["sharede_v2-micro4"] = {"model.moe.router": "sharede_v2", "train.micro_batch": 4}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("case", CASES)
def test_trainer_follows_the_reference_step(case, corpus, cache, tmp_path):
    """One process, zero_stage=0. Both runs compute in float32 with the same model code, so
    they differ only in rounding: the reference sums the loss over micro-batches in float64 and
    the gradient norm in another order; it clips with the trainer's logged norm (see
    reference_training). Measured on every case: losses within 1.6e-7 relative, gradient norms
    within 1.1e-6 (XMoE; 3.4e-7 otherwise), weights equal bit for bit except XMoE's (4.2e-7: the
    validation at step 0 renormalises its expert embeddings once more than the reference)."""
    args = overrides(corpus, tmp_path / "run", cache, **BASE, **CASES[case])
    train(load_config(None, args))
    cfg = load_config(None, args)
    logged, ref = assert_follows_reference(tmp_path / "run", cfg, loss_rtol=1e-6, norm_rtol=1e-5, weight_atol=2e-6)

    # the run exercised what it is meant to: warm-up, the cosine towards the floor, clipping
    lrs = [r["lr"] for r in logged]
    assert lrs[:WARMUP] == sorted(lrs[:WARMUP]) and max(lrs) == pytest.approx(cfg.train.lr)
    assert lrs[-1] == pytest.approx(cfg.train.lr * (0.3 + 0.7 * 0.5 * (1 + math.cos(math.pi * 11 / 12))))
    norms = [r["grad_norm"] for r in logged]
    assert any(n > CLIP for n in norms) and any(n < CLIP for n in norms), norms
    competing = ref.competing
    mode = cfg.model.moe.competition.mode if cfg.model.moe.router == "competesmoe" else "never"
    if mode == "schedule":
        assert 0 < sum(competing) < STEPS and max(competing) <= 1, competing  # a_max = 1
    else:
        assert competing == [2 if mode == "always" else 0] * STEPS
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.5


def test_rerun_with_more_steps_follows_the_reference(corpus, cache, tmp_path):
    """A finished run rerun with a larger train.steps continues with the learning rate and the
    competition table of the new length (the trainer says so when it resumes)."""
    short = overrides(corpus, tmp_path / "run", cache, **dict(BASE, **{"train.steps": 10}))
    longer = overrides(corpus, tmp_path / "run", cache, **dict(BASE, **{"train.steps": 14}))
    train(load_config(None, short))
    train(load_config(None, longer))
    assert_follows_reference(tmp_path / "run", load_config(None, short), load_config(None, longer),
                             loss_rtol=1e-6, norm_rtol=1e-5, weight_atol=2e-6)


@pytest.mark.parametrize("router", ROUTERS)
def test_a_training_step_draws_no_random_numbers(router):
    """Resumes restore torch's RNG state, but nothing in a step uses it (no dropout; the
    competition schedule and the data order come from their own seeded generators), so exact
    resumption does not rest on it and dropping that restore changes nothing. Should a step
    start drawing random numbers, this fails, and the resume tests must then cover the RNG."""
    cfg = load_config(SMOKE, ["model.vocab_size=64", "model.d_model=16", "model.n_layers=2", "model.n_heads=2",
                              "model.moe.num_experts=4", "model.moe.expert_hidden=8", f"model.moe.router={router}"])
    model = initial_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters())
    tokens = torch.randint(0, 64, (2, 9))
    compete = [router == "competesmoe", False][:len(model.moe_layers)]
    before = torch.get_rng_state()
    out = model(tokens[:, :-1], compete)
    (torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten()) + out.aux_loss).backward()
    optimizer.step()
    assert torch.equal(torch.get_rng_state(), before)


# -- multi-process: DeepSpeed ZeRO-1/2 on DP=2 x EP=2 ---------------------------------------------

def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "competesmoe.train", str(SMOKE), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_zero_follows_the_reference_step(zero_stage, corpus, cache, tmp_path):
    """4 processes, DP=2 x EP=2, two micro-batches per rank and step, against the one-device
    reference of the same global batches. DeepSpeed sums the gradients in another order (in
    buckets that mix expert and dense tensors), so they differ by float32 rounding; with
    adam_eps=MULTIPROCESS_ADAM_EPS (see tests/runs.py) that stays far under the tolerances,
    which stay far under what a wrong step makes (in the single-process cases: decay on every
    parameter moves the loss of step 2 by 1e-5 relative, no clipping that of step 3 by 5e-5)."""
    args = overrides(corpus, tmp_path / "run", cache, **BASE, **{
        "parallel.ep": 2, "parallel.zero_stage": zero_stage, "train.micro_batch": 1,
        "train.adam_eps": MULTIPROCESS_ADAM_EPS})
    result = torchrun(4, args)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert_follows_reference(tmp_path / "run", load_config(None, args), loss_rtol=1e-6, norm_rtol=1e-5,
                             weight_atol=3e-6)
