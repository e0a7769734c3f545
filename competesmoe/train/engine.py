"""The optimizer side of a training step, behind one interface for both engines.

    engine = build_engine(model, cfg, mesh, micro_batches)
    engine.set_lr(lr)
    for each micro-batch: engine.backward(loss / micro_batches)   # accumulate, never update
    outcome = engine.step(step_loss)                               # reduce, check, clip, update

`step` is where the update happens, for both engines: gradients are reduced over the ranks that
hold a replica of each parameter, the global gradient norm is computed, and if that norm or the
step's loss is not finite on any rank the update is skipped on every rank (the decision is
collective, so the replicas stay identical); otherwise gradients are clipped to `grad_clip` and
AdamW updates the parameters. Either way the gradients are cleared.

`TorchEngine` is torch's AdamW with our own gradient reduction: each gradient is summed over
its replicas (all ranks for dense parameters, the expert-data-parallel group for experts) and
divided by the world size. An expert's local gradient already sums the contributions of every
rank of its expert-parallel group (they reach it through the all-to-all), so this gives every
parameter the gradient of the mean loss over the global batch, as on one device.
`DeepSpeedEngine` (train/deepspeed_engine.py) is DeepSpeed's ZeRO-1/2 optimizer.

Optimizer state is exposed per parameter name (`state_tensors`), in the layout of the model's
parameters, so checkpoints do not depend on how an engine stores it. Both `param_tensors` and
`state_tensors` yield one parameter at a time, in the same order on every rank (for DeepSpeed each
item is a collective that gathers that parameter's full tensor), so that a checkpoint holds one
parameter's state at a time, never the whole model's.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from competesmoe.config import Config
from competesmoe.parallel.mesh import Mesh
from competesmoe.train.config import TrainConfig
from competesmoe.train.optim import is_expert_param, param_groups


@dataclass
class StepOutcome:
    grad_norm: float  # of the whole model's gradient, before clipping; nan when not finite
    applied: bool  # False when the step was skipped for a non-finite loss or gradient


class Engine(Protocol):
    def set_lr(self, lr: float) -> None: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss; never updates."""

    def step(self, loss: torch.Tensor) -> StepOutcome:
        """Reduce, check finiteness (with `loss`, this rank's loss of the step) on every rank, clip,
        update or skip, clear the gradients. Collective."""

    def params_finite(self) -> bool:
        """Whether every parameter on every rank is finite. Collective."""

    def param_tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def state_tensors(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]: ...

    def scalar_state(self) -> dict: ...

    def load_state(self, params: Mapping[str, torch.Tensor], states: Mapping[str, dict[str, torch.Tensor]],
                   scalars: dict) -> None: ...


def build_engine(model: nn.Module, cfg: Config, mesh: Mesh, micro_batches: int) -> Engine:
    """Torch's AdamW with our gradient reduction, or DeepSpeed's ZeRO stage 1/2."""
    if cfg.parallel.zero_stage == 0:
        return TorchEngine(model, cfg.train, mesh)
    from competesmoe.train.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, cfg, mesh, micro_batches)


def all_finite(tensors, mesh: Mesh) -> bool:
    """Whether every tensor on every rank is finite (one collective, one host sync)."""
    local = torch.stack([t.detach().isfinite().all() for t in tensors]).all() if tensors else torch.tensor(True)
    flag = local.float().to(mesh.device).reshape(1)
    if mesh.distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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


# Gradients are all-reduced in flat buckets of about this size: a few large messages instead of
# one per tensor, and a transient copy of one bucket, not of all gradients (the scale benchmark
# measured a one-flat-buffer reduce adding a full copy of the gradients to the step's peak).
REDUCE_BUCKET_BYTES = 64 * 2**20


def _buckets(tensors: list[torch.Tensor], max_bytes: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of `tensors` of at most `max_bytes` each (a larger tensor alone)."""
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


class TorchEngine:
    def __init__(self, model: nn.Module, cfg: TrainConfig, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.name_of = {id(p): n for n, p in self.named}
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_gradients(self) -> None:
        """Sum every gradient over its replicas and divide by the world size (see the module doc)."""
        # Every rank must reduce the same tensors in the same order: a gradient that is None
        # here (a parameter unused in this step) joins as zeros.
        for _, p in self.named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for is_expert in (False, True):
            grads = [p.grad for n, p in self.named if is_expert_param(n) == is_expert]
            group = self.mesh.expert_dp_group if is_expert else None
            for bucket in _buckets(grads, REDUCE_BUCKET_BYTES):
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat, group=group)
                flat.div_(self.mesh.world)
                for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    g.copy_(reduced)

    def step(self, loss: torch.Tensor) -> StepOutcome:
        if self.mesh.distributed:
            self.reduce_gradients()
        norm = grad_norm(self.named, self.mesh)
        # One collective and one host sync decide, identically on every rank, whether to update.
        bad = (~torch.isfinite(norm) | ~torch.isfinite(loss.detach())).float().reshape(1)
        if self.mesh.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        norm_value, bad_value = torch.cat([norm.detach().reshape(1), bad]).tolist()
        applied = bad_value == 0.0
        if applied:
            if self.cfg.grad_clip > 0:
                scale = torch.clamp(self.cfg.grad_clip / (norm + 1e-6), max=1.0)
                for _, p in self.named:
                    if p.grad is not None:
                        p.grad.mul_(scale.to(p.grad.dtype))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(norm_value if math.isfinite(norm_value) else math.nan, applied)

    def params_finite(self) -> bool:
        return all_finite([p for _, p in self.named], self.mesh)

    # -- state, by parameter name -------------------------------------------------------------
    def param_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.named

    def state_tensors(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for name, p in self.named:
            state = self.optimizer.state.get(p)
            if state:
                yield name, {k: v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")}

    def scalar_state(self) -> dict:
        steps = {self.name_of[id(p)]: float(s["step"]) for p, s in self.optimizer.state.items()}
        return {"adam_step": max(steps.values()) if steps else 0.0}

    def load_state(self, params: Mapping[str, torch.Tensor], states: Mapping[str, dict[str, torch.Tensor]],
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
