"""Dispatch and combine on one device: group (token, slot) pairs by expert and back.

A dispatcher owns the movement of tokens between the route and the expert phases:
  dispatch(x [T, d], indices [T, K]) -> Dispatched: rows for this rank's experts, grouped by
                                        local expert, with int32 cumulative group ends
  combine(y, dispatched)             -> [T, K, d]: each (token, slot)'s expert output, in place
  scores(x, score_fn)                -> [T, E]: all experts' responses to every token; score_fn
                                        scores rows against this rank's experts
  for_competition(x, w1, w2, top_k)  -> (dispatcher, w1, w2, exchange) a competing forward runs
                                        with instead of this one and the local expert weights,
                                        and how it meets the experts: local, tokens or weights
The expert-parallel dispatcher (competesmoe.parallel.dispatch) implements the same calls with
all-to-all and all-gather; its for_competition may answer with a local dispatcher and all
experts' weights gathered (competesmoe.parallel.exchange says when).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class Dispatched:
    x: Tensor  # [N, d] rows for the local experts, grouped by expert
    offsets: Tensor  # int32 [local experts] cumulative group ends
    order: Tensor  # permutation of the flattened (token, slot) pairs that sorts them by expert
    num_tokens: int
    top_k: int
    exchange: Any = None  # what a distributed dispatcher needs to route the results back


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation `perm` of x's rows, given its inverse, whose gradient is
    grad[inverse]: autograd keeps one index vector. Tensor.index_copy, the obvious way to put rows
    back, keeps its whole source for the backward (a [T K, d] copy per MoE layer, two under expert
    parallelism), and x[perm] alone would take a scatter-add as its gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def inverse_permutation(perm: Tensor) -> Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inverse


def permute_rows(x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
    """x[perm] for a permutation of x's rows and its inverse (inverse_permutation), with a gather
    as its gradient; permute_rows(y, inverse, perm) puts the rows back: out[perm[i]] = y[i]."""
    return _PermuteRows.apply(x, perm, inverse)


def sort_by_expert(indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Stable order of the flattened (token, slot) pairs by expert, and tokens per expert."""
    flat = indices.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts)


class LocalDispatcher:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: Tensor, indices: Tensor) -> Dispatched:
        order, counts = sort_by_expert(indices, self.num_experts)
        top_k = indices.shape[1]
        return Dispatched(x[order // top_k], counts.cumsum(0).to(torch.int32), order, x.shape[0], top_k)

    def combine(self, y: Tensor, dispatched: Dispatched) -> Tensor:
        order = dispatched.order
        return permute_rows(y, inverse_permutation(order), order).view(dispatched.num_tokens, dispatched.top_k, -1)

    def scores(self, x: Tensor, score_fn: Callable[[Tensor], Tensor]) -> Tensor:
        return score_fn(x)

    def for_competition(self, x: Tensor, w1: Tensor, w2: Tensor, top_k: int):
        return self, w1, w2, "local"
