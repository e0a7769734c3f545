"""Helpers for tests that train tiny models on the small `corpus` fixture."""
import json
from pathlib import Path


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
