"""Build the part of a model one rank owns: the dense weights and its slice of the experts.

The model is constructed on the meta device (shapes only), each MoE layer keeps its experts'
slice, and only then are the tensors allocated and drawn (model/init.py), so a rank never holds
the experts of another, not even during the build. The values depend on (seed, tensor, expert
id) only: expert i is the same under every expert-parallel size.
"""
from __future__ import annotations

import torch

from competesmoe.model.config import ModelConfig
from competesmoe.model.init import init_weights
from competesmoe.model.transformer import Transformer


def expert_slice(num_experts: int, ep: int, ep_rank: int) -> range:
    """The global expert ids rank `ep_rank` of an expert-parallel group of `ep` holds: contiguous blocks."""
    per_rank = num_experts // ep
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def build_shard(cfg: ModelConfig, seed: int, ep: int = 1, ep_rank: int = 0,
                device: torch.device | str = "cpu") -> Transformer:
    """This rank's model, materialised on `device` and initialised; the MoE layers still run
    their local dispatcher (competesmoe.parallel gives them the all-to-all one)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for layer in model.moe_layers:
        ids = expert_slice(layer.num_experts, ep, ep_rank)
        layer.experts.shard(ids.start, ids.stop)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty gives each module a new tensor, which unties them
        model.head.weight = model.embed.weight
    init_weights(model, seed)
    return model
