"""Routers: map tokens to top-K experts and their mixing weights (method doc, sections 1 and 6).

Every router exposes `logits(x) -> [T, E]` (what the balance loss, the z-loss and CompeteSMoE's
distillation loss see) and `select(logits) -> (indices [T, K], weights [T, K])`. Routing math
runs in (at least) fp32 outside autocast: top-K on bf16 logits flips ties between otherwise equal runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from competesmoe.model.config import MoEConfig
from competesmoe.model.init import Stream, global_stream, normal_, orthogonal_
from competesmoe.model.moe.losses import upcast


@dataclass
class Routing:
    indices: Tensor  # [T, K] global expert ids
    weights: Tensor  # [T, K] mixing weights of the selected experts
    logits: Tensor  # [T, E] router logits


def _renormalised_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    top, indices = scores.topk(k, dim=-1)
    return indices, top / top.sum(-1, keepdim=True)


class LinearRouter(nn.Module):
    """g(x) = W_g x (no bias), scored with softmax (SMoE, SharedE-V2, CompeteSMoE's router) or with
    sigmoid (sigma-MoE, SharedE-V3); top-K of the scores, renormalised to sum to 1."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, scoring: str, init_std: float):
        super().__init__()
        self.top_k, self.scoring, self.init_std = top_k, scoring, init_std
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.init_parameters(global_stream)

    def init_parameters(self, stream: Stream) -> None:
        normal_(self.weight, self.init_std, stream("weight"))

    def logits(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(upcast(x), upcast(self.weight))

    def select(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        return _renormalised_top_k(scores, self.top_k)

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        return Routing(*self.select(logits), logits)


class XMoERouter(nn.Module):
    """XMoE: project x to a low dimension, cosine similarity with expert embeddings kept at a fixed
    norm, softmax with a temperature, top-K, renormalised."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, dim: int, temperature: float,
                 embedding_norm: float, init_std: float):
        super().__init__()
        self.top_k, self.temperature, self.embedding_norm = top_k, temperature, embedding_norm
        self.init_std = init_std
        self.proj = nn.Parameter(torch.empty(dim, d_model))
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, dim))
        self.init_parameters(global_stream)

    def init_parameters(self, stream: Stream) -> None:
        normal_(self.proj, self.init_std, stream("proj"))
        orthogonal_(self.expert_embeddings, 0.32, stream("expert_embeddings"))

    def logits(self, x: Tensor) -> Tensor:
        # The embeddings are projected back onto the sphere of radius embedding_norm before every
        # use (outside autograd, as in XMoE), so only their direction is learned.
        with torch.no_grad():
            self.expert_embeddings.mul_(self.embedding_norm / self.expert_embeddings.norm(dim=-1, keepdim=True))
        with torch.autocast(x.device.type, enabled=False):
            projected = F.normalize(F.linear(upcast(x), upcast(self.proj)), dim=-1, eps=1e-4)
            return projected @ upcast(self.expert_embeddings).t()

    def select(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return _renormalised_top_k((logits / self.temperature).softmax(-1), self.top_k)

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        return Routing(*self.select(logits), logits)


def build_router(cfg: MoEConfig, d_model: int, init_std: float) -> nn.Module:
    if cfg.router == "xmoe":
        return XMoERouter(d_model, cfg.num_experts, cfg.top_k, cfg.routing_dim, cfg.xmoe_temperature,
                          cfg.xmoe_embedding_norm, init_std)
    scoring = "sigmoid" if cfg.router in ("sigmoid", "sharede_v3") else "softmax"
    return LinearRouter(d_model, cfg.num_experts, cfg.top_k, scoring, init_std)
