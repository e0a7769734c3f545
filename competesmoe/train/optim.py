"""AdamW parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math

from torch import nn

from competesmoe.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_expert_param(name: str) -> bool:
    return ".experts." in f".{name}"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices; none on norms, biases and embeddings. Expert tensors get groups
    of their own (`moe: True`) so that data-parallel engines can reduce their gradients over the
    expert-data-parallel group only."""
    groups: dict[tuple[bool, bool], list] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay = p.ndim >= 2 and "embed" not in name
        groups.setdefault((decay, is_expert_param(name)), []).append(p)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "moe": moe,
         "name": f"{'expert' if moe else 'dense'}_{'decay' if decay else 'no_decay'}"}
        for (decay, moe), params in sorted(groups.items())
    ]
