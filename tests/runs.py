"""Helpers for tests that train tiny models on the small `corpus` fixture, and compare what they
logged and saved with each other or with the reference run of tests/reference_train.py."""
import json
from pathlib import Path

import pytest
import torch


def overrides(corpus: Path, run_dir: Path, cache: Path, **extra) -> list[str]:
    """key=value overrides of a tiny CompeteSMoE run (2 layers, 4 experts, seq 32)."""
    base = {
        "run.dir": run_dir, "run.progress": "log", "data.sources": f"[{corpus}]", "data.cache_dir": cache,
        "data.vocab_size": 512, "data.val_fraction": 0.05,
        "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.moe.num_experts": 4,
        "model.moe.top_k": 2, "model.moe.expert_hidden": 16, "model.moe.router": "competesmoe",
        "model.moe.competition.omega": 0.3, "model.moe.competition.a_max": 1,
        "train.steps": 40, "train.global_batch": 8, "train.seq_len": 32,
        "train.lr": 3e-3, "train.warmup_steps": 5, "train.log_every": 1, "train.eval_every": 20,
        "train.eval_batches": 4, "train.ckpt_every": 10, "train.grad_clip": 1.0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def step_records(run_dir: Path) -> list[dict]:
    """The training lines of metrics.jsonl of a run with log_every=1: one per step from step 1."""
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    return steps


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter of the run's latest checkpoint, whole (experts by global id), on the CPU."""
    from competesmoe.train.checkpoint import load_for_inference

    _, model, _ = load_for_inference(run_dir)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_weights(actual: dict, expected: dict, atol: float = 0.0) -> None:
    """The same parameter names and values (bit for bit by default), naming the worst tensor."""
    assert sorted(actual) == sorted(expected)
    worst = max(((actual[n].double() - expected[n].double()).abs().max().item(), n) for n in expected)
    for name in sorted(expected):
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0,
                                   msg=lambda m, name=name: f"{name} (largest difference anywhere {worst}): {m}")


def effective(weights: dict, cfg) -> dict:
    """XMoE's expert embeddings are used projected onto the sphere of radius xmoe_embedding_norm
    (every forward renormalises them in place, validation's too); compare what the model uses."""
    norm = cfg.model.moe.xmoe_embedding_norm
    return {n: w * (norm / w.norm(dim=-1, keepdim=True)) if n.endswith("expert_embeddings") else w
            for n, w in weights.items()}


# adam_eps for runs compared with the one-device reference across processes. They sum gradients
# in another order, so these differ by float32 rounding. Adam divides each gradient element by
# its running RMS plus adam_eps, so an element whose first nonzero gradient is of the order of
# adam_eps (a rare token's embedding: 6.6e-7 measured) moves by up to about lr / adam_eps
# times its rounding difference: one embedding element ended 3.7e-5 apart with adam_eps=1e-6.
# 1e-4 bounds that factor to 30 at lr 3e-3 (3000 with 1e-6); gradient elements above ~1e-3, the
# bulk of these tiny runs, are still updated as by Adam. Measured with it (ZeRO-1/2 on 2x2, the resharded resumes,
# DP=2): losses within 1.5e-7 relative, gradient norms 3.1e-7, weights 3.5e-7 absolute.
MULTIPROCESS_ADAM_EPS = 1e-4


def assert_follows_reference(run_dir: Path, *cfgs, loss_rtol: float, norm_rtol: float, weight_atol: float):
    """The trainer's logged steps (metrics.jsonl at log_every=1) and final weights (its latest
    checkpoint) against the reference run of `cfgs` (tests/reference_train.py, clipping with the
    trainer's logged norms): learning rates to 1e-12, competing layers exactly, losses and
    gradient norms to a relative tolerance, weights to an absolute one. Returns both runs."""
    from reference_train import reference_training

    logged = step_records(run_dir)
    ref = reference_training(*cfgs, clip_norms=[r["grad_norm"] for r in logged])
    assert len(logged) == len(ref.loss) == cfgs[-1].train.steps
    for i, r in enumerate(logged):
        where = (f"step {r['step']}: trainer loss {r['loss']}, lr {r['lr']}, grad_norm {r['grad_norm']}, "
                 f"competing {r['competing_layers']}; reference {ref.loss[i]}, {ref.lr[i]}, {ref.grad_norm[i]}, "
                 f"{ref.competing[i]}")
        assert r["lr"] == pytest.approx(ref.lr[i], rel=1e-12), where
        assert r["competing_layers"] == ref.competing[i], where
        assert r["loss"] == pytest.approx(ref.loss[i], rel=loss_rtol), where
        assert r["grad_norm"] == pytest.approx(ref.grad_norm[i], rel=norm_rtol), where
    expected = {n: p.detach() for n, p in ref.model.named_parameters()}
    assert_same_weights(effective(final_weights(run_dir), cfgs[-1]), effective(expected, cfgs[-1]), atol=weight_atol)
    return logged, ref
