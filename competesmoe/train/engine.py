"""The optimizer side of a training step: backward, gradient reduction, clipping, AdamW.

`TorchEngine` runs torch's AdamW and, in a multi-process run, reduces gradients itself: each
gradient is summed over the ranks that hold a replica of its parameter (all ranks for dense
parameters, the expert-data-parallel group for experts) and divided by the world size. An
expert's local gradient already sums the contributions of every rank of its expert-parallel
group (they reach it through the all-to-all), so this gives every parameter the gradient of the
mean loss over the global batch, as on one device. competesmoe.parallel.deepspeed_engine holds
the same interface on DeepSpeed's ZeRO optimizer.

Optimizer state is exposed per parameter name (`state_tensors`), in the layout of the model's
parameters, so checkpoints do not depend on how the optimizer stores it.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from competesmoe.parallel.mesh import Mesh
from competesmoe.train.config import TrainConfig
from competesmoe.train.optim import is_expert_param, param_groups


def grad_norm(named_params: list[tuple[str, nn.Parameter]], mesh: Mesh) -> torch.Tensor:
    """L2 norm of the full model's gradient: dense gradients are identical on every rank after
    reduction; expert gradients are summed over the expert-parallel group that shards them."""
    dense = [p.grad for n, p in named_params if p.grad is not None and not is_expert_param(n)]
    experts = [p.grad for n, p in named_params if p.grad is not None and is_expert_param(n)]
    device = mesh.device

    def sq(grads):
        if not grads:
            return torch.zeros((), device=device, dtype=torch.float32)
        return torch.stack([g.float().pow(2).sum() for g in grads]).sum()

    expert_sq = sq(experts)
    if mesh.distributed and mesh.ep > 1:
        dist.all_reduce(expert_sq, group=mesh.ep_group)
    return (sq(dense) + expert_sq).sqrt()


class TorchEngine:
    def __init__(self, model: nn.Module, cfg: TrainConfig, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.name_of = {id(p): n for n, p in self.named}
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _reduce_gradients(self) -> None:
        # Every rank must reduce the same tensors in the same order: a gradient that is None
        # here (a parameter unused in this step) joins as zeros.
        for _, p in self.named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for is_expert in (False, True):
            grads = [p.grad for n, p in self.named if p.grad is not None and is_expert_param(n) == is_expert]
            if not grads:
                continue
            group = self.mesh.expert_dp_group if is_expert else None
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            flat.div_(self.mesh.world)
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        """Reduce, clip to cfg.grad_clip (0 = off), update; returns the gradient norm before
        clipping."""
        if self.mesh.distributed:
            self._reduce_gradients()
        norm = grad_norm(self.named, self.mesh)
        if self.cfg.grad_clip > 0:
            scale = torch.clamp(self.cfg.grad_clip / (norm + 1e-6), max=1.0)
            for _, p in self.named:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = norm.item()
        return value if math.isfinite(value) else float("nan")

    # -- state, by parameter name -------------------------------------------------------------
    def param_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named}

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for p, state in self.optimizer.state.items():
            out[self.name_of[id(p)]] = {k: v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")}
        return out

    def scalar_state(self) -> dict:
        steps = {self.name_of[id(p)]: float(s["step"]) for p, s in self.optimizer.state.items()}
        return {"adam_step": max(steps.values()) if steps else 0.0}

    def load_state(self, params: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]],
                   scalars: dict) -> None:
        by_name = dict(self.named)
        with torch.no_grad():
            for name, p in self.named:
                p.copy_(params[name])
        for name, state in states.items():
            p = by_name[name]
            self.optimizer.state[p] = {
                "step": torch.tensor(scalars["adam_step"], dtype=torch.float32),
                "exp_avg": state["exp_avg"].to(p.device, p.dtype).clone(),
                "exp_avg_sq": state["exp_avg_sq"].to(p.device, p.dtype).clone(),
            }
