"""Whole training steps under torch.profiler: what competition costs against what FLOPs predict.

Three variants of one config, on random tokens, one device:
  smoe         the same model routed by softmax top-K (no competition)
  competesmoe  CompeteSMoE following its omega / A_max schedule
  forced       every MoE layer competes at every step
For each, the mean step time (forward, backward, optimizer) over the timed steps, and its ratio
to SMoE next to the ratio the FLOP counts predict: (model FLOPs + the competition FLOPs the layers
report for those steps) / model FLOPs. A chrome trace of a few steps of each variant is written.

    competesmoe-profile --steps configs/reference_lm.yaml train.micro_batch=16 --trace-dir traces/
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from competesmoe.config import Config
from competesmoe.model.build import build_shard
from competesmoe.model.moe.schedule import schedule_for
from competesmoe.parallel.mesh import Mesh
from competesmoe.train.engine import TorchEngine
from competesmoe.train.step import train_step


def _variant(cfg: Config, name: str) -> Config:
    moe = cfg.model.moe
    if name == "smoe":
        moe = dataclasses.replace(moe, router="smoe")
    else:
        mode = "always" if name == "forced" else "schedule"
        competition = dataclasses.replace(moe.competition, mode=mode)
        moe = dataclasses.replace(moe, router="competesmoe", competition=competition)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_variant(cfg: Config, name: str, device: torch.device, warmup: int, steps: int,
                    trace_dir: Optional[Path]) -> dict:
    cfg = _variant(cfg, name)
    torch.manual_seed(cfg.seed)
    model = build_shard(cfg.model, cfg.seed, device=device).train()
    # The trainer's own step and engine (one process): what is timed is what training runs.
    engine = TorchEngine(model, cfg.train, Mesh(world=1, rank=0, ep=1, device=device))
    engine.set_lr(cfg.train.lr)
    n_moe = len(model.moe_layers)
    total = warmup + steps
    sched = schedule_for(cfg.model.moe, cfg.seed, n_moe, total)
    batch = cfg.train.micro_batch or cfg.train.global_batch
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.train.seq_len + 1), device=device)
    use_bf16 = device.type == "cuda" and cfg.train.precision != "fp32"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    def step(t: int) -> float:
        out = train_step(model, engine, tokens[:, :-1], tokens[:, 1:], sched.competes(t), 1, autocast)
        return sum(s.competition_flops for s in out.moe_stats[0])

    for t in range(warmup):
        step(t)
    _sync(device)
    competition_flops = 0.0
    start = time.perf_counter()
    for t in range(warmup, total):
        competition_flops += step(t)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps

    if trace_dir is not None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        trace_dir.mkdir(parents=True, exist_ok=True)
        with profile(activities=activities) as prof:
            for t in range(2):
                step(warmup + t)
        prof.export_chrome_trace(str(trace_dir / f"{name}.json"))
    model_flops = model.flops_per_token(cfg.train.seq_len) * batch * cfg.train.seq_len
    return {"variant": name, "step_s": seconds, "model_flops": model_flops,
            "competition_flops": competition_flops / steps,
            "competing_layers": sum(sum(sched.competes(t)) for t in range(warmup, total)) / steps}


def profile_training_steps(cfg: Config, device: torch.device, warmup: int = 3, steps: int = 10,
                           trace_dir: Optional[Path] = None, out: Optional[Path] = None) -> list[dict]:
    rows = [profile_variant(cfg, name, device, warmup, steps, trace_dir) for name in ("smoe", "competesmoe", "forced")]
    base = rows[0]
    for r in rows:
        r["measured_ratio"] = r["step_s"] / base["step_s"]
        r["flop_ratio"] = (r["model_flops"] + r["competition_flops"]) / base["model_flops"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tokens = (cfg.train.micro_batch or cfg.train.global_batch) * cfg.train.seq_len
    print(f"{where}: d={cfg.model.d_model}, layers={cfg.model.n_layers}, E={cfg.model.moe.num_experts}, "
          f"K={cfg.model.moe.top_k}, tokens/step={tokens}, "
          f"omega={cfg.model.moe.competition.omega}, A_max={cfg.model.moe.competition.a_max}")
    print(f"{'variant':12s} {'step ms':>9s} {'competing layers/step':>22s} {'measured / SMoE':>16s} "
          f"{'FLOPs predict':>14s}")
    for r in rows:
        print(f"{r['variant']:12s} {r['step_s'] * 1e3:9.1f} {r['competing_layers']:22.2f} "
              f"{r['measured_ratio']:16.3f} {r['flop_ratio']:14.3f}")
    if out is not None:
        out.write_text(json.dumps({"device": where, "rows": rows}, indent=1))
    return rows
