"""Dispatch and combine on one device: group (token, slot) pairs by expert and back.

A dispatcher owns the movement of tokens between the route and the expert phases:
  dispatch(x [T, d], indices [T, K]) -> Dispatched: rows for this rank's experts, grouped by
                                        local expert, with int32 cumulative group ends
  combine(y, dispatched)             -> [T, K, d]: each (token, slot)'s expert output, in place
  scores(x, score_fn)                -> [T, E]: all experts' responses to every token; score_fn
                                        scores rows against this rank's experts
  for_competition(x, w1, w2, top_k)  -> (dispatcher, w1, w2) a competing forward runs with
                                        instead of this one and the local expert weights
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
        out = y.new_empty(y.shape).index_copy(0, dispatched.order, y)
        return out.view(dispatched.num_tokens, dispatched.top_k, -1)

    def scores(self, x: Tensor, score_fn: Callable[[Tensor], Tensor]) -> Tensor:
        return score_fn(x)

    def for_competition(self, x: Tensor, w1: Tensor, w2: Tensor, top_k: int):
        return self, w1, w2
