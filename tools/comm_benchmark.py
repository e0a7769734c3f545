"""Communication of expert parallelism: measured on this job, projected to 8..512 GPUs.

Measured (run it under torchrun): for one MoE layer of a config at its per-rank token count,
the bytes each rank sends to the others (counted at every collective call) and the wall time of

  normal    the dispatch and combine of a normal step;
  tokens    a competing layer with the token exchange: token gather, score return, then the
            winners' dispatch and combine;
  weights   a competing layer with the weight exchange: all-gather of the experts' w1 and w2,
            and in backward the reduce-scatter of their gradients; no token moves;

forward, and forward + backward, with the job's real collectives (gloo on CPU, nccl on GPU) and
the dispatchers of competesmoe.parallel.dispatch. The expert math is replaced by a stand-in (one
small matmul), so the collectives are what is timed. Counted bytes are printed next to the cost
model's (competesmoe/parallel/exchange.py); they differ by the two tiny count exchanges and, for
the winners' dispatch, by how evenly the random winners spread over the ranks.

Projected: per layer and training step, from the cost model's byte counts at larger
expert-parallel groups, for the config and for an OLMoE-1B-7B-like and a Mixtral-8x7B-like layer,
with the choice `auto` makes, its crossover T* and an alpha-beta time model (per-message latency
+ bytes / bandwidth): intra-node links for groups of up to 8 GPUs, inter-node beyond. The
bandwidths are assumptions (printed and overridable), not measurements.

    torchrun --standalone --nproc_per_node 4 tools/comm_benchmark.py configs/reference_lm.yaml \\
        parallel.ep=4 --tokens 2048 --out benchmarks/results/comm_cpu_gloo_ep4.json
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

from competesmoe.config import load_config
from competesmoe.kernels.spec import w1_columns
from competesmoe.parallel.dispatch import AllToAllDispatcher
from competesmoe.parallel.exchange import ExchangePolicy, ExchangeShape
from competesmoe.parallel.mesh import init_mesh

GPUS = (8, 16, 32, 64, 128, 256, 512)

# Layer shapes of two public MoE LMs, for the projection (their own published sizes).
OTHER_SHAPES = {
    "OLMoE-1B-7B-like": dict(d_model=2048, moe_layers=16, num_experts=64, top_k=8, expert_hidden=1024,
                             activation="swiglu"),
    "Mixtral-8x7B-like": dict(d_model=4096, moe_layers=32, num_experts=8, top_k=2, expert_hidden=14336,
                              activation="swiglu"),
}


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


def _group_of(args, kwargs, position: int):
    return kwargs.get("group", args[position] if len(args) > position else None)


def _sent_bytes(name: str, args, kwargs) -> float:
    """Bytes this rank sends to the other ranks of the collective's group: what reaches them,
    and what a bandwidth-optimal (ring) algorithm sends for a gather, reduce-scatter or reduce."""
    if name == "all_to_all_single":
        group = _group_of(args, kwargs, 4)
        inp = args[1]
        splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
        n = dist.get_world_size(group)
        if not splits:
            return inp.nbytes * (n - 1) / n
        row = inp.nbytes / max(inp.shape[0], 1)
        return (sum(splits) - splits[dist.get_rank(group)]) * row
    if name == "all_gather_single":
        return args[1].nbytes * (dist.get_world_size(_group_of(args, kwargs, 2)) - 1)
    if name == "reduce_scatter_single":
        n = dist.get_world_size(_group_of(args, kwargs, 3))
        return args[1].nbytes * (n - 1) / n
    if name == "all_gather":
        return args[1].nbytes * (dist.get_world_size(_group_of(args, kwargs, 2)) - 1)
    if name == "all_reduce":
        n = dist.get_world_size(_group_of(args, kwargs, 2))
        return args[0].nbytes * 2 * (n - 1) / n
    raise ValueError(name)


@contextlib.contextmanager
def counted_traffic():
    """Counts the bytes this rank sends in every collective called inside (forward and backward)."""
    sent = collections.Counter()
    names = ("all_to_all_single", "all_gather_single", "reduce_scatter_single", "all_gather", "all_reduce")
    originals = {name: getattr(dist, name) for name in names}

    def counting(name):
        def call(*args, **kwargs):
            sent[name] += _sent_bytes(name, args, kwargs)
            return originals[name](*args, **kwargs)
        return call

    for name in names:
        setattr(dist, name, counting(name))
    try:
        yield sent
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def competing_layer(dispatcher: AllToAllDispatcher, x, w1, w2, top_k: int):
    """The communication of one competing layer, as MoELayer runs it, with stand-in expert math:
    each expert's 'response' to a row is the row's dot product with a vector of its weights."""
    local, w1, w2, _ = dispatcher.for_competition(x, w1, w2, top_k)
    probe = w1.sum(-1) + w2.sum(1)  # [experts, d]: keeps both weight tensors in the graph
    s = local.scores(x, lambda rows: rows @ probe.t())
    winners = s.topk(top_k, dim=-1).indices
    dispatched = local.dispatch(x, winners)
    return local.combine(dispatched.x, dispatched).sum() + s.sum()


def normal_layer(dispatcher: AllToAllDispatcher, x, indices):
    dispatched = dispatcher.dispatch(x, indices)
    return dispatcher.combine(dispatched.x, dispatched).sum()


def measure(cfg, mesh, tokens: int, repeats: int, dtype: torch.dtype) -> dict:
    moe = cfg.model.moe
    d, E, K, h = cfg.model.d_model, moe.num_experts, moe.top_k, moe.expert_hidden
    local = E // mesh.ep
    torch.manual_seed(mesh.rank)
    x = torch.randn(tokens, d, device=mesh.device, dtype=dtype, requires_grad=True)
    w1 = torch.randn(local, d, w1_columns(h, moe.activation), device=mesh.device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(local, h, d, device=mesh.device, dtype=dtype, requires_grad=True)
    indices = torch.stack([torch.randperm(E, device=mesh.device)[:K] for _ in range(tokens)])

    def dispatcher(mode):
        return AllToAllDispatcher(E, mesh.ep, mesh.ep_rank, mesh.ep_group, ExchangePolicy(mode))

    paths = {
        "normal": lambda: normal_layer(dispatcher("tokens"), x, indices),
        "tokens": lambda: competing_layer(dispatcher("tokens"), x, w1, w2, K),
        "weights": lambda: competing_layer(dispatcher("weights"), x, w1, w2, K),
    }
    out = {}
    for name, loss in paths.items():
        with counted_traffic() as forward:
            loss()
        with counted_traffic() as both:
            loss().backward()
        out[name] = {
            "fwd_s": _time(loss, repeats, mesh.device),
            "fwd_bwd_s": _time(lambda loss=loss: loss().backward(), repeats, mesh.device),
            "sent_fwd_bytes": sum(forward.values()),
            "sent_bwd_bytes": sum(both.values()) - sum(forward.values()),
            "sent_by_collective": dict(both),
        }
    # every rank's counts, so the report shows the whole group
    counts = [None] * mesh.world
    dist.all_gather_object(counts, {k: (v["sent_fwd_bytes"], v["sent_bwd_bytes"]) for k, v in out.items()})
    shape = ExchangeShape(tokens=tokens, d_model=d, num_experts=E, top_k=K, w1_cols=w1.shape[-1], hidden=h,
                          ep=mesh.ep, act_itemsize=x.element_size(), weight_itemsize=w1.element_size(),
                          grad_itemsize=w1.element_size())
    phases = shape.token_phases()
    out["model_bytes"] = {
        "normal": 2 * (phases["winner_dispatch"] + phases["winner_combine"]),
        "tokens": shape.token_bytes(),
        "weights": shape.weight_bytes(),
    }
    out["sent_per_rank"] = counts
    return out


def layer_shapes(cfg) -> dict[str, dict]:
    m, moe = cfg.model, cfg.model.moe
    own = dict(d_model=m.d_model, moe_layers=len(m.moe_layers), num_experts=moe.num_experts, top_k=moe.top_k,
               expert_hidden=moe.expert_hidden, activation=moe.activation)
    return {"this config": own, **OTHER_SHAPES}


def projection(layer: dict, tokens: int, act_itemsize: int, grad_itemsize: int, policy: ExchangePolicy,
               omega: float, a_max: int, intra_gbs: float, inter_gbs: float, latency_us: float,
               gpus_per_node: int) -> list[dict]:
    """Per GPU count: bytes one rank sends per layer (forward + backward) for a normal layer and a
    competing layer with each exchange, auto's choice, and modelled times."""
    E, L = layer["num_experts"], layer["moe_layers"]
    rows = []
    for gpus in GPUS:
        ep = min(gpus, E)
        bw = (intra_gbs if ep <= gpus_per_node else inter_gbs) * 1e9
        shape = ExchangeShape(tokens=tokens, d_model=layer["d_model"], num_experts=E, top_k=layer["top_k"],
                              w1_cols=w1_columns(layer["expert_hidden"], layer["activation"]),
                              hidden=layer["expert_hidden"], ep=ep, act_itemsize=act_itemsize,
                              weight_itemsize=act_itemsize, grad_itemsize=grad_itemsize)
        phases = shape.token_phases()
        normal_bytes = 2 * (phases["winner_dispatch"] + phases["winner_combine"])

        def seconds(nbytes, collectives, bw=bw, ep=ep):
            # collectives forward + backward, each with messages to ep - 1 peers
            return nbytes / bw + collectives * (ep - 1) * latency_us * 1e-6

        normal, compete_tokens = seconds(normal_bytes, 4), seconds(shape.token_bytes(), 8)
        compete_weights = seconds(shape.weight_bytes(), 4)
        auto = policy.choose(shape)
        chosen = compete_weights if auto == "weights" else compete_tokens
        rows.append({
            "gpus": gpus, "ep": ep, "link": "intra-node" if ep <= gpus_per_node else "inter-node",
            "normal_MB_per_layer": normal_bytes / 1e6,
            "compete_tokens_MB_per_layer": shape.token_bytes() / 1e6,
            "compete_weights_MB_per_layer": shape.weight_bytes() / 1e6,
            "gathered_weights_MB": shape.gathered_bytes / 1e6,
            "crossover_tokens": shape.crossover_tokens(),
            "auto": auto,
            "normal_ms_per_layer": 1e3 * normal,
            "compete_tokens_ms_per_layer": 1e3 * compete_tokens,
            "compete_weights_ms_per_layer": 1e3 * compete_weights,
            # a step: every MoE layer normal, except the competing ones (auto's exchange); the
            # schedule keeps each layer's rate near omega under the per-step cap A_max
            "step_ms_no_competition": 1e3 * L * normal,
            "step_ms_avg_competition_auto": 1e3 * (L * normal + min(omega * L, a_max) * (chosen - normal)),
            "step_ms_amax_competition_auto": 1e3 * (L * normal + min(a_max, L) * (chosen - normal)),
        })
    return rows


def print_projection(name: str, layer: dict, rows: list[dict]) -> None:
    W = layer["num_experts"] * layer["d_model"] * (
        w1_columns(layer["expert_hidden"], layer["activation"]) + layer["expert_hidden"])
    print(f"\n{name}: d={layer['d_model']}, E={layer['num_experts']}, K={layer['top_k']}, "
          f"h={layer['expert_hidden']} ({layer['activation']}), {layer['moe_layers']} MoE layers, "
          f"{W / 1e6:.1f}M expert weights per layer ({rows[0]['gathered_weights_MB']:.1f} MB gathered)")
    print(f"{'GPUs':>5} {'EP':>4} {'link':>10} | {'MB/layer: normal':>16} {'tokens':>8} {'weights':>8} | "
          f"{'T*':>7} {'auto':>7} | {'ms/layer: normal':>16} {'tokens':>7} {'weights':>7} | "
          f"{'step ms: no comp.':>17} {'avg':>7} {'A_max':>7}")
    for r in rows:
        print(f"{r['gpus']:5d} {r['ep']:4d} {r['link']:>10} | {r['normal_MB_per_layer']:16.1f} "
              f"{r['compete_tokens_MB_per_layer']:8.1f} {r['compete_weights_MB_per_layer']:8.1f} | "
              f"{r['crossover_tokens']:7.0f} {r['auto']:>7} | {r['normal_ms_per_layer']:16.3f} "
              f"{r['compete_tokens_ms_per_layer']:7.3f} {r['compete_weights_ms_per_layer']:7.3f} | "
              f"{r['step_ms_no_competition']:17.2f} {r['step_ms_avg_competition_auto']:7.2f} "
              f"{r['step_ms_amax_competition_auto']:7.2f}")


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
    parser.add_argument("--grad-bytes", type=int, default=2, choices=(2, 4),
                        help="bytes per reduce-scattered gradient element in the projection: 2 = bf16 parameters "
                             "(DeepSpeed ZeRO bf16), 4 = fp32 master weights under bf16 autocast (zero_stage=0)")
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
    policy = ExchangePolicy.from_config(cfg.parallel)
    comp = cfg.model.moe.competition
    # projections assume bf16 activations and gathered weights, as in GPU training
    projected = {name: projection(layer, tokens, 2, args.grad_bytes, policy, comp.omega, comp.a_max, args.intra_gbs,
                                  args.inter_gbs, args.latency_us, args.gpus_per_node)
                 for name, layer in layer_shapes(cfg).items()}
    if mesh.is_main:
        device = (torch.cuda.get_device_name() if mesh.device.type == "cuda"
                  else f"CPU ({platform.processor() or platform.machine()}), gloo")
        print(f"measured on {device}: world={mesh.world}, ep={mesh.ep}, {tokens} tokens/rank, d={cfg.model.d_model}, "
              f"E={cfg.model.moe.num_experts}, K={cfg.model.moe.top_k}, h={cfg.model.moe.expert_hidden} "
              f"({cfg.model.moe.activation}), dtype={dtype}")
        print(f"{'layer':>8} | {'fwd ms':>8} {'fwd+bwd ms':>10} | {'sent MB/rank: fwd':>17} {'bwd':>7} "
              f"{'total':>7} {'(cost model)':>12}")
        for name in ("normal", "tokens", "weights"):
            r = measured[name]
            print(f"{name:>8} | {r['fwd_s'] * 1e3:8.2f} {r['fwd_bwd_s'] * 1e3:10.2f} | "
                  f"{r['sent_fwd_bytes'] / 1e6:17.3f} "
                  f"{r['sent_bwd_bytes'] / 1e6:7.3f} {(r['sent_fwd_bytes'] + r['sent_bwd_bytes']) / 1e6:7.3f} "
                  f"{measured['model_bytes'][name] / 1e6:12.3f}")
        print(f"\nprojected per rank (bf16 activations and gathered weights, {args.grad_bytes}-byte gradients; "
              f"{tokens} tokens/GPU; {args.intra_gbs:.0f} GB/s intra-node, {args.inter_gbs:.0f} GB/s inter-node, "
              f"{args.latency_us:.0f} us/message; omega={comp.omega}, A_max={comp.a_max}; auto with "
              f"competition_weights_max_mb={policy.max_gathered_mb:g}). MB/layer: forward + backward; "
              "tokens/weights: a competing layer with that exchange; T*: tokens per GPU above which weights send "
              "fewer bytes; step ms: all MoE layers, no competition / min(omega x layers, A_max) / A_max layers "
              "competing with auto's exchange")
        for name, rows in projected.items():
            print_projection(name, layer_shapes(cfg)[name], rows)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": device, "world": mesh.world, "ep": mesh.ep, "tokens": tokens,
                                            "measured": measured, "projected": projected,
                                            "assumptions": vars(args) | {"out": str(args.out)}}, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
