"""Activation checkpointing and compiled blocks (parallel.activation_checkpoint, parallel.compile):
the same losses, statistics and gradients as the plain model, less kept for backward."""
import copy
import shutil

import pytest
import torch
from torch import nn

from competesmoe.config import load_config
from competesmoe.errors import ConfigError
from competesmoe.model.config import ROUTERS, ModelConfig, MoEConfig
from competesmoe.model.transformer import Transformer, lm_loss
from competesmoe.parallel.activation import checkpointed_modules
from competesmoe.parallel.config import ParallelConfig
from competesmoe.parallel.mesh import Mesh
from competesmoe.parallel.parallelize import parallelize

ONE_PROCESS = Mesh(world=1, rank=0, ep=1, device=torch.device("cpu"))
CHOICES = [("full", 1), ("ffn", 1), ("attn", 1), ("full", 2)]


def model_of(router: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=24, n_layers=3, n_heads=2, head_dim=10, rope_fraction=0.5,
                      moe=MoEConfig(router=router, num_experts=6, top_k=2, expert_hidden=8, activation="swiglu"))
    return Transformer(cfg).double().train()


def run(model: nn.Module, tokens, compete) -> tuple[torch.Tensor, dict, list]:
    """Loss, every parameter's gradient, and the MoE statistics of one forward and backward."""
    model.zero_grad(set_to_none=True)
    out = model(tokens[:, :-1], compete)
    loss = lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out.moe_stats


def saved_bytes(model: nn.Module, tokens, compete) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens[:, :-1], compete)
        lm_loss(out.logits, tokens[:, 1:]).backward()
    return total


def stat_values(stats) -> list:
    values = []
    for s in stats:
        values.append(s.competed)
        for key in sorted(vars(s)):
            v = getattr(s, key)
            if isinstance(v, torch.Tensor):
                values.append((key, v.detach().double().flatten().tolist()))
            elif isinstance(v, dict):
                values.append((key, {k: float(t) for k, t in v.items()}))
    return values


def assert_same_stats(stats, want, where: str) -> None:
    """The same statistics, each value to 1e-12 like the losses: a float64 reduction may round
    its last bit differently when its operands sit at another alignment (xmoe's balance loss
    did, by 1 ulp, depending on what had run before)."""
    got, expected = stat_values(stats), stat_values(want)
    assert len(got) == len(expected), where
    for g, e in zip(got, expected):
        if not isinstance(g, tuple):
            assert g == e, where
            continue
        assert g[0] == e[0], where
        a, b = (list(g[1].values()), list(e[1].values())) if isinstance(g[1], dict) else (g[1], e[1])
        assert (g[1].keys() == e[1].keys()) if isinstance(g[1], dict) else len(a) == len(b), (where, g[0])
        assert max((abs(x - y) for x, y in zip(a, b)), default=0.0) <= 1e-12, (where, g, e)


@pytest.mark.parametrize("router", ROUTERS)
def test_checkpointed_gradients_equal_the_plain_model_in_float64(router):
    plain = model_of(router)
    tokens = torch.randint(0, 50, (3, 17), generator=torch.Generator().manual_seed(1))
    n_moe = len(plain.moe_layers)
    competes = MoEConfig(router=router).has_competition
    flags = [[False] * n_moe] + ([[True, False, True][:n_moe], [True] * n_moe] if competes else [])
    for compete in flags:
        want_loss, want_grads, want_stats = run(plain, tokens, compete)
        for choice, every in CHOICES:
            model = parallelize(copy.deepcopy(plain), ONE_PROCESS,
                                ParallelConfig(activation_checkpoint=choice, activation_checkpoint_every=every))
            loss, grads, stats = run(model, tokens, compete)
            where = f"{router} {choice}/{every} compete={compete}"
            torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12, msg=where)
            assert grads.keys() == want_grads.keys(), where
            for name, g in grads.items():
                torch.testing.assert_close(g, want_grads[name], rtol=0, atol=1e-12, msg=f"{where}: {name}")
            assert_same_stats(stats, want_stats, where)


def test_checkpointing_keeps_less_for_backward_and_names_the_same_tensors():
    plain = model_of("competesmoe")
    tokens = torch.randint(0, 50, (4, 33), generator=torch.Generator().manual_seed(2))
    kept = {}
    for choice, every in [("none", 1), *CHOICES]:
        parallel = ParallelConfig(activation_checkpoint=choice, activation_checkpoint_every=every)
        model = parallelize(copy.deepcopy(plain), ONE_PROCESS, parallel)
        assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints and exports unchanged
        kept[choice, every] = saved_bytes(model, tokens, [False] * 3)
    none = kept["none", 1]
    assert kept["full", 1] < kept["full", 2] < none
    assert kept["full", 1] < kept["ffn", 1] < none and kept["full", 1] < kept["attn", 1] < none
    # every 2nd block of 3: blocks 0 and 2
    parallel = ParallelConfig(activation_checkpoint="ffn", activation_checkpoint_every=2)
    assert checkpointed_modules(plain, parallel) == [plain.blocks[0].ffn, plain.blocks[2].ffn]


def test_train_step_with_checkpointing_updates_the_same_weights():
    """The real step path (train_step, TorchEngine: two micro-batches, clipping, AdamW) on a
    competition step: the updated parameters and the step's statistics equal the plain model's."""
    from contextlib import nullcontext

    from competesmoe.train.config import TrainConfig
    from competesmoe.train.engine import TorchEngine
    from competesmoe.train.step import train_step

    plain = model_of("competesmoe")
    tokens = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(4))
    compete = [True, False, True]
    results = []
    for choice in ("none", "full", "ffn", "attn"):
        model = parallelize(copy.deepcopy(plain), ONE_PROCESS, ParallelConfig(activation_checkpoint=choice))
        out = train_step(model, TorchEngine(model, TrainConfig(), ONE_PROCESS), tokens[:, :-1], tokens[:, 1:],
                         compete, micro_batches=2, autocast=nullcontext)
        assert out.applied
        results.append((choice, out, {n: p.detach().clone() for n, p in model.named_parameters()}))
    _, want, want_params = results[0]
    assert any(not torch.equal(p, plain.get_parameter(n)) for n, p in want_params.items())  # the step moved weights
    for choice, out, params in results[1:]:
        torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=1e-12, msg=choice)
        torch.testing.assert_close(out.aux_loss, want.aux_loss, rtol=0, atol=1e-12, msg=choice)
        assert abs(out.grad_norm - want.grad_norm) <= 1e-12, choice
        for got, expected in zip(out.moe_stats, want.moe_stats, strict=True):
            assert_same_stats(got, expected, choice)
        for name, p in params.items():
            torch.testing.assert_close(p, want_params[name], rtol=0, atol=1e-12, msg=f"{choice}: {name}")


@pytest.mark.parametrize("key, value, message", [
    ("parallel.activation_checkpoint", "some", "parallel.activation_checkpoint must be one of none, full, ffn, attn"),
    ("parallel.activation_checkpoint_every", "0", "parallel.activation_checkpoint_every must be >= 1"),
])
def test_bad_values_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/smoke.yaml", [f"{key}={value}"])


def inductor_usable() -> bool:
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.slow
@pytest.mark.parametrize("backend, checkpointing", [("aot_eager", "none"), ("aot_eager", "ffn"), ("inductor", "none")])
def test_compiled_blocks_equal_eager(backend, checkpointing):
    """Normal and competition steps through compiled blocks (without and with checkpointing) match
    eager in fp32; `aot_eager` checks the captured graphs, `inductor` the generated code. Without
    checkpointing dynamo traces into the MoE layer itself (the fp32 grouped_mm must run eagerly)."""
    if backend == "inductor" and not inductor_usable():
        pytest.skip("inductor needs a C++ compiler on the CPU, and none is installed")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    plain = model_of("competesmoe").float()
    tokens = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(3))
    compiled = parallelize(copy.deepcopy(plain), ONE_PROCESS, ParallelConfig(activation_checkpoint=checkpointing))
    for block in compiled.blocks:
        block.compile(backend=backend)
    for compete in ([False, False, False], [True, False, True]):
        want_loss, want_grads, want_stats = run(plain, tokens, compete)
        loss, grads, stats = run(compiled, tokens, compete)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
        assert [s.competed for s in stats] == compete
    assert counters["stats"]["unique_graphs"] > 0  # dynamo captured graphs (not only fell back to eager)


def test_parallel_compile_compiles_every_block():
    model = parallelize(model_of("smoe"), ONE_PROCESS, ParallelConfig(compile=True))
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert list(model.state_dict()) == list(model_of("smoe").state_dict())
