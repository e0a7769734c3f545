"""Apply parallelism to a built model.

The model is built whole and identically on every rank (same seed), then `parallelize` keeps
this rank's slice of every MoE layer's experts and gives the layer an all-to-all dispatcher
(with the competition exchange policy of parallel.competition_exchange), and applies activation
checkpointing and compiled blocks (parallel/activation.py). Nothing in the model's code knows
about ranks.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from competesmoe.parallel.activation import apply_activation_checkpointing, apply_compile
from competesmoe.parallel.config import ParallelConfig
from competesmoe.parallel.dispatch import AllToAllDispatcher
from competesmoe.parallel.exchange import ExchangePolicy
from competesmoe.parallel.mesh import Mesh


def parallelize(model: nn.Module, mesh: Mesh, parallel: Optional[ParallelConfig] = None) -> nn.Module:
    """Expert parallelism, then activation checkpointing, then compiled blocks (the order
    torchtitan applies them in: compile sees the checkpointed forwards)."""
    parallel = parallel or ParallelConfig()
    if mesh.ep > 1:
        policy = ExchangePolicy.from_config(parallel)
        for layer in model.moe_layers:
            ids = mesh.local_experts(layer.num_experts)
            layer.experts.shard(ids.start, ids.stop)
            layer.dispatcher = AllToAllDispatcher(layer.num_experts, mesh.ep, mesh.ep_rank, mesh.ep_group, policy)
    apply_activation_checkpointing(model, parallel)
    if parallel.compile:
        apply_compile(model)
    return model.to(mesh.device)
