"""Run under torchrun: the expert-parallel MoE layer against the single-process layer.

For every router, normal and competition steps, in float64: each rank runs its share of a
global batch through the sharded layer (all-to-all dispatch), gradients are reduced as the
trainer reduces them, and outputs and every parameter's gradient must equal the single-process
layer's on the whole batch. Prints one line per case; exits non-zero on the first mismatch.

usage: torchrun --standalone --nproc_per_node W tests/workers/ep_layer.py EP
"""
import copy
import sys

import torch
import torch.distributed as dist

from competesmoe.model.config import CompetitionConfig, MoEConfig
from competesmoe.model.moe.layer import MoELayer
from competesmoe.parallel.mesh import init_mesh
from competesmoe.parallel.parallelize import parallelize
from competesmoe.train.config import TrainConfig
from competesmoe.train.engine import TorchEngine

D, SEQ, E, K = 8, 5, 8, 2
TOL = dict(rtol=1e-9, atol=1e-11)


def build(router: str, balance: str = "entropy") -> MoELayer:
    cfg = MoEConfig(router=router, num_experts=E, top_k=K, expert_hidden=6, balance_loss=balance,
                    balance_coef=0.3, z_loss_coef=0.05,
                    competition=CompetitionConfig(beta=0.2, gamma=0.1, balance_coef=0.4))
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


def run_case(mesh, router: str, compete: bool, starve_rank: bool) -> None:
    world, rank = mesh.world, mesh.rank
    full = Model(build(router))
    torch.manual_seed(1)
    x = torch.randn(2 * world, SEQ, D, dtype=torch.float64)
    g = torch.randn(2 * world, SEQ, D, dtype=torch.float64)
    if starve_rank:
        # Inputs positive, router rows of the experts of the last expert-parallel rank negative:
        # no token picks them, so that rank receives zero rows in the dispatch.
        x = x.abs()
        with torch.no_grad():
            w = full.layer.router.weight
            w.copy_(w.abs())
            w[E - E // mesh.ep:] *= -1
    sharded = parallelize(copy.deepcopy(full), mesh)
    x.requires_grad_()

    # single process, whole batch: sum of (y * g) plus the batch's aux loss
    y_ref, aux_ref, _ = full.layer(x, compete=compete)
    ((y_ref * g).sum() + aux_ref).backward()

    # this rank's share; the engine reduction sums over replicas and divides by the world
    share = slice(2 * rank, 2 * rank + 2)
    x_local = x.detach()[share].requires_grad_()
    y, aux, stats = sharded.layer(x_local, compete=compete)
    (world * (y * g[share]).sum() + aux).backward()
    engine = TorchEngine(sharded, TrainConfig(), mesh)
    wrong = {n: p.grad.clone() for n, p in sharded.named_parameters()}
    engine.reduce_gradients()

    torch.testing.assert_close(y, y_ref[share], **TOL)
    # the input gradient is per rank: its loss carries the factor `world` the reduction removes
    torch.testing.assert_close(x_local.grad / world, x.grad[share], **TOL)
    start, end = sharded.layer.experts.first_expert, sharded.layer.experts.first_expert + sharded.layer.experts.num_experts
    ref_grads = dict(full.named_parameters())
    for name, p in sharded.named_parameters():
        want = ref_grads[name].grad
        if ".experts." in name:
            want = want[start:end]
        torch.testing.assert_close(p.grad, want, **TOL, msg=f"{router} compete={compete} {name}")
    if starve_rank and not compete and mesh.ep_rank == mesh.ep - 1:
        assert stats.load[start:end].sum() == 0
        assert sharded.layer.experts.w1.grad.abs().sum() == 0

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


def main() -> None:
    ep = int(sys.argv[1])
    mesh = init_mesh(ep, E, "cpu")
    cases = [(r, False, False) for r in ("smoe", "competesmoe", "sigmoid", "xmoe", "sharede_v2", "sharede_v3")]
    cases += [("competesmoe", True, False), ("competesmoe", True, True), ("smoe", False, True)]
    for router, compete, starve in cases:
        run_case(mesh, router, compete, starve)
        if mesh.is_main:
            print(f"ok world={mesh.world} ep={ep} router={router} compete={compete} starved_rank={starve}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
