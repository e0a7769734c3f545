"""Load-balancing losses of the routers and of the competition."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def upcast(t: Tensor) -> Tensor:
    """Routing math in at least fp32 (float64 stays float64, for reference tests)."""
    return t if t.dtype == torch.float64 else t.float()


def entropy_balance(logits: Tensor, num_seqs: int) -> Tensor:
    """-mean_b H(mean_n softmax(logits[b, n])), the reference's entropy regulariser.

    `logits` is [T, E] with T = num_seqs * tokens_per_seq, tokens of one sequence contiguous.
    The routing marginal is taken per sequence and the entropy averaged over sequences; minimising
    this maximises the entropy of each sequence's marginal, pushing towards uniform expert use.
    """
    log_probs = F.log_softmax(upcast(logits), dim=-1).view(num_seqs, -1, logits.shape[-1])
    # log of the per-sequence marginal, computed stably in log space
    log_marginal = torch.logsumexp(log_probs, dim=1) - math.log(log_probs.shape[1])
    entropy = -(log_marginal.exp() * log_marginal).sum(-1)
    return -entropy.mean()


def switch_balance(logits: Tensor, indices: Tensor) -> Tensor:
    """Switch/GShard loss E * sum_e f_e P_e: f_e the fraction of (token, slot) assignments to e,
    P_e the mean router probability of e. Equals 1 at perfect balance."""
    num_experts = logits.shape[-1]
    probs = F.softmax(upcast(logits), dim=-1)
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction = counts / indices.numel()
    return num_experts * (fraction * probs.mean(0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """mean(logsumexp(logits)^2): keeps router logits small (ST-MoE)."""
    return torch.logsumexp(upcast(logits), dim=-1).pow(2).mean()


def router_balance(kind: str, logits: Tensor, indices: Tensor, num_seqs: int) -> Tensor:
    if kind == "entropy":
        return entropy_balance(logits, num_seqs)
    if kind == "switch":
        return switch_balance(logits, indices)
    return logits.new_zeros(())
