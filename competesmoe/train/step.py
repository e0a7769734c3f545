"""One optimizer step: forward and backward over the micro-batches, then the update."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from competesmoe.model.moe.layer import MoEStats
from competesmoe.model.transformer import Transformer, lm_loss
from competesmoe.parallel.mesh import Mesh
from competesmoe.train.engine import Engine


@dataclass
class StepOutput:
    loss: Tensor  # this rank's task loss, mean over the step's micro-batches (on the device)
    aux_loss: Tensor  # the MoE layers' weighted auxiliary losses, likewise
    grad_norm: float  # global gradient norm before clipping (nan when not finite)
    applied: bool  # False when the update was skipped for a non-finite loss or gradient
    moe_stats: list[list[MoEStats]]  # per micro-batch, one entry per MoE layer


def train_step(model: Transformer, engine: Engine, inputs: Tensor, targets: Tensor, compete: Sequence[bool],
               micro_batches: int, autocast: Callable[[], ContextManager]) -> StepOutput:
    """`inputs`/`targets` are this rank's share of the global batch; `compete` says which MoE
    layers compete (the same for every micro-batch and rank)."""
    loss = torch.zeros((), device=inputs.device)
    aux = torch.zeros((), device=inputs.device)
    stats = []
    for x, y in zip(inputs.chunk(micro_batches), targets.chunk(micro_batches)):
        with autocast():
            out = model(x, compete)
            micro_loss = lm_loss(out.logits, y)
        engine.backward((micro_loss + out.aux_loss) / micro_batches)
        loss += micro_loss.detach() / micro_batches
        aux += out.aux_loss.detach() / micro_batches
        stats.append(out.moe_stats)
    outcome = engine.step(loss + aux)
    return StepOutput(loss, aux, outcome.grad_norm, outcome.applied, stats)


def reduced_agreement(out: StepOutput, compete: Sequence[bool], mesh: Mesh) -> list[Optional[float]]:
    """Each competing layer's router/competition agreement in this step, averaged over the
    micro-batches and all ranks (equal token counts), so that every rank holds the same values;
    None for the layers that did not compete. A collective when some layer competed (every rank
    has the same `compete`)."""
    if not any(compete):
        return [None] * len(compete)
    sums = torch.zeros(len(compete), dtype=torch.float64, device=mesh.device)
    for micro in out.moe_stats:
        for i, stats in enumerate(micro):
            if stats.competed:
                sums[i] += stats.agreement.double()
    sums /= len(out.moe_stats)
    if mesh.distributed:
        dist.all_reduce(sums)
        sums /= mesh.world
    return [v if c else None for v, c in zip(sums.tolist(), compete)]
