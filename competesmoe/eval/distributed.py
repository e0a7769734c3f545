"""Splitting scoring work across data-parallel ranks and putting the results back in order.

Every rank builds the same list of work items; rank r takes items r, r + world, r + 2 world, ...
(strided, so that a list sorted by cost gives every rank a similar share), scores them, and the
(index, result) pairs of all ranks are gathered and merged. The gather is an all-gather, so every
rank ends with the full results and follows the same control flow; rank 0 reports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from competesmoe.parallel.mesh import join_process_group

T = TypeVar("T")


@dataclass
class Group:
    """A rank's place among the scoring processes, and how it exchanges results with the others."""

    rank: int = 0
    world: int = 1
    # Maps this rank's object to the list of every rank's object, in rank order.
    all_gather: Callable[[Any], list] = lambda obj: [obj]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


LOCAL = Group()


def shard(n: int, rank: int, world: int) -> range:
    """Indices of the n work items that `rank` of `world` scores."""
    return range(rank, n, world)


def merge(parts: Sequence[Sequence[tuple[int, T]]], n: int) -> list[T]:
    """Every rank's (index, result) pairs -> the n results in index order."""
    out: list = [None] * n
    filled = 0
    for part in parts:
        for index, result in part:
            out[index] = result
            filled += 1
    if filled != n:
        raise RuntimeError(f"gathered {filled} results for {n} work items: the ranks split the work differently")
    return out


def _torch_all_gather(obj: Any) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def init_from_env(device: torch.device) -> Group:
    """The torchrun process group when WORLD_SIZE > 1, else LOCAL."""
    rank, world = join_process_group(device)
    return LOCAL if world == 1 else Group(rank=rank, world=world, all_gather=_torch_all_gather)
