"""The MoE feed-forward layer, in four named phases: route, dispatch, expert compute, combine.

    y, aux_loss, stats = layer(x, compete=False)

x is [B, N, d] (or [T, d], read as one sequence). The layer is dropless: every (token, slot)
pair is computed, whatever the load. aux_loss is this layer's weighted auxiliary loss (balance,
z-loss, and on a competition step distillation, diversity and competition balance): the caller
adds it to the task loss, so nothing is kept in module state between steps.

A competition step (router `competesmoe`, `compete=True`, training mode) replaces the route
phase: all experts score every token, the K with the highest response win, and the router
only receives the distillation loss (method doc, section 2). Evaluation always uses the router.
The competition lives in `_compete` (its math in competition.py). Under expert parallelism the
dispatcher may hand a competing forward a local dispatcher and all experts' gathered weights
instead of itself and the local shard (`for_competition`, competesmoe/parallel/exchange.py);
the four phases then run unchanged on those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from competesmoe.model.config import MoEConfig
from competesmoe.model.init import Stream, global_stream, normal_
from competesmoe.model.moe import competition as comp
from competesmoe.model.moe.dispatch import LocalDispatcher
from competesmoe.model.moe.experts import (
    ExpertBackend,
    Experts,
    activate,
    expert_flops_per_token,
    init_std_out,
    resolve_backend,
    w1_columns,
)
from competesmoe.model.moe.losses import router_balance, upcast, z_loss
from competesmoe.model.moe.routers import Routing, build_router


@dataclass
class MoEStats:
    """What one MoE layer did in one forward; tensors are detached and stay on the device so that
    reading them (a host sync) is the trainer's choice."""

    competed: bool
    load: Optional[Tensor] = None  # [E] (token, slot) pairs routed to each expert
    losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted components
    s_mean: Optional[Tensor] = None  # competition steps only from here on
    s_std: Optional[Tensor] = None
    s_entropy: Optional[Tensor] = None  # mean over tokens of H(p^C), the target softmax(s / T)
    agreement: Optional[Tensor] = None  # mean |T^R intersect T^C| / K
    competition_flops: float = 0.0  # matmul FLOPs of the all-expert pass, forward + backward
    exchange: Optional[str] = None  # how the experts were met: local, tokens or weights (parallel/exchange.py)


class FeedForward(nn.Module):
    """A dense FFN act(x W1) W2 without bias: the `dense` router, and the non-MoE layers."""

    def __init__(self, d_model: int, hidden: int, activation: str, out_init_std: float):
        super().__init__()
        self.activation, self.out_init_std = activation, out_init_std
        self.w1 = nn.Linear(d_model, w1_columns(hidden, activation), bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.init_parameters(global_stream)

    def init_parameters(self, stream: Stream) -> None:
        normal_(self.w1.weight, self.w1.in_features ** -0.5, stream("w1.weight"))
        normal_(self.w2.weight, self.out_init_std, stream("w2.weight"))

    def forward(self, x: Tensor, compete: bool = False) -> tuple[Tensor, None, None]:
        return self.w2(activate(self.w1(x), self.activation)), None, None


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, router_init_std: float, n_layers: int):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        out_std = init_std_out(cfg.expert_hidden * cfg.top_k, n_layers)
        self.router = build_router(cfg, d_model, router_init_std)
        self.experts = Experts(cfg.num_experts, d_model, cfg.expert_hidden, cfg.activation, out_std)
        self.shared = None
        if cfg.router.startswith("sharede"):
            # A sum of always-on experts with weight 1 is one MLP over their concatenated hidden units.
            self.shared = FeedForward(d_model, cfg.num_shared_experts * cfg.expert_hidden, cfg.activation, out_std)
        # Swapped for an all-to-all dispatcher by competesmoe.parallel when experts are sharded.
        self.dispatcher = LocalDispatcher(cfg.num_experts)
        self._backends: dict[torch.device, ExpertBackend] = {}

    def backend(self, device: torch.device) -> ExpertBackend:
        if device not in self._backends:
            self._backends[device] = resolve_backend(self.cfg.backend, device)
        return self._backends[device]

    def forward(self, x: Tensor, compete: bool = False) -> tuple[Tensor, Tensor, MoEStats]:
        shape = x.shape
        num_seqs = shape[0] if x.dim() == 3 else 1
        tokens = x.reshape(-1, shape[-1])
        backend = self.backend(x.device)
        if compete and not self.cfg.has_competition:
            raise ValueError(f"router '{self.cfg.router}' has no competition step")
        competing = compete and self.training
        dispatcher, w1, w2 = self.dispatcher, self.experts.w1, self.experts.w2

        # 1. route
        if competing:
            dispatcher, w1, w2, exchange = dispatcher.for_competition(tokens, w1, w2, self.top_k)
            routing, aux, stats = self._compete(tokens, num_seqs, backend, dispatcher, w1, w2)
            stats.exchange = exchange
        else:
            routing = self.router(tokens)
            if self.training:
                aux, stats = self._router_losses(routing, num_seqs)
            else:  # evaluation and inference need no auxiliary losses
                aux, stats = routing.logits.new_zeros(()), MoEStats(competed=False)
        # 2. dispatch
        dispatched = dispatcher.dispatch(tokens, routing.indices)
        # 3. expert compute
        expert_out = backend.mlp(dispatched.x, dispatched.offsets, w1, w2, self.cfg.activation)
        # 4. combine
        per_slot = dispatcher.combine(expert_out, dispatched)
        y = (routing.weights.unsqueeze(-1) * per_slot).sum(1).to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(tokens)[0]

        if competing:
            diversity = comp.diversity_loss(per_slot)
            aux = aux + self.cfg.competition.gamma * diversity
            stats.losses["diversity"] = diversity.detach()
        with torch.no_grad():
            stats.load = torch.bincount(routing.indices.reshape(-1), minlength=self.num_experts)
        return y.view(shape), aux, stats

    def _router_losses(self, routing: Routing, num_seqs: int) -> tuple[Tensor, MoEStats]:
        balance = router_balance(self.cfg.balance_loss, routing.logits, routing.indices, num_seqs)
        aux = self.cfg.balance_coef * balance
        losses = {"balance": balance.detach()}
        if self.cfg.z_loss_coef > 0:
            z = z_loss(routing.logits)
            aux = aux + self.cfg.z_loss_coef * z
            losses["z"] = z.detach()
        return aux, MoEStats(competed=False, losses=losses)

    def _compete(self, tokens: Tensor, num_seqs: int, backend: ExpertBackend, dispatcher, w1: Tensor, w2: Tensor):
        c, act = self.cfg.competition, self.cfg.activation
        # All experts respond to every token; only the scores [T, E] are kept (see experts.py).
        s = upcast(dispatcher.scores(tokens, lambda rows: backend.scores(rows, w1, w2, act)))
        winners, weights = comp.select_winners(s, self.top_k, c.weights)
        # The router sees the (not detached) input only through the distillation loss.
        router_logits = self.router.logits(tokens)
        distill = comp.distillation_loss(router_logits, s, winners, c.alpha, c.target_temperature)
        balance = comp.competition_balance(s, num_seqs, c.balance_double_softmax, c.detach_balance)
        aux = c.beta * distill + c.balance_coef * balance
        with torch.no_grad():
            probs = comp.distillation_target(s, c.target_temperature)
            router_indices = self.router.select(router_logits)[0]
            stats = MoEStats(
                competed=True,
                losses={"distill": distill.detach(), "competition_balance": balance.detach()},
                s_mean=s.mean(), s_std=s.std(), s_entropy=-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(),
                agreement=comp.agreement(router_indices, winners),
                competition_flops=self.competition_flops(tokens.shape[0]),
            )
        return Routing(winners, weights, router_logits), aux, stats

    def competition_flops(self, num_tokens: int) -> float:
        """Matmul FLOPs of the all-expert pass: forward over E experts, and a backward (2x) over
        all of them when the balance term is not detached, else only over the K winners."""
        per_token = expert_flops_per_token(self.experts.d_model, self.cfg.expert_hidden, self.cfg.activation)
        forward = num_tokens * self.num_experts * per_token
        backward_experts = self.top_k if self.cfg.competition.detach_balance else self.num_experts
        return float(forward + 2 * num_tokens * backward_experts * per_token)
