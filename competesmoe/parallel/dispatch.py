"""Expert-parallel dispatch: tokens travel to the ranks that hold their experts and back.

The same three calls as competesmoe.model.moe.dispatch.LocalDispatcher, over an expert-parallel
group of `ep` ranks, each holding `E / ep` consecutive experts:

  dispatch   (token, slot) pairs are sorted by global expert, so each destination rank's share is
             contiguous; counts are exchanged, then the rows with one all_to_all_single with
             uneven splits (dropless); received rows are regrouped by local expert.
  combine    the reverse: regroup by source rank, all_to_all_single back, unsort.
  scores     competition: every token must meet every expert. The tokens of the whole group are
             gathered on every rank (an all_to_all_single that sends each rank's tokens to all),
             each rank scores them against its local experts, and only the scores [T, E/ep] are
             returned to the tokens' own ranks, where winners are chosen. The winners' outputs
             then come from a normal dispatch of the winners: (E/K) x less expert work than
             sending every expert's output back, at the price of a second, ordinary exchange.

Communication per competing layer and rank, forward: (ep - 1) * T * d values gathered plus
(ep - 1) * T * E/ep scores returned, then the winners' usual dispatch and combine; backward
mirrors it. All collectives are differentiable (autograd Functions below), so the competition
balance term's gradient reaches every expert on every rank.

A competing layer may instead gather the experts' weights (`for_competition`, chosen by the
policy of parallel.competition_exchange, see competesmoe/parallel/exchange.py): every rank
all-gathers the layer's w1 and w2, then runs the whole layer on its own tokens with a local
dispatcher over all E experts, with no token exchange. The gather's gradient is a
reduce-scatter: each owner receives its experts' gradients summed over the group's tokens,
exactly what the token exchange leaves on it, so the expert-data-parallel reduction that
follows (ours or ZeRO's) is the same for both. torch's all_gather_single and
reduce_scatter_single run on nccl and, in torch 2.13, on gloo.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from competesmoe.model.moe.dispatch import (
    Dispatched,
    LocalDispatcher,
    inverse_permutation,
    permute_rows,
    sort_by_expert,
)
from competesmoe.parallel.exchange import ExchangePolicy, ExchangeShape


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the exchange in reverse."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), list(out_splits), list(in_splits), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), list(in_splits), list(out_splits), group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group) -> Tensor:
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class _GatherShards(torch.autograd.Function):
    """All-gather of a tensor sharded along dim 0 (in group order); its gradient is the
    reduce-scatter of the gathered tensor's gradient, summed over the group, to each shard's owner.
    The gather runs in `dtype`, the reduce-scatter in the shard's own dtype: under autocast the
    weights travel in bf16 (the matmuls would cast them anyway) and fp32 master weights still get
    their gradients summed in fp32."""

    @staticmethod
    def forward(ctx, shard: Tensor, dtype: torch.dtype, group) -> Tensor:
        ctx.dtype, ctx.group = shard.dtype, group
        shard = shard.to(dtype).contiguous()
        out = shard.new_empty((dist.get_world_size(group) * shard.shape[0],) + tuple(shard.shape[1:]))
        dist.all_gather_single(out, shard, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.to(ctx.dtype).contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group),) + tuple(grad.shape[1:]))
        dist.reduce_scatter_single(out, grad, group=ctx.group)
        return out, None, None


def gather_shards(shard: Tensor, dtype: torch.dtype, group) -> Tensor:
    return _GatherShards.apply(shard, dtype, group)


def compute_dtype(x: Tensor, w: Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in: autocast's where it is on and narrower, else w's."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype.itemsize < w.dtype.itemsize:
            return dtype
    return w.dtype


class AllToAllDispatcher:
    def __init__(self, num_experts: int, ep: int, ep_rank: int, group, policy: Optional[ExchangePolicy] = None):
        self.num_experts, self.ep, self.ep_rank, self.group = num_experts, ep, ep_rank, group
        self.local = num_experts // ep
        self.policy = policy if policy is not None else ExchangePolicy()

    def _exchange_counts(self, counts: Tensor) -> Tensor:
        """[E] rows this rank sends per global expert -> [ep, E/ep] rows each source rank sends to
        each of this rank's experts."""
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        return received.view(self.ep, self.local)

    def dispatch(self, x: Tensor, indices: Tensor) -> Dispatched:
        top_k = indices.shape[1]
        order, counts = sort_by_expert(indices, self.num_experts)
        received = self._exchange_counts(counts)
        # The split sizes must be host integers: one device sync per layer, as in any dropless EP.
        send = counts.view(self.ep, self.local).sum(1).tolist()
        recv_matrix = received.cpu()
        recv = recv_matrix.sum(1).tolist()
        rows = all_to_all(x[order // top_k], recv, send, self.group)
        # Received rows are ordered by (source rank, local expert); group them by local expert.
        expert_of_row = torch.repeat_interleave(torch.arange(self.local).repeat(self.ep), recv_matrix.reshape(-1))
        regroup = torch.argsort(expert_of_row, stable=True).to(x.device)
        offsets = recv_matrix.sum(0).cumsum(0).to(torch.int32).to(x.device)
        by_source = inverse_permutation(regroup)  # used again by combine
        return Dispatched(permute_rows(rows, regroup, by_source), offsets, order, x.shape[0], top_k,
                          exchange=(send, recv, regroup, by_source))

    def combine(self, y: Tensor, dispatched: Dispatched) -> Tensor:
        send, recv, regroup, by_source = dispatched.exchange
        back = all_to_all(permute_rows(y, by_source, regroup), send, recv, self.group)
        order = dispatched.order
        return permute_rows(back, inverse_permutation(order), order).view(dispatched.num_tokens, dispatched.top_k, -1)

    def for_competition(self, x: Tensor, w1: Tensor, w2: Tensor, top_k: int):
        """The dispatcher and expert weights a competing forward runs with, and the exchange's
        name: this dispatcher and the local experts (tokens), or a local dispatcher and all E
        experts' weights gathered from the group (weights)."""
        if self.exchange(x, w1, w2, top_k) == "tokens":
            return self, w1, w2, "tokens"
        dtype = compute_dtype(x, w1)
        return (LocalDispatcher(self.num_experts), gather_shards(w1, dtype, self.group),
                gather_shards(w2, dtype, self.group), "weights")

    def exchange(self, x: Tensor, w1: Tensor, w2: Tensor, top_k: int) -> str:
        """`tokens` or `weights` for a competing forward of x through the local experts (w1, w2).
        Under `auto` every rank of the group decides on the group's total token count, so all
        choose the same even when their token counts differ."""
        if self.policy.mode != "auto":
            return self.policy.mode
        total = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        dist.all_reduce(total, group=self.group)
        shape = ExchangeShape(tokens=int(total) / self.ep, d_model=w1.shape[1], num_experts=self.num_experts,
                              top_k=top_k, w1_cols=w1.shape[2], hidden=w2.shape[1], ep=self.ep,
                              act_itemsize=x.element_size(), weight_itemsize=compute_dtype(x, w1).itemsize,
                              grad_itemsize=w1.element_size())
        return self.policy.choose(shape)

    def scores(self, x: Tensor, score_fn: Callable[[Tensor], Tensor]) -> Tensor:
        n = x.shape[0]
        sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(self.ep)]
        dist.all_gather(sizes, torch.tensor([n], device=x.device), group=self.group)
        all_sizes = [int(s) for s in sizes]
        # Send our tokens to every rank of the group; receive every rank's tokens.
        gathered = all_to_all(x.repeat(self.ep, 1), all_sizes, [n] * self.ep, self.group)
        local_scores = score_fn(gathered)  # [sum(all_sizes), E/ep]
        # Return each rank the scores of its own tokens; ours arrive ordered by source rank,
        # which is the global expert order.
        mine = all_to_all(local_scores, [n] * self.ep, all_sizes, self.group)
        return mine.view(self.ep, n, self.local).permute(1, 0, 2).reshape(n, self.num_experts)
