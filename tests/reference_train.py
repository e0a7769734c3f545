"""A plain reference of a whole training run on one device, written from the documentation
(README, docs/method.md, the comments of competesmoe/train/config.py) and not from the trainer:
nothing here imports competesmoe.train.

One optimizer step t of the reference:
  - learning rate: linear warm-up lr * (t + 1) / warmup_steps for t < warmup_steps, then a
    half cosine from lr down to the floor lr * min_lr_ratio, reached at t = steps;
  - competition pattern: column t of the schedule table (competition.mode schedule), every MoE
    layer (always) or none (never); only the competesmoe router competes;
  - the global batch of the data loader, split into micro-batches of train.micro_batch
    sequences; the gradient is that of the mean over micro-batches of (next-token loss + the
    model's auxiliary losses);
  - clipping of the whole gradient to a global L2 norm of grad_clip (the norm of the
    per-parameter norms; torch's clip_grads_with_norm_);
  - torch's AdamW with decoupled weight decay on matrices and none on norms, biases and
    embeddings (the token embedding and XMoE's expert embeddings).

The model's forward and loss come from competesmoe.model (their math is held against
tests/reference.py in float64); the batches from competesmoe.data.loader, whose order is held
against its own tests (tests/test_data.py), on the same prepared data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from competesmoe.config import Config
from competesmoe.data.loader import TrainLoader
from competesmoe.data.prepare import prepare_data
from competesmoe.model.build import build_shard
from competesmoe.model.moe.routers import XMoERouter
from competesmoe.model.moe.schedule import build_schedule
from competesmoe.model.transformer import Transformer, lm_loss


def initial_model(cfg: Config) -> Transformer:
    """The model a run of `cfg` starts from, before any step. The one place tests say how the
    initial weights follow from a config: the whole model (every expert), each tensor drawn from
    the generator of (seed, its name[, expert id]) by the model's own init (model/init.py; the
    initial state, not what these tests hold the trainer to)."""
    torch.manual_seed(cfg.seed)
    return build_shard(cfg.model, cfg.seed)


def learning_rate(step: int, cfg: Config) -> float:
    tc = cfg.train
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    floor = tc.lr * tc.min_lr_ratio
    decay_steps = tc.steps - tc.warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - tc.warmup_steps) / decay_steps)
    return floor + 0.5 * (tc.lr - floor) * (1.0 + math.cos(math.pi * progress))


def decays(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether AdamW decays it: every parameter with two or more dimensions
    except embeddings; never a norm's weight or bias (one dimension)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embeddings |= {id(m.expert_embeddings) for m in model.modules() if isinstance(m, XMoERouter)}
    return {name: p.dim() >= 2 and id(p) not in embeddings for name, p in model.named_parameters()}


def adamw(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    tc = cfg.train
    decay = decays(model)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in params if decay[n]], "weight_decay": tc.weight_decay},
              {"params": [params[n] for n in params if not decay[n]], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr,
                             betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps)


def competition_table(cfg: Config, n_moe_layers: int) -> np.ndarray:
    """[MoE layer, step] -> whether that layer competes at that step: the seeded schedule table
    (competition.mode schedule), every layer (always) or none (never); only the competesmoe
    router competes."""
    c = cfg.model.moe.competition
    if cfg.model.moe.router != "competesmoe" or c.mode != "schedule":
        always = cfg.model.moe.router == "competesmoe" and c.mode == "always"
        return np.full((n_moe_layers, cfg.train.steps), always)
    return build_schedule(cfg.seed, n_moe_layers, cfg.train.steps, c.omega, c.a_max, c.warmup_fraction)


@dataclass
class ReferenceRun:
    model: Transformer
    loss: list[float] = field(default_factory=list)  # mean next-token loss of each step's batch
    aux_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)  # of the whole gradient, before clipping
    competing: list[int] = field(default_factory=list)  # competing MoE layers


def reference_training(*cfgs: Config, clip_norms: Optional[Sequence[float]] = None) -> ReferenceRun:
    """The optimizer steps of the run `cfgs[0]` describes, on one device in float32 (the
    trainer's CPU precision), each on the whole global batch. Further configs (of the same run,
    with a larger train.steps) continue it as a rerun with a larger train.steps does: the
    learning rate and the competition table are those of the config in force at each step.

    clip_norms: the global gradient norms the trainer logged, one per step. Given, the gradient
    is clipped with those instead of this reference's own norms (ReferenceRun.grad_norm, which
    the caller compares with them). A float32 norm summed in another order differs in its last
    bit, and top-K routing can grow such a bit: with every step clipped, 16 steps of sigmoid
    routing ended 7e-6 apart in the loss, of XMoE in 2 routing dimensions 1e-3. Clipping with the
    logged norm keeps the runs equal bit for bit, so tight tolerances stay robust.
    """
    cfg = cfgs[0]
    tc = cfg.train
    model = initial_model(cfg)
    model.train()
    optimizer = adamw(model, cfg)
    data = prepare_data(cfg.data, log=lambda *a, **k: None)
    loader = TrainLoader(data.train_tokens(), tc.seq_len, tc.global_batch, cfg.seed)
    n_moe = len(model.moe_layers)
    micro = tc.micro_batch or tc.global_batch
    n_micro = tc.global_batch // micro
    run = ReferenceRun(model)
    step = 0
    for phase in cfgs:
        table = competition_table(phase, n_moe)
        while step < phase.train.steps:
            lr = learning_rate(step, phase)
            for group in optimizer.param_groups:
                group["lr"] = lr
            compete = table[:, step].tolist()
            inputs, targets = loader.next_batch()
            task = aux = 0.0
            for i in range(n_micro):
                rows = slice(i * micro, (i + 1) * micro)
                out = model(inputs[rows], compete)
                loss = lm_loss(out.logits, targets[rows])
                ((loss + out.aux_loss) / n_micro).backward()
                task += loss.item() / n_micro
                aux += out.aux_loss.item() / n_micro
            params = [p for p in model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            if tc.grad_clip > 0:
                used = norm if clip_norms is None else torch.tensor(clip_norms[step], dtype=norm.dtype)
                torch.nn.utils.clip_grads_with_norm_(params, tc.grad_clip, used)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.loss.append(task)
            run.aux_loss.append(aux)
            run.lr.append(lr)
            run.grad_norm.append(norm.item())
            run.competing.append(sum(compete))
            step += 1
    return run
