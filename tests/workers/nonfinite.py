"""Run under torchrun with 2 processes: a non-finite loss or gradient on ONE rank makes every rank
skip the update, for the engine of the given ZeRO stage (0 = ours, 1/2 = DeepSpeed).

usage: torchrun --standalone --nproc_per_node 2 tests/workers/nonfinite.py ZERO_STAGE
Prints one `ok ...` line per case; exits non-zero on the first failure.
"""
import math
import sys

import torch
import torch.distributed as dist

from competesmoe.config import load_config
from competesmoe.model.transformer import Transformer, lm_loss
from competesmoe.parallel.mesh import init_mesh
from competesmoe.parallel.parallelize import parallelize
from competesmoe.train.engine import build_engine

zero = int(sys.argv[1])
cfg = load_config(None, ["model.vocab_size=64", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                         "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=8",
                         "train.global_batch=4", "train.seq_len=8", "train.lr=0.01", "parallel.ep=2",
                         f"parallel.zero_stage={zero}"])
mesh = init_mesh(cfg.parallel.ep, cfg.model.moe.num_experts, "cpu")
torch.manual_seed(0)
model = parallelize(Transformer(cfg.model), mesh)
engine = build_engine(model, cfg, mesh, 1)
engine.set_lr(cfg.train.lr)
torch.manual_seed(1 + mesh.rank)
tokens = torch.randint(0, 64, (2, 9))


def params():
    return [p.detach().clone() for p in model.parameters()]


def step(poison_grad_on: int, poison_loss_on: int):
    out = model(tokens[:, :-1])
    loss = lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss
    if mesh.rank == poison_grad_on:
        loss = loss * math.nan
    engine.backward(loss)
    reported = loss.detach() * (math.nan if mesh.rank == poison_loss_on else 1.0)
    return engine.step(reported)


def check(name: str, poison_grad_on: int, poison_loss_on: int, expect_applied: bool):
    before = params()
    outcome = step(poison_grad_on, poison_loss_on)
    after = params()
    changed = any(not torch.equal(a, b) for a, b in zip(before, after))
    assert outcome.applied == expect_applied, (name, mesh.rank, outcome)
    assert changed == expect_applied, (name, mesh.rank, "parameters changed" if changed else "unchanged")
    assert math.isfinite(outcome.grad_norm) == (poison_grad_on < 0), (name, outcome)
    if mesh.is_main:
        print(f"ok zero={zero} {name}: applied={outcome.applied} grad_norm={outcome.grad_norm}", flush=True)


check("clean step", -1, -1, True)
check("NaN gradient on rank 1 only", 1, -1, False)
check("clean step after a skip", -1, -1, True)
if zero == 0:
    # DeepSpeed decides from its reduced gradient (a NaN loss reaches it through the backward);
    # our engine also takes the reported loss into its one collective.
    check("NaN loss on rank 1 only, finite gradient", -1, 1, False)
assert engine.params_finite()
dist.destroy_process_group()
