"""One rank's measurements for tools/scale_benchmark.py's build, step and ckpt sections.

Run under torchrun (one process per rank) with a run config's overrides:

    torchrun --standalone --nproc-per-node 2 -m competesmoe.profiling.scale --out DIR \\
        --phases build step ckpt --steps 3 -- model.d_model=256 ... parallel.ep=2

Phases, in order, each measured on its own:
  build  build_model (this rank's part only): seconds and peak RSS growth
  step   the optimizer (build_engine), then --steps training steps on random tokens (and
         --compete-steps with every MoE layer competing): seconds per step after the first, the
         peak RSS growth of the first step above the built model (gradients, optimizer state,
         activations) and of a later step above the RSS before it (activations and gradients,
         the latter allocated while the former are freed), and of one micro-batch's forward and
         loss alone (what autograd keeps, the logits and the forward's transients: the memory
         model's activation bytes without what a checkpointed backward recomputes)
  ckpt   Checkpointer.save then Checkpointer.load of the same state: seconds, bytes this rank
         wrote, peak RSS growth of each
Peak RSS is the kernel's high-water mark (VmHWM), reset before each phase (/proc/self/clear_refs),
so every figure is exact for its phase. Each rank writes DIR/rank<R>.json with its figures and the
memory model's prediction (competesmoe/profiling/memory.py) next to them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from competesmoe.config import load_config, to_dict
from competesmoe.parallel.exchange import ExchangePolicy
from competesmoe.profiling.memory import (
    Layout,
    activation_bytes,
    checkpoint_save_bytes,
    exchange_for,
    param_counts,
    state_bytes,
)
from competesmoe.train.checkpoint import Checkpointer, CheckpointReader


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


class Peak:
    """The RSS high-water mark above the RSS at entry, for the code inside the block."""

    def __enter__(self) -> "Peak":
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.start, self.t0 = _status("VmRSS"), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.growth = _status("VmHWM") - self.start


def _mib(x: float) -> float:
    return round(x / 2**20, 1)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--phases", nargs="+", default=["build", "step", "ckpt"], choices=["build", "step", "ckpt"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compete-steps", type=int, default=0)
    p.add_argument("--ckpt-dir", type=Path, default=None, help="where the checkpoint goes (default: OUT/ckpt)")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from competesmoe.model.moe.schedule import schedule_for  # noqa: F401 (loaded before measuring)
    from competesmoe.parallel.config import micro_batches
    from competesmoe.parallel.mesh import init_mesh
    from competesmoe.parallel.parallelize import build_model
    from competesmoe.train.engine import build_engine
    from competesmoe.train.step import train_step

    cfg = load_config(None, args.overrides)
    if cfg.parallel.zero_stage:
        import deepspeed  # noqa: F401 (its import is not what the step phase measures)
    tc, mc = cfg.train, cfg.model
    mesh = init_mesh(cfg.parallel.ep, mc.moe.num_experts, "cpu")
    n_micro = micro_batches(tc.global_batch, tc.micro_batch, mesh.world)
    counts = param_counts(mc)
    layout = Layout(mesh.world, mesh.ep, cfg.parallel.zero_stage)
    predicted_state = state_bytes(counts, layout)
    checkpointing = getattr(cfg.parallel, "activation_checkpoint", "none")
    every = getattr(cfg.parallel, "activation_checkpoint_every", 1)
    micro_tokens = tc.global_batch // mesh.world // n_micro * tc.seq_len
    report: dict = {"rank": mesh.rank, "world": mesh.world, "ep": mesh.ep, "zero_stage": cfg.parallel.zero_stage,
                    "checkpointing": checkpointing, "compile": bool(getattr(cfg.parallel, "compile", False)),
                    "params_total": counts.total, "params_dense": counts.dense, "params_experts": counts.experts,
                    "tokens_per_step": tc.global_batch * tc.seq_len, "micro_tokens": micro_tokens,
                    "overrides": args.overrides, "baseline_rss_mib": _mib(_status("VmRSS"))}

    with Peak() as build:
        model = build_model(mc, cfg.seed, mesh, cfg.parallel)
    own = sum(p.numel() * p.element_size() for p in model.parameters())
    report["build"] = {"seconds": round(build.seconds, 3), "peak_growth_mib": _mib(build.growth),
                       "param_mib": _mib(own), "predicted_mib": _mib(predicted_state["weights"])}

    if "step" in args.phases or "ckpt" in args.phases:
        gen = torch.Generator().manual_seed(1000 + mesh.rank)
        per_rank = tc.global_batch // mesh.world
        tokens = torch.randint(0, mc.vocab_size, (per_rank, tc.seq_len + 1), generator=gen)
        n_moe = len(model.moe_layers)

        def step(compete: bool) -> float:
            start = time.perf_counter()
            out = train_step(model, engine, tokens[:, :-1], tokens[:, 1:], [compete] * n_moe, n_micro,
                             lambda: torch.autocast("cpu", enabled=False))
            if not torch.isfinite(out.loss):
                raise RuntimeError("non-finite loss in the benchmark step")
            return time.perf_counter() - start

        def forward_only(compete: bool) -> int:
            """Peak growth of one micro-batch's forward and loss with autograd recording: the
            activations it keeps for the backward (the model's activation bytes), then dropped."""
            from competesmoe.model.transformer import lm_loss

            x = tokens[:micro_tokens // tc.seq_len]
            with Peak() as fwd:
                out = model(x[:, :-1], [compete] * n_moe)
                loss = lm_loss(out.logits, x[:, 1:]) + out.aux_loss
            del out, loss
            return fwd.growth

        with Peak() as first:
            engine = build_engine(model, cfg, mesh, n_micro)
            engine.set_lr(tc.lr)
            first_seconds = step(False)
        steady = {"seconds": [], "growth": 0}
        for _ in range(max(0, args.steps - 1)):
            with Peak() as later:
                steady["seconds"].append(step(False))
            steady["growth"] = max(steady["growth"], later.growth)
        act = activation_bytes(mc, micro_tokens, checkpointing, False, 4.0, every)
        act_forward = activation_bytes(mc, micro_tokens, checkpointing, False, 4.0, every, forward_only=True)
        forward_growth = forward_only(False)
        grads_opt = predicted_state["gradients"] + predicted_state["optimizer"]
        report["step"] = {
            "first_seconds": round(first_seconds, 3),
            "seconds": round(sum(steady["seconds"]) / len(steady["seconds"]), 3) if steady["seconds"] else None,
            "first_peak_growth_mib": _mib(first.growth), "first_predicted_mib": _mib(grads_opt + act),
            "peak_growth_mib": _mib(steady["growth"]) if steady["seconds"] else None,
            # the gradients are freed between steps (zero_grad(set_to_none)) at ZeRO-0
            "predicted_mib": _mib(act + (predicted_state["gradients"] if cfg.parallel.zero_stage == 0 else 0)),
            "activations_mib": _mib(forward_growth), "activations_predicted_mib": _mib(act_forward)}
        if args.compete_steps and mc.moe.has_competition:
            times, growth = [], 0
            for _ in range(args.compete_steps):
                with Peak() as comp:
                    times.append(step(True))
                growth = max(growth, comp.growth)
            exchange = exchange_for(mc, micro_tokens, mesh.ep, 4.0, ExchangePolicy.from_config(cfg.parallel))
            act_c = activation_bytes(mc, micro_tokens, checkpointing, True, 4.0, every, mesh.ep, exchange)
            act_c_forward = activation_bytes(mc, micro_tokens, checkpointing, True, 4.0, every, mesh.ep, exchange,
                                             forward_only=True)
            forward_growth = forward_only(True)
            report["compete_step"] = {
                "seconds": round(sum(times) / len(times), 3), "peak_growth_mib": _mib(growth),
                "predicted_mib": _mib(act_c + (predicted_state["gradients"] if cfg.parallel.zero_stage == 0 else 0)),
                "activations_mib": _mib(forward_growth), "activations_predicted_mib": _mib(act_c_forward),
                "exchange": exchange}

    if "ckpt" in args.phases:
        root = args.ckpt_dir or args.out / "ckpt"
        checkpointer = Checkpointer(root, mesh, keep_last=1)
        with Peak() as save:
            path = checkpointer.save(1, model, engine, {"config": to_dict(cfg)})
        written = (path / f"rank{mesh.rank:05d}.safetensors").stat().st_size
        anon = _status("RssAnon")
        with Peak() as load:
            reader = CheckpointReader(path)
            checkpointer.load(reader, model, engine)
        # safetensors maps the files: their pages count in RSS while the reader is open (clean page
        # cache, reclaimable); what the load allocates is the anonymous part
        anon_growth = _status("RssAnon") - anon
        del reader
        # streamed both ways: one parameter's weights and two moments at a time (memory model)
        one_param = 3 * max(p.numel() * 4 for p in model.parameters())
        report["ckpt"] = {"save_seconds": round(save.seconds, 3), "save_peak_growth_mib": _mib(save.growth),
                          "peak_predicted_mib": _mib(one_param),
                          "written_bytes": written, "written_mib": _mib(written), "predicted_written_mib":
                              _mib(checkpoint_save_bytes(counts, layout, mesh.rank)),
                          "save_mib_per_s": round(_mib(written) / save.seconds, 1),
                          "load_seconds": round(load.seconds, 3), "load_peak_growth_mib": _mib(load.growth),
                          "load_anon_growth_mib": _mib(anon_growth)}
        mesh.barrier()
        if mesh.is_main:
            shutil.rmtree(root, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{mesh.rank}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
