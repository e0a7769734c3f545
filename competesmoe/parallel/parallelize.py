"""Apply parallelism to a built model, and build the engine that optimises it.

The model is built whole and identically on every rank (same seed), then `parallelize` keeps
this rank's slice of every MoE layer's experts and gives the layer an all-to-all dispatcher
(with the competition exchange policy of parallel.competition_exchange). Nothing in the model's
code knows about ranks.
"""
from __future__ import annotations

from torch import nn

from competesmoe.config import Config
from competesmoe.parallel.config import ParallelConfig
from competesmoe.parallel.dispatch import AllToAllDispatcher
from competesmoe.parallel.mesh import Mesh
from competesmoe.train.engine import TorchEngine


def parallelize(model: nn.Module, mesh: Mesh, parallel: ParallelConfig = ParallelConfig()) -> nn.Module:
    if mesh.ep > 1:
        policy = parallel.exchange_policy()
        for layer in model.moe_layers:
            ids = mesh.local_experts(layer.num_experts)
            layer.experts.shard(ids.start, ids.stop)
            layer.dispatcher = AllToAllDispatcher(layer.num_experts, mesh.ep, mesh.ep_rank, mesh.ep_group, policy)
    return model.to(mesh.device)


def build_engine(model: nn.Module, cfg: Config, mesh: Mesh, micro_batches: int):
    """Torch's AdamW with our gradient reduction, or DeepSpeed's ZeRO stage 1/2."""
    if cfg.parallel.zero_stage == 0:
        return TorchEngine(model, cfg.train, mesh)
    from competesmoe.parallel.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, cfg, mesh, micro_batches)
