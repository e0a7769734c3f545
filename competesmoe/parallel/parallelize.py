"""Build a rank's model and apply parallelism to it.

`build_model` constructs only what this rank owns (model/build.py: dense weights and this rank's
experts, initialised from per-tensor generators so the values do not depend on the layout), then
`parallelize` gives every MoE layer an all-to-all dispatcher (with the competition exchange
policy of parallel.competition_exchange) and applies activation checkpointing and compiled
blocks (parallel/activation.py). `parallelize` also accepts a model built whole (tests, tools):
it then keeps this rank's slice of the experts. Nothing in the model's code knows about ranks.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from competesmoe.model.build import build_shard
from competesmoe.model.config import ModelConfig
from competesmoe.model.transformer import Transformer
from competesmoe.parallel.activation import apply_activation_checkpointing, apply_compile
from competesmoe.parallel.config import ParallelConfig
from competesmoe.parallel.dispatch import AllToAllDispatcher
from competesmoe.parallel.exchange import ExchangePolicy
from competesmoe.parallel.mesh import Mesh


def build_model(cfg: ModelConfig, seed: int, mesh: Mesh, parallel: ParallelConfig) -> Transformer:
    """The model this rank trains: its own part only, on its device, parallelised."""
    return parallelize(build_shard(cfg, seed, mesh.ep, mesh.ep_rank, mesh.device), mesh, parallel)


def parallelize(model: nn.Module, mesh: Mesh, parallel: Optional[ParallelConfig] = None) -> nn.Module:
    """Expert parallelism, then activation checkpointing, then compiled blocks (the order
    torchtitan applies them in: compile sees the checkpointed forwards)."""
    parallel = parallel or ParallelConfig()
    if mesh.ep > 1:
        policy = ExchangePolicy.from_config(parallel)
        for layer in model.moe_layers:
            ids = mesh.local_experts(layer.num_experts)
            layer.experts.shard(ids.start, ids.stop)  # nothing to do if built as a shard
            layer.dispatcher = AllToAllDispatcher(layer.num_experts, mesh.ep, mesh.ep_rank, mesh.ep_group, policy)
    apply_activation_checkpointing(model, parallel)
    if parallel.compile:
        apply_compile(model)
    return model.to(mesh.device)
