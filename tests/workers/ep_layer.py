"""Run under torchrun: the expert-parallel MoE layer against the single-process layer.

For every router, normal and competition steps, in float64: each rank runs its share of a
global batch through the sharded layer (all-to-all dispatch), gradients are reduced as the
trainer reduces them, and outputs, every auxiliary loss and every parameter's gradient must
equal the single-process layer's on the whole batch. Competition steps run with both exchanges
(parallel.competition_exchange: gathered tokens, gathered expert weights), with and without the
detached balance term, and with the experts of one rank winning no token. `auto` is checked to
choose the same exchange on every rank when their token counts differ, and under bf16 autocast
the weights travel in bf16 while their gradients are reduced in fp32. Prints one line per case;
exits non-zero on the first mismatch.

usage: torchrun --standalone --nproc_per_node W tests/workers/ep_layer.py EP
"""
import collections
import contextlib
import copy
import sys

import torch
import torch.distributed as dist

from competesmoe.model.config import CompetitionConfig, MoEConfig
from competesmoe.model.moe.layer import MoELayer
from competesmoe.parallel.config import ParallelConfig
from competesmoe.parallel.mesh import init_mesh
from competesmoe.parallel.parallelize import parallelize
from competesmoe.train.config import TrainConfig
from competesmoe.train.engine import TorchEngine

D, SEQ, E, K = 8, 5, 8, 2
TOL = dict(rtol=1e-9, atol=1e-11)


H = 6


def build(router: str, detach_balance: bool = False) -> MoELayer:
    cfg = MoEConfig(router=router, num_experts=E, top_k=K, expert_hidden=H, balance_coef=0.3, z_loss_coef=0.05,
                    competition=CompetitionConfig(beta=0.2, gamma=0.1, balance_coef=0.4,
                                                  detach_balance=detach_balance))
    torch.manual_seed(0)
    layer = MoELayer(cfg, D, router_init_std=0.5, n_layers=2).double().train()
    with torch.no_grad():
        layer.experts.w1.mul_(3.0)
        layer.experts.w2.mul_(3.0)
    return layer


class Model(torch.nn.Module):
    """Wraps a layer so the engine and parallelize see the attribute names they expect."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    @property
    def moe_layers(self):
        return [self.layer]


@contextlib.contextmanager
def counting_collectives():
    """Counts the calls of the collectives the dispatchers use."""
    calls = collections.Counter()
    names = ("all_to_all_single", "all_gather_single", "reduce_scatter_single", "all_gather", "all_reduce")
    originals = {name: getattr(dist, name) for name in names}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in names:
        setattr(dist, name, counted(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def starve_last_rank(layer: MoELayer, ep: int, compete: bool, x: torch.Tensor) -> torch.Tensor:
    """Make the experts of the last expert-parallel rank receive no token. Normal step: inputs
    positive, those experts' router rows negative, so no token picks them. Competition step
    (relu experts): their W2 negative and all others' positive, so their responses (mean
    softplus of outputs <= 0) stay below every other expert's (outputs >= 0) and they never win;
    the balance term still reaches them unless it is detached."""
    starved = slice(E - E // ep, E)
    with torch.no_grad():
        if compete:
            w2 = layer.experts.w2
            w2.copy_(w2.abs())
            w2[starved] *= -1
            return x
        w = layer.router.weight
        w.copy_(w.abs())
        w[starved] *= -1
    return x.abs()


def run_case(mesh, router: str, compete: bool, starve_rank: bool, exchange: str = "auto",
             detach_balance: bool = False) -> None:
    world, rank = mesh.world, mesh.rank
    full = Model(build(router, detach_balance))
    torch.manual_seed(1)
    x = torch.randn(2 * world, SEQ, D, dtype=torch.float64)
    g = torch.randn(2 * world, SEQ, D, dtype=torch.float64)
    if starve_rank:
        x = starve_last_rank(full.layer, mesh.ep, compete, x)
    sharded = parallelize(copy.deepcopy(full), mesh, ParallelConfig(competition_exchange=exchange))
    x.requires_grad_()

    # single process, whole batch: sum of (y * g) plus the batch's aux loss
    y_ref, aux_ref, stats_ref = full.layer(x, compete=compete)
    ((y_ref * g).sum() + aux_ref).backward()

    # this rank's share; the engine reduction sums over replicas and divides by the world
    share = slice(2 * rank, 2 * rank + 2)
    x_local = x.detach()[share].requires_grad_()
    with counting_collectives() as calls:
        y, aux, stats = sharded.layer(x_local, compete=compete)
        (world * (y * g[share]).sum() + aux).backward()
    engine = TorchEngine(sharded, TrainConfig(), mesh)
    wrong = {n: p.grad.clone() for n, p in sharded.named_parameters()}
    engine.reduce_gradients()

    case = f"{router} compete={compete} exchange={exchange} detach_balance={detach_balance} starved={starve_rank}"
    if compete and exchange == "weights":
        # the whole competing layer runs on gathered weights: one gather of w1 and of w2 forward,
        # one reduce-scatter of each backward, and no token exchange at all
        assert calls["all_to_all_single"] == 0 and calls["all_gather"] == 0, (case, calls)
        assert calls["all_gather_single"] == 2 and calls["reduce_scatter_single"] == 2, (case, calls)
    elif compete and exchange == "tokens":
        assert calls["all_gather_single"] == calls["reduce_scatter_single"] == 0, (case, calls)
        assert calls["all_to_all_single"] > 0, (case, calls)

    torch.testing.assert_close(y, y_ref[share], **TOL)
    # Every auxiliary loss is a mean over this rank's tokens or sequences (equal shares), so the
    # mean over ranks is the single process's; the loads add up.
    for name, want in dict(stats_ref.losses, aux=aux_ref.detach()).items():
        got = (aux.detach() if name == "aux" else stats.losses[name]).clone()
        dist.all_reduce(got)
        torch.testing.assert_close(got / world, want, **TOL, msg=f"{case}: aux loss {name}")
    assert sorted(stats.losses) == sorted(stats_ref.losses), case
    load = stats.load.clone()
    dist.all_reduce(load)
    assert torch.equal(load, stats_ref.load), case
    # the input gradient is per rank: its loss carries the factor `world` the reduction removes
    torch.testing.assert_close(x_local.grad / world, x.grad[share], **TOL)
    experts = sharded.layer.experts
    start, end = experts.first_expert, experts.first_expert + experts.num_experts
    ref_grads = dict(full.named_parameters())
    for name, p in sharded.named_parameters():
        want = ref_grads[name].grad
        if ".experts." in name:
            want = want[start:end]
        torch.testing.assert_close(p.grad, want, **TOL, msg=f"{case}: {name}")
    if starve_rank:
        # no token of the whole batch reached the starved experts ...
        assert stats_ref.load[E - E // mesh.ep:].sum() == 0, case
        if mesh.ep_rank == mesh.ep - 1:
            # ... so their gradient is zero, unless the competition's balance term reaches them
            reached = compete and not detach_balance
            for w in (sharded.layer.experts.w1, sharded.layer.experts.w2):
                assert (w.grad.abs().sum() > 0) == reached, case

    # Averaging the experts' gradients over all ranks instead of their expert-data-parallel group
    # mixes different experts: it must not pass the comparison above.
    if mesh.ep > 1 and not starve_rank:
        bad = wrong["layer.experts.w1"].clone()
        dist.all_reduce(bad)
        bad /= world
        want = ref_grads["layer.experts.w1"].grad[start:end]
        mismatch = torch.tensor([0.0 if torch.allclose(bad, want, **TOL) else 1.0])
        dist.all_reduce(mismatch)
        assert mismatch.item() > 0, "a world-wide average of expert gradients went unnoticed"


def crossover_tokens(ep: int) -> float:
    """T* of the worker's layer, all float64 (parallel/exchange.py): above it, gathering and
    reduce-scattering the W expert weights sends fewer bytes than the token exchange."""
    W = E * (D * H + H * D)
    return W * (8 + 8) / (2 * 8 * (ep * D + E + 2 * K * D))


def check_auto_agrees(mesh) -> None:
    """Token counts differ between the ranks of a group and straddle the crossover: every rank
    must take the exchange of the group's mean, and the competing step must run through."""
    crossover = crossover_tokens(mesh.ep)
    assert mesh.ep % 2 == 0
    for below in (True, False):
        # ranks alternate between few and many tokens, on both sides of T*; their mean sits
        # 2 tokens below or above it
        low, high = 1, 2 * round(crossover) - 1 + (-4 if below else 4)
        assert ((low + high) / 2 < crossover) == below and low < crossover < high
        tokens = low if mesh.ep_rank % 2 == 0 else high
        layer = parallelize(Model(build("competesmoe")), mesh, ParallelConfig(competition_exchange="auto")).layer
        x = torch.randn(tokens, D, dtype=torch.float64)
        chosen = layer.dispatcher.exchange(x, layer.experts.w1, layer.experts.w2, K)
        everyone = [None] * mesh.world
        dist.all_gather_object(everyone, chosen)
        assert set(everyone) == {"tokens" if below else "weights"}, (crossover, everyone)
        y, aux, _ = layer(x, compete=True)
        ((y * y).sum() + aux).backward()


def check_autocast_dtypes(mesh) -> None:
    """Under bf16 autocast with fp32 parameters the weights travel in bf16 (the matmuls would cast
    them anyway), their gradients are reduce-scattered in fp32, and the step agrees with the token
    exchange to bf16 precision."""
    torch.manual_seed(2)
    x = torch.randn(2 * SEQ, D)
    grads, reduced = {}, []
    original = dist.reduce_scatter_single

    def recording(out, inp, *args, **kwargs):
        reduced.append(inp.dtype)
        return original(out, inp, *args, **kwargs)

    dist.reduce_scatter_single = recording
    try:
        for exchange in ("tokens", "weights"):
            layer = parallelize(Model(build("competesmoe").float()), mesh,
                                ParallelConfig(competition_exchange=exchange)).layer
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, w1, _, name = layer.dispatcher.for_competition(x, layer.experts.w1, layer.experts.w2, K)
                assert w1.dtype == (torch.bfloat16 if exchange == "weights" else torch.float32), (exchange, w1.dtype)
                assert name == exchange
                y, aux, _ = layer(x, compete=True)
            (y.float().pow(2).sum() + aux).backward()
            grads[exchange] = [p.grad for p in (layer.experts.w1, layer.experts.w2)]
    finally:
        dist.reduce_scatter_single = original
    assert reduced and set(reduced) == {torch.float32}, reduced
    for got, want in zip(grads["weights"], grads["tokens"]):
        assert got.dtype == torch.float32
        # bf16 products summed in another order: measured <= 0.25% of the largest gradient
        torch.testing.assert_close(got, want, rtol=0.01, atol=0.01 * want.abs().max().item())


def main() -> None:
    ep = int(sys.argv[1])
    mesh = init_mesh(ep, E, "cpu")
    cases = [(r, False, False, "auto", False)
             for r in ("smoe", "competesmoe", "sigmoid", "xmoe", "sharede_v2", "sharede_v3")]
    cases += [("smoe", False, True, "auto", False)]
    cases += [("competesmoe", True, starve, exchange, detach)
              for exchange in ("tokens", "weights") for detach in (False, True) for starve in (False, True)]
    for router, compete, starve, exchange, detach in cases:
        run_case(mesh, router, compete, starve, exchange, detach)
        if mesh.is_main:
            print(f"ok world={mesh.world} ep={ep} router={router} compete={compete} exchange={exchange} "
                  f"detach_balance={detach} starved_rank={starve}", flush=True)
    check_auto_agrees(mesh)
    if mesh.is_main:
        print(f"ok world={mesh.world} ep={ep} auto chooses the same exchange on every rank", flush=True)
    check_autocast_dtypes(mesh)
    if mesh.is_main:
        print(f"ok world={mesh.world} ep={ep} bf16 autocast: weights gathered in bf16, gradients reduced in fp32",
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
