"""Communication of expert parallelism: measured on this job, projected to 8..512 GPUs.

Measured (run it under torchrun): for one MoE layer of a config at its per-rank token count,
the bytes each rank sends and the wall time of the normal dispatch and combine and of the
competition's token gather and score return, forward and backward, with the job's real
collectives (gloo on CPU, nccl on GPU).

Projected: per training step, from the byte counts of the same formulas at larger expert-parallel
groups, with an alpha-beta model (per-message latency + bytes / bandwidth): intra-node links
for groups of up to 8 GPUs, inter-node links beyond. The bandwidths are assumptions (printed
and overridable), not measurements.

    torchrun --standalone --nproc_per_node 4 tools/comm_benchmark.py configs/reference_lm.yaml \
        parallel.ep=4 --tokens 2048 --out benchmarks/results/comm_cpu_gloo.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

from competesmoe.config import load_config
from competesmoe.parallel.dispatch import AllToAllDispatcher
from competesmoe.parallel.mesh import init_mesh


def _time(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() across `repeats` runs, synchronised over ranks."""
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def measure(cfg, mesh, tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    moe = cfg.model.moe
    d, E, K = cfg.model.d_model, moe.num_experts, moe.top_k
    elem = torch.finfo(dtype).bits // 8
    torch.manual_seed(mesh.rank)
    x = torch.randn(tokens, d, device=mesh.device, dtype=dtype, requires_grad=True)
    indices = torch.stack([torch.randperm(E, device=mesh.device)[:K] for _ in range(tokens)])
    dispatcher = AllToAllDispatcher(E, mesh.ep, mesh.ep_rank, mesh.ep_group)
    local = E // mesh.ep
    w = torch.randn(local, d, device=mesh.device, dtype=dtype)

    dispatched = dispatcher.dispatch(x, indices)
    sent_rows = sum(dispatched.exchange[0]) - dispatched.exchange[0][mesh.ep_rank]
    out = {}
    out["dispatch_fwd_s"] = _time(lambda: dispatcher.dispatch(x, indices), repeats, mesh.device)
    y = dispatched.x.detach().requires_grad_()
    out["combine_fwd_s"] = _time(lambda: dispatcher.combine(y, dispatched), repeats, mesh.device)

    def dispatch_combine_backward():
        d_ = dispatcher.dispatch(x, indices)
        dispatcher.combine(d_.x, d_).sum().backward()

    out["dispatch_combine_fwd_bwd_s"] = _time(dispatch_combine_backward, repeats, mesh.device)

    def score(rows):
        return rows @ w.t()  # stands in for the experts: the collectives are what is timed

    out["competition_fwd_s"] = _time(lambda: dispatcher.scores(x, score), repeats, mesh.device)
    out["competition_fwd_bwd_s"] = _time(lambda: dispatcher.scores(x, score).sum().backward(), repeats, mesh.device)
    out["bytes"] = {
        "dispatch_fwd": sent_rows * d * elem,
        "combine_fwd": sent_rows * d * elem,
        "competition_gather_fwd": (mesh.ep - 1) * tokens * d * elem,
        "competition_scores_fwd": (mesh.ep - 1) * tokens * local * elem,
    }
    return out


def projected_bytes(tokens: int, d: int, E: int, K: int, ep: int, elem: int) -> dict:
    """Bytes one rank sends per MoE layer, forward (backward sends the same again), with
    uniform routing: a (ep - 1) / ep share of the K copies of each token leaves the rank."""
    return {
        "dispatch_combine": 2 * tokens * K * d * elem * (ep - 1) / ep,
        "competition": (ep - 1) * tokens * d * elem + (ep - 1) * tokens * (E // ep) * elem,
    }


def projection(cfg, tokens: int, elem: int, intra_gbs: float, inter_gbs: float, latency_us: float,
               gpus_per_node: int) -> list[dict]:
    moe, m = cfg.model.moe, cfg.model
    layers = len(m.moe_layers)
    comp = moe.competition
    rows = []
    for gpus in (8, 16, 32, 64, 128, 256, 512):
        ep = min(gpus, moe.num_experts)
        bw = (intra_gbs if ep <= gpus_per_node else inter_gbs) * 1e9
        b = projected_bytes(tokens, m.d_model, moe.num_experts, moe.top_k, ep, elem)
        # forward + backward, per layer: messages to ep - 1 peers per collective
        def seconds(nbytes, collectives):
            return 2 * (nbytes / bw + collectives * (ep - 1) * latency_us * 1e-6)
        normal = seconds(b["dispatch_combine"], 2)
        competition = seconds(b["competition"], 2)
        rows.append({
            "gpus": gpus, "ep": ep, "link": "intra-node" if ep <= gpus_per_node else "inter-node",
            "dispatch_combine_MB_per_layer": b["dispatch_combine"] * 2 / 1e6,
            "competition_extra_MB_per_layer": b["competition"] * 2 / 1e6,
            "step_normal_ms": 1e3 * layers * normal,
            "step_competition_avg_ms": 1e3 * layers * comp.omega * competition,
            "step_competition_amax_ms": 1e3 * min(comp.a_max, layers) * competition,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--tokens", type=int, help="tokens per rank per layer (default: micro_batch x seq_len)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--intra-gbs", type=float, default=450.0, help="assumed intra-node GB/s per GPU (NVLink 4)")
    parser.add_argument("--inter-gbs", type=float, default=50.0, help="assumed inter-node GB/s per GPU (400 Gb/s IB)")
    parser.add_argument("--latency-us", type=float, default=10.0, help="assumed per-message latency")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    mesh = init_mesh(cfg.parallel.ep, cfg.model.moe.num_experts, cfg.train.device)
    if not mesh.distributed or mesh.ep < 2:
        parser.error("run under torchrun with parallel.ep >= 2 (e.g. --nproc_per_node 4 ... parallel.ep=4)")
    tc = cfg.train
    tokens = args.tokens or (tc.micro_batch or tc.global_batch // mesh.world) * tc.seq_len
    dtype = torch.bfloat16 if mesh.device.type == "cuda" else torch.float32
    measured = measure(cfg, mesh, tokens, args.repeats, dtype)
    elem = 2  # projections assume bf16 activations, as in GPU training
    rows = projection(cfg, tokens, elem, args.intra_gbs, args.inter_gbs, args.latency_us, args.gpus_per_node)
    if mesh.is_main:
        device = torch.cuda.get_device_name() if mesh.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}), gloo"
        print(f"measured on {device}: world={mesh.world}, ep={mesh.ep}, {tokens} tokens/rank, d={cfg.model.d_model}, "
              f"E={cfg.model.moe.num_experts}, K={cfg.model.moe.top_k}, dtype={dtype}")
        for k, v in measured.items():
            if k != "bytes":
                print(f"  {k:28s} {v * 1e3:9.2f} ms")
        for k, v in measured["bytes"].items():
            print(f"  {k + ' bytes/rank':28s} {v / 1e6:9.2f} MB")
        print(f"\nprojected per training step (bf16; {args.intra_gbs:.0f} GB/s intra-node, {args.inter_gbs:.0f} GB/s "
              f"inter-node, {args.latency_us:.0f} us/message; omega={cfg.model.moe.competition.omega}, "
              f"A_max={cfg.model.moe.competition.a_max}, {len(cfg.model.moe_layers)} MoE layers):")
        print(f"{'GPUs':>5} {'EP':>4} {'link':>10} {'disp+comb MB/layer':>19} {'compet. MB/layer':>17} "
              f"{'normal ms':>10} {'compet. avg ms':>15} {'compet. A_max ms':>17}")
        for r in rows:
            print(f"{r['gpus']:5d} {r['ep']:4d} {r['link']:>10} {r['dispatch_combine_MB_per_layer']:19.1f} "
                  f"{r['competition_extra_MB_per_layer']:17.1f} {r['step_normal_ms']:10.2f} "
                  f"{r['step_competition_avg_ms']:15.2f} {r['step_competition_amax_ms']:17.2f}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": device, "world": mesh.world, "ep": mesh.ep, "tokens": tokens,
                                            "measured": measured, "projected": rows,
                                            "assumptions": vars(args) | {"out": str(args.out)}}, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
