"""DeepSpeed ZeRO stage 1/2 behind the engine interface of train/engine.py.

ZeRO partitions the optimizer state (and at stage 2 the gradients) over the data-parallel
ranks. Expert parameters go into MoE parameter groups named after DeepSpeed's expert-parallel
groups, so their gradients are reduced over the expert-data-parallel group only and their
optimizer state is partitioned over it; dense parameters are reduced over every rank. With
DeepSpeed's default averaging (divide by the world, then sum over the group), both give the
gradient of the mean loss over the global batch, as on one device.

DeepSpeed's engine recognises MoE models by `isinstance(module, deepspeed.moe.layer.MoE)`; while
the engine is built, our MoELayer is added to that check. Its gradient norm sums every
partition's squared norm over all ranks, which covers every expert shard once, so clipping uses
the norm of the whole model's gradient, as on one device. Both rely on DeepSpeed internals of the
pinned version (0.19.8); tests/test_parallel.py checks training against a single-process run.

A step whose reduced gradient is not finite is skipped by DeepSpeed itself (its overflow check,
on for fp32 and, with check_grad_overflow, for bf16); a non-finite loss makes the gradient
non-finite through the backward, so the same check covers it. `step` reports the outcome.

ZeRO-3 is refused: DeepSpeed does not support MoE parameter groups at stage 3.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from competesmoe.config import Config
from competesmoe.model.moe.layer import MoELayer
from competesmoe.parallel.mesh import Mesh
from competesmoe.train.engine import StepOutcome, all_finite
from competesmoe.train.optim import is_expert_param, param_groups


@contextlib.contextmanager
def _our_moe_layers_count_as_moe():
    import deepspeed.runtime.engine as ds_engine

    original = ds_engine.MoE
    ds_engine.MoE = (original, MoELayer)
    try:
        yield
    finally:
        ds_engine.MoE = original


class DeepSpeedEngine:
    def __init__(self, model: nn.Module, cfg: Config, mesh: Mesh, micro_batches: int):
        import deepspeed
        from deepspeed.utils import groups

        tc = cfg.train
        self.mesh = mesh
        deepspeed.init_distributed(dist_backend="nccl" if mesh.device.type == "cuda" else "gloo")
        group_name = f"ep_size_{mesh.ep}"
        if group_name not in groups._get_expert_data_parallel_group_dict():
            groups._create_expert_and_data_parallel(mesh.ep)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for name, p in self.named:
            if is_expert_param(name):
                p.allreduce = False
                p.group_name = group_name
        groups_ = param_groups(model, tc.weight_decay)
        for g in groups_:
            if g["moe"]:
                g["name"] = group_name
        optimizer = torch.optim.AdamW(groups_, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps)
        precision = tc.precision if tc.precision != "auto" else ("bf16" if mesh.device.type == "cuda" else "fp32")
        per_rank = tc.global_batch // mesh.world
        ds_config = {
            "train_batch_size": tc.global_batch,
            "train_micro_batch_size_per_gpu": per_rank // micro_batches,
            "gradient_accumulation_steps": micro_batches,
            "gradient_clipping": tc.grad_clip,
            "zero_optimization": {"stage": cfg.parallel.zero_stage, "overlap_comm": False},
            "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        with _our_moe_layers_count_as_moe():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                     config=ds_config)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divides the loss by the number of micro-batches.
        self.engine.backward(loss, scale_wrt_gas=False)
        # DeepSpeed counts micro-batches in its step() and updates only at the accumulation
        # boundary; before the boundary the call only advances that count.
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self, loss: torch.Tensor) -> StepOutcome:
        self.engine.step()
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        value = float(norm) if norm is not None else math.nan
        # The loss is checked too, for the report: a non-finite loss whose gradient stayed finite
        # (not seen in practice) was applied by DeepSpeed, and is reported as not applied so that
        # the run's non-finite policy sees it.
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.mesh.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        applied = applied and bad.item() == 0.0
        return StepOutcome(value if math.isfinite(value) else math.nan, applied)

    def params_finite(self) -> bool:
        return all_finite([p for _, p in self.named], self.mesh)

    # -- state, by parameter name (collective: every rank calls these in the same order) --------
    def param_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each parameter's full fp32 master copy, gathered from the ZeRO partitions one at a time."""
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in self.named:
            yield name, safe_get_full_fp32_param(p)

    def state_tensors(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Each parameter's full Adam moments, gathered one parameter at a time."""
        from deepspeed.utils import safe_get_full_optimizer_state

        if not self._optimizer_states_exist():
            return
        self._link_optimizer_state()
        for name, p in self.named:
            yield name, {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}

    def scalar_state(self) -> dict:
        steps = [float(s["step"]) for s in self.optimizer.optimizer.state.values() if "step" in s]
        return {"adam_step": max(steps) if steps else 0.0}

    def _link_optimizer_state(self) -> None:
        """(Re)link each parameter's view of the flat optimizer state. DeepSpeed links them once,
        after the step of its first parameter group, when the other groups' state does not exist
        yet; linking again once all exist repairs that."""
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()

    def _optimizer_states_exist(self) -> bool:
        return all(flat in self.optimizer.optimizer.state for flat in self.optimizer.single_partition_of_fp32_groups)

    def load_state(self, params: Mapping[str, torch.Tensor], states: Mapping[str, dict[str, torch.Tensor]],
                   scalars: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        with torch.no_grad():
            for name, p in self.named:
                p.copy_(params[name].to(p.dtype))
                safe_set_full_fp32_param(p, params[name].to(p.device, torch.float32))
        if not states:
            return
        zero = self.optimizer
        for flat in zero.single_partition_of_fp32_groups:
            zero.optimizer.state[flat] = {"step": torch.tensor(scalars["adam_step"], dtype=torch.float32),
                                          "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        self._link_optimizer_state()
        for name, p in self.named:
            for key, value in states[name].items():
                safe_set_full_optimizer_state(p, value.to(p.device, torch.float32), key)
