"""Process groups of a run: a data-parallel x expert-parallel mesh.

Global rank r sits at expert-parallel rank `r % ep` of the expert-parallel group of consecutive
ranks `[r - r % ep, ..., r - r % ep + ep - 1]`, and at data-parallel index `r // ep`. Experts are
sharded across an expert-parallel group; each shard is replicated across the expert-data-parallel
group (ranks with the same `r % ep`), which averages the experts' gradients. Every rank reads its
own part of the batch, so the dense parameters are data-parallel over the whole world. This is
DeepSpeed's layout for expert parallelism (consecutive expert-parallel ranks), so its ZeRO
optimizer and our collectives agree on the groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from competesmoe.errors import ConfigError
from competesmoe.model.build import expert_slice
from competesmoe.parallel.config import check_layout


@dataclass
class Mesh:
    world: int
    rank: int
    ep: int
    device: torch.device
    ep_group: Optional[dist.ProcessGroup] = None
    expert_dp_group: Optional[dist.ProcessGroup] = None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def expert_dp(self) -> int:
        return self.world // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds."""
        return expert_slice(num_experts, self.ep, self.ep_rank)


def pick_device(requested: str) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def join_process_group(device: torch.device) -> tuple[int, int]:
    """(rank, world) of this process: joins the process group torchrun started (nccl on GPU, gloo
    on CPU) when WORLD_SIZE > 1; a plain `python` start is rank 0 of a world of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size()


def init_mesh(ep: int, num_experts: int, device: str = "auto") -> Mesh:
    """Join the process group (if any) and build the mesh's groups."""
    dev = pick_device(device)
    check_layout(int(os.environ.get("WORLD_SIZE", 1)), ep, num_experts)
    rank, world = join_process_group(dev)
    if world == 1:
        return Mesh(world=1, rank=0, ep=ep, device=dev)
    ep_group = expert_dp_group = None
    # new_group must be called by every rank for every group, in the same order.
    for start in range(0, world, ep):
        group = dist.new_group(list(range(start, start + ep)))
        if start <= rank < start + ep:
            ep_group = group
    for offset in range(ep):
        group = dist.new_group(list(range(offset, world, ep)))
        if rank % ep == offset:
            expert_dp_group = group
    return Mesh(world=world, rank=rank, ep=ep, device=dev, ep_group=ep_group, expert_dp_group=expert_dp_group)
