"""CompeteSMoE's competition step: winners by neural response, and its three losses.

Method doc, section 2. Given the responses `s [T, E]` of all experts (s_e = mean softplus of
expert e's output), the K experts with the highest response win; their outputs are mixed with
weights from s. The router does not take part in the output: it learns to imitate the
competition through the distillation loss alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from competesmoe.model.moe.losses import entropy_balance, upcast


def select_winners(s: Tensor, top_k: int, weights: str) -> tuple[Tensor, Tensor]:
    """T^C = topK(s) and w = s_i / sum_{j in T^C} s_j ("renorm"), or softmax over the winners.

    s > 0 (softplus means), so the renormalised weights are well defined. w is not detached: the
    task loss reaches every winner through s as well as through its output.
    """
    top, indices = s.topk(top_k, dim=-1)
    if weights == "renorm":
        return indices, top / top.sum(-1, keepdim=True)
    return indices, top.softmax(-1)


def distillation_target(s: Tensor, temperature: float = 1.0) -> Tensor:
    """p^C = softmax(s / T), without gradient; T = 1 is the paper's softmax(s)."""
    return (s.detach() / temperature).softmax(-1)


def distillation_loss(router_logits: Tensor, s: Tensor, winners: Tensor, alpha: float,
                      temperature: float = 1.0) -> Tensor:
    """L_D = mean_{t,e} (p^R - p^C)^2 + alpha * mean_{t, k in T^C} (p^R_k - p^C_k)^2 (MSE, not KL).

    p^C = softmax(s / T) is a fixed target (no gradient into the experts); p^R = softmax(router
    logits) over all experts. The winners' probabilities are gathered without renormalising.
    """
    target = distillation_target(s, temperature)
    squared = (router_logits.softmax(-1) - target).pow(2)
    return squared.mean() + alpha * squared.gather(1, winners).mean()


def diversity_loss(winner_outputs: Tensor) -> Tensor:
    """Mean pairwise cosine similarity of the K winners' outputs [T, K, d].

    S = U U^T with U the unit-normalised outputs and the diagonal zeroed; the mean runs over tokens
    and all K*K entries (the zeroed diagonal included, as in the reference).
    """
    unit = F.normalize(upcast(winner_outputs), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    eye = torch.eye(similarity.shape[-1], dtype=torch.bool, device=similarity.device)
    return similarity.masked_fill(eye, 0.0).mean()


def competition_balance(s: Tensor, num_seqs: int, double_softmax: bool, detach: bool) -> Tensor:
    """Entropy balance of softmax(s) over all experts. The reference feeds softmax(s) where logits
    are expected, so a second softmax is applied; `double_softmax` reproduces that."""
    logits = s.softmax(-1) if double_softmax else s
    return entropy_balance(logits.detach() if detach else logits, num_seqs)


def agreement(router_indices: Tensor, winners: Tensor) -> Tensor:
    """Mean over tokens of |T^R intersect T^C| / K."""
    hits = (router_indices.unsqueeze(-1) == winners.unsqueeze(-2)).any(-1)
    return hits.float().mean()
